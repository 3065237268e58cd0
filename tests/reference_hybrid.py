"""Independent plain-Python reference of `hybrid` (FastGen in a fixed budget): lists and math only.

Written from the semantics in hybrid.py's docstring and ALGORITHMS.md, not from the engine's tensor code.
Inputs follow reference_policies: q[p][j], k[p][h], v[p][h] lists of floats; cls[p] = the class bits of the
token at position p (1 = special, 2 = punctuation, 3 = both, 0 = neither).

Profiling, per KV head h (A = group-mean causal attention of the prompt, col[j] = sum_i A[i][j],
avg[j] = col[j] / (T - j)):
  K0 = sinks + special;  K1 = K0 + punct;  K2 = K1 + {p >= T - n_local};
  K3 = K2 + the n_freq positions outside K2 with the largest avg (ties: lower position);  K4 = all.
  recovery_c = sum(col[j] for j in K_c) / sum(col);  policy = first c with recovery_c >= min_recovery_frac,
  else 4.  n_local = max(1, int(local_ratio * T)), n_freq = int(frequent_ratio * T).

Decode step t, per head: (1) frequency heads: the frequent pool = occupied positions flagged frequent that
are not sinks, special, punctuation or > t - n_local; if it holds more than n_freq, the one with the lowest
(avg, slot) is unflagged.  (2) member(p) = sink | full | special (0-3) | punct (1-3) | p > t - n_local (2-3)
| flagged (3).  (3) the slot: the lowest empty one; else the unprotected out-of-policy slot, else the
unprotected in-policy slot, with the lowest (order, slot), where protected = member and (p < G or
p >= t - r), and order = p for heads 0-2, avg for heads 3-4.  (4) write t there (flagged, empty history).
(5) visible = members + the new token; attention over the visible slots (mean over the group); every
occupied slot adds its probability (0 when masked) to its sum and 1 to its count.

Prompt longer than C: keep the first C positions of sorted(range(T), key=(-tier, -order, p)) with tier =
2 for member and (p < G or p >= T - r), 1 for other members, 0 else (membership at t = T - 1).
"""
import math

from tests.reference_policies import prompt_attention, shapes

NAMES = ["special", "special_punct", "special_punct_local", "special_punct_local_frequent", "full"]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


