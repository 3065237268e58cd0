"""Static, preallocated KV caches whose policies rewrite slots in place.

A layer's cache holds `kv_budget` slots per KV head: k, v [B, Hkv, C, D] and pos [B, Hkv, C] (the original
position in each slot, -1 = empty). Each decode step writes exactly one slot per (sequence, KV head), chosen
by the policy, so shapes never change and the decode step compiles once.

A policy is a small subclass of KVCache: it declares its hyper-parameters (`hyperparams`, shown in --help)
and how it scores slots (`score`, low = evicted first). The base class does the bookkeeping: sinks
(positions < global_tokens) and the recent window (positions >= t - recent_window) are protected, empty
slots fill first, ties go to the lowest slot index, prompts longer than the budget are compressed, and
statistics are kept. Semantics: ../shared/ALGORITHMS.md; the step-by-step references: tests/reference_policies.py.
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import apply_rope, attention

CONFIG_DIR = Path(__file__).resolve().parent / "cache_configs"


class KVCache(nn.Module):
    hyperparams = {}  # name -> (type, default, help): become --flags and constructor arguments
    needs_attention = False  # True: the model passes each decode step's attention to record_attention
    needs_tokens = False  # True: the model calls set_tokens(idx, prefill) before each forward
    default_prompt_compressor = "recent_global"

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, kv_budget: int, dtype, *,
                 max_seq_length: int = None, global_tokens: int = 4, recent_window: int = 10,
                 prompt_compressor: str = None, observation_window: int = 16, pooling_kernel: int = 5,
                 layer_idx: int = 0, n_layers: int = 1, debug_attention_loss: bool = False,
                 position_mode: str = "absolute", cache_bits: int = None, cache_group_size: int = None, **hp):
        super().__init__()
        if position_mode not in ("absolute", "cache"):
            raise ValueError(f"unknown position_mode {position_mode!r}; allowed: absolute, cache")
        self.position_mode = position_mode
        self.rotates_keys = position_mode == "cache"  # keys stored un-rotated, rotated by rank at each step
        self.rope_cos = self.rope_sin = None  # RoPE tables, set by Transformer.setup_caches
        self.kv_budget, self.global_tokens, self.recent_window = kv_budget, global_tokens, recent_window
        self.max_seq_length = max_seq_length or kv_budget  # longest sequence the run may reach
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.prompt_compressor = prompt_compressor or self.default_prompt_compressor
        self.observation_window, self.pooling_kernel = observation_window, pooling_kernel
        for name, (_, default, _) in self.hyperparams.items():
            setattr(self, name, hp.pop(name, default))
        if hp:
            raise ValueError(f"{type(self).__name__} got unknown hyper-parameters {sorted(hp)}")
        shape = (batch_size, n_kv_heads, kv_budget, head_dim)
        self.cache_bits = cache_bits
        if cache_bits:
            self.quant = KVQuantizer(cache_bits, cache_group_size or head_dim, head_dim)
            for name in ("k", "v"):  # codes packed in bytes, one scale and zero per token and group
                self.register_buffer(f"{name}_codes", torch.zeros(*shape[:3], self.quant.code_bytes, dtype=torch.uint8),
                                     persistent=False)
                self.register_buffer(f"{name}_scale", torch.zeros(*shape[:3], self.quant.n_groups, dtype=dtype),
                                     persistent=False)
                self.register_buffer(f"{name}_zero", torch.zeros(*shape[:3], self.quant.n_groups, dtype=dtype),
                                     persistent=False)
            self.k = self.v = None
        else:
            self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.kv_dtype, self.head_dim = dtype, head_dim
        self.register_buffer("pos", torch.full(shape[:3], -1, dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.debug_attention_loss = debug_attention_loss
        if debug_attention_loss:  # a shadow full cache of keys, to measure the attention mass eviction loses
            self.register_buffer("shadow_k", torch.zeros(batch_size, n_kv_heads, self.max_seq_length, head_dim,
                                                         dtype=dtype), persistent=False)
            # shape (1,): a compiled in-place add into a 0-dim float64 buffer was silently dropped (torch 2.13)
            self.register_buffer("lost_mass", torch.zeros(1, dtype=torch.float64), persistent=False)
            self.register_buffer("lost_steps", torch.zeros((), dtype=torch.long), persistent=False)

    def policy_buffers(self):
        """Names of per-slot policy state (scores, hashes) that is reset with the cache."""
        return []

    def reset(self):
        for name in self.kv_buffer_names():
            getattr(self, name).zero_()
        self.pos.fill_(-1)
        self.seen.zero_()
        for name in self.policy_buffers():
            getattr(self, name).zero_()
        if self.debug_attention_loss:
            self.shadow_k.zero_()
            self.lost_mass.zero_()
            self.lost_steps.zero_()

    # -- prefill -------------------------------------------------------------------------------------------
    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        """Store the prompt's rotated k, v [B, Hkv, T, D] (positions input_pos = 0..T-1); q [B, H, T, D]."""
        T, C = k.shape[2], self.kv_budget
        if T <= C:
            keep = None
            self.write_slots(torch.arange(T, device=k.device).expand(*k.shape[:2], T), k, v)
            self.pos[:, :, :T] = input_pos
        else:
            keep = self.compress_prompt(k, q)  # [B, Hkv, C] kept positions, increasing
            idx = keep.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            self.write_slots(torch.arange(C, device=k.device).expand_as(keep), k.gather(2, idx), v.gather(2, idx))
            self.pos.copy_(keep)
        self.seen.fill_(T)
        if self.debug_attention_loss:
            self.shadow_k[:, :, :T] = k
        self.after_prefill(k, q, keep)

    def after_prefill(self, k: Tensor, q: Tensor, keep):
        """Seed per-slot state from the prompt (keep: the kept positions, or None when all were kept)."""

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
    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        """Insert one token (k, v [B, Hkv, 1, D] at position input_pos [1]); q [B, H, 1, D].

        Returns q, k, v, mask for attention (q and k rotated by rank in position_mode "cache")."""
        slot = self.choose_slot(input_pos, k, q)  # [B, Hkv]
        self.write_slots(slot[:, :, None], k, v)
        self.pos.scatter_(2, slot[:, :, None], input_pos.view(-1, 1, 1).expand(slot.shape[0], slot.shape[1], 1))
        self.seen.add_(1)
        self.after_insert(slot, input_pos, k, q)
        if self.debug_attention_loss:
            self.shadow_k.index_copy_(2, input_pos, k)
            self.measure_lost_attention(input_pos, q)
        mask = (self.pos >= 0).unsqueeze(2)
        if self.cache_bits:  # attend() reads the quantized buffers directly
            return q, None, None, mask
        if self.rotates_keys:
            return (*self.rotate_by_rank(q, self.k), self.v, mask)
        return q, self.k, self.v, mask

    def decode(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """One decode token through the cache: insert it (evicting per the policy), attend, record attention."""
        q_att, k_all, v_all, mask = self.update(input_pos, k, v, q)
        y, probs = self.attend(q_att, k_all, v_all, mask)
        if probs is not None:
            self.record_attention(probs)
        return y

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor):
        """Decode attention over the cache; returns y and (when needs_attention) the probabilities."""
        if k is None:
            k, v = self.quant.dequantize(self.k_codes, self.k_scale, self.k_zero), \
                self.quant.dequantize(self.v_codes, self.v_scale, self.v_zero)
            if self.rotates_keys:
                q, k = self.rotate_by_rank(q, k)
            return fused_attention(q, k.to(q.dtype), v.to(q.dtype), mask, self.needs_attention)
        return attention(q, k, v, mask, need_probs=self.needs_attention)

    # -- storage (full precision or quantized) ---------------------------------------------------------------
    def kv_buffer_names(self):
        if self.cache_bits:
            return [f"{n}_{part}" for n in ("k", "v") for part in ("codes", "scale", "zero")]
        return ["k", "v"]

    def write_slots(self, index: Tensor, k: Tensor, v: Tensor):
        """Store k, v [B, Hkv, n, D] into the slots index [B, Hkv, n]."""
        if not self.cache_bits:
            idx = index.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            self.k.scatter_(2, idx, k.to(self.k.dtype))
            self.v.scatter_(2, idx, v.to(self.v.dtype))
            return
        for name, x in (("k", k), ("v", v)):
            for part, t in zip(("codes", "scale", "zero"), self.quant.quantize(x)):
                buf = getattr(self, f"{name}_{part}")
                buf.scatter_(2, index.unsqueeze(-1).expand(-1, -1, -1, buf.shape[-1]), t.to(buf.dtype))

    def keys(self) -> Tensor:
        """The cached keys in full precision (dequantized when stored quantized); for policy bookkeeping."""
        if self.cache_bits:
            return self.quant.dequantize(self.k_codes, self.k_scale, self.k_zero).to(self.kv_dtype)
        return self.k

    def values(self) -> Tensor:
        if self.cache_bits:
            return self.quant.dequantize(self.v_codes, self.v_scale, self.v_zero).to(self.kv_dtype)
        return self.v

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

    def set_tokens(self, idx: Tensor, prefill: bool):
        """idx [B, T]: the token ids of this forward (policies with needs_tokens)."""

    def select_token(self, t: int):
        """A multi-token decode step is about to insert its t-th token (policies with needs_tokens)."""

    def measure_lost_attention(self, input_pos: Tensor, q: Tensor):
        """Attention mass that full attention would put on tokens this cache no longer holds."""
        B, H, _, D = q.shape
        Hkv = self.shadow_k.shape[1]
        qf = q.float().reshape(B, Hkv, H // Hkv, D)
        scores = qf @ self.shadow_k.float().transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, S]
        S = scores.shape[-1]
        visible = torch.arange(S, device=q.device) <= input_pos
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        held = torch.zeros(B, Hkv, S + 1, device=q.device).scatter_(2, self.pos.clamp(min=-1) + 1, 1.0)[..., 1:]
        self.lost_mass.add_((probs * (1 - held).unsqueeze(2)).sum(-1).mean().double())
        self.lost_steps.add_(1)

    # -- statistics ----------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this cache really holds: K/V, positions and per-slot policy state (not the debug shadow)."""
        skip = {"shadow_k", "lost_mass", "lost_steps"}
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n not in skip)

    def kept(self) -> int:
        return int((self.pos >= 0).sum())


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


