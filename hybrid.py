"""hybrid: FastGen (Ge et al., "Model Tells You What to Discard", ICLR 2024) in a fixed budget, compiled.

Profiling (prefill). For each KV head (attention statistics are the mean over its GQA query group) the
candidate policies are tried in order; the first whose kept set of prompt columns recovers at least
`min_recovery_frac` of the head's prompt attention is chosen:

  id  name                            keeps (every candidate also keeps the sinks, positions < global_tokens)
  0   special                         special tokens
  1   special_punct                   + punctuation
  2   special_punct_local             + the last n_local prompt positions, n_local = max(1, int(local_ratio * T))
  3   special_punct_local_frequent    + the n_freq = int(frequent_ratio * T) positions not kept yet that have
                                        the highest accumulated attention (ties: the lower position)
  4   full                            everything (the fallback when no candidate reaches the threshold)

Recovery of a candidate = sum over the prompt's causal attention matrix A (A[i][j], j <= i) of its kept
columns / sum of A (= T). "Accumulated attention" is heavy_hitter's score: the attention a token received,
averaged over the steps (queries) that could see it (column sum / (T - j) for prompt token j).

Decode. The layer keeps its fixed budget of C slots (--max_cache_length, as every policy; the buffer holds C
slots, unlike the public code, which keeps a full cache and only masks it). Each step writes the new token
into one slot per (sequence, KV head). A slot is "in policy" for its head when the chosen policy keeps it at
step t: sinks; special tokens (policies 0-3); punctuation (1-3); positions > t - n_local (2-3); the frequent
set (3); everything (4). Attention is masked to the in-policy slots plus the new token. Per head, the slot to
overwrite is: an empty slot (lowest index) if any; else the out-of-policy slot that comes first in the policy's
own order; else the in-policy slot that comes first, where the shared protections apply to in-policy slots
only (sinks and the recent window r = --recent_window: positions >= t - r are never evicted).
The policy's own order: heads 0-2 evict the oldest position; heads 3-4 the least accumulated attention
(heavy_hitter's full-history average; the evicted slot's history is cleared). Ties go to the lowest slot.
  * Frequency heads (3) keep a bounded frequent set, as FastGen: a token that leaves the local window and is
    neither a sink, special nor punctuation joins it; when the set then holds more than n_freq tokens, its
    least-attended member leaves the policy (it is masked from then on and evicted first).
  * `full` heads mask nothing and behave exactly like heavy_hitter (sinks + recent window protected, least
    average attention evicted) once the budget is full.
  * Out-of-policy tokens never come back into the policy (windows only move forward, sets only shrink).
n_local and n_freq are fixed by the prompt length; the choices are tensors (a policy id per head), so the
decode step has no Python branch on tensor values and compiles once.

Prompts longer than C: profiling runs on the whole prompt, then each head keeps the C positions it would
evict last: sinks and in-policy positions >= T - r first, then in-policy, then the rest, each by the policy's
order (newest, or highest accumulated attention), ties to the lower position. (--prompt_compression_strategy
does not apply to hybrid.)

Token classes. The cache holds two boolean tables over the vocabulary, `special_ids` and `punct_ids`
(constructor arguments, or installed by `policies.setup(..., tokenizer=...)`); without tables no token is
special or punctuation. The model calls `set_tokens(idx, prefill)` before each forward; each slot stores its token's
class bits (1 = special, 2 = punctuation). The tables are shared by the layers and are not counted in
nbytes(); the per-slot state (class byte, frequent flag, attention sum and count) is.

Plain-Python reference: tests/reference_hybrid.py.
"""
import string
import unicodedata

import torch
from torch import Tensor

from cache import KVCache, Param

HYBRID_POLICIES = ["special", "special_punct", "special_punct_local", "special_punct_local_frequent", "full"]
SPECIAL, PUNCT = 1, 2  # class bits of a token
FREQUENT, FULL = 3, 4


