"""Static, preallocated KV caches whose policies rewrite slots in place.

A layer's cache holds `kv_budget` slots per KV head: k, v [B, Hkv, C, D] and pos [B, Hkv, C] (the original
position held by each slot, -1 = empty). Every decode step writes exactly one slot per (sequence, KV head),
chosen by the policy, so shapes never change and the decode step compiles once.

A policy subclasses KVCache and overrides `score` (low = evicted first); the base class protects sinks
(positions < global_tokens) and the recent window (positions >= t - recent_window), fills empty slots first
and breaks ties by the lowest slot index.
"""
import torch
import torch.nn as nn
from torch import Tensor


class KVCache(nn.Module):
    needs_attention = False  # True: the model passes decode attention probabilities to record_attention

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, kv_budget: int, dtype,
                 global_tokens: int = 0, recent_window: int = 0):
        super().__init__()
        self.kv_budget, self.global_tokens, self.recent_window = kv_budget, global_tokens, recent_window
        shape = (batch_size, n_kv_heads, kv_budget, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("pos", torch.full(shape[:3], -1, dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)  # tokens seen so far

    def reset(self):
        self.k.zero_()
        self.v.zero_()
        self.pos.fill_(-1)
        self.seen.zero_()

    # -- prefill -------------------------------------------------------------------------------------------
    def prefill(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        """Store the prompt's rotated k, v [B, Hkv, T, D] (positions input_pos, starting at 0)."""
        T = k.shape[2]
        if T > self.kv_budget:
            raise ValueError(f"prompt of {T} tokens does not fit a {self.kv_budget}-slot cache; "
                             "use a prompt compressor or --feed_long_prompts")
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v
        self.pos[:, :, :T] = input_pos
        self.seen.fill_(T)

    # -- decode --------------------------------------------------------------------------------------------
    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        """Insert one token (k, v [B, Hkv, 1, D] at position input_pos [1]); return k, v, mask for attention."""
        slot = self.choose_slot(input_pos, k, q)  # [B, Hkv]
        index = slot[:, :, None, None].expand(-1, -1, 1, k.shape[-1])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.pos.scatter_(2, slot[:, :, None], input_pos.view(1, 1, 1).expand(slot.shape[0], slot.shape[1], 1))
        self.seen.add_(1)
        self.after_insert(slot, input_pos, k, q)
        return self.k, self.v, (self.pos >= 0).unsqueeze(2)

    def choose_slot(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        score = self.score(input_pos, k, q).float()
        pos = self.pos
        protected = (pos < self.global_tokens) | (pos >= input_pos - self.recent_window)
        score = score.masked_fill(protected, float("inf")).masked_fill(pos < 0, float("-inf"))
        return score.argmin(dim=-1)  # first minimum: empty slots in order, then the lowest slot on ties

    def score(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        raise NotImplementedError

    def after_insert(self, slot: Tensor, input_pos: Tensor, k: Tensor, q: Tensor):
        """Per-slot state (scores, hashes) of the new token; nothing by default."""

    def record_attention(self, probs: Tensor):
        """probs [B, Hkv, G, 1, C]: this step's attention, for policies with needs_attention."""

    # -- statistics ----------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this cache really holds: K/V, positions and any per-slot policy state."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def kept(self) -> int:
        return int((self.pos >= 0).sum())


class FullCache(KVCache):
    """Never evicts: slot = position; the buffer is sized to prompt + max_new_tokens."""

    def choose_slot(self, input_pos, k, q):
        return input_pos.view(1, 1).expand(self.pos.shape[0], self.pos.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Command line and set-up, shared by generate.py, eval.py and benchmark.py
# ---------------------------------------------------------------------------------------------------------------
POLICIES = {"full": FullCache}


def add_cache_args(p):
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache_strategy", default="full", help=f"one of: {', '.join(POLICIES)}")


def setup(model, args, batch_size: int, prompt_len: int, max_seq_length: int):
    """Builds each layer's cache from the command-line arguments and installs it in the model."""
    if args.cache_strategy not in POLICIES:
        raise ValueError(f"unknown --cache_strategy {args.cache_strategy!r}; allowed: {', '.join(POLICIES)}")
    cfg = model.config
    dtype = model.tok_embeddings.weight.dtype
    device = model.tok_embeddings.weight.device

    def make(i):
        with torch.device(device):
            return FullCache(batch_size, cfg.n_local_heads, cfg.head_dim, max_seq_length, dtype)

    model.setup_caches(max_seq_length, make)


def cache_stats(model) -> dict:
    caches = model.caches
    seen = int(caches[0].seen)
    b, h, _, d = caches[0].k.shape
    kept = sum(c.kept() for c in caches) / (len(caches) * b * h)  # tokens kept per layer and KV head
    elem = caches[0].k.element_size()
    return {
        "seen_tokens": seen,
        "kept_tokens": kept,
        "compression_ratio": kept / seen if seen else 1.0,
        "kv_cache_bytes": sum(c.nbytes() for c in caches),
        "full_kv_cache_bytes": 2 * len(caches) * b * h * seen * d * elem,
    }