# ---------------------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------------------
class FullCache(KVCache):
    """Never evicts: slot = position; the buffer holds prompt + max_new_tokens."""

    def choose_slot(self, input_pos, k, q):
        return input_pos.view(-1, 1).expand(self.pos.shape[0], self.pos.shape[1])


def hash_uniform(a: Tensor, b: Tensor, c: int) -> Tensor:
    """A uniform [0, 1) draw per (a, b, c), from integer hashing (two Park-Miller steps; no overflow in int64).
    Random eviction uses it instead of a random generator, so a sequence evicts the same slots whether it
    is decoded alone or in a batch, and every run is reproducible."""
    m = 2147483647
    x = (a * 73856093 + b * 19349663 + c * 83492791 + 12345) % m
    x = (x * 48271) % m
    x = (x * 48271) % m
    return x.double() / m


class RandomCache(KVCache):
    """Evicts a random unprotected slot: one draw per (layer, step, slot), shared by the KV heads."""
    default_prompt_compressor = "recent_global"

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
        "history_window_size": (int, 0, "heavy_hitter: 0 = full history; W > 0 = average over the last W steps"),
        "attn_thresholding": (bool, False, "heavy_hitter: a step counts 1 if attention >= 1/occupied, else 0"),
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
        T, C, W = k.shape[2], self.kv_budget, self.history_window_size
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
        "lsh_dim": (int, 16, "lsh: hash bits per key (1..64); stored packed, ceil(lsh_dim/8) bytes per token and head"),
        "lsh_source": (str, "key", "lsh: hash the incoming key (authors' code) or the query (paper; summed over GQA)"),
        "lsh_seed": (int, 0, "lsh: seed of the per-layer random projections"),
    }

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        if not 1 <= self.lsh_dim <= 64:
            raise ValueError(f"--lsh_dim must be in 1..64, got {self.lsh_dim}")
        if self.lsh_source not in ("key", "query"):
            raise ValueError(f"--lsh_source must be key or query, got {self.lsh_source!r}")
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
    """keep(T) of ALGORITHMS.md: sinks, the recent window, and whole middle blocks (aligned to position 0)."""
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
        "sink_tokens": (int, 256, "sink_recent/merge_pyramid: first tokens always kept (sink_recent 256, merge_pyramid 4)"),
        "recent_tokens": (int, 512, "sink_recent: most recent tokens kept"),
        "middle_strategy": (str, "none", "sink_recent: none | uniform"),
        "middle_budget_tokens": (int, 0, "sink_recent: tokens of uniformly spread middle blocks"),
        "uniform_stride": (int, 0, "sink_recent: keep every s-th middle block (overrides the budget)"),
        "block_n": (int, 128, "sink_recent: block size of the middle selection"),
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
        if self.middle_strategy not in ("none", "uniform"):
            raise ValueError(f"--middle_strategy must be none or uniform, got {self.middle_strategy!r}")
        if min(self.sink_tokens, self.uniform_stride, self.middle_budget_tokens) < 0 or self.recent_tokens < 1 \
                or self.block_n < 1:
            raise ValueError("sink_recent needs --sink_tokens >= 0, --recent_tokens >= 1, --block_n >= 1")
        # The recent window counts the new token: protect the recent_tokens - 1 before it.
        self.global_tokens, self.recent_window = self.sink_tokens, self.recent_tokens - 1

    @torch.compiler.disable  # keep(T) is computed on the host: compiled, it would recompile per prompt length
    def prefill(self, input_pos, k, v, q):
        T = k.shape[2]
        keep = sink_recent_keep(T, **{name: getattr(self, name) for name in self.hyperparams})
        n = len(keep)
        if n > self.kv_budget:
            raise ValueError(f"sink_recent keeps {n} prompt tokens but the budget is {self.kv_budget}")
        idx = torch.tensor(keep, device=k.device)
        self.write_slots(torch.arange(n, device=k.device).expand(*k.shape[:2], n), k[:, :, idx], v[:, :, idx])
        self.pos[:, :, :n] = idx
        self.seen.fill_(T)

    def score(self, input_pos, k, q):
        return -self.pos.float()  # the newest unprotected token (the one leaving the window) goes


