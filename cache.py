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
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

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


PROMPT_COMPRESSORS = ("recent_global", "random", "l2", "heavy_hitter", "keep_it_odd", "lsh", "keydiff", "tova",
                      "expected_attention", "kvzip")
KEEP_SET_RULES = ("topk", "chunkkv", "criticalkv", "adakv")
KVZIP_INSTRUCTION = "\n\nRepeat the previous context exactly.\n"  # KVzip's reconstruction prompt (as kvpress)
KVZIP_MAX_INSTRUCTION = 64  # tokens the instruction may take (RoPE tables are made this much longer)

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
    "keep_set": Param(str, "topk", "how a long prompt's kept positions are chosen from the compressor's scores: topk "
                                   "(per head), chunkkv (whole chunks), criticalkv (rescaled by |W_o v|, also while "
                                   "decoding), adakv (head-adaptive budgets within a layer)", choices=KEEP_SET_RULES),
    "chunkkv_size": Param(int, 20, "chunkkv: tokens per chunk", min=1),
    "criticalkv_first_stage": Param(float, 0.5, "criticalkv: share of the budget chosen by the raw scores first",
                                    min=0, max=1),
    "criticalkv_epsilon": Param(float, 1e-4, "criticalkv: added to the scores before the |W_o v| rescaling", min=0),
    "adakv_alpha": Param(float, 0.2, "adakv: share of its average budget every head keeps at least", min=0, max=1),
    "adakv_cap": Param(float, 2.0, "adakv: slots per head as a multiple of the average budget (the memory "
                                   "allocated; a head may hold up to this many)", min=1),
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
        # per sequence, shape [B] (a compiled in-place add into a 0-dim float64 buffer was silently dropped, 2.13)
        self.register_buffer("lost_mass", torch.zeros(batch_size, dtype=torch.float64), persistent=False)
        self.register_buffer("lost_steps", torch.zeros(batch_size, dtype=torch.long), persistent=False)

    def prefill(self, k: Tensor):
        self.shadow_k[:, :, :k.shape[2]] = k

    def observe(self, input_pos: Tensor, k: Tensor, q: Tensor, pos: Tensor):
        """One decode token (k [B, Hkv, 1, D], q [B, H, 1, D], rotated; input_pos [1] or [B, 1]) against the cache's
        positions pos."""
        B, H, _, D = q.shape
        Hkv = self.shadow_k.shape[1]
        at = input_pos.view(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        self.shadow_k.scatter_(2, at.expand(B, Hkv, 1, D), k.to(self.shadow_k.dtype))
        qf = q.float().reshape(B, Hkv, H // Hkv, D)
        scores = qf @ self.shadow_k.float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, S]
        S = scores.shape[-1]
        visible = torch.arange(S, device=q.device) <= at
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        held = torch.zeros(B, Hkv, S + 1, device=q.device).scatter_(2, pos.clamp(min=-1) + 1, 1.0)[..., 1:]
        self.lost_mass.add_((probs * (1 - held).unsqueeze(2)).sum(-1).mean((1, 2)).double())
        self.lost_steps.add_(1)

    def value(self) -> float:
        """The mean lost attention mass per step (the mean over the sequences of a batch)."""
        return float((self.lost_mass / self.lost_steps.clamp(min=1)).mean())


# ---------------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    hyperparams = {}  # name -> Param: the policy's own knobs
    needs_attention = False  # True: each decode step's attention probabilities go to record_attention
    needs_prompt_attention = False  # True: the prompt's attention probabilities go to observe_prompt_attention
    needs_tokens = False  # True: set_tokens gets the token ids (policies.setup installs token tables)
    default_prompt_compressor = "recent_global"
    default_position_mode = "absolute"
    own_prompt_rule = False  # True: the policy keeps the prompt its own way (no prompt compressor, no keep-set rule)
    never_evicts = False
    rope_margin = 0  # RoPE table positions needed beyond max_seq_length

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, kv_budget: int, dtype, *,
                 max_seq_length: int = None, layer_idx: int = 0, n_layers: int = 1, n_heads: int = None,
                 decode_room: int = 0, **kw):
        super().__init__()
        self.n_heads = n_heads or n_kv_heads  # query heads (policies that keep per-query-head statistics)
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
        self.keep_set = engine["keep_set"] if not self.never_evicts else "topk"  # full: nothing to choose
        for name in ("chunkkv_size", "criticalkv_first_stage", "criticalkv_epsilon", "adakv_alpha"):
            setattr(self, name, engine[name])
        self.rope_cos = self.rope_sin = None  # RoPE tables, from set_rope (the model's)
        # budget: the prompt tokens a KV head keeps on average; prompt_slots: the slots the compressed prompt may
        # use per head (more under adakv, whose heads hold different numbers of tokens); decode_room: empty slots
        # after them for the new tokens (--budget_scope prompt: kvpress's layout, the budget binds at prefill only;
        # empty slots fill before anything is evicted); kv_budget: the slots each head's buffer holds.
        self.budget, self.decode_room = kv_budget, decode_room
        if self.keep_set == "adakv":
            kv_budget = min(math.ceil(engine["adakv_cap"] * kv_budget), max_seq_length or kv_budget)
        self.prompt_slots = kv_budget
        self.kv_budget = kv_budget = min(kv_budget + decode_room, max_seq_length or kv_budget + decode_room)
        self.max_seq_length = max_seq_length or kv_budget  # longest sequence the run may reach
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.kv_dtype, self.head_dim = dtype, head_dim
        shape = (batch_size, n_kv_heads, kv_budget, head_dim)
        self.store = KVStore(shape, dtype) if not self.cache_bits else \
            QuantizedKVStore(shape, dtype, self.cache_bits, engine["cache_group_size"])
        self.register_buffer("pos", torch.full(shape[:3], -1, dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros(batch_size, dtype=torch.long), persistent=False)  # per sequence
        self.loss_meter = AttentionLossMeter(batch_size, n_kv_heads, self.max_seq_length, head_dim, dtype) \
            if self.debug_attention_loss else None
        self.out_proj = None  # criticalkv: the output projection per query head [H, D, dim] (set_output_projection)
        self.head_group, self.head_world, self.head_rank = None, 1, 0  # tensor parallelism: the ranks that hold
        # this layer's other heads, how many, which block is this process's
        self.kvzip_instruction = None  # kvzip: the reconstruction instruction's ids (policies.install, tokenizer)
        if self.prompt_compressor == "kvzip":  # the reconstruction reads the prompt twice: positions up to 2T + k
            self.rope_margin = self.max_seq_length + KVZIP_MAX_INSTRUCTION
        if self.keep_set == "criticalkv":  # |W_o v|_1 of each slot's value (mean over the query heads of its KV head)
            self.register_buffer("slot_vnorm", torch.zeros(shape[:3]), persistent=False)
        if self.own_prompt_rule and (engine["prompt_compression_strategy"] or self.keep_set != "topk"):
            raise ValueError(f"{type(self).__name__} keeps the prompt by its own rule: --prompt_compression_strategy "
                             "and --keep_set do not apply to it")
        if self.prompt_compressor == "lsh" and not callable(getattr(type(self), "hash", None)):
            raise ValueError("prompt compressor 'lsh' hashes with the lsh policy's projections: use it with "
                             "--cache_strategy lsh")

    def policy_buffers(self):
        """Names of per-sequence policy state (scores, hashes, counters; batch first) that is reset with the cache."""
        return []

    def sequence_buffers(self):
        """(module, name) of every buffer that holds one entry per sequence (batch first): K/V, positions, counters,
        policy state, the debug shadow. Shared tables (LSH projections, popcounts) are not among them."""
        own = ["pos", "seen"] + (["slot_vnorm"] if self.keep_set == "criticalkv" else []) + self.policy_buffers()
        out = [(self, name) for name in own]
        for mod in (self.store, self.loss_meter):
            if mod is not None:
                out += [(mod, name) for name in mod._buffers]
        return out

    @contextlib.contextmanager
    def row_view(self, row: int):
        """Inside, this cache is sequence `row`'s alone: each per-sequence buffer is replaced by its slice
        [row:row + 1], a view, so whatever the cache writes lands in that sequence's part of the batch."""
        saved = [(mod, name, mod._buffers[name]) for mod, name in self.sequence_buffers()]
        try:
            for mod, name, buf in saved:
                mod._buffers[name] = buf[row:row + 1]
            yield self
        finally:
            for mod, name, buf in saved:
                mod._buffers[name] = buf

    def reset(self):
        for buf in self.store.buffers():
            buf.zero_()
        self.pos.fill_(-1)
        self.seen.zero_()
        if self.keep_set == "criticalkv":
            self.slot_vnorm.zero_()
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

    def rope(self, x: Tensor, input_pos: Tensor) -> Tensor:
        """x [B, H, T, D] rotated at positions input_pos ([T], or [B, T]: each sequence's own); unchanged without
        tables (already positioned)."""
        if self.rope_cos is None:
            return x
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if input_pos.dim() == 2:  # [B, T, D] -> [B, 1, T, D]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return apply_rope(x, cos, sin)

    # -- prefill -------------------------------------------------------------------------------------------
    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor, row: int = None,
                context_len: int = None, need_output: bool = True) -> Tensor:
        """The prompt: un-rotated k, v [B, Hkv, T, D] and q [B, H, T, D] at positions input_pos = 0..T-1. Returns
        its causal self-attention y [B, H, T, D]; the cache then keeps what its policy keeps.
        row: which sequence of the batch this prompt is (each is prefilled alone, no padding; None: a cache that
        holds one sequence).
        context_len: only the first context_len tokens are the prompt; the rest is a scoring extension that the
        cache reads but does not keep (KVzip's context reconstruction).
        need_output False: only the cache is wanted (leaderboard.py's replay of a recorded prefill); the attention is
        computed only where the policy learns from it, and None may be returned."""
        batch = self.pos.shape[0]
        if row is None and batch > 1:
            raise ValueError("a batch of caches is prefilled one sequence at a time: give row")
        if row is not None and not 0 <= row < batch:
            raise ValueError(f"this cache holds {batch} sequence(s); there is no sequence {row}")
        if batch > 1:
            return self.prefill_row(row, input_pos, k, v, q, context_len)
        self.observe_prompt_queries(input_pos, q, context_len)
        k_rot, q_rot = self.rope(k, input_pos), self.rope(q, input_pos)
        if int(self.seen) > 0:  # the cache already holds the prompt's earlier chunks
            return self.prefill_chunk(input_pos, k_rot, v, q_rot)
        T = self.context_len = context_len or k.shape[2]
        learns = self.needs_prompt_attention or self.prompt_compressor == "kvzip"
        y = self.prompt_attention(q_rot, k_rot, v) if need_output or learns else None
        k, k_rot, v, q_rot, input_pos = k[:, :, :T], k_rot[:, :, :T], v[:, :, :T], q_rot[:, :, :T], input_pos[:T]
        keep = self.prompt_keep(k_rot, q_rot, v)
        self.write_prompt(input_pos, k if self.rotates_keys else k_rot, v, keep)
        self.seen.fill_(T)
        if self.loss_meter is not None:
            self.loss_meter.prefill(k_rot)
        self.after_prefill(k_rot, q_rot, keep)
        return y

    def observe_prompt_queries(self, input_pos: Tensor, q: Tensor, context_len: int = None):
        """The prompt's (or a prompt chunk's) un-rotated queries, before anything is scored (expected_attention)."""

    @torch.compiler.disable  # the buffers are swapped for views of one sequence's rows: not traced
    def prefill_row(self, row, input_pos, k, v, q, context_len):
        with self.row_view(row):
            return self.prefill(input_pos, k, v, q, context_len=context_len)

    def prompt_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal self-attention of the prompt (rotated q, k): the fused kernel, or, for policies that learn from the
        prompt's attention (needs_prompt_attention), one streamed pass that also hands each chunk of probabilities
        to observe_prompt_attention (so the attention is computed once, not again for the policy)."""
        if not (self.needs_prompt_attention or self.prompt_compressor == "kvzip"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return streamed_prompt_attention(q, k, v, self.observe_prompt_attention)

    def observe_prompt_attention(self, start: int, probs: Tensor):
        """probs [B, Hkv, G, c, e]: the causal attention of prompt queries start..start+c-1 to the keys 0..e-1 (G:
        each KV head's query heads), for policies with needs_prompt_attention, and for the kvzip compressor: a prompt
        position's score is the largest attention it gets from the reconstruction queries (positions >=
        context_len), over the heads."""
        if self.prompt_compressor != "kvzip":
            return
        T, c = self.context_len, probs.shape[3]
        if start == 0:
            self._kvzip = torch.zeros(probs.shape[0], probs.shape[1], T, device=probs.device)
        if start + c > T:
            rows = probs[:, :, :, max(0, T - start):, :T]  # queries of the extension, keys of the prompt
            self._kvzip = torch.maximum(self._kvzip, rows.amax(dim=(2, 3)))

    def prompt_keep(self, k: Tensor, q: Tensor, v: Tensor):
        """The prompt positions to keep: None (all of them, T <= budget) or [B, Hkv, n <= C] increasing.
        k, q rotated at their positions. Policies with their own prompt rule override this."""
        return None if k.shape[2] <= self.budget else self.compress_prompt(k, q, v)

    def write_prompt(self, input_pos: Tensor, k: Tensor, v: Tensor, keep):
        """Writes the kept prompt tokens (k in its stored form) into slots 0..n-1, in position order."""
        B, Hkv, T, D = k.shape
        if keep is None:
            self.store.write(torch.arange(T, device=k.device).expand(B, Hkv, T), k, v)
            self.pos[:, :, :T] = input_pos
            self.pos[:, :, T:] = -1
            if self.keep_set == "criticalkv":
                self.slot_vnorm[:, :, :T] = self.value_norms(v)
            return
        n = keep.shape[-1]
        idx = keep.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, D)  # -1: an empty slot (its K/V are never read)
        self.store.write(torch.arange(n, device=k.device).expand_as(keep), k.gather(2, idx), v.gather(2, idx))
        self.pos[:, :, :n] = keep
        self.pos[:, :, n:] = -1
        if self.keep_set == "criticalkv":
            self.slot_vnorm[:, :, :n] = self.value_norms(v).gather(2, keep.clamp(min=0))

    def after_prefill(self, k: Tensor, q: Tensor, keep):
        """Seed per-slot state from the prompt (k, q rotated; keep: the kept positions, or None when all were)."""

    def compress_prompt(self, k: Tensor, q: Tensor, v: Tensor, pos: Tensor = None) -> Tensor:
        """The candidates to keep, as indices [B, Hkv, C] into the candidate axis (-1: an empty slot, for keep-set
        rules that keep fewer): the compressor's protected positions first, then its highest scores (ties to the
        lower position), chosen by the keep-set rule (--keep_set). The candidates are the prompt (k, v
        [B, Hkv, M, D], pos None: positions 0..M-1, index = position) or, for a later chunk of a prompt, the cached
        slots and the chunk in increasing position order (pos [B, Hkv, M], -1 = an empty slot, first). q: the
        newest queries (the prompt's, or the chunk's)."""
        T = k.shape[2] if pos is None else int(pos.max()) + 1  # the prompt so far
        pos = positions_like(k) if pos is None else pos
        valid = pos >= 0
        score, recent = PROMPT_SCORERS[self.prompt_compressor](self, k, q, v, pos)
        protected = valid & ((pos < self.global_tokens) | (pos >= T - recent))
        n_protected = int(protected[0, 0].sum())
        if n_protected > self.budget:
            raise ValueError(f"prompt compressor {self.prompt_compressor!r} must keep {n_protected} tokens (sinks + "
                             f"window) but the budget is {self.budget} slots; lower --observation_window or "
                             "--recent_window")
        score = score.double().masked_fill(~valid, float("-inf"))
        return KEEP_SETS[self.keep_set](self, score, protected, v)

    # -- a later chunk of a prompt (--prefill_chunk) ------------------------------------------------------
    def prefill_chunk(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """The next N prompt tokens (rotated k, q; input_pos [N]) after earlier chunks: their queries attend to the
        cached slots and, causally, to the chunk; then the cached tokens and the chunk's compete for the budget by
        the prompt compressor's scores (the chunk's queries are the newest), so the cache never holds more than
        the budget and the prompt may be longer than any buffer. Returns y [B, H, N, D]."""
        name = type(self).__name__
        if self.own_prompt_rule or self.needs_prompt_attention or self.rotates_keys or self.keep_set == "adakv":
            raise ValueError(f"--prefill_chunk is not supported by {name}" + (" with --keep_set adakv" if
                             self.keep_set == "adakv" else "") + " (its prompt rule needs the whole prompt); use "
                             "--feed_long_prompts")
        B, Hkv, N, D = k.shape
        keys = torch.cat([self.keys(), k.to(self.kv_dtype)], dim=2)
        values = torch.cat([self.values(), v.to(self.kv_dtype)], dim=2)
        pos = torch.cat([self.pos, input_pos.view(1, 1, N).expand(B, Hkv, N)], dim=2)
        visible = (pos.unsqueeze(2) >= 0) & (pos.unsqueeze(2) <= input_pos.view(1, 1, N, 1))  # [B, Hkv, N, M]
        y, _ = attention(q, keys, values, visible)
        order = pos.argsort(dim=-1, stable=True)  # increasing positions, empty slots (-1) first
        pos = pos.gather(-1, order)
        idx = order.unsqueeze(-1).expand(-1, -1, -1, D)
        keys, values = keys.gather(2, idx), values.gather(2, idx)
        keep = self.compress_prompt(keys, q, values, pos)
        kept_pos = pos.gather(-1, keep.clamp(min=0)).masked_fill(keep < 0, -1)
        gather = keep.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, D)
        n = keep.shape[-1]
        self.store.write(torch.arange(n, device=k.device).expand(B, Hkv, n), keys.gather(2, gather),
                         values.gather(2, gather))
        self.pos[:, :, :n] = kept_pos
        self.pos[:, :, n:] = -1
        if self.keep_set == "criticalkv":
            self.slot_vnorm[:, :, :n] = self.value_norms(values).gather(2, keep.clamp(min=0))
        self.seen.fill_(int(input_pos[-1]) + 1)
        if self.loss_meter is not None:
            self.loss_meter.shadow_k[:, :, input_pos] = k
        self.after_prefill(keys, q, keep)
        return y

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
        """Insert one token (un-rotated k, v [B, Hkv, 1, D], q [B, H, 1, D] at position input_pos: [1], or [B, 1]
        each sequence's own).

        Returns q, k, v, mask for attention (q and k rotated by rank in position_mode "cache")."""
        k_rot, q_rot = self.rope(k, input_pos), self.rope(q, input_pos)
        k_in, q_in = (k, q) if self.rotates_keys else (k_rot, q_rot)
        slot = self.choose_slot(input_pos, k_in, q_in) if self.keep_set != "adakv" else \
            self.adakv_slot(input_pos, k_in, q_in)  # [B, Hkv]
        self.store.write(slot[:, :, None], k_in, v)
        if self.keep_set == "criticalkv":
            self.slot_vnorm.scatter_(2, slot[:, :, None], self.value_norms(v))
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
        if self.keep_set == "criticalkv":  # CriticalKV's second stage, per slot: rescaled by the value's |W_o v|_1
            score = (score + self.criticalkv_epsilon) * self.slot_vnorm
        pos = self.pos
        protected = (pos < self.global_tokens) | (pos >= input_pos.view(-1, 1, 1) - self.recent_window)
        score = score.masked_fill(protected, float("inf")).masked_fill(pos < 0, float("-inf"))
        return score.argmin(dim=-1)  # the first minimum: empty slots in order, then the lowest slot on ties

    def score(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        raise NotImplementedError

    def adakv_slot(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        """--keep_set adakv while decoding: the layer keeps Hkv * budget tokens in all. Each head writes its new
        token into its first empty slot (a head whose buffer is full first evicts its own lowest-scored slot); when
        the layer then holds more than its budget, the lowest-scored unprotected slots of the whole layer go, from
        heads above their floor (adakv_alpha * budget). Branch-free: static shapes."""
        score = self.all_heads(self.score(input_pos, k, q).float())  # under tp: every rank's heads, in order
        pos = self.all_heads(self.pos)
        B, Hkv, C = pos.shape
        occupied = pos >= 0
        protected = (pos < self.global_tokens) | (pos >= input_pos.view(-1, 1, 1) - self.recent_window)
        ranked = score.masked_fill(protected, float("inf")).masked_fill(~occupied, float("-inf"))
        full = occupied.all(-1)  # [B, Hkv]
        slot = torch.where(full, ranked.argmin(-1), (~occupied).to(torch.uint8).argmax(-1))
        written = torch.zeros_like(occupied).scatter_(2, slot[:, :, None], True)
        held = occupied.sum(-1)  # per head, before this step
        floor = max(1, int(self.budget * self.adakv_alpha)) if self.adakv_alpha > 0 else 0
        excess = (held.sum(-1) + (~full).sum(-1) - Hkv * (self.budget + self.decode_room)).clamp(min=0)  # [B]
        candidate = occupied & ~protected & ~written & (held > floor).unsqueeze(-1)
        flat = score.masked_fill(~candidate, float("inf")).reshape(B, Hkv * C)
        low = torch.topk(flat, Hkv, dim=-1, largest=False)  # ties: the lowest index (head, then slot)
        evict = (torch.arange(Hkv, device=pos.device) < excess.unsqueeze(-1)) & torch.isfinite(low.values)
        gone = torch.zeros(B, Hkv * C, dtype=torch.bool, device=pos.device).scatter_(1, low.indices, evict)
        self.pos.masked_fill_(self.own_heads(gone.view(B, Hkv, C)), -1)
        return self.own_heads(slot)

    def after_insert(self, slot: Tensor, input_pos: Tensor, k: Tensor, q: Tensor):
        """Per-slot state (scores, hashes) of the new token."""

    def record_attention(self, probs: Tensor):
        """probs [B, Hkv, G, 1, C]: this step's attention (policies with needs_attention)."""

    # -- across KV heads (tensor parallelism splits them over processes) ------------------------------------
    def set_head_group(self, group, world: int, rank: int = 0):
        """Under torchrun (tp.py) each process holds world-th of the layer's heads (rank r: the r-th block);
        policies that combine heads (tova's layer mean, chunkkv's chunk scores) reduce over this group, and adakv,
        whose budget is shared by the layer's heads, decides on every rank's heads gathered (all_heads), each
        rank applying its own block of the same decision (own_heads)."""
        self.head_group, self.head_world, self.head_rank = group, world, rank

    def all_heads(self, x: Tensor) -> Tensor:
        """x [B, Hkv_here, ...] -> [B, Hkv of the layer, ...], the ranks' heads in order (itself without tp)."""
        if self.head_group is None:
            return x
        if x.dtype == torch.bool:  # collectives move numbers
            return self.all_heads(x.to(torch.uint8)).bool()
        x = x.contiguous()
        if torch.compiler.is_compiling():  # traced into the compiled step
            return funcol.all_gather_tensor(x, 1, self.head_group)
        # eager: a blocking all-gather into a buffer that lives here (ranks stacked first, then moved to dim 1)
        out = x.new_empty((self.head_world * x.shape[0], *x.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, x, group=self.head_group)
        return out.view(self.head_world, *x.shape).movedim(0, 1).reshape(x.shape[0], -1, *x.shape[2:])

    def own_heads(self, x: Tensor) -> Tensor:
        """This rank's block of a [B, Hkv of the layer, ...] tensor."""
        if self.head_group is None:
            return x
        n = x.shape[1] // self.head_world
        return x[:, self.head_rank * n:(self.head_rank + 1) * n]

    def sum_over_heads(self, x: Tensor) -> Tensor:
        """x [B, Hkv, ...] summed over every KV head of the layer (all ranks' under tensor parallelism), keepdim."""
        total = x.sum(1, keepdim=True)
        return total if self.head_group is None else funcol.all_reduce(total, "sum", self.head_group)

    # -- criticalkv ---------------------------------------------------------------------------------------
    def set_output_projection(self, weight: Tensor):
        """The layer's output projection weight [dim, H * D] (dense; policies.setup passes it under criticalkv)."""
        dim = weight.shape[0]
        self.out_proj = weight.view(dim, -1, self.head_dim).permute(1, 2, 0)  # [H, D, dim], a view: no copy

    def value_norms(self, v: Tensor) -> Tensor:
        """|W_o,j v|_1 for v [B, Hkv, T, D], averaged over the query heads j of each KV head -> [B, Hkv, T]
        (CriticalKV's projected value norm), in chunks of 512 tokens and one query head of each group at a time."""
        if self.out_proj is None:
            raise ValueError("--keep_set criticalkv needs the output projection (set up the caches with "
                             "policies.setup, which gives it)")
        B, Hkv, T, D = v.shape
        W = self.out_proj.view(Hkv, -1, D, self.out_proj.shape[-1])  # [Hkv, G, D, dim]
        out = []
        for s in range(0, T, 512):
            vc = v[:, :, s:s + 512].float()
            out.append(sum(torch.einsum("bhtd,hde->bhte", vc, W[:, g].float()).abs().sum(-1)
                           for g in range(W.shape[1])) / W.shape[1])
        return torch.cat(out, dim=2)

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


def snapkv_scores(q: Tensor, k: Tensor, window: int, kernel: int, pos: Tensor = None) -> Tensor:
    """SnapKV (Li et al. 2024, arXiv 2404.14469): the attention of the last `window` queries to each key before the
    window (mean over the window and the GQA group), smoothed by 1-D average pooling over those keys (zero padding
    counted, as SnapKV's code and kvpress); the window's own keys score +inf (always kept). q [B, H, n, D] (the
    newest queries), k [B, Hkv, M, D] at positions pos [B, Hkv, M] (default 0..M-1; increasing, -1 = empty, first;
    the last `window` keys are the window's) -> [B, Hkv, M]."""
    B, H, n, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    pos = torch.arange(M, device=q.device).expand(B, Hkv, M) if pos is None else pos
    w = min(window, n)
    qw = q[:, :, n - w:].float().reshape(B, Hkv, H // Hkv * w, D)
    scores = qw @ k.float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G*w, M]
    rows = pos[:, :, M - w:].repeat(1, 1, H // Hkv)  # the window queries' positions = the window keys'
    visible = (pos.unsqueeze(2) <= rows.unsqueeze(-1)) & (pos >= 0).unsqueeze(2)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).mean(2)[..., :M - w]  # [B, Hkv, M - w]
    pooled = F.avg_pool1d(probs, kernel, stride=1, padding=kernel // 2) if M > w else probs
    return torch.cat([pooled, pooled.new_full((B, Hkv, w), float("inf"))], dim=-1)


@torch.compiler.disable  # a Python loop over query chunks: compiled, it would recompile per prompt length
def streamed_prompt_attention(q: Tensor, k: Tensor, v: Tensor, observe) -> Tensor:
    """Causal attention of the prompt computed in fp32 query chunks (at most ~32M probabilities at a time; a chunk
    reads only the keys up to its last query); each chunk's probabilities go to observe(start, probs
    [B, Hkv, G, c, e]) (G: the query heads of each KV head; e: the keys 0..e-1 the chunk can see).
    q [B, H, T, D]; k, v [B, Hkv, T, D] -> y [B, H, T, D] in q's dtype."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    chunk = max(1, min(256, 2 ** 25 // max(1, B * H * T)))
    kf, vf = k.float().transpose(-1, -2).unsqueeze(2), v.float().unsqueeze(2)
    ys = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        qc = q[:, :, s:e].float()
        c = e - s
        scores = qc.reshape(B, Hkv, G, c, D) @ kf[..., :e] / math.sqrt(D)  # [B, Hkv, G, c, e]
        causal = torch.arange(e, device=q.device)[None, :] <= torch.arange(s, e, device=q.device)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        observe(s, probs)
        ys.append((probs @ vf[:, :, :, :e]).reshape(B, H, c, D))
    return torch.cat(ys, dim=2).to(q.dtype)


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
    never_evicts = True

    def choose_slot(self, input_pos, k, q):
        return input_pos.view(-1, 1).expand(self.pos.shape[0], self.pos.shape[1])


class RandomCache(KVCache):
    """Evicts a random unprotected slot: one draw per (layer, step, slot), shared by the KV heads."""
    default_prompt_compressor = "random"

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
    default_prompt_compressor = "keep_it_odd"

    def score(self, input_pos, k, q):
        return (self.pos % 2 == 1).float() * self.max_seq_length + self.pos


class L2Cache(KVCache):
    """Evicts the largest-norm key (low-norm keys attract attention). Norms are stored per slot."""
    default_prompt_compressor = "l2"

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        self.register_buffer("key_norm", torch.zeros(batch_size, n_kv_heads, self.kv_budget), persistent=False)

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
    needs_prompt_attention = True
    default_prompt_compressor = "heavy_hitter"

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        W = max(self.history_window_size, 1)  # full history: one running column
        shape = (batch_size, n_kv_heads, self.kv_budget, W)
        self.register_buffer("attn_hist", torch.zeros(shape), persistent=False)  # per-step values (a ring of W)
        self.register_buffer("attn_vis", torch.zeros(shape), persistent=False)  # 1 where the slot was visible
        self.register_buffer("step", torch.zeros(batch_size, dtype=torch.long), persistent=False)  # per sequence

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
            col = (self.step % self.history_window_size).view(-1, 1, 1, 1).expand(*values.shape, 1)
            self.attn_hist.scatter_(3, col, values.unsqueeze(-1))
            self.attn_vis.scatter_(3, col, visible.unsqueeze(-1))
        else:
            self.attn_hist[..., 0] += values
            self.attn_vis[..., 0] += visible
        self.step.add_(1)

    def observe_prompt_attention(self, start, probs):
        """H2O's history from the prompt: each prompt query counts as one step (with a window: the last W only).
        Accumulated chunk by chunk while the prompt's attention is computed (no second attention pass)."""
        super().observe_prompt_attention(start, probs)
        T, W = self.context_len, self.history_window_size  # a KVzip extension's queries are not steps
        if start >= T:
            return
        p = probs.mean(2)[:, :, :T - start, :T]  # [B, Hkv, c, e]: zero above the diagonal (causal softmax)
        B, Hkv, c, e = p.shape
        if start == 0:
            self._seed = {"sums": p.new_zeros(B, Hkv, T), "rows": []}
        seed = self._seed
        if not W and not self.attn_thresholding:  # the common case: one reduction
            seed["sums"][..., :e] += p.sum(2)
            return
        rows = torch.arange(start, start + c, device=p.device)
        visible = (torch.arange(e, device=p.device)[None, :] <= rows[:, None]).float()  # [c, e]
        vals = self.step_values(p, (rows + 1.0)[:, None]) * visible
        if W:
            sel = rows >= T - W
            seed["rows"].append((F.pad(vals[:, :, sel], (0, T - e)), F.pad(visible[sel], (0, T - e))))
        else:
            seed["sums"][..., :e] += vals.sum(2)

    def after_prefill(self, k, q, keep):
        T, W = k.shape[2], self.history_window_size
        seed, self._seed = self._seed, None
        if W:
            vals = torch.cat([r[0] for r in seed["rows"]], 2).transpose(2, 3)  # [B, Hkv, T, W']
            vis = torch.cat([r[1] for r in seed["rows"]], 0).t().expand_as(vals)
        else:  # key j was visible to the T - j queries at or after it
            sums = seed["sums"]
            vals, vis = sums.unsqueeze(-1), (T - torch.arange(T, device=k.device)).float().expand_as(sums).unsqueeze(-1)
        if keep is None:
            self.attn_hist[:, :, :T, :vals.shape[-1]] = vals
            self.attn_vis[:, :, :T, :vals.shape[-1]] = vis
        else:
            idx = keep.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, vals.shape[-1])
            n = keep.shape[-1]  # fewer than the slots with --budget_scope prompt (the rest wait for new tokens)
            self.attn_hist[:, :, :n, :vals.shape[-1]] = vals.gather(2, idx)
            self.attn_vis[:, :, :n, :vals.shape[-1]] = vis.gather(2, idx)
        self.step.fill_(min(T, W) if W else T)

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
    Needs no attention probabilities, so attention stays on the fused path. A long prompt keeps the keys whose hashes
    are closest to those of the last observation_window queries."""
    default_prompt_compressor = "lsh"
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
        self.register_buffer("hashes", torch.zeros(batch_size, n_kv_heads, self.kv_budget, n_bytes, dtype=torch.uint8),
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
    own_prompt_rule = True
    hyperparams = {
        "sink_tokens": Param(int, 256, "sink_recent/merge_pyramid: first tokens always kept (sink_recent 256, "
                                       "merge_pyramid 4)", min=0),
        "recent_tokens": Param(int, 512, "sink_recent: most recent tokens kept", min=1),
        "middle_strategy": Param(str, "none", "sink_recent: none | uniform", choices=("none", "uniform")),
        "middle_budget_tokens": Param(int, 0, "sink_recent: tokens of uniformly spread middle blocks", min=0),
        "uniform_stride": Param(int, 0, "sink_recent: keep every s-th middle block (overrides the budget)", min=0),
        "block_n": Param(int, 128, "sink_recent: block size of the middle selection", min=1),
    }

    size_flags = ("sink_tokens", "recent_tokens", "middle_strategy", "middle_budget_tokens", "uniform_stride")

    @classmethod
    def size_for_budget(cls, budget: int) -> dict:
        """Without its own size flags, a budget of B slots (--max_cache_length / --compression_ratio) becomes
        min(256, B // 4) sinks and the rest recent tokens (no middle), so one budget flag compares every policy."""
        sink = min(cls.hyperparams["sink_tokens"].default, budget // 4)
        return {"sink_tokens": sink, "recent_tokens": max(1, budget - sink), "middle_strategy": "none"}

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
    def prompt_keep(self, k, q, v):
        B, Hkv, T, _ = k.shape
        keep = sink_recent_keep(T, **{name: getattr(self, name) for name in self.hyperparams})
        if len(keep) > self.kv_budget:
            raise ValueError(f"sink_recent keeps {len(keep)} prompt tokens but the budget is {self.kv_budget}")
        return torch.tensor(keep, device=k.device).expand(B, Hkv, len(keep))

    def score(self, input_pos, k, q):
        return -self.pos.float()  # the newest unprotected token (the one leaving the window) goes


class KeyDiffCache(KVCache):
    """KeyDiff (Park et al. 2025, arXiv 2504.15364): evicts the key most similar (cosine) to the mean normalised key
    of the cache (the incoming key included), so the cache keeps the keys that differ most from the typical one. No
    attention is needed: it runs with the fused attention kernel. The paper streams the prompt block by block
    (--prefill_chunk); its own prompt compressor scores every prompt key against the prompt's mean normalised key."""
    default_prompt_compressor = "keydiff"

    def score(self, input_pos, k, q):
        # Two matrix-vector products instead of a normalised copy of every key: the step reads the keys like
        # attention does (1.6-2x faster on CPU at batch 10, 520 slots; same scores to float rounding).
        keys = self.keys().float()
        inv_norm = keys.norm(dim=-1).clamp_min(1e-12).reciprocal()  # [B, Hkv, C]; F.normalize's eps
        occupied = self.pos >= 0
        total = ((inv_norm * occupied).unsqueeze(2) @ keys).squeeze(2) + F.normalize(k.float(), dim=-1)[:, :, 0]
        anchor = F.normalize(total / (occupied.sum(-1, keepdim=True) + 1), dim=-1)  # mean normalised key, unit
        return -(keys @ anchor.unsqueeze(-1)).squeeze(-1) * inv_norm  # -cos(key, anchor)


class TOVACache(KVCache):
    """TOVA (Oren et al. 2024, arXiv 2401.06104): evicts the slot the current query attends to least, the attention
    averaged over every query head of the layer (tova_heads=layer, as the paper and kvpress: a layer drops the same
    token in every head) or over each KV head's group (tova_heads=group). The new token takes part in the softmax.
    Costs one extra query-key product per step (the scores are needed before the token is inserted)."""
    hyperparams = {
        "tova_heads": Param(str, "layer", "tova: average the attention over all query heads of the layer (layer) or "
                                          "over each KV head's group (group)", choices=("layer", "group")),
    }
    default_prompt_compressor = "tova"

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        if self.rotates_keys:
            raise ValueError("tova scores attention at absolute positions: use --position_mode absolute")
        same_everywhere = self.prompt_compressor in ("tova", "recent_global", "random", "keep_it_odd")
        if self.tova_heads == "layer" and not (same_everywhere and self.keep_set in ("topk", "chunkkv")):
            raise ValueError(f"tova_heads=layer averages slot by slot over the KV heads, so every head must keep the "
                             f"same positions: prompt compressor {self.prompt_compressor!r} with --keep_set "
                             f"{self.keep_set} keeps per-head sets; use --tova_heads group")

    def score(self, input_pos, k, q):
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        qf = q.float().reshape(B, Hkv, H // Hkv, D)
        logits = qf @ self.keys().float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, C]
        logits = logits.masked_fill((self.pos < 0).unsqueeze(2), float("-inf"))
        new = (qf * k.float()).sum(-1, keepdim=True) / math.sqrt(D)  # [B, Hkv, G, 1]
        probs = torch.cat([logits, new], dim=-1).softmax(-1)[..., :-1]
        if self.tova_heads == "group":
            return probs.mean(2)
        total = self.sum_over_heads(probs.sum(2))  # identical slot layouts in every head: a slot-wise mean
        return (total / (H * self.head_world)).expand(B, Hkv, -1)


_PREFIX_SUMS = {}


def rope_prefix_sums(cos: Tensor, sin: Tensor):
    """Running sums of the RoPE tables (float64, [L + 1, D]), so the mean rotation over any window of positions is
    two lookups; one pair per table, shared by every layer."""
    key = (cos.data_ptr(), cos.shape[0], str(cos.device))
    if key not in _PREFIX_SUMS:
        zero = torch.zeros(1, cos.shape[1], dtype=torch.float64, device=cos.device)
        _PREFIX_SUMS.clear()
        _PREFIX_SUMS[key] = (torch.cat([zero, cos.double().cumsum(0)]), torch.cat([zero, sin.double().cumsum(0)]))
    return _PREFIX_SUMS[key]


class ExpectedAttentionCache(KVCache):
    """Expected attention (Devoto et al. 2025, kvpress ExpectedAttentionPress): scores each key by the attention the
    NEXT queries are expected to give it. The pre-RoPE queries are modelled as a Gaussian (mean mu, covariance S per
    query head); under the average RoPE rotation R of the next ea_future_positions positions, exp(q.k/sqrt(d)) has
    expectation exp(mu'.k/sqrt(d) + k.S'k/(2d)) with mu' = R mu, S' = R S R^T. Score = softmax of that over the cached
    keys (sinks excluded), averaged over the KV head's query heads, times |v|. The statistics start from the prompt's
    queries (sinks excluded) and follow the generated ones: a running mean and covariance, exact for the first
    ea_query_window queries and an exponential average of that horizon afterwards. Costs O(C d^2) per head and step
    (the quadratic term); --ea_use_covariance false drops it."""
    hyperparams = {
        "ea_future_positions": Param(int, 512, "expected_attention: future positions whose mean RoPE rotation is "
                                               "applied to the query statistics", min=1),
        "ea_query_window": Param(int, 512, "expected_attention: horizon of the running query mean and covariance",
                                 min=1),
        "ea_use_covariance": Param(bool, True, "expected_attention: include the query covariance term"),
        "ea_use_vnorm": Param(bool, True, "expected_attention: multiply the scores by the value norms"),
        "ea_epsilon": Param(float, 0.0, "expected_attention: added to the scores before the value-norm rescaling",
                            min=0),
    }
    default_prompt_compressor = "expected_attention"

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        if self.rotates_keys:
            raise ValueError("expected_attention scores at absolute positions: use --position_mode absolute")
        self.rope_margin = max(self.rope_margin, self.ea_future_positions + 1)  # up to the last future position
        H = self.n_heads
        self.register_buffer("q_mean", torch.zeros(batch_size, H, head_dim), persistent=False)
        self.register_buffer("q_cov", torch.zeros(batch_size, H, head_dim, head_dim), persistent=False)
        self.register_buffer("q_count", torch.zeros(batch_size, dtype=torch.long), persistent=False)

    def policy_buffers(self):
        return ["q_mean", "q_cov", "q_count"]

    def set_rope(self, cos, sin):
        need = self.max_seq_length + self.rope_margin
        if cos.shape[0] < need:
            raise ValueError(f"expected_attention reads RoPE tables up to position {need - 1} (max_seq_length + "
                             f"--ea_future_positions); got {cos.shape[0]}: install caches with policies.install")
        super().set_rope(cos, sin)
        # taken here, eagerly: a compiled step reading the shared dict would guard on its key (the tables' address)
        self.rope_sums = rope_prefix_sums(cos, sin)

    def observe_prompt_queries(self, input_pos, q, context_len=None):
        """The query statistics come first (the prompt compressor scores with them): the pre-RoPE prompt queries
        after the sinks."""
        if q.shape[1] != self.q_mean.shape[1]:
            raise ValueError(f"expected_attention was built for {self.q_mean.shape[1]} query heads, the model has "
                             f"{q.shape[1]}: give build_caches n_heads")
        first = int(input_pos[0])
        qs = q[:, :, max(0, self.global_tokens - first):context_len].float()  # the prompt's, after the sinks
        n = qs.shape[2]
        if n:
            mean = qs.mean(2)
            centred = qs - mean.unsqueeze(2)
            cov = centred.transpose(-1, -2) @ centred / n
            if first > 0 and int(self.q_count) > 0:  # a later chunk (--prefill_chunk): merge, exactly
                m = int(self.q_count)
                delta = mean - self.q_mean
                mean = self.q_mean + delta * (n / (m + n))
                outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
                cov = (m * self.q_cov + n * cov) / (m + n) + outer * (m * n / (m + n) ** 2)
                n += m
            self.q_mean.copy_(mean)
            self.q_cov.copy_(cov)
            self.q_count.fill_(n)
        elif first == 0:
            self.q_count.fill_(0)

    def update(self, input_pos, k, v, q):
        """The new query updates the statistics before the eviction is scored."""
        n = self.q_count + 1  # [B]
        a = (1.0 / n.clamp(max=self.ea_query_window).double()).float().view(-1, 1, 1)
        delta = q[:, :, 0].float() - self.q_mean
        self.q_mean.add_(a * delta)
        outer = delta.unsqueeze(-1) * delta.unsqueeze(-2)
        a = a.unsqueeze(-1)
        self.q_cov.copy_((1 - a) * (self.q_cov + a * outer))
        self.q_count.copy_(n)
        return super().update(input_pos, k, v, q)

    def future_rotation(self, first) -> Tensor:
        """The mean RoPE rotation matrices over positions first .. first + n - 1 (first: an int, or a tensor with
        one entry per sequence) [B or 1, D, D]: R(p) x = cos(p) * x + sin(p) * rotate_half(x), so the mean is
        diag(mean cos) + diag(mean sin) P."""
        n, D = self.ea_future_positions, self.head_dim
        cs, ss = self.rope_sums
        first = torch.as_tensor(first, device=cs.device).view(-1)
        c = (cs.index_select(0, first + n) - cs.index_select(0, first)) / n  # [B, D]
        s = (ss.index_select(0, first + n) - ss.index_select(0, first)) / n
        half = D // 2
        P = torch.zeros(D, D, dtype=torch.float64, device=cs.device)
        P[half:, :half] = torch.eye(half, dtype=torch.float64, device=cs.device)
        P[:half, half:] = -torch.eye(half, dtype=torch.float64, device=cs.device)
        return (torch.diag_embed(c) + s.unsqueeze(-1) * P).float()

    def expected_scores(self, keys: Tensor, values: Tensor, valid: Tensor, first) -> Tensor:
        """keys, values [B, Hkv, N, D] (rotated keys), valid [B, Hkv, N] (the candidates of the softmax) ->
        scores [B, Hkv, N] (0 where not valid)."""
        B, Hkv, N, D = keys.shape
        H = self.q_mean.shape[1]
        G = H // Hkv
        R = self.future_rotation(first).unsqueeze(1)  # [B or 1, 1, D, D]
        mu = (self.q_mean.unsqueeze(-2) @ R.transpose(-1, -2)).view(B, Hkv, G, D)
        kf = keys.float()
        logits = torch.einsum("bhnd,bhgd->bhgn", kf, mu) / math.sqrt(D)
        if self.ea_use_covariance:
            cov = (R @ self.q_cov @ R.transpose(-1, -2)).view(B, Hkv, G, D, D)
            logits = logits + torch.einsum("bhnd,bhgde,bhne->bhgn", kf, cov, kf) / (2 * D)
        probs = logits.masked_fill(~valid.unsqueeze(2), float("-inf")).softmax(-1).mean(2)
        if self.ea_use_vnorm:
            probs = (probs + self.ea_epsilon) * values.float().norm(dim=-1)
        return probs.masked_fill(~valid, 0.0)

    def score(self, input_pos, k, q):
        keys = torch.cat([self.keys(), k], dim=2)
        values = torch.cat([self.values(), torch.zeros_like(k)], dim=2)  # the new key: in the softmax, never evicted
        pos = torch.cat([self.pos, input_pos.view(-1, 1, 1).expand(k.shape[0], k.shape[1], 1)], dim=2)
        valid = pos >= self.global_tokens
        return self.expected_scores(keys, values, valid, input_pos.view(-1) + 1)[..., :-1]


# ---------------------------------------------------------------------------------------------------------------
# Prompt compressors: scores of every prompt position (high = kept) and how many recent positions are protected
# ---------------------------------------------------------------------------------------------------------------
def positions_like(k: Tensor) -> Tensor:
    B, Hkv, T, _ = k.shape
    return torch.arange(T, device=k.device).expand(B, Hkv, T)


# Each takes the candidates k, v [B, Hkv, M, D] at positions pos [B, Hkv, M] (-1: an empty slot; scores there are
# ignored) and the newest queries q [B, H, n, D] (the last prompt positions); returns (scores [B, Hkv, M], how many
# recent positions are protected).
def prompt_recent_global(cache, k, q, v, pos):
    return pos.double(), cache.budget - cache.global_tokens


def prompt_random(cache, k, q, v, pos):
    return hash_uniform(pos.clamp(min=0), 0, cache.layer_idx), cache.recent_window  # the same draw alone or batched


def prompt_l2(cache, k, q, v, pos):
    return -k.float().norm(dim=-1), cache.recent_window  # keep the low-norm keys


def prompt_keep_it_odd(cache, k, q, v, pos):
    return (pos % 2 == 1).double() * (int(pos.max()) + 1) + pos, cache.recent_window  # odd first, newest first


def prompt_heavy_hitter(cache, k, q, v, pos):
    """SnapKV: the observation window of queries protects itself."""
    w = min(cache.observation_window, q.shape[2])
    return snapkv_scores(q, k, w, cache.pooling_kernel, pos), w


def prompt_lsh(cache, k, q, v, pos):
    """Hamming distance of each key's hash to the hashes of the last observation_window queries (summed over the
    KV head's query heads): keys that hash like the recent queries are kept."""
    B, H, n, D = q.shape
    Hkv = k.shape[1]
    w = min(cache.observation_window, n)
    hq = cache.hash(q[:, :, n - w:]).view(B, Hkv, -1, 1, cache.hashes.shape[-1])  # [B, Hkv, G*w, 1, nb]
    d = cache.hamming(hq, cache.hash(k).unsqueeze(2)).sum(2)  # [B, Hkv, M]
    return -d.double(), cache.recent_window


def prompt_keydiff(cache, k, q, v, pos):
    valid = (pos >= 0).unsqueeze(-1)
    kn = F.normalize(k.float(), dim=-1)
    anchor = F.normalize((kn * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True), dim=-1)
    return -(kn * anchor).sum(-1), cache.recent_window


def prompt_tova(cache, k, q, v, pos):
    """The last prompt query's attention over the whole prompt, averaged over the layer's (or the group's) heads."""
    B, H, n, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    logits = q[:, :, -1].float().reshape(B, Hkv, H // Hkv, 1, D) @ k.float().unsqueeze(2).transpose(-1, -2)
    logits = (logits / math.sqrt(D)).masked_fill((pos < 0).view(B, Hkv, 1, 1, M), float("-inf"))
    probs = logits.softmax(-1)[:, :, :, 0]  # [B, Hkv, G, M]
    if getattr(cache, "tova_heads", "layer") == "group":
        return probs.mean(2), cache.recent_window
    return (cache.sum_over_heads(probs.sum(2)) / (H * cache.head_world)).expand(B, Hkv, M), cache.recent_window


def prompt_expected_attention(cache, k, q, v, pos):
    """Expected attention with the prompt's query statistics (ExpectedAttentionCache.prefill computed them) under
    the mean rotation of the positions right after the prompt; the sinks are excluded from the softmax (and kept)."""
    return cache.expected_scores(k, v, pos >= cache.global_tokens, int(pos.max()) + 1).double(), cache.recent_window


def prompt_kvzip(cache, k, q, v, pos):
    """KVzip: the largest attention each prompt key received from the reconstruction queries (the model re-reading
    the prompt after "Repeat the previous context exactly."): computed while the extended prompt was prefilled."""
    scores = getattr(cache, "_kvzip", None)
    if scores is None or scores.shape[-1] != k.shape[2]:
        raise ValueError("prompt compressor kvzip needs the reconstruction pass: prefill with runtime.prefill, which "
                         "extends a long prompt (policies.setup(..., tokenizer=...) gives the caches the instruction)")
    return scores.double(), cache.recent_window


PROMPT_SCORERS = {
    "recent_global": prompt_recent_global,
    "random": prompt_random,
    "l2": prompt_l2,
    "heavy_hitter": prompt_heavy_hitter,
    "keep_it_odd": prompt_keep_it_odd,
    "lsh": prompt_lsh,
    "keydiff": prompt_keydiff,
    "tova": prompt_tova,
    "expected_attention": prompt_expected_attention,
    "kvzip": prompt_kvzip,
}


# ---------------------------------------------------------------------------------------------------------------
# Keep-set rules: from the scores [B, Hkv, T] (float64, high = kept) and the protected positions, the kept
# positions [B, Hkv, C] in increasing order (-1: an empty slot)
# ---------------------------------------------------------------------------------------------------------------
def rank_scores(score: Tensor, protected: Tensor) -> Tensor:
    """A key to take the top of, strictly ordered: protected positions first, then by score, ties to the lower
    position; -inf (no candidate) stays -inf. It is minus the rank from a stable sort, not the score minus a
    position penalty: attention-based scores are ~1e-7..1e-5 on a 2k prompt, where any fixed penalty would outweigh
    them and favour early positions."""
    key = score.masked_fill(protected, float("inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(key.shape[-1], device=key.device, dtype=torch.float64).expand(order.shape)
    rank = torch.empty(order.shape, dtype=torch.float64, device=key.device).scatter_(-1, order, ranks)
    return (-rank).masked_fill(key == float("-inf"), float("-inf"))


def keep_topk(cache, score, protected, v):
    return torch.topk(rank_scores(score, protected), cache.budget, dim=-1).indices.sort(dim=-1).values


def keep_chunkkv(cache, score, protected, v):
    """ChunkKV (Liu et al. 2025, arXiv 2502.00299): whole chunks of chunkkv_size tokens, by the mean over the chunk
    of the score summed over KV heads, the same positions in every head. Protected positions are kept first; then
    chunks in decreasing chunk score, each taken when all its positions not yet kept fit in the budget (a chunk that
    does not fit is skipped). The choice is made on the host (a prompt-time step)."""
    B, Hkv, T = score.shape
    L, C = cache.chunkkv_size, cache.budget
    total = cache.sum_over_heads(score)[:, 0]  # [B, T], every KV head of the layer
    out = []
    for b in range(B):
        kept = set(torch.nonzero(protected[b, 0]).flatten().tolist())
        chunk_scores = [(float(total[b, s:s + L].mean()), s) for s in range(0, T, L)]
        for _, s in sorted(chunk_scores, key=lambda x: (-x[0], x[1])):
            new = [p for p in range(s, min(s + L, T)) if p not in kept]
            if len(kept) + len(new) <= C:
                kept.update(new)
        keep = sorted(kept) + [-1] * (C - len(kept))
        out.append(torch.tensor(keep, device=score.device))
    keep = torch.stack(out).unsqueeze(1).expand(B, Hkv, C)
    return keep_order(keep)


def keep_order(keep: Tensor) -> Tensor:
    """Kept positions increasing, empty slots (-1) last."""
    big = torch.iinfo(torch.long).max
    ordered = keep.masked_fill(keep < 0, big).sort(dim=-1).values
    return ordered.masked_fill(ordered == big, -1)


def keep_criticalkv(cache, score, protected, v):
    """CriticalKV (Feng et al. 2025, arXiv 2502.03805), two stages: the first criticalkv_first_stage of the budget
    by the raw scores; the rest by (score + epsilon) * |W_o v|_1 (the value's contribution to the layer output)."""
    n1 = max(1, int(cache.budget * cache.criticalkv_first_stage)) if cache.criticalkv_first_stage > 0 else 0
    first = torch.topk(rank_scores(score, torch.zeros_like(protected)), n1, dim=-1).indices  # by the scores alone
    rescaled = (score + cache.criticalkv_epsilon) * cache.value_norms(v).double()
    rescaled = rescaled.scatter(-1, first, float("inf"))
    return keep_topk(cache, rescaled, protected, v)


def keep_adakv(cache, score, protected, v):
    """AdaKV (Feng et al. 2024, arXiv 2407.11550): head-adaptive budgets inside a layer. Each head keeps its top
    max(1, adakv_alpha * budget) positions (a floor, ties to the lower position); then the layer keeps the
    Hkv * budget highest scores over all heads together (protected positions and floors first; ties: lower head,
    then lower position). A head holds at most kv_budget (= adakv_cap * budget) tokens: its best ones. Under
    tensor parallelism the decision is taken on every rank's heads and each rank keeps its own block."""
    score, protected = cache.all_heads(score), cache.all_heads(protected)
    B, Hkv, T = score.shape
    C, slots = cache.budget, cache.prompt_slots
    n_safe = max(1, int(C * cache.adakv_alpha)) if cache.adakv_alpha > 0 else 0
    pinned = protected.clone()
    if n_safe:
        pinned.scatter_(-1, torch.topk(rank_scores(score, protected), n_safe, dim=-1).indices, True)
    flat = score.masked_fill(pinned, float("inf")).reshape(B, Hkv * T)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices  # ties: lower head, then position
    chosen = torch.zeros(B, Hkv * T, dtype=torch.bool, device=score.device)
    chosen.scatter_(1, order[:, :Hkv * C], True)
    chosen = chosen.view(B, Hkv, T)
    best = torch.topk(rank_scores(score, pinned).masked_fill(~chosen, float("-inf")), min(slots, T), dim=-1).indices
    keep = torch.where(chosen.gather(-1, best), best, torch.full_like(best, -1))
    if keep.shape[-1] < slots:
        keep = torch.cat([keep, keep.new_full((B, Hkv, slots - keep.shape[-1]), -1)], dim=-1)
    return keep_order(cache.own_heads(keep))


KEEP_SETS = {"topk": keep_topk, "chunkkv": keep_chunkkv, "criticalkv": keep_criticalkv, "adakv": keep_adakv}


# ---------------------------------------------------------------------------------------------------------------
# A batch of sequences, and statistics
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sequence_view(model, row: int):
    """Inside: sequence `row`'s cache in every layer (a view into each layer's batched cache)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(c.row_view(row)) for c in model.caches]


def batch_size(model) -> int:
    return model.caches[0].pos.shape[0]


def prefill_budget(model) -> int:
    """The longest prompt every layer can take without compression."""
    return min(c.kv_budget for c in model.caches)


def cache_stats(model, row: int = None) -> dict:
    """Statistics of the caches (with a batch: of sequence `row`, or per sequence under "sequences" with the
    totals of the whole batch's buffers). Three byte counts that mean different things:
      kv_cache_bytes       the buffers allocated (K/V at their slots, positions, per-slot policy state)
      kept_kv_bytes        what the kept tokens' K/V occupy in those buffers
      full_kv_cache_bytes  what a full cache of the same tokens would take (K/V in the model's dtype)
    kv_budget_slots: slots per KV head, the mean over layers."""
    if batch_size(model) > 1 and row is None:
        per_seq = [cache_stats(model, b) for b in range(batch_size(model))]
        total = {k: sum(s[k] for s in per_seq) for k in ("kept_kv_bytes", "full_kv_cache_bytes")}
        kept, seen = sum(s["kept_tokens"] for s in per_seq), sum(s["seen_tokens"] for s in per_seq)
        return {"batch_size": len(per_seq), "seen_tokens": seen, "kept_tokens": kept,
                "compression_ratio": kept / seen if seen else 1.0, **total,
                "kv_cache_bytes": sum(c.nbytes() for c in model.caches),  # shared tables once
                "kv_budget_slots": per_seq[0]["kv_budget_slots"], "sequences": per_seq}
    if row is None:
        return layer_stats(model.caches)
    with sequence_view(model, row) as caches:
        return layer_stats(caches)


def layer_stats(caches: list) -> dict:
    """cache_stats of one sequence's caches (one per layer)."""
    seen = int(caches[0].seen)
    b, h, _ = caches[0].pos.shape
    d = caches[0].head_dim
    layers = []
    for i, c in enumerate(caches):
        kept = c.kept() / (b * h)
        slot_bytes = sum(t.numel() * t.element_size() for t in c.store.buffers()) / c.pos.numel()
        layer = {"layer": i, "policy": type(c).__name__, "kv_budget": c.kv_budget, "kept_tokens": kept,
                 "compression_ratio": kept / seen if seen else 1.0, "kv_cache_bytes": c.nbytes(),
                 "kept_kv_bytes": int(c.kept() * slot_bytes)}
        if c.loss_meter is not None:
            layer["attention_loss"] = c.loss_meter.value()
        layers.append(layer)
    kept = sum(x["kept_tokens"] for x in layers) / len(layers)
    elem = torch.empty((), dtype=caches[0].kv_dtype).element_size()
    stats = {
        "seen_tokens": seen,
        "kept_tokens": kept,
        "compression_ratio": kept / seen if seen else 1.0,
        "kv_budget_slots": sum(x["kv_budget"] for x in layers) / len(layers),
        "kv_cache_bytes": sum(x["kv_cache_bytes"] for x in layers),
        "kept_kv_bytes": sum(x["kept_kv_bytes"] for x in layers),
        "full_kv_cache_bytes": 2 * len(caches) * b * h * seen * d * elem,
        "layers": layers,
    }
    losses = [x["attention_loss"] for x in layers if "attention_loss" in x]
    if losses:
        stats["attention_loss"] = sum(losses) / len(losses)
    return stats
