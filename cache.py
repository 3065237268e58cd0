"""Static, preallocated KV caches whose policies rewrite slots in place.

A layer's cache holds `kv_budget` slots per KV head: K/V [B, Hkv, C, D] (in a KVStore, full precision or
quantized) and pos [B, Hkv, C] (the original position in each slot, -1 = empty). Each decode step writes
exactly one slot per (sequence, KV head), chosen by the policy, so shapes never change and the decode step
compiles once.

The model talks to a cache through four calls, the same for every policy, batch and storage mode:
  set_rope(cos, sin)                    once, the model's RoPE tables
  set_tokens(idx, prefill, row)         before each forward: the token ids (only token-class policies use them)
  prefill(input_pos, k, v, q, row)      the prompt's un-rotated q, k and v; the cache keeps what its policy keeps
  decode(input_pos, k, v, q) -> y       T >= 1 new tokens: insert each (evicting per the policy) and attend
The cache applies RoPE itself (at absolute positions, or by rank in position_mode "cache"), so the model never
asks which mode a cache is in. A cache used without a model (no tables) takes q and k as already positioned.

A policy is a small subclass of KVCache: it declares its hyper-parameters (`hyperparams`: Param declarations,
which become --flags, YAML keys and constructor arguments, validated in one place) and how it scores slots
(`score`, low = evicted first). The base class does the bookkeeping: sinks (positions < global_tokens) and the
recent window (positions >= t - recent_window) are protected, empty slots fill first, ties go to the lowest
slot index, prompts longer than the budget are compressed (`prompt_keep`; the base writes the kept slots,
positions and the debug shadow once), and statistics are kept. Semantics: docs/algorithms.md; the step-by-step
references: tests/reference_policies.py. The registry of policies and the command-line set-up: policies.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import apply_rope, attention


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameter declarations
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One hyper-parameter: type, default and help (the --flag, the YAML key and the constructor argument all come
    from it) and its valid values, checked in one place (`problem`)."""
    type: type
    default: object
    help: str
    choices: tuple = ()
    min: float = None  # inclusive
    max: float = None  # inclusive
    above: float = None  # exclusive lower bound

    def problem(self, value):
        """Why `value` is not allowed (a phrase such as 'must be >= 1, got 0'), or None when it is."""
        if value is None:
            return None if self.default is None else "must be given"
        if self.type is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {value!r}"
            if not math.isfinite(value):
                return f"must be a finite number, got {value}"
            if self.type is int and value != int(value):
                return f"must be an integer, got {value}"
            if self.min is not None and self.max is not None and not self.min <= value <= self.max:
                return f"must be in {self.min:g}..{self.max:g}, got {value}"
            if self.min is not None and value < self.min:
                return f"must be >= {self.min:g}, got {value}"
            if self.max is not None and value > self.max:
                return f"must be <= {self.max:g}, got {value}"
            if self.above is not None and not value > self.above:
                return f"must be > {self.above:g}, got {value}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        return None

    def check(self, name: str, value):
        """value, or a ValueError naming the flag."""
        why = self.problem(value)
        if why:
            raise ValueError(f"--{name} {why}")
        return self.type(value) if value is not None and self.type in (int, float) else value


def check_params(params: dict, values: dict, owner: str = "") -> dict:
    """Every declared hyper-parameter, from values or its default, validated."""
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"{owner or 'the cache'} got unknown hyper-parameters {unknown}")
    return {name: p.check(name, values.get(name, p.default)) for name, p in params.items()}


PROMPT_COMPRESSORS = ("recent_global", "random", "l2", "heavy_hitter", "keep_it_odd")

# The engine's own knobs, shared by every policy (constructor arguments of KVCache, flags of policies.py).
CACHE_PARAMS = {
    "global_tokens": Param(int, 4, "sink tokens (the first positions) never evicted", min=0),
    "recent_window": Param(int, 10, "most recent tokens never evicted", min=0),
    "prompt_compression_strategy": Param(str, None, "for prompts longer than the budget: "
                                          f"{', '.join(PROMPT_COMPRESSORS)} (default: the policy's own)",
                               choices=PROMPT_COMPRESSORS),
    "observation_window": Param(int, 16, "SnapKV prompt compression: the last prompt queries scored", min=1),
    "pooling_kernel": Param(int, 5, "SnapKV prompt compression: 1-D pooling kernel over the scores (odd)", min=1),
    "position_mode": Param(str, None, "RoPE positions of cached keys: absolute, or cache (rank in the cache, "
                                      "StreamingLLM's position shift); default: the policy's own",
                           choices=("absolute", "cache")),
    "cache_bits": Param(int, None, "store K/V quantized (per token and group, min-max) with every policy",
                        choices=(2, 4, 8)),
    "cache_group_size": Param(int, None, "channels sharing one scale with --cache_bits (default: head_dim)", min=1),
    "debug_attention_loss": Param(bool, False, "keep a shadow full cache and report the attention mass evicted "
                                               "tokens would get"),
}


# ---------------------------------------------------------------------------------------------------------------
# Storage: full precision or quantized, behind one interface
# ---------------------------------------------------------------------------------------------------------------
class KVStore(nn.Module):
    """K/V slots in full precision: k, v [B, Hkv, C, D]."""

    def __init__(self, shape: tuple, dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def write(self, index: Tensor, k: Tensor, v: Tensor):
        """Store k, v [B, Hkv, n, D] into the slots index [B, Hkv, n]."""
        idx = index.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))

    def keys(self) -> Tensor:
        return self.k

    def values(self) -> Tensor:
        return self.v

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, need_probs: bool):
        return attention(q, k, v, mask, need_probs=need_probs)