POLICIES = {
    "full": FullCache,
    "random": RandomCache,
    "recent_global": RecentGlobalCache,
    "l2": L2Cache,
    "heavy_hitter": HeavyHitterCache,
    "keep_it_odd": KeepItOddCache,
    "lsh": LSHCache,
    "sink_recent": SinkRecentCache,
}
PROMPT_COMPRESSORS = ["recent_global", "random", "l2", "heavy_hitter", "keep_it_odd"]


# ---------------------------------------------------------------------------------------------------------------
# Command line, configs and set-up, shared by generate.py, eval.py and benchmark.py
# ---------------------------------------------------------------------------------------------------------------
def add_cache_args(p):
    g = p.add_argument_group("KV cache (see cache_configs/ and ../shared/ALGORITHMS.md)")
    g.add_argument("--cache_config", default=None,
                   help="load cache_configs/NAME.yaml; flags given on the command line override it")
    g.add_argument("--cache_strategy", nargs="+", default=["full"], help=f"one or more of: {', '.join(POLICIES)}")
    g.add_argument("--cache_strategy_pattern", default="tile", choices=["tile", "repeat"],
                   help="how several strategies are laid over the layers: tile a..ab..b, repeat abab")
    g.add_argument("--max_cache_length", nargs="+", type=float, default=[1.0],
                   help="slots per layer: a fraction (<= 1) of prompt + max_new_tokens, or a token count")
    g.add_argument("--cache_length_pattern", default="tile", choices=["tile", "repeat", "pyramid", "funnel"],
                   help="how several lengths are laid over the layers; pyramid/funnel: PyramidKV's linear schedule")
    g.add_argument("--pyramid_beta", type=float, default=20.0,
                   help="pyramid/funnel steepness (PyramidKV's beta): the smallest layer gets average / beta")
    g.add_argument("--global_tokens", type=int, default=4, help="sink tokens never evicted")
    g.add_argument("--recent_window", type=int, default=10, help="most recent tokens never evicted")
    g.add_argument("--prompt_compression_strategy", default=None,
                   help=f"for prompts longer than the budget: {', '.join(PROMPT_COMPRESSORS)} "
                        "(default: heavy_hitter for heavy_hitter, else recent_global)")
    g.add_argument("--observation_window", type=int, default=16, help="SnapKV: last prompt queries scored")
    g.add_argument("--pooling_kernel", type=int, default=5, help="SnapKV: 1-D pooling kernel over the scores")
    g.add_argument("--feed_long_prompts", action="store_true",
                   help="prefill budget-1 prompt tokens, then feed the rest through the decode step")
    g.add_argument("--cache_bits", type=int, default=None, choices=[2, 4, 8],
                   help="store K/V quantized (per token and group, min-max) with every policy")
    g.add_argument("--cache_group_size", type=int, default=None,
                   help="channels sharing one scale with --cache_bits (default: head_dim, i.e. per token)")
    g.add_argument("--debug_attention_loss", action="store_true",
                   help="keep a shadow full cache and report the attention mass evicted tokens would get")
    g.add_argument("--position_mode", default=None, choices=["absolute", "cache"],
                   help="RoPE positions of cached keys: absolute, or cache (rank in the cache, StreamingLLM's "
                        "position shift); default: each policy's own (absolute for all but lacache)")
    # Policy hyper-parameters; a flag left unset (None) lets each policy use its own default.
    seen = set()
    for cls in POLICIES.values():
        for hp, (typ, default, help_) in cls.hyperparams.items():
            if hp in seen:
                continue
            seen.add(hp)
            if typ is bool:
                g.add_argument(f"--{hp}", action="store_const", const=True, default=None, help=help_)
            else:
                g.add_argument(f"--{hp}", type=typ, default=None, help=f"{help_} (default {default})")


