"""LaCache: ladder-shaped KV cache (docs/algorithms.md "lacache").

Content independent: which tokens layer l keeps depends only on the number of tokens fed, the layer index
and (L = n_layers, S = span, O = overlap, C = budget, S0 = start_size).  Per ladder group of B ranks a layer
keeps A, at offset l mod (R + 1), so the layers together still cover the group; R = B - A slots are saved per
group.  When the laddered region reaches the newest L tokens the cache is re-laddered from the sinks
("start over"), so older tokens get sparser.

The rules, fed one token at a time
----------------------------------
`ladder_params` is the literal rule of docs/algorithms.md for any need = n - C.  Fed one token at a time (prefill
gives the same result, see below) the length never exceeds C + floor(R/2) after a step, so need <= 1 and
every compaction is ONE group: a normal ladder takes the group [c, c + B) (then c += A); a start-over happens
exactly when room < A, so its first pass ladders nothing (floor(room / A) = 0), st = 1, Bs = B, Rs = R, and it
takes the group [S0, S0 + B) (then c = S0 + A).  `ladder_schedule` runs the rule on the host once per
(L, S, O, C, S0, max_seq_length), checks those facts, and tabulates per step t (tokens seen before it)
the group start and the group count g (0 = nothing to do).

Static shapes, one compiled graph
---------------------------------
Every layer holds C + floor(R/2) slots (the rule grows C by floor(R/2) the first time it is exceeded; the
reported kv_budget is that slot count).  Slots are not kept in position order; a per-slot rank buffer
(rank of the slot's position among the kept ones, per sequence, shared by the heads) is maintained.  A
decode step reads each sequence's schedule row with its `seen` as index, evaluates the keep rule on the rank
space 0..slots, evicts dropped slots by setting their position to -1 (K/V never move), renumbers the ranks,
and the base class writes the new token into the first empty slot.  A batch is one instance with the
sequences as the first dimension of every buffer, as for the score-based policies.  No Python branch depends
on a tensor value (a step with g = 0 keeps everything), so the step compiles once with fullgraph=True.  In
position_mode "cache" (the default here, as in the seed: keys stored un-rotated, StreamingLLM's position
shift) keys are rotated by the rank buffer and the query at rank n - 1.

Prompts longer than the slots are laddered on the host at prefill with the same schedule, which reproduces
the cache one gets by feeding the prompt token by token (torch.compiler.disable: one graph break under
generate.py's --compile_prefill, which is not fullgraph).  The schedule covers max_seq_length tokens: a
cache built without max_seq_length (or with one <= its budget) never ladders.

"""
import functools

import torch
from torch import Tensor

from cache import KVCache, Param
from model import apply_rope


def ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def ladder_shape(L: int, S: int, O: int):
    """(B, A, R): ranks per ladder group, ranks a layer keeps per group, slots saved per group."""
    B = 1 + ceil_div(L - S, S - O)
    A = min(ceil_div(S, S - O), B)
    return B, A, B - A