class QuantizedKVStore(nn.Module):
    """K/V slots quantized per token and group of channels (KVQuantizer); keys() and values() dequantize
    elementwise, so under torch.compile they fuse into the attention reductions reading them."""

    def __init__(self, shape: tuple, dtype, bits: int, group_size: int):
        super().__init__()
        head_dim = shape[-1]
        self.quant = KVQuantizer(bits, group_size or head_dim, head_dim)
        self.dtype = dtype
        for name in ("k", "v"):  # codes packed in bytes, one scale and zero per token and group
            self.register_buffer(f"{name}_codes", torch.zeros(*shape[:3], self.quant.code_bytes, dtype=torch.uint8),
                                 persistent=False)
            self.register_buffer(f"{name}_scale", torch.zeros(*shape[:3], self.quant.n_groups, dtype=dtype),
                                 persistent=False)
            self.register_buffer(f"{name}_zero", torch.zeros(*shape[:3], self.quant.n_groups, dtype=dtype),
                                 persistent=False)

    def write(self, index: Tensor, k: Tensor, v: Tensor):
        for name, x in (("k", k), ("v", v)):
            for part, t in zip(("codes", "scale", "zero"), self.quant.quantize(x)):
                buf = getattr(self, f"{name}_{part}")
                buf.scatter_(2, index.unsqueeze(-1).expand(-1, -1, -1, buf.shape[-1]), t.to(buf.dtype))

    def keys(self) -> Tensor:
        return self.quant.dequantize(self.k_codes, self.k_scale, self.k_zero).to(self.dtype)

    def values(self) -> Tensor:
        return self.quant.dequantize(self.v_codes, self.v_scale, self.v_zero).to(self.dtype)

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, need_probs: bool):
        return fused_attention(q, k.to(q.dtype), v.to(q.dtype), mask, need_probs)