def one_line_errors(parser):
    """argparse prints its whole usage before an error; bad input gets one line here (and exit 2)."""
    def error(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def parse_args(parser, argv=None):
    """parse_args with --cache_config: the YAML's values become defaults, so command-line flags override them."""
    import yaml

    one_line_errors(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.cache_config:
        path = Path(pre.cache_config)
        if not path.suffix:
            path = CONFIG_DIR / f"{pre.cache_config}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ValueError(f"unknown --cache_config {pre.cache_config!r}; shipped configs: {known}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(values, dict):
            raise ValueError(f"{path} must be a mapping of option: value")
        actions = {a.dest: a for a in parser._actions}
        bad = sorted(set(values) - set(actions))
        if bad:
            raise ValueError(f"{path}: unknown keys {bad}")
        for key, value in values.items():  # the same type checks as on the command line
            typ = actions[key].type
            if typ is None or value is None:
                continue
            try:
                values[key] = [typ(x) for x in value] if isinstance(value, list) else typ(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {key}: {value!r} is not a valid {typ.__name__}")
            if isinstance(value, list) and actions[key].nargs is None:
                raise ValueError(f"{path}: {key} takes one value, got a list")
        for key in ("cache_strategy", "max_cache_length"):
            if key in values and not isinstance(values[key], list):
                values[key] = [values[key]]
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def layer_pattern(values: list, n_layers: int, pattern: str, what: str) -> list:
    if n_layers % len(values):
        raise ValueError(f"{len(values)} values of {what} do not divide the model's {n_layers} layers")
    if pattern == "repeat":
        return [values[i % len(values)] for i in range(n_layers)]
    per = n_layers // len(values)
    return [values[i // per] for i in range(n_layers)]


def layer_budgets(args, n_layers: int, max_seq_length: int) -> list:
    """Slots per layer from --max_cache_length and --cache_length_pattern, each capped at max_seq_length."""
    def tokens(x):
        return int(round(x * max_seq_length)) if x <= 1 else int(x)

    lengths = [tokens(x) for x in args.max_cache_length]
    if any(x < 1 for x in lengths):
        raise ValueError(f"--max_cache_length {args.max_cache_length} gives an empty cache")
    if args.cache_length_pattern in ("pyramid", "funnel"):
        if len(lengths) != 1:
            raise ValueError("--cache_length_pattern pyramid/funnel takes one --max_cache_length (the average)")
        if args.pyramid_beta < 1:
            raise ValueError(f"--pyramid_beta must be >= 1, got {args.pyramid_beta}")
        avg = lengths[0]
        low = avg / args.pyramid_beta  # PyramidKV: linear from 2*avg - low (layer 0) down to low
        high = 2 * avg - low
        step = (high - low) / max(n_layers - 1, 1)
        budgets = [int(round(high - i * step)) for i in range(n_layers)]
        if args.cache_length_pattern == "funnel":
            budgets = budgets[::-1]
    else:
        budgets = layer_pattern(lengths, n_layers, args.cache_length_pattern, "--max_cache_length")
    return [min(b, max_seq_length) for b in budgets]


def build_caches(args, n_layers, n_kv_heads, head_dim, batch_size, max_seq_length, dtype, device,
                 prompt_len: int = 0):
    """One cache module per layer from the parsed arguments (validated: one clear error per mistake)."""
    strategies = layer_pattern(args.cache_strategy, n_layers, args.cache_strategy_pattern, "--cache_strategy")
    for s in set(strategies):
        if s not in POLICIES:
            raise ValueError(f"unknown --cache_strategy {s!r}; allowed: {', '.join(POLICIES)}")
    pc = args.prompt_compression_strategy
    if pc is not None and pc not in PROMPT_COMPRESSORS:
        raise ValueError(f"unknown --prompt_compression_strategy {pc!r}; allowed: {', '.join(PROMPT_COMPRESSORS)}")
    if pc is not None and args.feed_long_prompts:
        raise ValueError("--prompt_compression_strategy and --feed_long_prompts are two ways to handle long "
                         "prompts; choose one")
    if args.global_tokens < 0 or args.recent_window < 0:
        raise ValueError("--global_tokens and --recent_window must be >= 0")
    budgets = layer_budgets(args, n_layers, max_seq_length)
    caches = []
    for i, (strategy, budget) in enumerate(zip(strategies, budgets)):
        cls = POLICIES[strategy]
        if cls is FullCache:
            budget = max_seq_length
        elif not hasattr(cls, "sized_budget") and budget < max_seq_length and budget < args.global_tokens + args.recent_window + 1:
            raise ValueError(f"layer {i} gets a budget of {budget} slots, smaller than --global_tokens "
                             f"({args.global_tokens}) + --recent_window ({args.recent_window}) + 1")
        hp = {name: getattr(args, name) for name in cls.hyperparams if getattr(args, name, None) is not None}
        if hasattr(cls, "sized_budget"):  # policies whose own flags set the budget
            budget = cls.sized_budget(prompt_len, max_seq_length,
                                      {n: hp.get(n, d) for n, (_, d, _) in cls.hyperparams.items()})
        if args.position_mode is not None:
            hp["position_mode"] = args.position_mode
        with torch.device(device):
            caches.append(cls(batch_size, n_kv_heads, head_dim, budget, dtype, max_seq_length=max_seq_length,
                              global_tokens=args.global_tokens, recent_window=args.recent_window,
                              prompt_compressor=pc, observation_window=args.observation_window,
                              pooling_kernel=args.pooling_kernel, layer_idx=i, n_layers=n_layers,
                              debug_attention_loss=args.debug_attention_loss, cache_bits=args.cache_bits,
                              cache_group_size=args.cache_group_size, **hp))
    return caches


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

    def reset(self):
        for c in self.rows:
            c.reset()

    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor, row: int):
        self.rows[row].prefill(input_pos, k, v, q)

    def decode(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor) -> Tensor:
        """input_pos [B, 1] (each sequence's position) or [1] (shared); k, v [B, Hkv, 1, D]; q [B, H, 1, D]."""
        per_seq = input_pos.dim() == 2
        return torch.cat([c.decode(input_pos[b] if per_seq else input_pos, k[b:b + 1], v[b:b + 1], q[b:b + 1])
                          for b, c in enumerate(self.rows)], dim=0)

    def set_tokens(self, idx: Tensor, prefill: bool, row: int = None):
        if prefill:
            self.rows[row].set_tokens(idx, True)
        else:
            for b, c in enumerate(self.rows):
                c.set_tokens(idx[b:b + 1], False)

    def select_token(self, t: int):
        for c in self.rows:
            c.select_token(t)

    def set_token_tables(self, *args, **kw):  # hybrid's vocabulary tables
        for c in self.rows:
            c.set_token_tables(*args, **kw)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.rows)

    def kept(self) -> int:
        return sum(c.kept() for c in self.rows)


def setup(model, args, batch_size: int, prompt_len: int, max_seq_length: int):
    """Builds each layer's cache from the command-line arguments and installs it in the model. With
    batch_size > 1 each layer gets a SequenceBatch of batch_size single-sequence caches (prompt_len: the
    longest prompt)."""
    cfg = model.config
    w = model.tok_embeddings.weight

    def build():
        return build_caches(args, cfg.n_layer, cfg.n_local_heads, cfg.head_dim, 1, max_seq_length, w.dtype,
                            w.device, prompt_len=prompt_len)

    if batch_size == 1:
        caches = build()
    else:
        per_seq = [build() for _ in range(batch_size)]
        caches = [SequenceBatch([seq[i] for seq in per_seq]) for i in range(cfg.n_layer)]
    model.setup_caches(max_seq_length, lambda i: caches[i])
    return caches


def sequence_caches(model, row: int) -> list:
    """Sequence `row`'s cache in every layer (the model's own caches when it decodes one sequence)."""
    return [c.rows[row] if isinstance(c, SequenceBatch) else c for c in model.caches]


def batch_size(model) -> int:
    c = model.caches[0]
    return len(c.rows) if isinstance(c, SequenceBatch) else c.pos.shape[0]


def prefill_budget(model) -> int:
    """The longest prompt every layer can take without compression."""
    return min(c.kv_budget for c in model.caches)


def cache_stats(model, row: int = None) -> dict:
    """Statistics of the caches (with a batch: of sequence `row`, or per sequence under "sequences" with the
    totals of the whole batch's buffers)."""
    if isinstance(model.caches[0], SequenceBatch) and row is None:
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
        if c.debug_attention_loss:
            layer["attention_loss"] = float(c.lost_mass / c.lost_steps.clamp(min=1))
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


# The seed policies live in their own modules and register themselves in POLICIES at their end (a plain
# import tolerates the cycle when one of them is imported first).
import lacache  # noqa: E402,F401
import merge_pyramid  # noqa: E402,F401
import hybrid  # noqa: E402,F401
