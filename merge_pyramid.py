"""merge_pyramid: merging, not eviction, with a per-layer pyramid of raw-tail windows (seed merge-pyramid.md).

Semantics: docs/algorithms.md ("merge_pyramid"); the step-by-step reference: tests/reference_policies.py
(`MergePyramidLayerRef`, item 10 of its docstring).

Layer k of m has the raw-tail threshold W_k = int(W0 * (1 + k/m * (1/beta - 1))) (W0 = --initial_local_window,
beta = --steepness_coefficient). A layer's slots stay in position order: slot index = rank, sinks first
(never merged), then the compressed part [sinks, rws), then the raw tail [rws, n); the new token is appended at
slot n. When the tail holds more than W_k tokens, the whole region [sinks, n) is pooled in adjacent pairs (an
odd region repeats its last slot) and becomes the new compressed part: rws = n = sinks + ceil((n - sinks) / 2).
Pooling: mean (a + b) / 2, max (element-wise), or best (per head and channel, the whole even or the whole odd
series of the region, whichever wins more pairs; ties -> even; the padded pair counts for odd). Keys keep the
rotation of their absolute position. A slot's position is the pairwise mean of its two members' positions:
`pos_mean` (float64 [C]) holds it exactly, the base `pos` buffer holds its floor (>= 0 marks an occupied slot
for the attention mask), and `span` ([2, C]) the first and last original positions the slot covers.

When a merge happens. The trigger is evaluated right after a token is appended (as the reference), but the
merge itself is applied at the start of the next decode step (`merge_pending`): the new token's query attends
to the cache as it stood after the append, exactly as in the seed, whose HF decoding loop compresses
past_key_values between forward passes. So after update(t) the cache holds the reference's state after step
t - 1 plus token t; `merge_pending()` brings it to the reference's state after step t (the next update does
that first anyway). Prefill compresses the prompt (the seed's compress_prefill loop) before returning, unless
--skip_prefill_compression.

Static shapes. Everything in update() is branch-free on tensor values: n, rws and the pending flag are 0-dim
tensor buffers, the merged buffer is computed every step with index tensors (gather the even and odd members
of [sinks, n), pool, pad with empty slots) and selected with torch.where(pending, merged, current), so the
decode step compiles once (fullgraph) and never recompiles.

Buffer size (per layer; the pyramid is the memory saving). The budget from --max_cache_length does not apply:
after the prompt is compressed the compressed part c = rws - sinks satisfies c <= W_k (prefill:
c' = ceil((c + W_k) / 2)) and then c <= W_k + 1 while decoding (c' = ceil((c + W_k + 1) / 2)); the largest
occupancy is reached right after an append that triggers a merge: sinks + c + W_k + 1 <= sinks + 2 W_k + 2,
which is reached once c = W_k + 1. So C_k = min(max_seq_length, sink_tokens + 2 W_k + 2). With
--skip_prefill_compression the whole prompt (T tokens) stays until the first decode step, which appends one
more before the first merge; the later occupancy never exceeds max(T + 1, sinks + 2 W_k + 2), so
C_k = min(max_seq_length, max(T + 1, sinks + 2 W_k + 2)), where T comes from build_caches' prompt_len (via
`sized_budget`); when the prompt length is not known (prompt_len 0) the buffer is max_seq_length. Each layer
reports its C_k as kv_budget.
"""
import torch
from torch import Tensor

from cache import KVCache, Param, check_params

POOLING_TYPES = ("mean", "max", "best")


def pyramid_windows(n_layers: int, initial_local_window: int, steepness_coefficient: float) -> list:
    """W_k = int(W0 * (1 + k/m * (1/beta - 1))) for k < m (Python floats, as the seed)."""
    W0, beta = initial_local_window, steepness_coefficient
    return [int(W0 * (1 + k / n_layers * (1 / beta - 1))) for k in range(n_layers)]


def pool_pairs(even: Tensor, odd: Tensor, kind: str, valid: Tensor = None) -> Tensor:
    """Pools pairs along dim 2: even, odd [B, H, P, D] (the two members of each pair; a padded pair has
    even == odd). valid [B, P] bool marks each sequence's real pairs (None: all); only they count for 'best'."""
    if kind == "mean":
        return (even + odd) / 2
    if kind == "max":
        return torch.maximum(even, odd)
    if kind == "best":
        wins = even > odd  # strictly: the padded pair (x, x) counts for odd
        if valid is None:
            n_pairs = even.shape[2]
        else:
            wins = wins & valid[:, None, :, None]
            n_pairs = valid.sum(-1).view(-1, 1, 1, 1)
        first = wins.sum(2, keepdim=True)  # [B, H, 1, D]: pairs the even member wins, per channel
        return torch.where(first >= n_pairs - first, even, odd)  # ties -> even (the seed's >=)
    raise ValueError(f"unknown --seq_pooling_type {kind!r}; allowed: {', '.join(POOLING_TYPES)}")