def per_sequence(t):
    """A step or count ([1] shared, [B] or [B, 1] per sequence, or an int) shaped to broadcast over [B, H, C]."""
    return t.view(-1, 1, 1) if isinstance(t, Tensor) else t


class HybridCache(KVCache):
    """FastGen: per KV head, the cheapest of special / +punctuation / +local / +frequent / full that recovers
    min_recovery_frac of the prompt's attention; decode follows it inside the fixed budget (module docstring).
    Heads whose choice is `full` behave like heavy_hitter once the budget is full."""
    own_prompt_rule = True
    hyperparams = {
        "min_recovery_frac": Param(float, 0.95, "hybrid: a head takes the first candidate policy recovering this "
                                                "fraction of its prompt attention", above=0, max=1),
        "hybrid_local_ratio": Param(float, 0.3, "hybrid: local window as a fraction of the prompt length", min=0,
                                    max=1),
        "hybrid_frequent_ratio": Param(float, 0.3, "hybrid: frequent (heavy-hitter) tokens as a fraction of the "
                                                   "prompt", min=0, max=1),
    }
    needs_attention = True
    needs_prompt_attention = True
    needs_tokens = True

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, *, special_ids: Tensor = None,
                 punct_ids: Tensor = None, **kw):
        super().__init__(batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw)
        if kv_budget <= self.global_tokens:
            raise ValueError(f"hybrid needs more slots ({kv_budget}) than sink tokens ({self.global_tokens})")
        B, H, C = batch_size, n_kv_heads, kv_budget
        self.register_buffer("special_ids", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("punct_ids", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.set_token_tables(special_ids, punct_ids)
        self.register_buffer("policy", torch.full((B, H), FULL, dtype=torch.long), persistent=False)
        self.register_buffer("recovery", torch.zeros(B, H, len(HYBRID_POLICIES)), persistent=False)
        # Sized from each sequence's prompt length: per sequence, as the head policies.
        self.register_buffer("n_local", torch.ones(B, dtype=torch.long), persistent=False)
        self.register_buffer("n_freq", torch.zeros(B, dtype=torch.long), persistent=False)
        self.register_buffer("slot_cls", torch.zeros(B, H, C, dtype=torch.uint8), persistent=False)
        self.register_buffer("frequent", torch.zeros(B, H, C, dtype=torch.bool), persistent=False)
        self.register_buffer("attn_sum", torch.zeros(B, H, C), persistent=False)
        self.register_buffer("attn_cnt", torch.zeros(B, H, C), persistent=False)
        self.register_buffer("cur_cls", torch.zeros(B, dtype=torch.uint8), persistent=False)
        self._prompt_cls = None  # [B, T] classes of the last multi-token forward (the prompt)
        self._step_cls = None  # [B, T] classes of a multi-token decode step (speculative verification)
        self._profile = None

    def policy_buffers(self):
        return ["slot_cls", "frequent", "attn_sum", "attn_cnt", "cur_cls", "recovery", "policy", "n_local", "n_freq"]

    def reset(self):
        super().reset()
        self.policy.fill_(FULL)
        self.n_local.fill_(1)
        self._prompt_cls = self._profile = None

    def nbytes(self) -> int:
        """As the base class, without the vocabulary tables (shared by all layers, 2 bytes per vocabulary id)."""
        return super().nbytes() - self.special_ids.nbytes - self.punct_ids.nbytes

    # -- token classes -------------------------------------------------------------------------------------
    def set_token_tables(self, special_ids: Tensor = None, punct_ids: Tensor = None):
        """Boolean tables over the vocabulary (None: no token of that class)."""
        dev = self.pos.device
        self.special_ids = torch.zeros(0, dtype=torch.bool, device=dev) if special_ids is None \
            else special_ids.to(device=dev, dtype=torch.bool)
        self.punct_ids = torch.zeros(0, dtype=torch.bool, device=dev) if punct_ids is None \
            else punct_ids.to(device=dev, dtype=torch.bool)

    def token_classes(self, idx: Tensor) -> Tensor:
        """idx [...] token ids -> class bits [...] uint8 (ids outside a table belong to no class)."""
        cls = torch.zeros(idx.shape, dtype=torch.uint8, device=idx.device)
        for table, bit in ((self.special_ids, SPECIAL), (self.punct_ids, PUNCT)):
            n = table.shape[0]
            if n:  # a shape, not a value: static under compile
                hit = table[idx.clamp(0, n - 1)] & (idx < n) & (idx >= 0)
                cls = cls | (hit.to(torch.uint8) * bit)
        return cls

    def set_tokens(self, idx: Tensor, prefill: bool, row: int = None):
        cls = self.token_classes(idx)
        (self.cur_cls if row is None else self.cur_cls[row:row + 1]).copy_(cls[:, -1])
        if prefill:  # one sequence's prompt (a batch is prefilled row by row)
            self._prompt_cls = cls
        else:  # a multi-token decode step picks each token's class in turn (select_token)
            self._step_cls = cls

    def select_token(self, t: int):
        self.cur_cls.copy_(self._step_cls[:, t])

    # -- membership ----------------------------------------------------------------------------------------
    def member(self, pos: Tensor, cls: Tensor, frequent: Tensor, t) -> Tensor:
        """Whether each position (pos [B, H, N], -1 = empty) is kept by its head's policy at step t (an int, or a
        tensor of one step or each sequence's)."""
        pol = self.policy.unsqueeze(-1)
        t = per_sequence(t)
        special, punct = (cls & SPECIAL) != 0, (cls & PUNCT) != 0
        keep = (pos < self.global_tokens) | (pol == FULL) | (special & (pol <= FREQUENT))
        keep = keep | (punct & (pol >= 1) & (pol <= FREQUENT))
        keep = keep | ((pos > t - per_sequence(self.n_local)) & (pol >= 2) & (pol <= FREQUENT))
        keep = keep | (frequent & (pol == FREQUENT))
        return keep & (pos >= 0)

    def order_score(self, pos: Tensor, avg: Tensor) -> Tensor:
        """Low = evicted first: the position for heads 0-2, the average attention for frequent/full heads."""
        return torch.where(self.policy.unsqueeze(-1) >= FREQUENT, avg, pos.float())

    def avg_attention(self) -> Tensor:
        return self.attn_sum / self.attn_cnt.clamp(min=1)

    # -- prefill -------------------------------------------------------------------------------------------
    def observe_prompt_attention(self, start, probs):
        """Column sums of the prompt's attention (each key's total from the later queries), chunk by chunk."""
        col = probs.mean(2).sum(2)  # [B, H, e]: mean over the KV head's query heads, sum over the queries
        if start == 0:
            self._columns = col.new_zeros(*col.shape[:2], self.context_len)
        self._columns[..., :col.shape[-1]] += col

    def prompt_keep(self, k, q, v):
        self.profile(k, q)  # every prompt is profiled; only one longer than the budget is compressed
        return super().prompt_keep(k, q, v)

    def prompt_classes(self, B: int, T: int, device) -> Tensor:
        cls = self._prompt_cls
        if cls is not None and tuple(cls.shape) == (B, T):
            return cls.to(device)
        if T == 1:
            return self.cur_cls.view(B, 1)
        return torch.zeros(B, T, dtype=torch.uint8, device=device)  # set_tokens was not called: no classes

    @torch.compiler.disable  # host-side sizes (n_local, n_freq from T): compiled, it would recompile per length
    def profile(self, k: Tensor, q: Tensor):
        """Chooses each head's policy from the prompt's attention (recovery of each candidate's columns)."""
        B, H, T, _ = k.shape
        dev = k.device
        col, self._columns = self._columns, None
        positions = torch.arange(T, device=dev)
        cnt = (T - positions).float().expand(B, H, T)
        avg = col / cnt
        cls = self.prompt_classes(B, T, dev).unsqueeze(1).expand(B, H, T)
        n_local, n_freq = max(1, int(self.hybrid_local_ratio * T)), int(self.hybrid_frequent_ratio * T)
        pos = positions.expand(B, H, T)
        keep0 = (pos < self.global_tokens) | ((cls & SPECIAL) != 0)
        keep1 = keep0 | ((cls & PUNCT) != 0)
        keep2 = keep1 | (pos >= T - n_local)
        # Frequent: the n_freq not yet kept positions of highest average attention (ties: lower position).
        order = avg.masked_fill(keep2, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, positions.expand(B, H, T))
        keep3 = keep2 | (rank < n_freq)  # kept positions rank last, so this only adds available ones
        total = col.sum(-1)
        rec = torch.stack([(col * m).sum(-1) / total for m in (keep0, keep1, keep2, keep3)]
                          + [torch.ones_like(total)], dim=-1)  # [B, H, 5]
        ok = rec >= self.min_recovery_frac
        ok[..., FULL] = True
        self.policy.copy_(ok.int().argmax(-1))  # the first candidate that recovers enough
        self.recovery.copy_(rec)
        self.n_local.fill_(n_local)
        self.n_freq.fill_(n_freq)
        self._profile = dict(col=col, cnt=cnt, avg=avg, cls=cls, frequent=keep3)

    def compress_prompt(self, k: Tensor, q: Tensor, v: Tensor) -> Tensor:
        """Per head the C positions it would evict last (module docstring); sorted."""
        p = self._profile
        B, H, T, _ = k.shape
        positions = torch.arange(T, device=k.device)
        pos = positions.expand(B, H, T)
        member = self.member(pos, p["cls"], p["frequent"], T - 1)
        protected = member & ((pos < self.global_tokens) | (pos >= T - self.recent_window))
        tier = member.long() + protected.long()
        by_order = self.order_score(pos, p["avg"]).sort(dim=-1, descending=True, stable=True).indices
        by_tier = tier.gather(-1, by_order).sort(dim=-1, descending=True, stable=True).indices
        return by_order.gather(-1, by_tier)[..., :self.kv_budget].sort(dim=-1).values

    def after_prefill(self, k, q, keep):
        p = self._profile
        T = k.shape[2]
        for name, buf in (("cls", self.slot_cls), ("frequent", self.frequent), ("col", self.attn_sum),
                          ("cnt", self.attn_cnt)):
            src = p[name]
            buf.zero_()
            if keep is None:
                buf[:, :, :T] = src
            else:
                buf.copy_(src.gather(2, keep))

    # -- decode --------------------------------------------------------------------------------------------
    def trim_frequent(self, t: Tensor):
        """Frequency heads: when the frequent set (flagged, occupied, not sink / special / punctuation / local)
        holds more than n_freq tokens, its least-attended member leaves it (one per step suffices: one token
        leaves the local window per step)."""
        pos, cls = self.pos, self.slot_cls
        covered = (pos < self.global_tokens) | (cls != 0) | (pos > per_sequence(t) - per_sequence(self.n_local))
        pool = (pos >= 0) & self.frequent & ~covered
        over = pool.sum(-1, keepdim=True) > per_sequence(self.n_freq)
        victim = self.avg_attention().masked_fill(~pool, float("inf")).argmin(-1, keepdim=True)
        slots = torch.arange(pos.shape[-1], device=pos.device)
        self.frequent.masked_fill_((slots == victim) & over, False)

    def choose_slot(self, input_pos, k, q):
        t = per_sequence(input_pos)
        self.trim_frequent(t)
        pos = self.pos
        occupied = pos >= 0
        member = self.member(pos, self.slot_cls, self.frequent, t)
        protected = member & ((pos < self.global_tokens) | (pos >= t - self.recent_window))
        order = self.order_score(pos, self.avg_attention())
        out_cand = occupied & ~member
        in_cand = member & ~protected
        inf = float("inf")
        out_slot = order.masked_fill(~out_cand, inf).argmin(-1)
        in_slot = order.masked_fill(~in_cand, inf).argmin(-1)
        empty = ~occupied
        slot = torch.where(out_cand.any(-1), out_slot, in_slot)
        return torch.where(empty.any(-1), empty.int().argmax(-1), slot)

    def after_insert(self, slot, input_pos, k, q):
        idx = slot[:, :, None]
        B, H = slot.shape
        self.slot_cls.scatter_(2, idx, self.cur_cls.view(B, 1, 1).expand(B, H, 1))
        self.frequent.scatter_(2, idx, torch.ones_like(idx, dtype=torch.bool))
        self.attn_sum.scatter_(2, idx, torch.zeros_like(idx, dtype=self.attn_sum.dtype))
        self.attn_cnt.scatter_(2, idx, torch.zeros_like(idx, dtype=self.attn_cnt.dtype))

    def attention_mask(self, input_pos):
        """Only the slots in the head's policy, and the new token."""
        visible = self.member(self.pos, self.slot_cls, self.frequent, input_pos) | (self.pos == per_sequence(input_pos))
        return (visible & (self.pos >= 0)).unsqueeze(2)

    def record_attention(self, probs):
        occupied = self.pos >= 0
        self.attn_sum += probs.mean(2)[:, :, 0] * occupied
        self.attn_cnt += occupied.float()

    # -- statistics ----------------------------------------------------------------------------------------
    def head_policies(self, batch: int = 0) -> list:
        """The policy name chosen for each KV head of sequence `batch`."""
        return [HYBRID_POLICIES[i] for i in self.policy[batch].tolist()]

    def policy_counts(self) -> dict:
        """How many (sequence, KV head) pairs of this layer chose each policy."""
        ids = self.policy.flatten().tolist()
        return {name: ids.count(i) for i, name in enumerate(HYBRID_POLICIES)}

    def attended(self) -> int:
        """Slots the last decode step attended to (in policy), summed over sequences and heads."""
        t = per_sequence(self.seen - 1)
        return int((self.member(self.pos, self.slot_cls, self.frequent, t) | (self.pos == t)).sum())


def hybrid_stats(model) -> dict:
    """Per layer (hybrid layers only) the policy chosen by each KV head (sequence 0) and the counts; totals."""
    layers, total = [], {name: 0 for name in HYBRID_POLICIES}
    for i, c in enumerate(model.caches):
        if isinstance(c, HybridCache):
            counts = c.policy_counts()
            layers.append({"layer": i, "head_policies": c.head_policies(), "policy_counts": counts})
            for name, n in counts.items():
                total[name] += n
    return {"policy_counts": total, "layers": layers}


# ---------------------------------------------------------------------------------------------------------------
# Token classes from the tokenizer
# ---------------------------------------------------------------------------------------------------------------
def is_punctuation(text: str) -> bool:
    """A token whose text, without surrounding whitespace, is only punctuation (ASCII punctuation or a
    Unicode P* category)."""
    s = text.strip()
    return bool(s) and all(ch in string.punctuation or unicodedata.category(ch).startswith("P") for ch in s)


def token_class_tables(tokenizer, vocab_size: int):
    """(special, punct) boolean tables [vocab_size]: special = the tokenizer's special/added tokens, BOS and
    EOS ids; punct = ids whose single-token decode is punctuation (special ids excluded)."""
    special = torch.zeros(vocab_size, dtype=torch.bool)
    ids = list(getattr(tokenizer, "special_tokens", {}).values())
    ids += [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    ids += list(getattr(tokenizer, "eos_ids", []) or [])
    for i in ids:
        if 0 <= i < vocab_size:
            special[i] = True
    punct = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, getattr(tokenizer, "vocab_size", 0) or vocab_size)
    for i in range(n):
        if special[i]:
            continue
        try:
            text = tokenizer.decode([i])
        except Exception:  # ids a tokenizer cannot decode alone are not punctuation
            continue
        punct[i] = is_punctuation(text)
    return special, punct