class KVQuantizer:
    """Asymmetric min-max quantization of K/V per token and group of channels, codes packed into bytes."""

    def __init__(self, bits: int, group_size: int, head_dim: int):
        if bits not in (2, 4, 8):
            raise ValueError(f"--cache_bits must be 2, 4 or 8, got {bits}")
        if group_size < 1 or head_dim % group_size:
            raise ValueError(f"--cache_group_size {group_size} must divide head_dim {head_dim}")
        self.bits, self.group_size, self.head_dim = bits, group_size, head_dim
        self.per_byte = 8 // bits
        self.code_bytes, self.n_groups = head_dim // self.per_byte, head_dim // group_size
        self.levels = 2 ** bits - 1

    def quantize(self, x: Tensor):
        """x [..., D] -> codes [..., D * bits / 8] uint8, scale and zero [..., D / group_size]."""
        xg = x.float().unflatten(-1, (self.n_groups, self.group_size))
        lo, hi = xg.amin(-1), xg.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / self.levels
        codes = ((xg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, self.levels).to(torch.uint8)
        codes = codes.flatten(-2).unflatten(-1, (self.code_bytes, self.per_byte))
        shifts = torch.arange(0, 8, self.bits, device=x.device, dtype=torch.uint8)
        packed = (codes << shifts).sum(-1, dtype=torch.uint8) if self.per_byte > 1 else codes[..., 0]
        return packed, scale, lo

    def dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Elementwise, so that under torch.compile it fuses into the attention reductions reading it."""
        if self.per_byte > 1:
            shifts = torch.arange(0, 8, self.bits, device=codes.device, dtype=torch.uint8)
            codes = ((codes.unsqueeze(-1) >> shifts) & self.levels).flatten(-2)
        x = codes.float().unflatten(-1, (self.n_groups, self.group_size))
        return (x * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, need_probs: bool):
    """Decode attention written as multiply-and-reduce, so a dequantizing producer of k and v is fused into
    the two reductions (no full-precision copy of the cache is written). q [B, H, 1, D]; k, v [B, Hkv, C, D]."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qf = q.float().reshape(B, Hkv, H // Hkv, 1, D)
    scores = (qf * k.float().unsqueeze(2)).sum(-1) / math.sqrt(D)  # [B, Hkv, G, C]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    y = (probs.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # [B, Hkv, G, D]
    return y.reshape(B, H, 1, D).to(q.dtype), (probs.unsqueeze(3) if need_probs else None)


class AttentionLossMeter(nn.Module):
    """--debug_attention_loss: a shadow full cache of the keys (rotated at their absolute positions), to measure
    the attention mass full attention would put on tokens the cache no longer holds. Every policy gets it from
    the base class; its memory is not counted as the cache's."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_length: int, head_dim: int, dtype):
        super().__init__()
        self.register_buffer("shadow_k", torch.zeros(batch_size, n_kv_heads, max_seq_length, head_dim, dtype=dtype),
                             persistent=False)
        # shape (1,): a compiled in-place add into a 0-dim float64 buffer was silently dropped (torch 2.13)
        self.register_buffer("lost_mass", torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer("lost_steps", torch.zeros((), dtype=torch.long), persistent=False)

    def prefill(self, k: Tensor):
        self.shadow_k[:, :, :k.shape[2]] = k

    def observe(self, input_pos: Tensor, k: Tensor, q: Tensor, pos: Tensor):
        """One decode token (k [B, Hkv, 1, D], q [B, H, 1, D], rotated) against the cache's positions pos."""
        self.shadow_k.index_copy_(2, input_pos, k)
        B, H, _, D = q.shape
        Hkv = self.shadow_k.shape[1]
        qf = q.float().reshape(B, Hkv, H // Hkv, D)
        scores = qf @ self.shadow_k.float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, S]
        S = scores.shape[-1]
        visible = torch.arange(S, device=q.device) <= input_pos
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        held = torch.zeros(B, Hkv, S + 1, device=q.device).scatter_(2, pos.clamp(min=-1) + 1, 1.0)[..., 1:]
        self.lost_mass.add_((probs * (1 - held).unsqueeze(2)).sum(-1).mean().double())
        self.lost_steps.add_(1)

    def value(self) -> float:
        return float(self.lost_mass / self.lost_steps.clamp(min=1))


# ---------------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    hyperparams = {}  # name -> Param: the policy's own knobs
    needs_attention = False  # True: each decode step's attention probabilities go to record_attention
    needs_tokens = False  # True: set_tokens gets the token ids (policies.setup installs token tables)
    default_prompt_compressor = "recent_global"
    default_position_mode = "absolute"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, kv_budget: int, dtype, *,
                 max_seq_length: int = None, layer_idx: int = 0, n_layers: int = 1, **kw):
        super().__init__()
        engine = {name: kw.pop(name) for name in list(kw) if name in CACHE_PARAMS}
        engine = check_params(CACHE_PARAMS, engine)
        for name, value in check_params(self.hyperparams, kw, type(self).__name__).items():
            setattr(self, name, value)
        self.global_tokens, self.recent_window = engine["global_tokens"], engine["recent_window"]
        self.observation_window, self.pooling_kernel = engine["observation_window"], engine["pooling_kernel"]
        self.prompt_compressor = engine["prompt_compression_strategy"] or self.default_prompt_compressor
        self.position_mode = engine["position_mode"] or self.default_position_mode
        self.rotates_keys = self.position_mode == "cache"  # keys stored un-rotated, rotated by rank at each step
        self.cache_bits, self.debug_attention_loss = engine["cache_bits"], engine["debug_attention_loss"]
        self.rope_cos = self.rope_sin = None  # RoPE tables, from set_rope (the model's)
        self.kv_budget = kv_budget
        self.max_seq_length = max_seq_length or kv_budget  # longest sequence the run may reach
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.kv_dtype, self.head_dim = dtype, head_dim
        shape = (batch_size, n_kv_heads, kv_budget, head_dim)
        self.store = KVStore(shape, dtype) if not self.cache_bits else \
            QuantizedKVStore(shape, dtype, self.cache_bits, engine["cache_group_size"])
        self.register_buffer("pos", torch.full(shape[:3], -1, dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.loss_meter = AttentionLossMeter(batch_size, n_kv_heads, self.max_seq_length, head_dim, dtype) \
            if self.debug_attention_loss else None

    def policy_buffers(self):
        """Names of per-slot policy state (scores, hashes) that is reset with the cache."""
        return []

    def reset(self):
        for buf in self.store.buffers():
            buf.zero_()
        self.pos.fill_(-1)
        self.seen.zero_()
        for name in self.policy_buffers():
            getattr(self, name).zero_()
        if self.loss_meter is not None:
            for buf in self.loss_meter.buffers():
                buf.zero_()

    # -- the model's interface -------------------------------------------------------------------------------
    def set_rope(self, cos: Tensor, sin: Tensor):
        self.rope_cos, self.rope_sin = cos, sin

    def set_tokens(self, idx: Tensor, prefill: bool, row: int = None):
        """idx [B, T]: the token ids of this forward (used by policies with needs_tokens)."""

    def select_token(self, t: int):
        """A multi-token decode step is about to insert its t-th token (policies with needs_tokens)."""

    def sequences(self) -> list:
        """The single-sequence caches behind this one (itself; a SequenceBatch has one per sequence)."""
        return [self]

    def rope(self, x: Tensor, input_pos: Tensor) -> Tensor:
        """x [B, H, T, D] rotated at positions input_pos [T]; unchanged without tables (already positioned)."""
        if self.rope_cos is None:
            return x
        return apply_rope(x, self.rope_cos[input_pos], self.rope_sin[input_pos])

    # -- prefill -------------------------------------------------------------------------------------------
    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor, row: int = None):
        """Store the prompt: un-rotated k, v [B, Hkv, T, D] and q [B, H, T, D] at positions input_pos = 0..T-1.
        row: which sequence of a batch of caches (a single cache holds one; None or 0)."""
        if row not in (None, 0):
            raise ValueError(f"a single cache has no sequence {row}")
        T = k.shape[2]
        k_rot, q_rot = self.rope(k, input_pos), self.rope(q, input_pos)
        keep = self.prompt_keep(k_rot, q_rot)
        self.write_prompt(input_pos, k if self.rotates_keys else k_rot, v, keep)
        self.seen.fill_(T)
        if self.loss_meter is not None:
            self.loss_meter.prefill(k_rot)
        self.after_prefill(k_rot, q_rot, keep)

    def prompt_keep(self, k: Tensor, q: Tensor):
        """The prompt positions to keep: None (all of them, T <= budget) or [B, Hkv, n <= C] increasing.
        k, q rotated at their positions. Policies with their own prompt rule override this."""
        return None if k.shape[2] <= self.kv_budget else self.compress_prompt(k, q)

    def write_prompt(self, input_pos: Tensor, k: Tensor, v: Tensor, keep):
        """Writes the kept prompt tokens (k in its stored form) into slots 0..n-1, in position order."""
        B, Hkv, T, D = k.shape
        if keep is None:
            self.store.write(torch.arange(T, device=k.device).expand(B, Hkv, T), k, v)
            self.pos[:, :, :T] = input_pos
            self.pos[:, :, T:] = -1
            return
        n = keep.shape[-1]
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, D)
        self.store.write(torch.arange(n, device=k.device).expand_as(keep), k.gather(2, idx), v.gather(2, idx))
        self.pos[:, :, :n] = keep
        self.pos[:, :, n:] = -1

    def after_prefill(self, k: Tensor, q: Tensor, keep):
        """Seed per-slot state from the prompt (k, q rotated; keep: the kept positions, or None when all were)."""

    def compress_prompt(self, k: Tensor, q: Tensor) -> Tensor:
        """Pick kv_budget prompt positions per KV head: protected ones first, then the highest scores."""
        B, Hkv, T, _ = k.shape
        C, G = self.kv_budget, self.global_tokens
        name = self.prompt_compressor
        positions = torch.arange(T, device=k.device).expand(B, Hkv, T)
        recent = self.recent_window
        if name == "recent_global":
            score, recent = positions.float(), C - G
        elif name == "random":
            score = hash_uniform(positions, 0, self.layer_idx)  # the same draw alone or batched
        elif name == "l2":
            score = -k.float().norm(dim=-1)  # keep the low-norm keys
        elif name == "keep_it_odd":
            score = (positions % 2 == 1).float() * T + positions  # odd positions first, newest first
        elif name == "heavy_hitter":
            score, recent = snapkv_scores(q, k, self.observation_window, self.pooling_kernel), self.observation_window
        else:
            raise ValueError(f"unknown prompt compressor {name!r}")
        protected = (positions < G) | (positions >= T - recent)
        if int(protected[0, 0].sum()) > C:
            raise ValueError(f"prompt compressor {name!r} must keep {int(protected[0, 0].sum())} tokens "
                             f"(sinks + window) but the budget is {C} slots; lower --observation_window")
        score = score.masked_fill(protected, float("inf"))
        # Ties go to the lower position: a tiny position penalty keeps topk deterministic.
        keep = torch.topk(score.double() - positions * 1e-9, C, dim=-1).indices
        return keep.sort(dim=-1).values

    # -- decode --------------------------------------------------------------------------------------------
    def decode(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """T >= 1 new tokens (un-rotated k, v [B, Hkv, T, D], q [B, H, T, D] at positions input_pos [T]). T > 1
        (speculative verification) inserts and attends token by token, so the cache passes through the same
        states as in T single steps."""
        ys = []
        for t in range(k.shape[2]):
            self.select_token(t)
            ys.append(self.decode_token(input_pos[..., t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                        q[:, :, t:t + 1]))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)

    def decode_token(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """One token through the cache: insert it (evicting per the policy), attend, record attention."""
        q_att, k_all, v_all, mask = self.update(input_pos, k, v, q)
        y, probs = self.attend(q_att, k_all, v_all, mask)
        if probs is not None:
            self.record_attention(probs)
        return y

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor):
        """Decode attention over the cache; returns y and (when needs_attention) the probabilities."""
        return self.store.attend(q, k, v, mask, self.needs_attention)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        """Insert one token (un-rotated k, v [B, Hkv, 1, D], q [B, H, 1, D] at position input_pos [1]).

        Returns q, k, v, mask for attention (q and k rotated by rank in position_mode "cache")."""
        k_rot, q_rot = self.rope(k, input_pos), self.rope(q, input_pos)
        k_in, q_in = (k, q) if self.rotates_keys else (k_rot, q_rot)
        slot = self.choose_slot(input_pos, k_in, q_in)  # [B, Hkv]
        self.store.write(slot[:, :, None], k_in, v)
        self.pos.scatter_(2, slot[:, :, None], input_pos.view(-1, 1, 1).expand(slot.shape[0], slot.shape[1], 1))
        self.seen.add_(1)
        self.after_insert(slot, input_pos, k_in, q_in)
        if self.loss_meter is not None:
            self.loss_meter.observe(input_pos, k_rot, q_rot, self.pos)
        mask = self.attention_mask(input_pos)
        keys, values = self.store.keys(), self.store.values()
        if self.rotates_keys:
            q_in, keys = self.rotate_by_rank(q_in, keys)
        return q_in, keys, values, mask

    def attention_mask(self, input_pos: Tensor) -> Tensor:
        """[B, Hkv, 1, C]: the slots the new token attends to (every occupied one)."""
        return (self.pos >= 0).unsqueeze(2)

    def rotate_by_rank(self, q: Tensor, k: Tensor):
        """StreamingLLM's position shift: each key is rotated at its rank among the cached positions and the
        query at the rank of the newest token, so positions never exceed the cache length."""
        B, Hkv, C = self.pos.shape
        occupied = self.pos >= 0
        order = self.pos.masked_fill(~occupied, torch.iinfo(torch.long).max).argsort(dim=-1)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(C, device=order.device).expand(B, Hkv, C))
        k = apply_rope(k, self.rope_cos[rank], self.rope_sin[rank])
        q_rank = (occupied.sum(-1) - 1).repeat_interleave(q.shape[1] // Hkv, dim=1)  # [B, H]
        q = apply_rope(q, self.rope_cos[q_rank].unsqueeze(2), self.rope_sin[q_rank].unsqueeze(2))
        return q, k

    def choose_slot(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        score = self.score(input_pos, k, q).float()
        pos = self.pos
        protected = (pos < self.global_tokens) | (pos >= input_pos.view(-1, 1, 1) - self.recent_window)
        score = score.masked_fill(protected, float("inf")).masked_fill(pos < 0, float("-inf"))
        return score.argmin(dim=-1)  # the first minimum: empty slots in order, then the lowest slot on ties

    def score(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        raise NotImplementedError

    def after_insert(self, slot: Tensor, input_pos: Tensor, k: Tensor, q: Tensor):
        """Per-slot state (scores, hashes) of the new token."""

    def record_attention(self, probs: Tensor):
        """probs [B, Hkv, G, 1, C]: this step's attention (policies with needs_attention)."""

    # -- storage and statistics ----------------------------------------------------------------------------
    def keys(self) -> Tensor:
        """The cached keys in full precision (dequantized when stored quantized), in their stored form."""
        return self.store.keys()

    def values(self) -> Tensor:
        return self.store.values()

    def nbytes(self) -> int:
        """Bytes this cache really holds: K/V, positions and per-slot policy state (not the debug shadow)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                   if not n.startswith("loss_meter."))

    def kept(self) -> int:
        return int((self.pos >= 0).sum())


def snapkv_scores(q: Tensor, k: Tensor, window: int, kernel: int) -> Tensor:
    """SnapKV: attention of the last `window` prompt queries to each key (mean over window and GQA group),
    smoothed by 1-D average pooling. q [B, H, T, D], k [B, Hkv, T, D] -> [B, Hkv, T]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    w = min(window, T)
    qw = q[:, :, T - w:].float().reshape(B, Hkv, H // Hkv * w, D)
    scores = qw @ k.float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G*w, T]
    rows = torch.arange(T - w, T, device=q.device).repeat(H // Hkv)
    causal = torch.arange(T, device=q.device)[None, :] <= rows[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(2)  # [B, Hkv, T]
    return F.avg_pool1d(probs, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def prompt_attention_columns(q: Tensor, k: Tensor, chunk: int = 256):
    """Per key j of the prompt, the causal attention it gets from each later query, mean over the GQA group,
    streamed in query chunks. Yields (first query index, probs [B, Hkv, c, T])."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf = k.float().transpose(-1, -2)
    for s in range(0, T, chunk):
        qc = q[:, :, s:s + chunk].float()
        c = qc.shape[2]
        scores = qc.reshape(B, Hkv, G, c, D) @ kf.unsqueeze(2) / math.sqrt(D)  # [B, Hkv, G, c, T]
        causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(s, s + c, device=q.device)[:, None]
        yield s, scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(2)


def hash_uniform(a: Tensor, b: Tensor, c: int) -> Tensor:
    """A uniform [0, 1) draw per (a, b, c), from integer hashing (two Park-Miller steps; no overflow in int64).
    Random eviction uses it instead of a random generator, so a sequence evicts the same slots whether it
    is decoded alone or in a batch, and every run is reproducible."""
    m = 2147483647
    x = (a * 73856093 + b * 19349663 + c * 83492791 + 12345) % m
    x = (x * 48271) % m
    x = (x * 48271) % m
    return x.double() / m


# ---------------------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------------------
class FullCache(KVCache):
    """Never evicts: slot = position; the buffer holds prompt + max_new_tokens."""

    def choose_slot(self, input_pos, k, q):
        return input_pos.view(-1, 1).expand(self.pos.shape[0], self.pos.shape[1])


class RandomCache(KVCache):
    """Evicts a random unprotected slot: one draw per (layer, step, slot), shared by the KV heads."""

    def score(self, input_pos, k, q):
        B, Hkv, C = self.pos.shape
        slots = torch.arange(C, device=k.device)
        return hash_uniform(input_pos.view(-1, 1, 1), slots, self.layer_idx).float().expand(B, Hkv, C)


class RecentGlobalCache(KVCache):
    """StreamingLLM: sinks + a sliding window; the oldest non-sink token goes."""

    def score(self, input_pos, k, q):
        return self.pos.float()


class KeepItOddCache(KVCache):
    """cold-compress's toy policy: keeps odd positions; the oldest even token goes first."""

    def score(self, input_pos, k, q):
        return (self.pos % 2 == 1).float() * self.max_seq_length + self.pos


class L2Cache(KVCache):
    """Evicts the largest-norm key (low-norm keys attract attention). Norms are stored per slot."""

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        self.register_buffer("key_norm", torch.zeros(batch_size, n_kv_heads, kv_budget), persistent=False)

    def policy_buffers(self):
        return ["key_norm"]

    def after_prefill(self, k, q, keep):
        self.key_norm.copy_(self.keys().float().norm(dim=-1))

    def after_insert(self, slot, input_pos, k, q):
        self.key_norm.scatter_(2, slot[:, :, None], k.float().norm(dim=-1))

    def score(self, input_pos, k, q):
        return -self.key_norm


class HeavyHitterCache(KVCache):
    """H2O / Scissorhands: evicts the slot with the least average attention over the steps it was visible."""
    hyperparams = {
        "history_window_size": Param(int, 0, "heavy_hitter: 0 = full history; W > 0 = average over the last W "
                                             "steps", min=0),
        "attn_thresholding": Param(bool, False, "heavy_hitter: a step counts 1 if attention >= 1/occupied, else 0"),
    }
    needs_attention = True
    default_prompt_compressor = "heavy_hitter"

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        W = max(self.history_window_size, 1)  # full history: one running column
        shape = (batch_size, n_kv_heads, kv_budget, W)
        self.register_buffer("attn_hist", torch.zeros(shape), persistent=False)  # per-step values (a ring of W)
        self.register_buffer("attn_vis", torch.zeros(shape), persistent=False)  # 1 where the slot was visible
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    def policy_buffers(self):
        return ["attn_hist", "attn_vis", "step"]

    def step_values(self, probs: Tensor, occupied: Tensor) -> Tensor:
        if self.attn_thresholding:
            return (probs >= 1.0 / occupied).float()
        return probs

    def push(self, values: Tensor, visible: Tensor):
        """Append one step's values [B, Hkv, C] for the slots visible at that step."""
        values, visible = values * visible, visible.float()
        if self.history_window_size:
            col = (self.step % self.history_window_size).view(1, 1, 1, 1).expand(*values.shape, 1)
            self.attn_hist.scatter_(3, col, values.unsqueeze(-1))
            self.attn_vis.scatter_(3, col, visible.unsqueeze(-1))
        else:
            self.attn_hist[..., 0] += values
            self.attn_vis[..., 0] += visible
        self.step.add_(1)

    @torch.compiler.disable  # a Python loop over prompt chunks: compiled, it would recompile per prompt length
    def after_prefill(self, k, q, keep):
        """Each prompt query counts as one step (with a window: only the last W queries)."""
        T, W = k.shape[2], self.history_window_size
        first = max(0, T - W) if W else 0
        key_pos = torch.arange(T, device=k.device)
        sums, counts, rows_kept = 0, 0, []
        for s, probs in prompt_attention_columns(q, k):  # probs [B, Hkv, c, T]
            rows = torch.arange(s, s + probs.shape[2], device=k.device)
            visible = (key_pos[None, :] <= rows[:, None]).float()  # [c, T]
            vals = self.step_values(probs, (rows + 1.0)[:, None]) * visible
            if W:
                sel = rows >= first
                rows_kept.append((vals[:, :, sel], visible[sel]))
            else:
                sums, counts = sums + vals.sum(2), counts + visible.sum(0)
        if W:
            vals = torch.cat([r[0] for r in rows_kept], 2).transpose(2, 3)  # [B, Hkv, T, W']
            vis = torch.cat([r[1] for r in rows_kept], 0).t().expand_as(vals)
        else:
            vals, vis = sums.unsqueeze(-1), counts.expand_as(sums).unsqueeze(-1)
        if keep is None:
            self.attn_hist[:, :, :T, :vals.shape[-1]] = vals
            self.attn_vis[:, :, :T, :vals.shape[-1]] = vis
        else:
            idx = keep.unsqueeze(-1).expand(-1, -1, -1, vals.shape[-1])
            self.attn_hist[..., :vals.shape[-1]] = vals.gather(2, idx)
            self.attn_vis[..., :vals.shape[-1]] = vis.gather(2, idx)
        self.step.fill_(T - first)

    def after_insert(self, slot, input_pos, k, q):
        idx = slot[:, :, None, None].expand(-1, -1, 1, self.attn_hist.shape[-1])
        self.attn_hist.scatter_(2, idx, torch.zeros_like(idx, dtype=self.attn_hist.dtype))
        self.attn_vis.scatter_(2, idx, torch.zeros_like(idx, dtype=self.attn_vis.dtype))

    def record_attention(self, probs):
        occupied = self.pos >= 0
        p = probs.mean(2)[:, :, 0]  # [B, Hkv, C]: mean over the query heads of the group
        self.push(self.step_values(p, occupied.sum(-1, keepdim=True).float()), occupied)

    def score(self, input_pos, k, q):
        return self.attn_hist.sum(-1) / self.attn_vis.sum(-1).clamp(min=1)


class LSHCache(KVCache):
    """LSH-E: SimHash of each cached key (a fixed Gaussian projection per layer, packed bits); the slot whose
    hash is farthest in Hamming distance from the incoming key (or the group's queries) is evicted.
    Needs no attention probabilities, so attention stays on the fused path."""
    hyperparams = {
        "lsh_dim": Param(int, 16, "lsh: hash bits per key; stored packed, ceil(lsh_dim/8) bytes per token and head",
                         min=1, max=64),
        "lsh_source": Param(str, "key", "lsh: hash the incoming key (authors' code) or the query (paper; summed "
                                        "over GQA)", choices=("key", "query")),
        "lsh_seed": Param(int, 0, "lsh: seed of the per-layer random projections", min=0),
    }

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        g = torch.Generator().manual_seed(self.lsh_seed * 100003 + self.layer_idx)
        self.register_buffer("proj", torch.randn(head_dim, self.lsh_dim, generator=g), persistent=False)
        n_bytes = (self.lsh_dim + 7) // 8
        self.register_buffer("hashes", torch.zeros(batch_size, n_kv_heads, kv_budget, n_bytes, dtype=torch.uint8),
                             persistent=False)
        self.register_buffer("bit_weights", 2 ** (torch.arange(self.lsh_dim) % 8), persistent=False)
        self.register_buffer("popcount", torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8),
                             persistent=False)

    def policy_buffers(self):
        return ["hashes"]

    def hash(self, x: Tensor) -> Tensor:
        """x [..., D] -> packed sign bits [..., ceil(b/8)] uint8; bit i in byte i//8 at position i%8."""
        bits = (x.float() @ self.proj >= 0).long() * self.bit_weights
        pad = (-self.lsh_dim) % 8
        return F.pad(bits, (0, pad)).view(*bits.shape[:-1], -1, 8).sum(-1).to(torch.uint8)

    def hamming(self, a: Tensor, b: Tensor) -> Tensor:
        return self.popcount[(a ^ b).long()].long().sum(-1)

    def after_prefill(self, k, q, keep):
        self.hashes.copy_(self.hash(self.keys()))

    def after_insert(self, slot, input_pos, k, q):
        idx = slot[:, :, None, None].expand(-1, -1, 1, self.hashes.shape[-1])
        self.hashes.scatter_(2, idx, self.hash(k))

    def score(self, input_pos, k, q):
        B, Hkv, C, n_bytes = self.hashes.shape
        if self.lsh_source == "key":
            d = self.hamming(self.hash(k), self.hashes)  # [B, Hkv, 1, nb] vs [B, Hkv, C, nb] -> [B, Hkv, C]
        else:
            hq = self.hash(q).view(B, Hkv, -1, 1, n_bytes)  # the group's queries
            d = self.hamming(hq, self.hashes.unsqueeze(2)).sum(2)
        return -d.float()  # = max(d) - d up to a constant: the farthest key goes first


def sink_recent_keep(T: int, sink_tokens: int, recent_tokens: int, middle_strategy: str, middle_budget_tokens: int,
                     uniform_stride: int, block_n: int) -> list:
    """keep(T) (docs/algorithms.md): sinks, the recent window, and whole middle blocks (aligned to position 0)."""
    sink, recent = sink_tokens, recent_tokens
    if T <= sink + recent:
        return list(range(T))
    keep = set(range(sink)) | set(range(T - recent, T))
    first, end = -(-sink // block_n), (T - recent) // block_n  # partial blocks at the boundaries are dropped
    blocks = []
    if middle_strategy == "uniform" and first < end:
        nb = end - first
        if uniform_stride > 0:
            blocks = list(range(first, end, uniform_stride))
        elif middle_budget_tokens > 0:
            kb = max(1, middle_budget_tokens // block_n)
            # floor(linspace(0, nb - 1, kb)) in exact integer arithmetic (float32 linspace rounds wrongly)
            blocks = list(range(first, end)) if kb >= nb else \
                [first + (i * (nb - 1)) // (kb - 1) if kb > 1 else first for i in range(kb)]
    for b in blocks:
        keep |= set(range(b * block_n, (b + 1) * block_n))
    return sorted(keep)


class SinkRecentCache(KVCache):
    """Sink + recent (+ uniform middle blocks): keep(T) at prefill; during decode a fixed budget of
    sink + recent + middle, where the middle chosen at prefill stays and the token leaving the recent window
    joins it only while there is room (else it is evicted). Content-independent."""
    hyperparams = {
        "sink_tokens": Param(int, 256, "sink_recent/merge_pyramid: first tokens always kept (sink_recent 256, "
                                       "merge_pyramid 4)", min=0),
        "recent_tokens": Param(int, 512, "sink_recent: most recent tokens kept", min=1),
        "middle_strategy": Param(str, "none", "sink_recent: none | uniform", choices=("none", "uniform")),
        "middle_budget_tokens": Param(int, 0, "sink_recent: tokens of uniformly spread middle blocks", min=0),
        "uniform_stride": Param(int, 0, "sink_recent: keep every s-th middle block (overrides the budget)", min=0),
        "block_n": Param(int, 128, "sink_recent: block size of the middle selection", min=1),
    }

    @classmethod
    def sized_budget(cls, prompt_len: int, max_seq_length: int, hp: dict) -> int:
        """sink + recent + middle cap (the budget flags of this policy replace --max_cache_length)."""
        keep = sink_recent_keep(prompt_len, **{k: hp[k] for k in cls.hyperparams})
        s, r = hp["sink_tokens"], hp["recent_tokens"]
        prefill_middle = sum(1 for p in keep if s <= p < prompt_len - r)
        if hp["middle_strategy"] == "none":
            cap = 0
        elif hp["uniform_stride"] > 0:
            cap = prefill_middle
        else:
            cap = max(prefill_middle, hp["middle_budget_tokens"])
        return min(s + r + cap, max_seq_length)

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        # The recent window counts the new token: protect the recent_tokens - 1 before it.
        self.global_tokens, self.recent_window = self.sink_tokens, self.recent_tokens - 1

    @torch.compiler.disable  # keep(T) is computed on the host: compiled, it would recompile per prompt length
    def prompt_keep(self, k, q):
        B, Hkv, T, _ = k.shape
        keep = sink_recent_keep(T, **{name: getattr(self, name) for name in self.hyperparams})
        if len(keep) > self.kv_budget:
            raise ValueError(f"sink_recent keeps {len(keep)} prompt tokens but the budget is {self.kv_budget}")
        return torch.tensor(keep, device=k.device).expand(B, Hkv, len(keep))

    def score(self, input_pos, k, q):
        return -self.pos.float()  # the newest unprotected token (the one leaving the window) goes


# ---------------------------------------------------------------------------------------------------------------
# A batch of sequences, and statistics
# ---------------------------------------------------------------------------------------------------------------
class SequenceBatch(nn.Module):
    """One layer's caches for a batch of sequences: one policy instance per sequence (its own static buffers,
    positions, counters and statistics), all preallocated once. Prefill fills one sequence (`row`) at a time, so
    prompts of different lengths need no padding; a decode step inserts and attends each sequence's token in
    its own cache, at its own position, inside the one compiled step (the linears run once over the batch).
    Each sequence therefore keeps exactly the positions it keeps when decoded alone, for every policy."""

    def __init__(self, rows: list):
        super().__init__()
        self.rows = nn.ModuleList(rows)
        first = rows[0]
        for name in ("kv_budget", "head_dim", "kv_dtype", "rotates_keys", "needs_tokens", "needs_attention",
                     "debug_attention_loss", "layer_idx"):
            setattr(self, name, getattr(first, name))

    def sequences(self) -> list:
        return list(self.rows)

    def reset(self):
        for c in self.rows:
            c.reset()

    def set_rope(self, cos: Tensor, sin: Tensor):
        for c in self.rows:
            c.set_rope(cos, sin)

    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor, row: int = None):
        if row is None:
            raise ValueError("a batch of caches is prefilled one sequence at a time: give row")
        self.rows[row].prefill(input_pos, k, v, q)

    def decode(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """input_pos [B, T] (each sequence's positions) or [T] (shared); k, v [B, Hkv, T, D]; q [B, H, T, D]."""
        per_seq = input_pos.dim() == 2
        return torch.cat([c.decode(input_pos[b] if per_seq else input_pos, k[b:b + 1], v[b:b + 1], q[b:b + 1])
                          for b, c in enumerate(self.rows)], dim=0)

    def set_tokens(self, idx: Tensor, prefill: bool, row: int = None):
        if prefill:
            self.rows[row].set_tokens(idx, True)
        else:
            for b, c in enumerate(self.rows):
                c.set_tokens(idx[b:b + 1], False)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.rows)

    def kept(self) -> int:
        return sum(c.kept() for c in self.rows)


def sequence_caches(model, row: int) -> list:
    """Sequence `row`'s cache in every layer."""
    return [c.sequences()[row] for c in model.caches]


def batch_size(model) -> int:
    c = model.caches[0]
    rows = c.sequences()
    return len(rows) if len(rows) > 1 else c.pos.shape[0]


def prefill_budget(model) -> int:
    """The longest prompt every layer can take without compression."""
    return min(c.kv_budget for c in model.caches)


def cache_stats(model, row: int = None) -> dict:
    """Statistics of the caches (with a batch: of sequence `row`, or per sequence under "sequences" with the
    totals of the whole batch's buffers)."""
    if len(model.caches[0].sequences()) > 1 and row is None:
        per_seq = [cache_stats(model, b) for b in range(batch_size(model))]
        total = {k: sum(s[k] for s in per_seq) for k in ("kv_cache_bytes", "full_kv_cache_bytes")}
        kept, seen = sum(s["kept_tokens"] for s in per_seq), sum(s["seen_tokens"] for s in per_seq)
        return {"batch_size": len(per_seq), "seen_tokens": seen, "kept_tokens": kept,
                "compression_ratio": kept / seen if seen else 1.0, **total, "sequences": per_seq}
    caches = model.caches if row is None else sequence_caches(model, row)
    seen = int(caches[0].seen)
    b, h, _ = caches[0].pos.shape
    d = caches[0].head_dim
    layers = []
    for i, c in enumerate(caches):
        kept = c.kept() / (b * h)
        layer = {"layer": i, "policy": type(c).__name__, "kv_budget": c.kv_budget, "kept_tokens": kept,
                 "compression_ratio": kept / seen if seen else 1.0, "kv_cache_bytes": c.nbytes()}
        if c.loss_meter is not None:
            layer["attention_loss"] = c.loss_meter.value()
        layers.append(layer)
    kept = sum(x["kept_tokens"] for x in layers) / len(layers)
    elem = torch.empty((), dtype=caches[0].kv_dtype).element_size()
    stats = {
        "seen_tokens": seen,
        "kept_tokens": kept,
        "compression_ratio": kept / seen if seen else 1.0,
        "kv_cache_bytes": sum(x["kv_cache_bytes"] for x in layers),
        "full_kv_cache_bytes": 2 * len(caches) * b * h * seen * d * elem,
        "layers": layers,
    }
    losses = [x["attention_loss"] for x in layers if "attention_loss" in x]
    if losses:
        stats["attention_loss"] = sum(losses) / len(losses)
    return stats