class MergePyramidCache(KVCache):
    """Merges old tokens pairwise (mean / max / best) once the raw tail exceeds the layer's window W_k;
    sinks are never merged; W_k shrinks (beta > 1) or grows (beta < 1) linearly with the layer."""
    own_prompt_rule = True
    hyperparams = {
        "initial_local_window": Param(int, 512, "merge_pyramid: raw-tail window W0 of layer 0; layer k of m gets "
                                                "W0 * (1 + k/m * (1/beta - 1))", min=1),
        "steepness_coefficient": Param(float, 1.0, "merge_pyramid: pyramid steepness beta > 0 (1 = the same window "
                                                   "in every layer, > 1 = smaller windows in upper layers)", above=0),
        "sink_tokens": Param(int, 4, "sink_recent/merge_pyramid: first tokens always kept (sink_recent 256, "
                                     "merge_pyramid 4)", min=0),
        "seq_pooling_type": Param(str, "mean", "merge_pyramid: how a pair of slots is merged: mean | max | best",
                                  choices=POOLING_TYPES),
        "skip_prefill_compression": Param(bool, False, "merge_pyramid: keep the whole prompt at prefill and merge "
                                                       "only while decoding (the buffer must hold the prompt)"),
    }

    # -- configuration -------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, hp: dict) -> dict:
        """The hyper-parameters with defaults filled in, validated (one clear ValueError per mistake)."""
        return check_params(cls.hyperparams, {k: v for k, v in hp.items() if v is not None}, cls.__name__)

    size_flags = ("initial_local_window", "sink_tokens", "skip_prefill_compression")

    @classmethod
    def size_for_budget(cls, budget: int) -> dict:
        """Without its own size flags, a budget of B slots (--max_cache_length / --compression_ratio) sets the window
        so that layer 0's buffer, sinks + 2 W0 + 2, fits in B (the other layers' windows are no larger)."""
        sinks = cls.hyperparams["sink_tokens"].default
        return {"initial_local_window": max(1, (budget - sinks - 2) // 2)}

    @classmethod
    def sized_budget(cls, prompt_len: int, max_seq_length: int, hp: dict) -> int:
        """Called by build_caches before the layers are built; each layer then sizes its own buffer (see the
        module docstring). Only --skip_prefill_compression needs the prompt length: it must fit whole."""
        vals = cls.resolve(hp)
        if vals["skip_prefill_compression"] and prompt_len > 0:
            return min(max_seq_length, prompt_len + 1)
        return max_seq_length

    @classmethod
    def buffer_slots(cls, local_window: int, sink_tokens: int, skip_prefill_compression: bool,
                     max_seq_length: int, kv_budget: int) -> int:
        """C_k = min(max_seq_length, sinks + 2 W_k + 2); with skip_prefill_compression at least kv_budget
        (= prompt_len + 1 from sized_budget), still capped by max_seq_length."""
        need = sink_tokens + 2 * local_window + 2
        if skip_prefill_compression:
            need = max(need, kv_budget)
        return min(max_seq_length, need)

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        if kw.get("cache_bits"):
            raise ValueError("merge_pyramid pools K/V in place and does not support a quantized cache (--cache_bits)")
        hp = {name: kw[name] for name in self.hyperparams if name in kw}
        vals = self.resolve(hp)
        n_layers, layer_idx = kw.get("n_layers", 1), kw.get("layer_idx", 0)
        windows = pyramid_windows(n_layers, vals["initial_local_window"], vals["steepness_coefficient"])
        if min(windows) < 1:
            bad = windows.index(min(windows))
            raise ValueError(f"--initial_local_window {vals['initial_local_window']} with --steepness_coefficient "
                             f"{vals['steepness_coefficient']} gives layer {bad} a window of {windows[bad]} tokens; "
                             "raise --initial_local_window or lower --steepness_coefficient")
        local_window = windows[layer_idx]
        max_seq_length = kw.get("max_seq_length") or kv_budget
        C = self.buffer_slots(local_window, vals["sink_tokens"], bool(vals["skip_prefill_compression"]),
                              max_seq_length, kv_budget)
        for name in self.hyperparams:
            kw[name] = vals[name]
        kw["max_seq_length"] = max_seq_length
        super().__init__(batch_size, n_kv_heads, head_dim, C, dtype, **kw)
        self.skip_prefill_compression = bool(self.skip_prefill_compression)
        self.local_window = local_window  # W_k
        # The base-class eviction knobs do not apply: nothing is evicted, sinks are sink_tokens.
        self.global_tokens, self.recent_window = self.sink_tokens, 0
        # Per sequence (the batch first, as every per-sequence buffer); shared by the heads (merges are positional).
        B = batch_size
        self.register_buffer("pos_mean", torch.full((B, C), -1.0, dtype=torch.float64), persistent=False)
        self.register_buffer("span", torch.full((B, 2, C), -1, dtype=torch.long), persistent=False)
        self.register_buffer("n", torch.zeros(B, dtype=torch.long), persistent=False)  # occupied slots
        self.register_buffer("rws", torch.full((B,), self.sink_tokens, dtype=torch.long), persistent=False)
        self.register_buffer("pending", torch.zeros(B, dtype=torch.bool), persistent=False)

    def policy_buffers(self):
        return ["pos_mean", "span", "n", "rws", "pending"]

    def reset(self):
        super().reset()
        self.pos_mean.fill_(-1.0)
        self.span.fill_(-1)
        self.rws.fill_(self.sink_tokens)

    # -- prefill -------------------------------------------------------------------------------------------
    def _pool_region(self, region):
        """Eager pooling of a whole region: (k, v [B, H, L, D], pos_mean [L], span [2, L]), L >= 1."""
        k, v, pm, span = region
        L = k.shape[2]
        even = torch.arange(0, L, 2, device=k.device)
        odd = torch.clamp(even + 1, max=L - 1)  # an odd region repeats its last slot
        kind = self.seq_pooling_type
        return (pool_pairs(k[:, :, even], k[:, :, odd], kind), pool_pairs(v[:, :, even], v[:, :, odd], kind),
                (pm[even] + pm[odd]) / 2, torch.stack([span[0, even], span[1, odd]]))

    def prompt_keep(self, k, q, v):
        return None  # nothing is dropped: write_prompt pools the prompt instead

    @torch.compiler.disable  # a Python loop over the prompt: compiled, it would recompile per prompt length
    def write_prompt(self, input_pos: Tensor, k: Tensor, v: Tensor, keep):
        """Keeps the prompt's rotated k, v [B, Hkv, T, D], compressed until the raw tail fits W_k (the seed's
        compress_prefill loop: pool [sinks, rws + W_k) while n - rws > W_k) unless skip_prefill_compression."""
        T, S, W, C = k.shape[2], self.sink_tokens, self.local_window, self.kv_budget
        pm = input_pos.to(torch.float64)
        span = input_pos.long().expand(2, T)

        def cut(a, b):
            return k[:, :, a:b], v[:, :, a:b], pm[a:b], span[:, a:b]

        parts, comp, tail = [cut(0, S)], None, S
        if not self.skip_prefill_compression:
            # n - rws = the raw tail = T - tail; each round pools the compressed part + the next W tail tokens.
            while T - tail > W:
                nxt = cut(tail, tail + W)
                region = nxt if comp is None else tuple(torch.cat([a, b], dim=-1 if a.dim() < 3 else 2)
                                                        for a, b in zip(comp, nxt))
                comp = self._pool_region(region)
                tail += W
        if comp is not None:
            parts.append(comp)
        parts.append(cut(tail, T))
        ks, vs, pms, spans = zip(*parts)
        keep_k, keep_v = torch.cat(ks, 2), torch.cat(vs, 2)
        keep_pm, keep_span = torch.cat(pms), torch.cat(spans, 1)
        n = keep_k.shape[2]
        if n > C:
            raise ValueError(f"merge_pyramid with --skip_prefill_compression keeps the whole prompt ({T} tokens) "
                             f"but layer {self.layer_idx}'s buffer has {C} slots; give build_caches the prompt "
                             "length (prompt_len) or a larger max_seq_length")
        kbuf, vbuf = self.store.k, self.store.v
        kbuf.zero_()
        vbuf.zero_()
        kbuf[:, :, :n] = keep_k
        vbuf[:, :, :n] = keep_v
        self.pos_mean.fill_(-1.0)
        self.pos_mean[:, :n] = keep_pm
        self.span.fill_(-1)
        self.span[:, :, :n] = keep_span
        self.pos.fill_(-1)
        self.pos[:, :, :n] = keep_pm.floor().long()
        self.n.fill_(n)
        self.rws.fill_(S + (0 if comp is None else comp[0].shape[2]))
        self.pending.fill_(False)

    # -- decode --------------------------------------------------------------------------------------------
    def merged_state(self):
        """The buffers after pooling the whole region [sinks, n) of every sequence (branch-free; static shapes).
        Returns k, v, pos_mean, span, n."""
        B, H, C, D = self.store.k.shape
        S, dev = self.sink_tokens, self.store.k.device
        J = C - S  # slots after the sinks
        P_max = (J + 1) // 2  # the region holds at most J slots, so at most ceil(J / 2) pairs
        L = (self.n - S).view(B, 1)  # region length per sequence; >= W_k + 1 >= 2 whenever a merge is pending
        n_pairs = torch.div(L + 1, 2, rounding_mode="floor").clamp(min=0)
        j = torch.arange(P_max, device=dev)
        even = (S + 2 * j).clamp(max=C - 1)  # [P]: the same slots in every sequence
        # [B, P]: each sequence's odd members (an odd-length region repeats its last slot)
        odd = (S + torch.minimum(2 * j + 1, (L - 1).clamp(min=0))).clamp(max=C - 1)
        valid = j < n_pairs  # [B, P]
        kind = self.seq_pooling_type
        pad = J - P_max

        def pooled(buf):
            odd_slots = buf.gather(2, odd[:, None, :, None].expand(B, H, P_max, D))
            out = pool_pairs(buf.index_select(2, even), odd_slots, kind, valid)
            out = torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=dev))
            return torch.cat([buf[:, :, :S], out, buf.new_zeros(B, H, pad, D)], 2)

        pm = torch.where(valid, (self.pos_mean[:, even] + self.pos_mean.gather(1, odd)) / 2, -1.0)
        pm = torch.cat([self.pos_mean[:, :S], pm, self.pos_mean.new_full((B, pad), -1.0)], 1)
        sp = torch.stack([self.span[:, 0, even], self.span[:, 1].gather(1, odd)], 1)
        sp = torch.where(valid[:, None], sp, -1)
        sp = torch.cat([self.span[:, :, :S], sp, self.span.new_full((B, 2, pad), -1)], 2)
        return pooled(self.store.k), pooled(self.store.v), pm, sp, S + n_pairs.view(B)

    def merge_pending(self):
        """Applies the merge triggered by the last append, if any (a no-op otherwise). update() calls it first;
        call it after the last step to get the reference's settled state."""
        if self.kv_budget <= self.sink_tokens:  # nothing beyond the sinks can ever be held: never triggers
            return
        k, v, pm, sp, n = self.merged_state()
        p = self.pending  # [B]
        self.store.k.copy_(torch.where(p.view(-1, 1, 1, 1), k, self.store.k))
        self.store.v.copy_(torch.where(p.view(-1, 1, 1, 1), v, self.store.v))
        self.pos_mean.copy_(torch.where(p.view(-1, 1), pm, self.pos_mean))
        self.span.copy_(torch.where(p.view(-1, 1, 1), sp, self.span))
        occupied = self.pos_mean >= 0
        self.pos.copy_(torch.where(occupied, self.pos_mean.floor(), -1.0).long().unsqueeze(1).expand_as(self.pos))
        self.n.copy_(torch.where(p, n, self.n))
        self.rws.copy_(torch.where(p, n, self.rws))
        self.pending.fill_(False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        self.merge_pending()
        return super().update(input_pos, k, v, q)

    def choose_slot(self, input_pos: Tensor, k: Tensor, q: Tensor) -> Tensor:
        B, H, _ = self.pos.shape
        return self.n.view(B, 1).expand(B, H).clone()  # append: slot index = rank

    def after_insert(self, slot: Tensor, input_pos: Tensor, k: Tensor, q: Tensor):
        B = self.n.shape[0]
        at = input_pos.view(-1, 1).expand(B, 1)  # each sequence's position (or one shared)
        self.pos_mean.scatter_(1, self.n.view(B, 1), at.to(torch.float64))
        self.span.scatter_(2, self.n.view(B, 1, 1).expand(B, 2, 1), at.long().view(B, 1, 1).expand(B, 2, 1))
        self.n.add_(1)
        self.pending.copy_(self.n - self.rws > self.local_window)

    # -- reporting -----------------------------------------------------------------------------------------
    def positions(self) -> list:
        """Mean positions of the occupied slots, in slot order (of sequence 0; row_view for another)."""
        n = int(self.n[0])
        return self.pos_mean[0, :n].tolist()

    def members(self) -> list:
        """Per occupied slot, the original positions it covers (a contiguous range; of sequence 0)."""
        n = int(self.n[0])
        return [tuple(range(a, b + 1)) for a, b in self.span[0, :, :n].t().tolist()]