class HybridRef:
    def __init__(self, C, G, r, min_recovery_frac=0.95, local_ratio=0.3, frequent_ratio=0.3):
        self.C, self.G, self.r = C, G, r
        self.frac, self.local_ratio, self.frequent_ratio = min_recovery_frac, local_ratio, frequent_ratio

    # ---- profiling ---------------------------------------------------------------------------------------
    def candidate_sets(self, col, cls, T):
        avg = [col[j] / (T - j) for j in range(T)]
        k0 = {p for p in range(T) if p < self.G or cls[p] & 1}
        k1 = k0 | {p for p in range(T) if cls[p] & 2}
        k2 = k1 | set(range(max(0, T - self.n_local), T))
        rest = sorted((p for p in range(T) if p not in k2), key=lambda p: (-avg[p], p))
        k3 = k2 | set(rest[:self.n_freq])
        return [k0, k1, k2, k3, set(range(T))], avg

    def prefill(self, q, k, v, cls):
        T, H, nq, g, d = shapes(q, k)
        self.H, self.g, self.d = H, g, d
        self.n_local = max(1, int(self.local_ratio * T))
        self.n_freq = int(self.frequent_ratio * T)
        self.cls_of = dict(enumerate(cls))  # position -> class bits (decode steps add theirs)
        self.policy, self.recovery, self.flagged, self.slots, self.keys, self.vals = [], [], [], [], [], []
        self.sum, self.cnt = [], []
        for h in range(H):
            A = prompt_attention(q, k, h, g)
            col = [sum(A[i][j] for i in range(T)) for j in range(T)]
            sets, avg = self.candidate_sets(col, cls, T)
            total = sum(col)
            rec = [sum(col[j] for j in s) / total for s in sets]
            rec[4] = 1.0
            pol = next((c for c in range(4) if rec[c] >= self.frac), 4)
            self.policy.append(pol)
            self.recovery.append(rec)
            self.flagged.append(set(sets[3]))
            if T <= self.C:
                kept = list(range(T))
            else:
                def key(p, h=h, pol=pol, avg=avg):
                    m = self.member(h, p, T - 1)
                    tier = 2 if m and (p < self.G or p >= T - self.r) else (1 if m else 0)
                    order = avg[p] if pol >= 3 else p
                    return (-tier, -order, p)
                kept = sorted(sorted(range(T), key=key)[:self.C])
            self.slots.append(kept + [-1] * (self.C - len(kept)))
            self.keys.append([k[p][h] if p >= 0 else None for p in self.slots[h]])
            self.vals.append([v[p][h] if p >= 0 else None for p in self.slots[h]])
            self.sum.append([col[p] if p >= 0 else 0.0 for p in self.slots[h]])
            self.cnt.append([float(T - p) if p >= 0 else 0.0 for p in self.slots[h]])

    # ---- decode ------------------------------------------------------------------------------------------
    def member(self, h, p, t):
        pol, c = self.policy[h], self.cls_of[p]
        return (p < self.G or pol == 4 or (c & 1 and pol <= 3) or (c & 2 and 1 <= pol <= 3)
                or (p > t - self.n_local and 2 <= pol <= 3) or (pol == 3 and p in self.flagged[h]))

    def avg(self, h, s):
        return self.sum[h][s] / max(self.cnt[h][s], 1.0)

    def order(self, h, s):
        return self.avg(h, s) if self.policy[h] >= 3 else self.slots[h][s]

    def choose_slot(self, h, t):
        slots = self.slots[h]
        if self.policy[h] == 3:
            pool = [s for s, p in enumerate(slots) if p >= 0 and p in self.flagged[h] and p >= self.G
                    and self.cls_of[p] == 0 and p <= t - self.n_local]
            if len(pool) > self.n_freq:
                victim = min(pool, key=lambda s: (self.avg(h, s), s))
                self.flagged[h].discard(slots[victim])
        for s, p in enumerate(slots):
            if p < 0:
                return s
        members = [s for s, p in enumerate(slots) if self.member(h, p, t)]
        outside = [s for s in range(self.C) if s not in members]
        if outside:
            return min(outside, key=lambda s: (self.order(h, s), s))
        free = [s for s in members if not (slots[s] < self.G or slots[s] >= t - self.r)]
        if not free:
            raise ValueError(f"every slot is protected at t={t}")
        return min(free, key=lambda s: (self.order(h, s), s))

    def step(self, t, q_t, k_t, v_t, cls_t):
        """Returns per head the visible (attended) positions, sorted."""
        self.cls_of[t] = cls_t
        visible_out = []
        for h in range(self.H):
            s = self.choose_slot(h, t)
            self.slots[h][s], self.keys[h][s], self.vals[h][s] = t, k_t[h], v_t[h]
            self.flagged[h].add(t)
            self.sum[h][s], self.cnt[h][s] = 0.0, 0.0
        for h in range(self.H):
            slots = self.slots[h]
            vis = [s for s, p in enumerate(slots) if p >= 0 and (p == t or self.member(h, p, t))]
            probs = [0.0] * self.C
            for j in range(h * self.g, (h + 1) * self.g):
                pr = softmax([dot(q_t[j], self.keys[h][s]) / math.sqrt(self.d) for s in vis])
                for s, x in zip(vis, pr):
                    probs[s] += x / self.g
            for s, p in enumerate(slots):
                if p >= 0:
                    self.sum[h][s] += probs[s]
                    self.cnt[h][s] += 1.0
            visible_out.append(sorted(slots[s] for s in vis))
        return visible_out

    def kept(self):
        return [sorted(p for p in self.slots[h] if p >= 0) for h in range(self.H)]

    def names(self):
        return [NAMES[p] for p in self.policy]


def run(ref, q, k, v, cls, prompt_len, n_steps):
    """Kept positions after prefill and every step, and the visible positions of every step."""
    ref.prefill(q[:prompt_len], k[:prompt_len], v[:prompt_len], cls[:prompt_len])
    kept, visible = [ref.kept()], []
    for t in range(prompt_len, prompt_len + n_steps):
        visible.append(ref.step(t, q[t], k[t], v[t], cls[t]))
        kept.append(ref.kept())
    return kept, visible