def ladder_params(n: int, grown: bool, c: int, *, L, A, B, R, C, half, S0):
    """The literal rule after the cache reached length n (Python ints).  grown: C was exceeded before, or is
    exceeded now (C is then C + half).  Returns (g1, g2, st, Bs, Rs, c_new): pass 1 ladders g1 groups of B
    from rank c (stride 1); pass 2 (start over, else g2 = 0) re-ladders from S0 with group Bs, stride st and
    g2 groups; c_new is the end of the laddered region afterwards."""
    Cg = C + half * grown
    need = n - Cg
    if need <= 0:
        return 0, 0, 1, B, R, c
    room = max(Cg - c - L, 0)
    cap = (room // A) * R
    if need <= cap:
        g = ceil_div(need, R)
        return g, 0, 1, B, R, c + g * A
    cap1 = ((Cg - S0 - L) // A) * R
    st = ceil_div(need - cap, cap1)
    Bs = B + (st - 1) * (B - 1)
    g2 = ceil_div(need - cap, Bs - A)
    return room // A, g2, st, Bs, Bs - A, S0 + g2 * A


@functools.lru_cache(maxsize=8)
def ladder_schedule(L: int, S: int, O: int, C: int, S0: int, steps: int):
    """Per step t < steps (t tokens seen before it): (start, g) of the one ladder pass the rule makes after
    the token is appended (g = 0: none), and the length after the step.  Python lists."""
    B, A, R = ladder_shape(L, S, O)
    half = R // 2
    start, groups, length = [], [], []
    n, c, grown = 0, S0, False
    for t in range(steps):
        n += 1
        grown = grown or n > C
        g1, g2, st, Bs, Rs, c_new = ladder_params(n, grown, c, L=L, A=A, B=B, R=R, C=C, half=half, S0=S0)
        # Fed one token at a time, need <= 1: one group per compaction, and a start-over ladders nothing in
        # its first pass and uses stride 1 (module doc).  Checked, not assumed.
        assert g1 + g2 <= 1 and st == 1 and Bs == B, (t, g1, g2, st)
        start.append(c if g1 else S0)
        groups.append(g1 + g2)
        n -= (g1 + g2) * R
        length.append(n)
        c = c_new
    return start, groups, length


@functools.lru_cache(maxsize=16)
def schedule_tensor(L, S, O, C, S0, steps, device) -> Tensor:
    start, groups, _ = ladder_schedule(L, S, O, C, S0, steps)
    return torch.tensor([start, groups], dtype=torch.long, device=device).t().contiguous()  # [steps, 2]


def ladder_keep(i: Tensor, start, g, B: int, A: int, off: int) -> Tensor:
    """True where rank i survives ladder groups [start + B*j, start + B*(j+1)), j < g, keeping the A ranks at
    offset off in each: [0, start) + {start + off + B*j + a : j < g, a < A} + [start + B*g, inf)."""
    d = i - start - off
    return (i < start) | (i >= start + B * g) | ((d >= 0) & (d % B < A))


@functools.lru_cache(maxsize=4)
def ladder_prefill(T: int, L: int, S: int, O: int, C: int, S0: int):
    """Per layer the original positions kept after T tokens fed one at a time: a list of L lists."""
    B, A, R = ladder_shape(L, S, O)
    start, groups, length = ladder_schedule(L, S, O, C, S0, T)
    kept = [[] for _ in range(L)]
    for t in range(T):
        for layer, P in enumerate(kept):
            P.append(t)
            if groups[t]:
                s, off = start[t], layer % (R + 1)
                P[s:s + B] = P[s + off:s + off + A]
    assert all(len(P) == length[-1] for P in kept)
    return kept


# Prefill of a long prompt runs the schedule on the host; under --compile_prefill that is one graph break, not a
# trace of a loop as long as the prompt.
host_ladder_prefill = torch.compiler.disable(ladder_prefill)


class LaCache(KVCache):
    """LaCache: content-independent ladder of kept tokens, shifted layer by layer (see the module doc)."""
    own_prompt_rule = True
    hyperparams = {
        "span": Param(int, 16, "lacache: ladder span S (layers one kept token covers)", min=1),
        "overlap": Param(int, 0, "lacache: overlap O between adjacent ladder steps (0 <= O < span)", min=0),
        "start_size": Param(int, 4, "lacache: sink tokens S0 kept in every layer", min=0),
    }
    default_position_mode = "cache"  # keys rotated by their rank in the cache, as the seed

    def __init__(self, batch_size, n_kv_heads, head_dim, kv_budget, dtype, **kw):
        S, O, S0 = (kw.get(name, self.hyperparams[name].default) for name in ("span", "overlap", "start_size"))
        L, i = kw.get("n_layers", 1), kw.get("layer_idx", 0)
        for name, value in (("span", S), ("overlap", O), ("start_size", S0)):
            self.hyperparams[name].check(name, value)
        if not O < S:
            raise ValueError(f"lacache: --overlap must satisfy 0 <= overlap < span ({S}), got {O}")
        C = kv_budget
        max_seq = kw.get("max_seq_length")
        self.ladders = max_seq is not None and max_seq > C  # False: the run fits the budget, nothing is laddered
        B, A, R = ladder_shape(L, S, O)
        if self.ladders:
            if R < 1:
                best = max((s for s in range(O + 1, L) if ladder_shape(L, s, O)[2] >= 1), default=None)
                hint = f"use --span <= {best}" if best else "use a smaller --overlap"
                raise ValueError(f"lacache: --span {S} --overlap {O} save no slot on a {L}-layer model "
                                 f"(ladder group B={B}, kept per layer A={A}); {hint}")
            if C < S0 + L + A:
                raise ValueError(f"lacache: layer {i} gets {C} slots but the ladder needs at least --start_size "
                                 f"({S0}) + n_layers ({L}) + {A} (one ladder group) = {S0 + L + A}; raise "
                                 "--max_cache_length or lower --start_size")
        half = R // 2 if self.ladders else 0
        super().__init__(batch_size, n_kv_heads, head_dim, C + half, dtype, **kw)
        self.ladder_budget = C  # C of the rules; kv_budget (the slots) is C + floor(R/2)
        self.B, self.A, self.R, self.offset = B, A, R, i % (R + 1)
        # Rank of each slot's position among the kept ones (valid where pos >= 0), per sequence; shared by the heads
        # (the ladder is content independent: every head of a layer keeps the same positions).
        self.register_buffer("slot_rank", torch.zeros(batch_size, C + half, dtype=torch.long), persistent=False)
        if self.ladders:  # [max_seq_length, 2]: (group start, groups) per step; one tensor shared by the layers
            sched = schedule_tensor(L, S, O, C, S0, self.max_seq_length, str(self.slot_rank.device))
            self.register_buffer("schedule", sched, persistent=False)

    def policy_buffers(self):
        return ["slot_rank"]

    def nbytes(self) -> int:
        """K/V, positions and ranks; the schedule (one tensor shared by all layers) is not per-layer memory."""
        return super().nbytes() - (self.schedule.numel() * self.schedule.element_size() if self.ladders else 0)

    # -- prefill -------------------------------------------------------------------------------------------
    def prompt_keep(self, k, q, v):
        """The rules compact nothing before the length exceeds C + floor(R/2); a longer prompt keeps what feeding
        it token by token would (laddered on the host)."""
        B, Hkv, T, _ = k.shape
        if T <= self.kv_budget:
            return None
        kept = host_ladder_prefill(T, self.n_layers, self.span, self.overlap, self.ladder_budget, self.start_size)
        idx = torch.tensor(kept[self.layer_idx], device=k.device)
        return idx.expand(B, Hkv, idx.shape[0])

    def after_prefill(self, k, q, keep):
        self.slot_rank.copy_(torch.arange(self.kv_budget, device=k.device).expand_as(self.slot_rank))  # in order

    # -- decode --------------------------------------------------------------------------------------------
    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, q: Tensor):
        if self.ladders:
            self.make_room()
        return super().update(input_pos, k, v, q)  # writes the token into the first empty slot

    def make_room(self):
        """The compaction the rules make once the next token is appended (it is always kept, so it can be done
        before the token is written): dropped slots get position -1, the kept ones are renumbered. Each sequence
        reads its own schedule row (its own token count): [B] tensors, no host sync."""
        start, g = self.schedule.index_select(0, self.seen.view(-1)).unsqueeze(-1).unbind(1)  # [B, 1] each
        ranks = torch.arange(self.kv_budget + 1, device=self.pos.device)  # rank space, the new token included
        keep = ladder_keep(ranks, start, g, self.B, self.A, self.offset)  # [B, slots + 1]
        occupied = self.pos[:, 0] >= 0  # [B, slots]
        self.pos.masked_fill_((occupied & ~keep.gather(1, self.slot_rank)).unsqueeze(1), -1)
        self.slot_rank.copy_((keep.cumsum(1) - 1).clamp(min=0).gather(1, self.slot_rank))

    def choose_slot(self, input_pos, k, q):
        return (self.pos < 0).to(torch.uint8).argmax(dim=-1)  # the first empty slot (make_room leaves one)

    def after_insert(self, slot, input_pos, k, q):
        newest = (self.pos[:, 0] >= 0).sum(-1, keepdim=True) - 1  # [B, 1]: the rank of the token just written
        self.slot_rank.scatter_(1, slot[:, :1], newest)

    def rotate_by_rank(self, q: Tensor, k: Tensor):
        """StreamingLLM's position shift from the rank buffer (empty slots get some rank; they are masked)."""
        # index_select, not rope_cos[rank]: advanced indexing runs multi-threaded on the CPU from ~40 indices on
        # and costs milliseconds per call on a busy machine; a [B] index for the queries: no host sync.
        B, C = self.slot_rank.shape
        last = self.rope_cos.shape[0] - 1

        def table(rank):  # [B, n] ranks -> cos, sin [B, 1, n, D], broadcast over the heads
            flat = rank.clamp(0, last).reshape(-1)
            return (t.index_select(0, flat).view(B, 1, rank.shape[1], -1) for t in (self.rope_cos, self.rope_sin))

        k = apply_rope(k, *table(self.slot_rank))
        q_rank = (self.pos[:, 0] >= 0).sum(-1, keepdim=True) - 1  # [B, 1]
        return apply_rope(q, *table(q_rank)), k

