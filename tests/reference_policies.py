"""Independent, plain-Python reference implementations of the KV-cache policies.

Only ``math``, ``random`` and ``struct`` are used (no torch, no numpy), so that the engine's tensor code can
be checked step by step against something that is short enough to read.  The specification is
``ALGORITHMS.md`` (shared with the engine) and, for keydiff, tova, expected_attention, the lsh prompt
compressor, the per-policy default compressors and the chunkkv / criticalkv / adakv keep wrappers, the
new-policy semantics written for the engine's author (the rules are restated at the code); where they leave a
choice open, the choice made here is written next to the code and summarised below.  These references are
written without reading the engine's code.

Conventions (the engine follows the same ones)
=============================================
Inputs are plain nested lists of floats::

    q[p][j]  query of position p, query head j      (list of d floats), j < n_heads
    k[p][h]  key   of position p, KV head h          (list of d floats), h < n_kv_heads
    v[p][h]  value of position p, KV head h          (list of d floats)

The vectors are used exactly as given: pass whatever the engine caches (keys after RoPE at their
absolute position, the query rotated at its own position).  Query head j belongs to KV head
``j // g`` with ``g = n_heads // n_kv_heads``.

* A cache of one layer has C slots per KV head; ``policy.slots[h]`` is a list of length C of original
  positions (-1 = empty).
* Attention of a query at step t is computed here: softmax over the occupied slots (after the new
  token has been inserted) of ``dot(q, k) / sqrt(d)``; for GQA the per-KV-head statistic is the MEAN
  over the g query heads of the group.  Prompt attention is causal: query i sees keys 0..i.
* Prefill with T <= C: slot s holds position s for s < T, the rest are -1.  T > C: a prompt compressor
  picks C positions per KV head, stored in increasing position order in slots 0..C-1.
* Decode step for position t: if an empty slot exists, insert into the lowest-index empty slot.
  Otherwise score every slot; slots holding positions < G (sinks) or >= t - r (recent window) are
  protected; evict the unprotected slot with the LOWEST score, ties broken by the LOWEST slot index,
  and write t there.  If every slot is protected a ``ValueError`` is raised (the engine rejects
  budgets < G + r + 1).

API
===
Cache policies (one layer), all ``Policy(C, G, r, **hyperparams)`` with ``prefill(q, k, v)``,
``step(t, q_t, k_t, v_t)`` (``q_t[j]``, ``k_t[h]``, ``v_t[h]``), ``slots``, ``keys``, ``values`` and ``kept()``:

    FullRef, RandomRef(seed=0), HashedRandomRef(layer=0), RecentGlobalRef, L2Ref,
    HeavyHitterRef(history_window_size=None, attn_thresholding=False, prefill_seeding="per_query"),
    KeepItOddRef(keep_parity=1), LSHRef(R, lsh_source="key"), KeyDiffRef, TOVARef(tova_heads="layer"),
    ExpectedAttentionRef(cos, sin, ea_future_positions=512, ea_query_window=512, ea_use_covariance=True,
                         ea_use_vnorm=True, ea_epsilon=0.0)

Every policy also accepts ``prompt_compressor=`` (name, see ``compress_prompt``; None = the policy's own,
item 11), ``observation_window=16``, ``pool_kernel=5``, ``compressor_seed=0`` and
``compressor_options={...}`` (COMPRESSOR_OPTIONS: R, tova_heads, cos, sin, ea_*, for a compressor that is not
the policy's own), ``keep_wrapper=None | name | (name, kwargs)`` (chunkkv, criticalkv, adakv applied to the
policy's own compressor scores), ``W_o=None`` (per query head the dim x d block of the output projection),
``decode_criticalkv=False`` and ``criticalkv_epsilon=1e-4`` (decode score (inner + e) * vnorm(slot)).
``make_policy(name, C, G, r, **hp)`` builds one by its engine name (random = RandomRef).
``run(policy, q, k, v, prompt_len, n_steps, feed_long_prompts=False)`` returns the list of
``[sorted kept positions of KV head h for h]`` after prefill and after every decode step.

Prompt compressors: ``compress_prompt(name, q, k, C, G, r, ..., **options)`` -> per KV head the sorted C
kept positions, for name in recent_global, random, l2, heavy_hitter (SnapKV), keep_it_odd, keydiff, tova,
expected_attention, lsh.  ``prompt_scores(name, q, k, G, r, ...)`` -> (s[h][p], protected positions): the
inner scores the keep wrappers use; ``keep_from_scores(s, protected, C)`` turns them into the plain keep-set.

Keep wrappers (T > C): ``chunkkv_keep(scores, protected, C, chunk_size)``,
``criticalkv_keep(scores, protected, C, vnorm, first_stage_ratio=0.5, epsilon=1e-4)`` with
``vnorm_of(values, W_o, g)`` (``vnorm_vec(value, W_o, g, h)`` for one vector),
``adakv_keep(scores, protected, C, alpha_safeguard=0.2)`` (variable-length per-head lists).

Expected-attention helpers: ``rope_tables(n_pos, d, base)``, ``rope_rotation(cos_p, sin_p)``,
``mean_rotation(cos, sin, first, n)``, ``population_stats(vectors, d)``, ``ea_update(n, mu, S, x, window)``,
``ea_key_scores(mus, Ss, Rbar, keys, values, h, g, ...)``.

LSH helpers: ``lsh_bits(x, R)``, ``pack_bits(bits)``, ``hamming(bytes_a, bytes_b)``.

Content-independent policies: ``lacache_keep(n, L, S, O, C, S0)`` (and ``LaCacheRef``),
``sink_recent_keep(T, sink, recent, ...)``, ``sink_recent_decode(...)``,
``sink_recent_chunked_prefill(...)``, ``merge_pyramid_windows``, ``merge_pyramid_schedule``,
``MergePyramidLayerRef``, ``pool_pair``, ``pool_region``, ``best_pool``.

Semantic choices where ALGORITHMS.md is open (each is repeated at the code)
==========================================================================
1. random: one uniform score per slot per eviction step from ``random.Random(seed)``, shared by all KV
   heads (head-constant, like cold-compress); the random prompt compressor keeps sinks + the recent r
   and a ``rng.sample`` of the middle.  The RNG streams differ from torch: use for invariants only.
2. recent_global: score = position (the oldest unprotected token goes).  Head-constant.
3. l2: score = -||k||_2 of the slot's key (per KV head).
4. heavy_hitter (H2O): per KV head, each slot keeps the list of its per-step values since it was
   inserted (prefill queries count as steps).  Score = mean of the last min(W, len) values
   (W = history_window_size, None = all).  With attn_thresholding a step's value is 1.0 if the
   group-mean attention >= 1 / (occupied slots of that head at that step, or i + 1 for prompt
   query i) else 0.0.  Per decode step: choose the victim from the previous steps' scores, insert the
   new token with an empty history, compute q_t's attention over the occupied slots, append.
   Prefill (``prefill_seeding="per_query"``, default): key j gets one value per prompt query i >= j
   (causal attention over the FULL prompt, even when the prompt is then compressed to C positions).
   ``prefill_seeding="column_mean"`` instead appends a single value: the mean of those per-query
   values (the cold-compress variant where the whole prompt counts as one step).
   A window W therefore means "the last W steps", prompt queries included.
5. keep_it_odd: cold-compress's toy policy KEEPS ODD positions (the name, its README and its prompt
   compressor all agree), so even positions are evicted first.  Score = (1 if position has the kept
   parity else 0, position): among tokens of the evicted parity the OLDEST goes first; only when no
   unprotected token of that parity is left does the oldest token of the kept parity go.  No two
   slots of a head share a position, so the slot-index tie rule never applies.  ``keep_parity=0``
   flips it (keep even positions).  The prompt compressor (cold-compress's ``PromptCompressorKeepItOdd``)
   keeps sinks and the recent r, then the most recent tokens of the kept parity, then the most recent
   of the other parity.  (The real cold-compress cache drops even tokens at insertion instead of
   scoring them; that is not reproduced.)
6. lsh: bits = [dot(x, R[:, i]) >= 0], packed little-endian within bytes; slot hashes are of the
   stored key.  Distance d_s to each cached hash is taken BEFORE the new token is inserted (the new
   key's own slot is the one being chosen).  lsh_source="query" sums over the g query heads of the
   group.  score_s = max(d) - d_s where the max runs over all occupied slots (a constant shift, so
   the victim is the unprotected slot of largest distance, lowest slot on ties).  No accumulation.
   Dots are computed in float64 here: tests should use vectors whose projections are clearly away from 0.
7. Prompt compressors (T > C), per KV head, ties always to the LOWER position: recent_global = sinks +
   the last C - G positions; l2 = sinks + positions >= T - r + lowest-norm keys of the rest;
   heavy_hitter = SnapKV: w = min(observation_window, T); s[j] = mean over the last w prompt queries
   and the g group heads of the causal attention to key j < T - w (the keys before the window); smoothed
   over those keys with AvgPool1d(kernel, stride 1, padding kernel//2) counting the zero padding (SnapKV's
   code and kvpress), i.e. sum(s[max(0, j-kernel//2) .. min(T-w-1, j+kernel//2)]) / kernel; the window's
   positions score +inf; sinks and the w window positions are always kept
   (the recent r is NOT additionally protected), the rest of the budget goes to the largest smoothed
   scores (G + w > C raises ValueError).  The default compressor is each policy's own (item 11).
8. lacache: the literal rules of ALGORITHMS.md reproduce the worked example (checked in the tests);
   ``n`` in the rules is the current per-layer cache length (every layer has the same length), the
   compaction runs after each appended token; "grow C by R//2 the first time" happens the first time
   the length exceeds the original C, and need = n - (grown C) is then re-checked (no compaction when
   need <= 0).  Negative room counts as 0 groups.  A non-positive cap1 raises ValueError.
   Caveat: with R >= 2, g = ceil(need / R) groups can remove up to R - 1 more tokens than needed, and
   the literal rules then ladder into the newest L tokens (only the newest L - R + 1 are guaranteed
   untouched; e.g. L=6, S=2, O=0, C=30, S0=1 drops position 72 at n = 78).  Kept literal here.
9. sink_recent keep(T): the seed's ``build_simple_keep_token_idx`` (blocks aligned to absolute
   multiples of block_n, middle blocks = [ceil(sink/bn), floor((T-recent)/bn)), partial blocks
   dropped, stride or floor(linspace) budget selection).  floor(linspace(0, nb-1, kb)) is computed
   EXACTLY as (i*(nb-1)) // (kb-1).  Note: ``torch.linspace(...).long()`` in float32 differs from the
   exact value for many (nb, kb), e.g. nb=17, kb=15 gives block 7 instead of 8; an engine should use
   integer arithmetic.
   Decode (``sink_recent_decode``, mode "freeze", default): the middle chosen at prefill is never
   re-selected; every step the new token enters the recent window and the token leaving it (position
   t - recent) stays only while the middle holds fewer than M_cap tokens, M_cap = max(middle kept at
   prefill, middle_budget_tokens) for uniform/budget, the prefill middle for uniform/stride, 0 for
   "none".  Equivalently: when the cache exceeds sink + recent + M_cap, evict the NEWEST middle token.
   The kept set is then keep(T) restricted to the tokens still present plus the recent window, and no
   evicted token is ever needed back.  Mode "rank" reproduces the seed's own streaming rule one token at
   a time: when the cache length n_c exceeds the seed's target (sink + recent + middle_budget_tokens for
   uniform/budget, else sink + recent) keep(n_c) is applied to RANKS of the compacted cache.
10. merge_pyramid: W_k = int(W0 * (1 + k / m * (1 / beta - 1))) in Python floats (as the seed).  rws
    starts at ``sinks``.  Prefill (unless skipped): while n - rws > W_k pool [sinks, rws + W_k) into
    pairs and set rws = sinks + pooled length (the seed's compress_prefill loop).  Decode: append the
    token, then if n - rws > W_k pool the whole [sinks, n) once and set rws = new length.  An odd region
    repeats its last element.  A slot's reported position is the pairwise mean of the two pooled slots'
    positions (the same mean pooling applied to the position vector; a padded pair (x, x) keeps x);
    ``members`` also gives the set of original positions.  best pooling: per channel count pairs with
    even > odd (strictly); take the even series when count_even >= count_odd (ties -> even, as the seed's
    ``first_count >= second_count``), where count_odd = pairs - count_even (the padded pair counts for odd).
11. Default prompt compressor = the policy's own: l2 -> l2, random -> random, keep_it_odd -> keep_it_odd,
    lsh -> lsh, recent_global -> recent_global, heavy_hitter -> heavy_hitter (SnapKV), keydiff -> keydiff,
    tova -> tova, expected_attention -> expected_attention (it used to be recent_global for all but
    heavy_hitter).  "random" is two compressors: RandomRef keeps the rng.sample of item 1 (compressor_seed);
    HashedRandomRef (the engine's) passes ``hash_layer=layer`` and then "random" keeps sinks + the recent r +
    the HIGHEST hash_uniform(position, 0, layer) draws (float32 values, ties to the lower position), the same
    positions in every head.  FullRef and the base class keep recent_global.  The lsh compressor scores every
    prompt key (those inside the observation window too) by -sum of Hamming distances to the last
    w = min(observation_window, T) queries of the group, and protects sinks + the recent r only (not the w
    window, unlike SnapKV).
12. keydiff: decode and prompt exactly as specified (anchor = mean of unit keys, the incoming key included at
    decode; score = -cos).  Keys must be non-zero (a zero key raises: its direction is undefined; kvpress's
    F.normalize would give it a zero unit vector).  All occupied slots (sinks and recent included) enter the
    anchor.
13. tova: softmax over the occupied slots + the new key (prompt: the last query over all T keys).  layer mode
    computes the mean over ALL query heads BY POSITION and raises ValueError at an eviction when the KV heads'
    slot layouts differ (identical slot lists are required, not just identical sets), so layer mode cannot be
    combined with a per-head compressor (l2, keydiff, ...), the criticalkv/adakv keep wrappers, or
    decode_criticalkv (the last is rejected at construction; the others raise at the first eviction).  The
    chunkkv wrapper keeps the same positions in every head and is fine.  The tova compressor in layer mode is
    head-constant.
14. expected_attention: the statistics never include sink queries: prompt n = T - G (all T - G queries, even
    when n > ea_query_window: the window only weighs decode updates); a prompt with T <= G starts from n = 0,
    mu = 0, S = 0 (the first update then gives mu = q, S = 0); a decode step at t < G does not update.  The
    update runs at every decode step (before the victim is chosen), whether or not an eviction happens.
    Decode sink slots score +inf (never candidates anyway).  Prompt sinks score the MAX of the other scores
    (kvpress pads its n_sink scores with the max) so that the keep wrappers see finite scores; with stage-1
    pins (criticalkv) ties go to the lower position, so sinks take pins first.  Without ea_use_vnorm the score
    is p + epsilon.  The RoPE tables must reach position t + ea_future_positions (ValueError otherwise);
    ea_future_positions >= 1.  Everything is float64.
15. chunkkv: P is head-independent; the chunk score averages the summed inner scores over ALL the chunk's
    positions (protected ones included); a chunk with no new position is a no-op "add".  When no remaining
    chunk fits, fewer than C positions are kept: the policy's leftover slots stay empty (-1) and decode fills
    them first (no top-up with single positions).
16. criticalkv: the stage-1 top n1 = max(1, int(C * f)) is taken over ALL T positions (protected ones included,
    as kvpress has no protection), per head, ties to the lower position; the pins tie at +inf and are ordered
    among themselves by the lower position (matters only when n1 > C - |P|).  vnorm = mean over the group's
    query heads of the L1 norm of W_o[j'] @ v.  At decode (decode_criticalkv) vnorm is stored per slot when
    the token is written (prefill included) and the score is (inner + e) * vnorm for every slot (no pins);
    inner scores that are tuples (keep_it_odd) are not supported.
17. adakv: the safeguard top n_safe = max(1, int(C * a)) per head is also taken over all positions; there is
    NO per-head cap (a head may keep more than C positions; the lengths sum to Hkv * C).  In a policy the slot
    lists are then widened to the longest head (-1 padding) and ``step`` raises NotImplementedError (the
    adakv decode rule is the engine's, not modelled here).
18. Keep wrappers take the compressor's protected set as ``prompt_scores`` reports it: sinks + the recent r for
    every compressor except heavy_hitter (sinks + the last w).  Inner scores of the old compressors:
    recent_global = position, l2 = -|k|, keep_it_odd = p + T * [kept parity] (same ranking as item 5),
    heavy_hitter = SnapKV's pooled score, random = the hash draw (the rng "random" has no scores: ValueError).
"""
import math
import random
import struct

# =====================================================================================================
# Small numeric helpers
# =====================================================================================================


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def l2norm(a):
    return math.sqrt(sum(x * x for x in a))


def softmax(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def ceil_div(a, b):
    return -((-a) // b)


def group_attention(q_heads, keys, g, h):
    """Mean over the g query heads of KV head h of softmax(q . k / sqrt(d)) over ``keys`` (a list of
    key vectors).  Returns one probability per key."""
    d = len(keys[0])
    out = [0.0] * len(keys)
    for j in range(h * g, (h + 1) * g):
        probs = softmax([dot(q_heads[j], key) / math.sqrt(d) for key in keys])
        for s, p in enumerate(probs):
            out[s] += p / g
    return out


def prompt_attention(q, k, h, g):
    """Causal prompt attention of KV head h: A[i][j] for j <= i (group mean), 0.0 for j > i."""
    T = len(k)
    A = []
    for i in range(T):
        row = group_attention(q[i], [k[j][h] for j in range(i + 1)], g, h)
        A.append(row + [0.0] * (T - i - 1))
    return A


def shapes(q, k):
    """(T, n_kv_heads, n_heads, g, d) of the inputs."""
    T, H, nq, d = len(k), len(k[0]), len(q[0]), len(k[0][0])
    if nq % H:
        raise ValueError(f"{nq} query heads do not split into {H} KV heads")
    return T, H, nq, nq // H, d


def cosine(a, b):
    """dot(a, b) / (|a| |b|); a zero vector has no direction (ValueError)."""
    na, nb = l2norm(a), l2norm(b)
    if na == 0.0 or nb == 0.0:
        raise ValueError("cosine of a zero vector")
    return dot(a, b) / (na * nb)


def unit(a):
    """a / |a| (a zero vector raises ValueError)."""
    n = l2norm(a)
    if n == 0.0:
        raise ValueError("a zero vector has no direction")
    return [x / n for x in a]


def matvec(M, x):
    return [dot(row, x) for row in M]


def transpose(M):
    return [list(col) for col in zip(*M)]


def matmul(A, B):
    Bt = transpose(B)
    return [[dot(row, col) for col in Bt] for row in A]


def vnorm_vec(value, W_o, g, h):
    """CriticalKV's value norm of one value vector of KV head h: mean over the g query heads j' of the group of
    the L1 norm of W_o[j'] @ value (W_o[j']: the dim x d block of the output projection for query head j')."""
    return sum(sum(abs(x) for x in matvec(W_o[j], value)) for j in range(h * g, (h + 1) * g)) / g


def vnorm_of(values, W_o, g):
    """vnorm[h][p] for values v[p][h] (see vnorm_vec)."""
    T, H = len(values), len(values[0])
    return [[vnorm_vec(values[p][h], W_o, g, h) for p in range(T)] for h in range(H)]


# ---- expected attention (kvpress ExpectedAttentionPress) -------------------------------------------------


def rope_tables(n_pos, d, base=10000.0):
    """Standard rotate-half RoPE tables: cos[p], sin[p] are d-lists whose two halves are equal,
    angle_i = p * base ** (-2 i / d) for i < d / 2."""
    half = d // 2
    inv = [base ** (-2.0 * i / d) for i in range(half)]
    cos = [[math.cos(p * f) for f in inv] * 2 for p in range(n_pos)]
    sin = [[math.sin(p * f) for f in inv] * 2 for p in range(n_pos)]
    return cos, sin


def rope_rotation(cos_p, sin_p):
    """R(p) = diag(cos[p]) + diag(sin[p]) @ P with P x = concat(-x[d/2:], x[:d/2]), as a d x d matrix."""
    d = len(cos_p)
    half = d // 2
    M = [[0.0] * d for _ in range(d)]
    for a in range(d):
        M[a][a] += cos_p[a]
        if a < half:
            M[a][a + half] -= sin_p[a]
        else:
            M[a][a - half] += sin_p[a]
    return M


def mean_rotation(cos, sin, first, n):
    """Rbar = mean over p in [first, first + n) of R(p)."""
    if n < 1:
        raise ValueError("expected_attention needs at least one future position")
    if first + n > len(cos) or first + n > len(sin):
        raise ValueError(f"RoPE tables of {len(cos)} positions do not reach position {first + n - 1}")
    d = len(cos[0])
    acc = [[0.0] * d for _ in range(d)]
    for p in range(first, first + n):
        Rp = rope_rotation(cos[p], sin[p])
        for a in range(d):
            for b in range(d):
                acc[a][b] += Rp[a][b]
    return [[x / n for x in row] for row in acc]


def population_stats(vectors, d=None):
    """(n, mean, population covariance (1/n) sum (x - mu)(x - mu)^T); n = 0 gives zeros (d must be given)."""
    n = len(vectors)
    if d is None:
        d = len(vectors[0])
    if n == 0:
        return 0, [0.0] * d, [[0.0] * d for _ in range(d)]
    mu = [sum(x[a] for x in vectors) / n for a in range(d)]
    S = [[sum((x[a] - mu[a]) * (x[b] - mu[b]) for x in vectors) / n for b in range(d)] for a in range(d)]
    return n, mu, S


def ea_update(n, mu, S, x, window):
    """One running update: n += 1; a = 1 / min(n, W); delta = x - mu; mu += a delta;
    S = (1 - a) (S + a delta delta^T).  Returns the new (n, mu, S) (inputs are not modified)."""
    n += 1
    a = 1.0 / min(n, window)
    delta = [x[c] - mu[c] for c in range(len(x))]
    mu = [mu[c] + a * delta[c] for c in range(len(x))]
    S = [[(1.0 - a) * (S[i][j] + a * delta[i] * delta[j]) for j in range(len(x))] for i in range(len(x))]
    return n, mu, S


def ea_key_scores(mus, Ss, Rbar, keys, values, h, g, use_covariance=True, use_vnorm=True, epsilon=0.0):
    """Expected-attention score of each key of KV head h: mu'_j = Rbar mu_j, S'_j = Rbar S_j Rbar^T,
    logit_j(k) = mu'_j . k / sqrt(d) + k^T S'_j k / (2 d) (second term only with use_covariance),
    p_j = softmax over ``keys``; score = (mean over the g heads of p_j + epsilon) * |v|_2 (use_vnorm).
    ``mus[j]``, ``Ss[j]`` are indexed by query head; a value of None skips the norm (the incoming key)."""
    d = len(keys[0])
    Rt = transpose(Rbar)
    mean_p = [0.0] * len(keys)
    for j in range(h * g, (h + 1) * g):
        mu_r = matvec(Rbar, mus[j])
        S_r = matmul(matmul(Rbar, Ss[j]), Rt)
        logits = []
        for key in keys:
            x = dot(mu_r, key) / math.sqrt(d)
            if use_covariance:
                x += dot(key, matvec(S_r, key)) / (2 * d)
            logits.append(x)
        for i, p in enumerate(softmax(logits)):
            mean_p[i] += p / g
    out = []
    for p, val in zip(mean_p, values):
        s = p + epsilon
        if use_vnorm and val is not None:
            s *= l2norm(val)
        out.append(s)
    return out


# =====================================================================================================
# Prompt compressors (prompt longer than the budget): per KV head the sorted C kept positions
# =====================================================================================================


def _fill(protected, ranked_rest, C):
    """protected positions + the first C - |protected| of ranked_rest, sorted."""
    protected = sorted(set(protected))
    if len(protected) > C:
        raise ValueError(f"{len(protected)} always-kept positions do not fit a budget of {C}")
    keep = protected + list(ranked_rest[: C - len(protected)])
    return sorted(keep)


def snapkv_scores(q, k, h, g, observation_window=16, pool_kernel=5, A=None):
    """SnapKV's smoothed score of every prompt key for KV head h (see module docstring, item 7)."""
    T = len(k)
    if A is None:
        A = prompt_attention(q, k, h, g)
    w = min(observation_window, T)
    n = T - w  # the keys before the window; the window itself is kept whatever its score
    s = [sum(A[i][j] for i in range(T - w, T)) / w for j in range(n)]
    half = pool_kernel // 2
    pooled = []
    for j in range(n):  # zero padding beyond [0, n) counts (SnapKV's avg_pool1d, count_include_pad=True)
        lo, hi = max(0, j - half), min(n - 1, j + half)
        pooled.append(sum(s[lo:hi + 1]) / pool_kernel)
    return pooled + [math.inf] * w


# Options a compressor may take besides the common ones (each compressor ignores those it does not use):
#   v           the values v[p][h] (expected_attention's |v|)
#   R           the layer's LSH projection (lsh)
#   hash_layer  the layer index of the hashed random draw ("random" uses hash_uniform(p, 0, layer) when given)
#   tova_heads  "layer" | "group" (tova)
#   cos, sin, ea_future_positions, ea_use_covariance, ea_use_vnorm, ea_epsilon   (expected_attention)
COMPRESSOR_OPTIONS = {"v": None, "R": None, "hash_layer": None, "tova_heads": "layer", "cos": None, "sin": None,
                      "ea_future_positions": 512, "ea_use_covariance": True, "ea_use_vnorm": True,
                      "ea_epsilon": 0.0, "ea_query_window": 512}
SCORED_ONLY = ("keydiff", "tova", "expected_attention", "lsh")


def _options(opts):
    unknown = set(opts) - set(COMPRESSOR_OPTIONS)
    if unknown:
        raise TypeError(f"unknown prompt-compressor options {sorted(unknown)}")
    out = dict(COMPRESSOR_OPTIONS)
    out.update(opts)
    return out


def prompt_scores(name, q, k, G, r, observation_window=16, pool_kernel=5, keep_parity=1, seed=0, rng=None,
                  **opts):
    """The inner prompt scores of a compressor and the positions it protects: (s, P) with s[h][p] (higher =
    kept first) for every prompt position p and KV head h, P the sorted protected positions (head-independent).

    Keeping P, then the highest s (ties to the lower position) up to C is exactly ``compress_prompt`` for every
    compressor except the rng "random" (it has no scores: ValueError; give ``hash_layer`` for the hashed draw).
    Scores (module docstring, items 7 and 11-16): recent_global = position; l2 = -|k|;
    keep_it_odd = p + T * [p has the kept parity]; heavy_hitter = SnapKV's pooled score (P = sinks + the last w
    positions); random (hashed) = hash_uniform(p, 0, layer); keydiff = -cos(k, anchor); tova = the last query's
    attention; expected_attention = the expected-attention score (sinks: the max of the others, as kvpress);
    lsh = -(summed Hamming distance).  Every compressor but heavy_hitter protects sinks + the recent r."""
    o = _options(opts)
    T, H, nq, g, d = shapes(q, k)
    prot = sorted(set(range(min(G, T))) | set(range(max(0, T - r), T)))
    if name == "recent_global":
        return [[float(p) for p in range(T)] for _ in range(H)], prot
    if name == "l2":
        return [[-l2norm(k[p][h]) for p in range(T)] for h in range(H)], prot
    if name == "keep_it_odd":
        s = [float(p + (T if p % 2 == keep_parity else 0)) for p in range(T)]
        return [list(s) for _ in range(H)], prot
    if name == "heavy_hitter":
        w = min(observation_window, T)
        prot_s = sorted(set(range(min(G, T))) | set(range(T - w, T)))
        return [snapkv_scores(q, k, h, g, observation_window, pool_kernel) for h in range(H)], prot_s
    if name == "random":
        if o["hash_layer"] is None:
            raise ValueError("the rng random compressor has no scores (pass hash_layer for the hashed draw)")
        s = [hash_uniform(p, 0, o["hash_layer"]) for p in range(T)]
        return [list(s) for _ in range(H)], prot
    if name == "keydiff":
        out = []
        for h in range(H):
            units = [unit(k[p][h]) for p in range(T)]
            anchor = [sum(u[c] for u in units) / T for c in range(d)]
            out.append([-cosine(k[p][h], anchor) for p in range(T)])
        return out, prot
    if name == "tova":
        if o["tova_heads"] not in ("layer", "group"):
            raise ValueError(f"tova_heads must be layer or group, not {o['tova_heads']!r}")
        last = q[T - 1]
        per_group = [group_attention(last, [k[p][h] for p in range(T)], g, h) for h in range(H)]
        if o["tova_heads"] == "group":
            return per_group, prot
        layer = [sum(per_group[h][p] for h in range(H)) / H for p in range(T)]  # = mean over all H*g heads
        return [list(layer) for _ in range(H)], prot
    if name == "expected_attention":
        if o["cos"] is None or o["sin"] is None:
            raise ValueError("the expected_attention compressor needs the RoPE tables cos, sin")
        if o["ea_use_vnorm"] and o["v"] is None:
            raise ValueError("the expected_attention compressor needs the values v (ea_use_vnorm)")
        stats = [population_stats([q[p][j] for p in range(G, T)], d) for j in range(nq)]
        mus, Ss = [st[1] for st in stats], [st[2] for st in stats]
        Rbar = mean_rotation(o["cos"], o["sin"], T, o["ea_future_positions"])
        out = []
        for h in range(H):
            cand = list(range(min(G, T), T))
            vals = [o["v"][p][h] if o["v"] is not None else None for p in cand]
            sc = ea_key_scores(mus, Ss, Rbar, [k[p][h] for p in cand], vals, h, g, o["ea_use_covariance"],
                               o["ea_use_vnorm"], o["ea_epsilon"])
            top = max(sc) if sc else 0.0
            out.append([top] * (T - len(cand)) + sc)  # sinks: the max score (kvpress pads n_sink with the max)
        return out, prot
    if name == "lsh":
        if o["R"] is None:
            raise ValueError("the lsh compressor needs the layer's projection R")
        w = min(observation_window, T)

        def hsh(x):
            return pack_bits(lsh_bits(x, o["R"]))

        out = []
        for h in range(H):
            probes = [hsh(q[i][j]) for i in range(T - w, T) for j in range(h * g, (h + 1) * g)]
            out.append([-float(sum(hamming(pr, hsh(k[p][h])) for pr in probes)) for p in range(T)])
        return out, prot
    raise ValueError(f"unknown prompt compressor {name!r}")


def keep_from_scores(scores, protected, C):
    """Per KV head: the protected positions, then the highest scores (ties to the lower position), sorted."""
    out = []
    prot = set(protected)
    for s in scores:
        rest = [p for p in range(len(s)) if p not in prot]
        out.append(_fill(prot, sorted(rest, key=lambda p: (-s[p], p)), C))
    return out


def compress_prompt(name, q, k, C, G, r, observation_window=16, pool_kernel=5, seed=0, rng=None,
                    keep_parity=1, **opts):
    """The C positions (per KV head, sorted) a prompt compressor keeps from a prompt of T > C tokens.
    ``opts``: see COMPRESSOR_OPTIONS (v, R, hash_layer, tova_heads, cos, sin, ea_*)."""
    o = _options(opts)
    T, H, _, g, _ = shapes(q, k)
    if T <= C:
        return [list(range(T)) for _ in range(H)]
    if name in SCORED_ONLY or (name == "random" and o["hash_layer"] is not None):
        scores, prot = prompt_scores(name, q, k, G, r, observation_window, pool_kernel, keep_parity, **opts)
        return keep_from_scores(scores, prot, C)
    sinks = [p for p in range(min(G, T))]
    recent = [p for p in range(max(0, T - r), T)]
    prot = set(sinks) | set(recent)
    middle = [p for p in range(T) if p not in prot]
    if name == "recent_global":
        if C <= G:
            raise ValueError("recent_global prompt compression needs C > G")
        keep = sorted(set(sinks) | set(range(T - (C - G), T)))
        return [list(keep) for _ in range(H)]
    if name == "random":
        rng = rng if rng is not None else random.Random(seed)
        n_mid = C - len(prot)
        if n_mid < 0:
            raise ValueError("sinks + recent window exceed the budget")
        keep = sorted(prot | set(rng.sample(middle, n_mid)))
        return [keep for _ in range(H)]
    if name == "keep_it_odd":
        ranked = sorted(middle, key=lambda p: (0 if p % 2 == keep_parity else 1, -p))
        keep = _fill(prot, ranked, C)
        return [list(keep) for _ in range(H)]
    if name == "l2":
        out = []
        for h in range(H):
            ranked = sorted(middle, key=lambda p: (l2norm(k[p][h]), p))
            out.append(_fill(prot, ranked, C))
        return out
    if name == "heavy_hitter":  # SnapKV
        out = []
        w = min(observation_window, T)
        prot_s = set(sinks) | set(range(T - w, T))
        for h in range(H):
            pooled = snapkv_scores(q, k, h, g, observation_window, pool_kernel)
            rest = [p for p in range(T) if p not in prot_s]
            ranked = sorted(rest, key=lambda p: (-pooled[p], p))
            out.append(_fill(prot_s, ranked, C))
        return out
    raise ValueError(f"unknown prompt compressor {name!r}")


# =====================================================================================================
# Keep-set wrappers (applied to a compressor's prompt scores, T > C): chunkkv, criticalkv, adakv
# =====================================================================================================


def _check_protected(protected, C):
    prot = sorted(set(protected))
    if len(prot) > C:
        raise ValueError(f"{len(prot)} always-kept positions do not fit a budget of {C}")
    return prot


def chunkkv_keep(scores, protected, C, chunk_size):
    """ChunkKV: chunks [0, L), [L, 2L), ... (the last may be shorter) scored by the mean over their positions of
    the sum over KV heads of scores[h][p].  Kept = the protected positions, then whole chunks in decreasing chunk
    score (ties: lower chunk index); a chunk whose not-yet-kept positions do not fit the remaining capacity is
    skipped and the next one tried.  The same positions in every head.  May keep fewer than C (module docstring
    item 15): the rest of the slots stay empty."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    H, T = len(scores), len(scores[0])
    kept = set(_check_protected(protected, C))
    total = [sum(scores[h][p] for h in range(H)) for p in range(T)]
    chunks = [list(range(a, min(a + chunk_size, T))) for a in range(0, T, chunk_size)]
    cscore = [sum(total[p] for p in ch) / len(ch) for ch in chunks]
    for i in sorted(range(len(chunks)), key=lambda i: (-cscore[i], i)):
        new = [p for p in chunks[i] if p not in kept]
        if len(new) <= C - len(kept):
            kept.update(new)
    keep = sorted(kept)
    return [list(keep) for _ in range(H)]


def _top_positions(s, n):
    """The n positions of highest s (ties to the lower position)."""
    return sorted(range(len(s)), key=lambda p: (-s[p], p))[:n]


def criticalkv_keep(scores, protected, C, vnorm, first_stage_ratio=0.5, epsilon=1e-4):
    """CriticalKV, per KV head h: stage 1 pins the top n1 = max(1, int(C * f)) positions by scores[h] (over ALL
    positions, protected ones included; ties to the lower position) with +inf; stage 2 scores the others
    (s + epsilon) * vnorm[h][p].  Kept = the protected positions, then the highest final scores (ties to the
    lower position; the pins tie among themselves at +inf) up to C."""
    prot = _check_protected(protected, C)
    n1 = max(1, int(C * first_stage_ratio))
    out = []
    for h, s in enumerate(scores):
        pinned = set(_top_positions(s, n1))
        final = [math.inf if p in pinned else (s[p] + epsilon) * vnorm[h][p] for p in range(len(s))]
        out.append(keep_from_scores([final], prot, C)[0])
    return out


def adakv_keep(scores, protected, C, alpha_safeguard=0.2):
    """AdaKV: per KV head the top n_safe = max(1, int(C * a)) positions by scores[h] (over all positions, ties
    to the lower position) are pinned; then the layer keeps, over all heads together, the H * C (head, position)
    pairs of highest score, pinned and protected counting as +inf (ties: lower head, then lower position).
    Returns per head the sorted kept positions; the lengths differ, their sum is H * C (no per-head cap: a
    head may keep more than C)."""
    prot = set(_check_protected(protected, C))
    H, T = len(scores), len(scores[0])
    n_safe = max(1, int(C * alpha_safeguard))
    cand = []
    for h, s in enumerate(scores):
        pinned = set(_top_positions(s, n_safe))
        for p in range(T):
            cand.append((math.inf if p in prot or p in pinned else s[p], h, p))
    cand.sort(key=lambda x: (-x[0], x[1], x[2]))
    out = [[] for _ in range(H)]
    for _, h, p in cand[:H * C]:
        out[h].append(p)
    return [sorted(x) for x in out]


KEEP_WRAPPERS = ("chunkkv", "criticalkv", "adakv")


# =====================================================================================================
# Cache policies (one layer)
# =====================================================================================================


class RefPolicy:
    """Shared slot mechanics; subclasses define ``score(h, t, q_t, k_t)`` (low = evicted first).

    Common options (every policy):
      prompt_compressor      name (see compress_prompt); None = the policy's own (``default_prompt_compressor``)
      observation_window, pool_kernel, compressor_seed   for the compressors that use them
      compressor_options     dict of extra compressor options (COMPRESSOR_OPTIONS: R, tova_heads, cos, sin, ...)
                             for a compressor that is not the policy's own; they override the policy's own
      keep_wrapper           None | name | (name, kwargs) with name in chunkkv, criticalkv, adakv: the prompt
                             (T > C) is kept by that wrapper applied to the compressor's ``prompt_scores``
                             (criticalkv takes its vnorm from W_o; adakv: prefill only, decode raises)
      W_o                    the output-projection blocks W_o[j] (dim x d, one per query head) for vnorm
      decode_criticalkv      decode score = (inner score + criticalkv_epsilon) * vnorm(slot), vnorm stored per
                             slot at insertion (prefill included); needs W_o
    """

    name = "base"
    default_prompt_compressor = "recent_global"

    def __init__(self, C, G, r, prompt_compressor=None, observation_window=16, pool_kernel=5,
                 compressor_seed=0, compressor_options=None, keep_wrapper=None, W_o=None,
                 decode_criticalkv=False, criticalkv_epsilon=1e-4, **hp):
        if hp:
            raise TypeError(f"{type(self).__name__}: unknown hyperparameters {sorted(hp)}")
        self.C, self.G, self.r = C, G, r
        self.prompt_compressor = prompt_compressor or self.default_prompt_compressor
        self.observation_window, self.pool_kernel = observation_window, pool_kernel
        self.compressor_seed = compressor_seed
        self.compressor_options = dict(compressor_options or {})
        _options(self.compressor_options)  # rejects unknown names early
        if isinstance(keep_wrapper, str):
            keep_wrapper = (keep_wrapper, {})
        if keep_wrapper is not None:
            if keep_wrapper[0] not in KEEP_WRAPPERS:
                raise ValueError(f"unknown keep wrapper {keep_wrapper[0]!r}")
            keep_wrapper = (keep_wrapper[0], dict(keep_wrapper[1] or {}))
            if keep_wrapper[0] == "criticalkv" and W_o is None:
                raise ValueError("the criticalkv keep wrapper needs W_o")
        self.keep_wrapper = keep_wrapper
        if decode_criticalkv and W_o is None:
            raise ValueError("decode_criticalkv needs W_o")
        self.W_o, self.decode_criticalkv, self.criticalkv_epsilon = W_o, decode_criticalkv, criticalkv_epsilon
        self.slots = None
        self.keys = None
        self.values = None
        self.vnorms = None

    # ---- prefill -------------------------------------------------------------------------------------
    def policy_compressor_kwargs(self):
        """Compressor options this policy supplies itself (its R, tova_heads, RoPE tables, ...)."""
        return {}

    def compressor_kwargs(self):
        kw = dict(observation_window=self.observation_window, pool_kernel=self.pool_kernel,
                  seed=self.compressor_seed)
        kw.update(self.policy_compressor_kwargs())
        kw.update(self.compressor_options)
        return kw

    def wrapped_keep(self, q, k, v):
        """The prompt kept by ``keep_wrapper`` from this policy's compressor scores (T > C)."""
        kw = self.compressor_kwargs()
        kw["v"] = v
        scores, prot = prompt_scores(self.prompt_compressor, q, k, self.G, self.r, **kw)
        name, opts = self.keep_wrapper
        if name == "chunkkv":
            return chunkkv_keep(scores, prot, self.C, **opts)
        if name == "criticalkv":
            return criticalkv_keep(scores, prot, self.C, vnorm_of(v, self.W_o, self.g), **opts)
        return adakv_keep(scores, prot, self.C, **opts)

    def prefill(self, q, k, v):
        T, H, nq, g, d = shapes(q, k)
        self.H, self.nq, self.g, self.d = H, nq, g, d
        if T <= self.C:
            kept = [list(range(T)) for _ in range(H)]
        elif self.keep_wrapper is not None:
            kept = self.wrapped_keep(q, k, v)
        else:
            kept = compress_prompt(self.prompt_compressor, q, k, self.C, self.G, self.r, v=v,
                                   **self.compressor_kwargs())
        width = max([self.C] + [len(x) for x in kept])  # > C only for adakv (whose decode is not modelled)
        self.slots = [kept[h] + [-1] * (width - len(kept[h])) for h in range(H)]
        self.keys = [[k[p][h] if p >= 0 else None for p in self.slots[h]] for h in range(H)]
        self.values = [[v[p][h] if p >= 0 else None for p in self.slots[h]] for h in range(H)]
        if self.W_o is not None:
            self.vnorms = [[vnorm_vec(v[p][h], self.W_o, g, h) if p >= 0 else None for p in self.slots[h]]
                           for h in range(H)]
        self.after_prefill(q, k, v)

    def after_prefill(self, q, k, v):
        pass

    # ---- decode --------------------------------------------------------------------------------------
    def protected(self, p, t):
        return p < self.G or p >= t - self.r

    def choose_slot(self, h, t, q_t, k_t):
        slots = self.slots[h]
        for s, p in enumerate(slots):
            if p < 0:
                return s  # lowest empty slot
        scores = self.score(h, t, q_t, k_t)
        if self.decode_criticalkv:
            e = self.criticalkv_epsilon
            scores = [(sc + e) * vn for sc, vn in zip(scores, self.vnorms[h])]
        cand = [s for s, p in enumerate(slots) if not self.protected(p, t)]
        if not cand:
            raise ValueError(f"every slot is protected at t={t} (C={self.C}, G={self.G}, r={self.r})")
        return min(cand, key=lambda s: (scores[s], s))

    def begin_step(self, t, q_t, k_t):
        pass

    def step(self, t, q_t, k_t, v_t):
        if self.keep_wrapper is not None and self.keep_wrapper[0] == "adakv":
            raise NotImplementedError("adakv decode is not modelled by the reference (prefill only)")
        self.begin_step(t, q_t, k_t)
        chosen = [self.choose_slot(h, t, q_t, k_t) for h in range(self.H)]  # all decided before writing
        for h, s in enumerate(chosen):
            self.slots[h][s] = t
            self.keys[h][s] = k_t[h]
            self.values[h][s] = v_t[h]
            if self.vnorms is not None:
                self.vnorms[h][s] = vnorm_vec(v_t[h], self.W_o, self.g, h)
            self.after_insert(h, s, t, q_t, k_t)
        self.after_step(t, q_t, k_t)
        return chosen

    def after_insert(self, h, s, t, q_t, k_t):
        pass

    def after_step(self, t, q_t, k_t):
        pass

    def score(self, h, t, q_t, k_t):
        raise NotImplementedError

    def kept(self):
        return [sorted(p for p in self.slots[h] if p >= 0) for h in range(self.H)]


class FullRef(RefPolicy):
    """Never evicts (C >= prompt + new tokens)."""

    name = "full"

    def choose_slot(self, h, t, q_t, k_t):
        for s, p in enumerate(self.slots[h]):
            if p < 0:
                return s
        raise ValueError(f"full cache of {self.C} slots overflowed at t={t}")

    def prefill(self, q, k, v):
        if len(k) > self.C:
            raise ValueError("full cache: prompt longer than the buffer")
        super().prefill(q, k, v)


class RandomRef(RefPolicy):
    """score = uniform random per slot per eviction step (shared by all KV heads)."""

    name = "random"
    default_prompt_compressor = "random"  # the rng.sample compressor (compressor_seed)

    def __init__(self, C, G, r, seed=0, **kw):
        super().__init__(C, G, r, **kw)
        self.rng = random.Random(seed)
        self._scores = None

    def begin_step(self, t, q_t, k_t):
        self._scores = None

    def score(self, h, t, q_t, k_t):
        if self._scores is None:
            self._scores = [self.rng.random() for _ in range(self.C)]
        return self._scores


def hash_uniform(a, b, c):
    """The engine's deterministic draw for random eviction: two Park-Miller steps over a mix of three integers,
    divided by the modulus and rounded to float32 (the engine ranks float32 scores)."""
    m = 2147483647
    x = (a * 73856093 + b * 19349663 + c * 83492791 + 12345) % m
    x = (x * 48271) % m
    x = (x * 48271) % m
    return struct.unpack("f", struct.pack("f", x / m))[0]


class HashedRandomRef(RefPolicy):
    """The engine's random policy: score of slot s at step t = hash_uniform(t, s, layer), shared by all KV
    heads (a fixed function instead of a generator, so a sequence evicts the same alone or in a batch)."""

    name = "random"
    default_prompt_compressor = "random"  # with hash_layer: keep the highest hash_uniform(p, 0, layer)

    def __init__(self, C, G, r, layer=0, **kw):
        super().__init__(C, G, r, **kw)
        self.layer = layer

    def policy_compressor_kwargs(self):
        return {"hash_layer": self.layer}

    def score(self, h, t, q_t, k_t):
        return [hash_uniform(t, s, self.layer) for s in range(self.C)]


class RecentGlobalRef(RefPolicy):
    """score = position: the oldest unprotected token is evicted (StreamingLLM)."""

    name = "recent_global"
    default_prompt_compressor = "recent_global"

    def score(self, h, t, q_t, k_t):
        return list(self.slots[h])


class L2Ref(RefPolicy):
    """score = -||k||: the largest-norm key is evicted first."""

    name = "l2"
    default_prompt_compressor = "l2"

    def score(self, h, t, q_t, k_t):
        return [-l2norm(key) if key is not None else 0.0 for key in self.keys[h]]


class KeepItOddRef(RefPolicy):
    """Keeps positions of parity ``keep_parity`` (1 = odd, cold-compress) preferentially.

    score = (1 if kept parity else 0, position): the oldest token of the other parity goes first."""

    name = "keep_it_odd"
    default_prompt_compressor = "keep_it_odd"

    def __init__(self, C, G, r, keep_parity=1, **kw):
        super().__init__(C, G, r, **kw)
        self.keep_parity = keep_parity

    def policy_compressor_kwargs(self):
        return {"keep_parity": self.keep_parity}  # only the keep_it_odd compressor reads it

    def score(self, h, t, q_t, k_t):
        return [(1 if p % 2 == self.keep_parity else 0, p) for p in self.slots[h]]


class HeavyHitterRef(RefPolicy):
    """H2O / Scissorhands: mean of each slot's recorded per-step attention (module docstring, item 4)."""

    name = "heavy_hitter"
    default_prompt_compressor = "heavy_hitter"

    def __init__(self, C, G, r, history_window_size=None, attn_thresholding=False,
                 prefill_seeding="per_query", **kw):
        super().__init__(C, G, r, **kw)
        if prefill_seeding not in ("per_query", "column_mean"):
            raise ValueError(prefill_seeding)
        self.W = history_window_size
        self.thresholding = attn_thresholding
        self.prefill_seeding = prefill_seeding
        self.history = None  # history[h][s]: list of per-step values, oldest first

    def value(self, prob, n_visible):
        if self.thresholding:
            return 1.0 if prob >= 1.0 / n_visible else 0.0
        return prob

    def after_prefill(self, q, k, v):
        T = len(k)
        self.history = []
        for h in range(self.H):
            A = prompt_attention(q, k, h, self.g)
            hist_h = []
            for p in self.slots[h]:
                if p < 0:
                    hist_h.append([])
                    continue
                vals = [self.value(A[i][p], i + 1) for i in range(p, T)]
                if self.prefill_seeding == "column_mean":
                    if self.W is not None:
                        vals = vals[-self.W:]
                    vals = [sum(vals) / len(vals)]
                hist_h.append(vals)
            self.history.append(hist_h)

    def slot_score(self, hist):
        vals = hist if self.W is None else hist[-self.W:]
        if not vals:
            raise ValueError("an unprotected slot has no attention history")
        return sum(vals) / len(vals)

    def score(self, h, t, q_t, k_t):
        return [self.slot_score(hist) if p >= 0 and not self.protected(p, t) else math.inf
                for p, hist in zip(self.slots[h], self.history[h])]

    def after_insert(self, h, s, t, q_t, k_t):
        self.history[h][s] = []  # the evicted slot's history is cleared

    def step_attention(self, h, q_t):
        """This step's group-mean attention of q_t over the occupied slots of head h: {slot: prob}."""
        occ = [s for s, p in enumerate(self.slots[h]) if p >= 0]
        probs = group_attention(q_t, [self.keys[h][s] for s in occ], self.g, h)
        return dict(zip(occ, probs))

    def after_step(self, t, q_t, k_t):
        for h in range(self.H):
            att = self.step_attention(h, q_t)
            n = len(att)
            for s, prob in att.items():
                self.history[h][s].append(self.value(prob, n))


def lsh_bits(x, R):
    """Hash bits of vector x (length d) under projection R (d lists of b floats): x . R[:, i] >= 0."""
    b = len(R[0])
    return [1 if sum(x[c] * R[c][i] for c in range(len(x))) >= 0 else 0 for i in range(b)]


def pack_bits(bits):
    """Bit i goes to byte i // 8, bit position i % 8 (little-endian within the byte)."""
    out = [0] * ceil_div(len(bits), 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return out


def hamming(bytes_a, bytes_b):
    if len(bytes_a) != len(bytes_b):
        raise ValueError("hashes of different lengths")
    return sum(bin(a ^ b).count("1") for a, b in zip(bytes_a, bytes_b))


class LSHRef(RefPolicy):
    """LSH-E: evict the cached key whose hash is farthest (Hamming) from the incoming key's / queries'."""

    name = "lsh"
    default_prompt_compressor = "lsh"

    def __init__(self, C, G, r, R=None, lsh_source="key", **kw):
        super().__init__(C, G, r, **kw)
        if R is None:
            raise ValueError("LSHRef needs the projection R (d lists of b floats)")
        if lsh_source not in ("key", "query"):
            raise ValueError(lsh_source)
        self.R, self.source = R, lsh_source
        self.hashes = None

    def policy_compressor_kwargs(self):
        return {"R": self.R}

    def hash(self, x):
        return pack_bits(lsh_bits(x, self.R))

    def after_prefill(self, q, k, v):
        self.hashes = [[self.hash(key) if key is not None else None for key in self.keys[h]]
                       for h in range(self.H)]

    def distances(self, h, q_t, k_t):
        """Distance of every occupied slot of head h to the incoming vector(s) (None for empty slots)."""
        if self.source == "key":
            probes = [self.hash(k_t[h])]
        else:
            probes = [self.hash(q_t[j]) for j in range(h * self.g, (h + 1) * self.g)]
        return [None if hs is None else sum(hamming(pr, hs) for pr in probes) for hs in self.hashes[h]]

    def score(self, h, t, q_t, k_t):
        dist = self.distances(h, q_t, k_t)
        dmax = max(x for x in dist if x is not None)
        return [math.inf if x is None else dmax - x for x in dist]

    def after_insert(self, h, s, t, q_t, k_t):
        self.hashes[h][s] = self.hash(k_t[h])


class KeyDiffRef(RefPolicy):
    """KeyDiff: anchor = mean of k / |k| over the occupied slots of the head plus the incoming key;
    score = -cos(k_slot, anchor): the key most similar to the anchor is evicted."""

    name = "keydiff"
    default_prompt_compressor = "keydiff"

    def anchor(self, h, k_t):
        cands = [key for key in self.keys[h] if key is not None] + [k_t[h]]
        units = [unit(key) for key in cands]
        return [sum(u[c] for u in units) / len(units) for c in range(len(k_t[h]))]

    def score(self, h, t, q_t, k_t):
        a = self.anchor(h, k_t)
        return [-cosine(key, a) if key is not None else math.inf for key in self.keys[h]]


class TOVARef(RefPolicy):
    """TOVA: the current query's attention over the occupied slots plus the new key (softmax includes it).
    tova_heads="layer": mean over ALL query heads, computed by position (every KV head must hold the same
    position in every slot: ValueError otherwise); "group": mean over the g heads of the KV head."""

    name = "tova"
    default_prompt_compressor = "tova"

    def __init__(self, C, G, r, tova_heads="layer", **kw):
        super().__init__(C, G, r, **kw)
        if tova_heads not in ("layer", "group"):
            raise ValueError(f"tova_heads must be layer or group, not {tova_heads!r}")
        if tova_heads == "layer" and self.decode_criticalkv:
            raise ValueError("decode_criticalkv gives per-head victims; tova_heads='layer' needs one layout")
        self.heads = tova_heads
        self._layer = None  # (t, {position: score})

    def policy_compressor_kwargs(self):
        return {"tova_heads": self.heads}

    def layer_scores(self, t, q_t, k_t):
        """{position: mean over all query heads j of p_j(position)}, p_j over head j // g's slots + t."""
        for h in range(1, self.H):
            if self.slots[h] != self.slots[0]:
                raise ValueError(f"tova layer mode: KV heads 0 and {h} hold different slot layouts at t={t}")
        acc = {}
        for j in range(self.nq):
            h = j // self.g
            pos = self.slots[h] + [t]
            keys = self.keys[h] + [k_t[h]]
            probs = softmax([dot(q_t[j], key) / math.sqrt(self.d) for key in keys])
            for p, pr in zip(pos, probs):
                acc.setdefault(p, []).append(pr)
        for p, prs in acc.items():
            if len(prs) != self.nq:
                raise ValueError(f"tova layer mode: position {p} is not held by every KV head")
        return {p: sum(prs) / self.nq for p, prs in acc.items()}

    def score(self, h, t, q_t, k_t):
        if self.heads == "group":
            probs = group_attention(q_t, self.keys[h] + [k_t[h]], self.g, h)
            return probs[:len(self.slots[h])]
        if self._layer is None or self._layer[0] != t:
            self._layer = (t, self.layer_scores(t, q_t, k_t))
        return [self._layer[1][p] for p in self.slots[h]]


class ExpectedAttentionRef(RefPolicy):
    """Expected attention (kvpress ExpectedAttentionPress) with running query statistics per query head.

    Prefill: n = T - G, mean and population covariance of the queries at positions G..T-1.  Decode step t:
    first the running update with q_t[j] (ea_update, window ea_query_window; only when t >= G, item 14),
    then Rbar = mean of R(p) for p in [t+1, t+ea_future_positions] and ea_key_scores over the occupied slots at
    positions >= G plus the new key; sink slots score +inf (they are protected anyway)."""

    name = "expected_attention"
    default_prompt_compressor = "expected_attention"

    def __init__(self, C, G, r, cos=None, sin=None, ea_future_positions=512, ea_query_window=512,
                 ea_use_covariance=True, ea_use_vnorm=True, ea_epsilon=0.0, **kw):
        super().__init__(C, G, r, **kw)
        if cos is None or sin is None:
            raise ValueError("ExpectedAttentionRef needs the RoPE tables cos, sin (lists of d-lists)")
        if ea_future_positions < 1 or ea_query_window < 1:
            raise ValueError("ea_future_positions and ea_query_window must be >= 1")
        self.cos, self.sin = cos, sin
        self.n_future, self.window = ea_future_positions, ea_query_window
        self.use_cov, self.use_vnorm, self.eps = ea_use_covariance, ea_use_vnorm, ea_epsilon
        self.n, self.mu, self.S = 0, None, None
        self._rbar = None  # (first position, Rbar)

    def policy_compressor_kwargs(self):
        return dict(cos=self.cos, sin=self.sin, ea_future_positions=self.n_future, ea_use_covariance=self.use_cov,
                    ea_use_vnorm=self.use_vnorm, ea_epsilon=self.eps)

    def after_prefill(self, q, k, v):
        T = len(k)
        stats = [population_stats([q[p][j] for p in range(min(self.G, T), T)], self.d) for j in range(self.nq)]
        self.n = stats[0][0]
        self.mu = [st[1] for st in stats]
        self.S = [st[2] for st in stats]

    def begin_step(self, t, q_t, k_t):
        if t < self.G:
            return  # sink queries never enter the statistics
        n = self.n
        for j in range(self.nq):
            n_new, self.mu[j], self.S[j] = ea_update(n, self.mu[j], self.S[j], q_t[j], self.window)
        self.n = n_new

    def rbar(self, first):
        if self._rbar is None or self._rbar[0] != first:
            self._rbar = (first, mean_rotation(self.cos, self.sin, first, self.n_future))
        return self._rbar[1]

    def score(self, h, t, q_t, k_t):
        slots = self.slots[h]
        cand = [s for s, p in enumerate(slots) if p >= self.G]
        keys = [self.keys[h][s] for s in cand] + [k_t[h]]
        vals = [self.values[h][s] for s in cand] + [None]
        sc = ea_key_scores(self.mu, self.S, self.rbar(t + 1), keys, vals, h, self.g, self.use_cov,
                           self.use_vnorm, self.eps)
        out = [math.inf] * len(slots)
        for s, x in zip(cand, sc):
            out[s] = x
        return out


POLICY_CLASSES = {
    "full": FullRef,
    "random": RandomRef,
    "recent_global": RecentGlobalRef,
    "l2": L2Ref,
    "heavy_hitter": HeavyHitterRef,
    "keep_it_odd": KeepItOddRef,
    "lsh": LSHRef,
    "keydiff": KeyDiffRef,
    "tova": TOVARef,
    "expected_attention": ExpectedAttentionRef,
}


def make_policy(name, C, G, r, **hp):
    return POLICY_CLASSES[name](C, G, r, **hp)


def run(policy, q, k, v, prompt_len, n_steps, feed_long_prompts=False):
    """Prefill ``prompt_len`` tokens then decode ``n_steps`` (positions prompt_len ..).

    Returns a list: entry 0 after prefill, entry i after the i-th decode step; each entry is
    [sorted kept positions of KV head h for h].  With ``feed_long_prompts`` a prompt longer than C is
    prefilled with its first C tokens and the rest are fed one at a time as decode steps (each one
    recorded, so the list has 1 + (prompt_len - C) + n_steps entries)."""
    T0 = prompt_len
    if feed_long_prompts and prompt_len > policy.C:
        T0 = policy.C
    if len(k) < prompt_len + n_steps:
        raise ValueError("not enough positions in q/k/v")
    policy.prefill(q[:T0], k[:T0], v[:T0])
    out = [policy.kept()]
    for t in range(T0, prompt_len + n_steps):
        policy.step(t, q[t], k[t], v[t])
        out.append(policy.kept())
    return out


# =====================================================================================================
# LaCache: ladder-shaped, content independent
# =====================================================================================================


class LaCacheRef:
    """Per layer an ordered list of original positions; ``append()`` feeds the next token."""

    def __init__(self, L, S, O, C, S0):
        if S - O <= 0:
            raise ValueError("span must exceed overlap")
        self.L, self.S, self.O, self.C, self.S0 = L, S, O, C, S0
        self.B = 1 + ceil_div(L - S, S - O)
        self.A = min(ceil_div(S, S - O), self.B)
        self.R = self.B - self.A
        self.c = S0
        self.grown = False
        self.n = 0  # tokens fed so far
        self.layers = [[] for _ in range(L)]
        self.events = []  # (token index, "ladder" | "start_over", details) for inspection

    def _ladder(self, lists, start, B, R, A, g, st):
        """layer l keeps [0, start) + {start + (l mod (R+1)) + B*j + st*a} + [start + B*g, len)."""
        out = []
        for l, P in enumerate(lists):
            off = l % (R + 1)
            keep = list(range(start))
            keep += [start + off + B * j + st * a for j in range(g) for a in range(A)]
            keep += list(range(start + B * g, len(P)))
            out.append([P[i] for i in keep])
        return out

    def append(self):
        p = self.n
        self.n += 1
        for P in self.layers:
            P.append(p)
        n = len(self.layers[0])
        if n <= self.C:
            return
        if not self.grown:  # the first time: grow C so that the average matches the budget
            self.C += self.R // 2
            self.grown = True
        need = n - self.C
        if need <= 0:
            return
        A, B, R, L, S0 = self.A, self.B, self.R, self.L, self.S0
        room = self.C - self.c - L
        cap = (max(room, 0) // A) * R
        if need <= cap:
            g = ceil_div(need, R)
            self.layers = self._ladder(self.layers, self.c, B, R, A, g, 1)
            self.c += g * A
            self.events.append((p, "ladder", dict(g=g, c=self.c)))
            return
        # start over: ladder what fits, then re-ladder everything from S0 with a stride
        g = max(room, 0) // A
        if g > 0:
            self.layers = self._ladder(self.layers, self.c, B, R, A, g, 1)
        cap1 = ((self.C - S0 - L) // A) * R
        if cap1 <= 0:
            raise ValueError("lacache: cache too small to re-ladder (C - S0 - L < A)")
        st = ceil_div(need - cap, cap1)
        Bs = B + (st - 1) * (B - 1)
        Rs = Bs - A
        g2 = ceil_div(need - cap, Rs)
        self.layers = self._ladder(self.layers, S0, Bs, Rs, A, g2, st)
        self.c = S0 + g2 * A
        self.events.append((p, "start_over", dict(g=g, st=st, Bs=Bs, Rs=Rs, g2=g2, c=self.c)))

    def kept(self):
        return [list(P) for P in self.layers]


def lacache_keep(n, L, S, O, C, S0):
    """Per layer the original positions kept after n tokens fed one at a time from position 0."""
    ref = LaCacheRef(L, S, O, C, S0)
    for _ in range(n):
        ref.append()
    return ref.kept()


# =====================================================================================================
# sink_recent (+ uniform middle)
# =====================================================================================================


def floor_linspace(n, k):
    """floor(linspace(0, n - 1, k)) computed exactly (integer arithmetic)."""
    if k == 1:
        return [0]
    return [(i * (n - 1)) // (k - 1) for i in range(k)]


def sink_recent_middle_blocks(T, sink, recent, middle_strategy="none", middle_budget_tokens=0,
                              uniform_stride=0, block_n=128):
    """Indices of the middle blocks keep(T) keeps (blocks of block_n aligned to absolute 0)."""
    if middle_strategy == "none" or T <= sink + recent:
        return []
    if middle_strategy != "uniform":
        raise ValueError(f"unknown middle_strategy {middle_strategy!r}")
    sink_end, recent_start = min(T, sink), max(0, T - recent)
    first, end = ceil_div(sink_end, block_n), recent_start // block_n  # partial blocks dropped
    if first >= end:
        return []
    if uniform_stride > 0:
        return list(range(first, end, uniform_stride))
    if middle_budget_tokens <= 0:
        return []
    nb = end - first
    kb = max(1, middle_budget_tokens // block_n)
    if kb >= nb:
        return list(range(first, end))
    return [first + i for i in floor_linspace(nb, kb)]


def sink_recent_keep(T, sink, recent, middle_strategy="none", middle_budget_tokens=0, uniform_stride=0,
                     block_n=128):
    """keep(T): sorted kept indices of a cache holding 0..T-1 (ALGORITHMS.md / the seed's
    build_simple_keep_token_idx)."""
    if T <= sink + recent:
        return list(range(T))
    keep = set(range(min(T, sink))) | set(range(max(0, T - recent), T))
    for blk in sink_recent_middle_blocks(T, sink, recent, middle_strategy, middle_budget_tokens,
                                         uniform_stride, block_n):
        keep |= set(range(blk * block_n, min((blk + 1) * block_n, T)))
    return sorted(keep)


def sink_recent_target(sink, recent, middle_strategy="none", middle_budget_tokens=0, uniform_stride=0):
    """The seed's cache_target (eviction fires when the cache length exceeds it)."""
    mid = middle_budget_tokens if middle_strategy == "uniform" and uniform_stride == 0 else 0
    return sink + recent + mid


def sink_recent_decode(prompt_len, n_steps, sink, recent, middle_strategy="none", middle_budget_tokens=0,
                       uniform_stride=0, block_n=128, mode="freeze"):
    """Kept positions after prefill (keep(prompt_len)) and after each decode step (module docstring 9)."""
    args = (sink, recent, middle_strategy, middle_budget_tokens, uniform_stride)
    cache = sink_recent_keep(prompt_len, *args, block_n=block_n)
    out = [list(cache)]
    if mode == "freeze":
        n_mid_prefill = sum(1 for p in cache if sink <= p < prompt_len - recent)
        if middle_strategy == "none":
            m_cap = 0
        elif uniform_stride > 0:
            m_cap = n_mid_prefill
        else:
            m_cap = max(n_mid_prefill, middle_budget_tokens)
        for t in range(prompt_len, prompt_len + n_steps):
            cache.append(t)
            n = t + 1
            middle = [p for p in cache if sink <= p < n - recent]
            if len(middle) > m_cap:
                cache.remove(max(middle))  # the newest middle token (the one leaving the window)
            out.append(sorted(cache))
        return out
    if mode == "rank":
        target = sink_recent_target(*args)
        for t in range(prompt_len, prompt_len + n_steps):
            cache.append(t)
            if len(cache) > target:
                cache = [cache[i] for i in sink_recent_keep(len(cache), *args, block_n=block_n)]
            out.append(list(cache))
        return out
    raise ValueError(f"unknown mode {mode!r}")


def sink_recent_chunked_prefill(T, sink, recent, middle_strategy="none", middle_budget_tokens=0,
                                uniform_stride=0, block_n=128, chunk=512):
    """The seed's streaming_prefill: feed chunks, and after each chunk, if the cache length exceeds the
    target, apply keep(length) to the ranks of the compacted cache.  Returns the kept positions."""
    args = (sink, recent, middle_strategy, middle_budget_tokens, uniform_stride)
    target = sink_recent_target(*args)
    cache = []
    for start in range(0, T, chunk):
        cache.extend(range(start, min(start + chunk, T)))
        if len(cache) > target:
            cache = [cache[i] for i in sink_recent_keep(len(cache), *args, block_n=block_n)]
    return cache


# =====================================================================================================
# merge_pyramid: merging, not eviction
# =====================================================================================================


def merge_pyramid_windows(L, W0=512, beta=1.0):
    """W_k = floor(W0 * (1 + k/m * (1/beta - 1))) for k < m = L (Python floats, as the seed)."""
    return [int(W0 * (1 + k / L * (1 / beta - 1))) for k in range(L)]


def pool_pair(a, b, kind="mean"):
    """Element-wise pooling of two vectors: mean or max."""
    if kind == "mean":
        return [(x + y) / 2 for x, y in zip(a, b)]
    if kind == "max":
        return [max(x, y) for x, y in zip(a, b)]
    raise ValueError(f"pool_pair supports mean and max, not {kind!r}")


def _pairs(region):
    """Adjacent pairs (even, odd) of a region; an odd-length region repeats its last element."""
    region = list(region)
    if len(region) % 2:
        region.append(region[-1])
    return [(region[i], region[i + 1]) for i in range(0, len(region), 2)]


def best_pool(region):
    """'best' pooling of a region (list of vectors of one head): per channel, count the pairs whose even
    member is strictly greater than the odd one; take the whole even series if that count >= the rest,
    else the whole odd series."""
    pairs = _pairs(region)
    d = len(region[0])
    out = [[0.0] * d for _ in pairs]
    for c in range(d):
        first = sum(1 for a, b in pairs if a[c] > b[c])
        take_even = first >= len(pairs) - first
        for i, (a, b) in enumerate(pairs):
            out[i][c] = a[c] if take_even else b[c]
    return out


def pool_region(region, kind="mean"):
    """Pool a region of vectors pairwise (odd length repeats the last one)."""
    if not region:
        return []
    if kind == "best":
        return best_pool(region)
    return [pool_pair(a, b, kind) for a, b in _pairs(region)]


class MergePyramidLayerRef:
    """One layer of merge_pyramid.  Each slot is a dict with 'pos' (float, pairwise mean), 'members'
    (frozenset of original positions) and, when vectors are given, 'k' / 'v' (per KV head a vector)."""

    def __init__(self, layer, n_layers, W0=512, beta=1.0, sinks=4, pooling="mean",
                 skip_prefill_compression=False):
        self.W = merge_pyramid_windows(n_layers, W0, beta)[layer]
        self.sinks, self.pooling, self.skip = sinks, pooling, skip_prefill_compression
        self.slots = []
        self.rws = sinks

    @staticmethod
    def _slot(p, k=None, v=None):
        return {"pos": float(p), "members": frozenset([p]), "k": k, "v": v}

    def _pool(self, region):
        out = []
        for a, b in _pairs(region):
            out.append({"pos": (a["pos"] + b["pos"]) / 2, "members": a["members"] | b["members"], "k": None,
                        "v": None})
        for name in ("k", "v"):
            if region and region[0][name] is not None:
                n_heads = len(region[0][name])
                per_head = [pool_region([s[name][h] for s in region], self.pooling) for h in range(n_heads)]
                for i, slot in enumerate(out):
                    slot[name] = [per_head[h][i] for h in range(n_heads)]
        return out

    def prefill(self, T, k=None, v=None):
        self.slots = [self._slot(p, k[p] if k else None, v[p] if v else None) for p in range(T)]
        self.rws = self.sinks
        if self.skip:
            return
        while len(self.slots) - self.rws > self.W:
            end = self.rws + self.W
            pooled = self._pool(self.slots[self.sinks:end])
            self.slots = self.slots[:self.sinks] + pooled + self.slots[end:]
            self.rws = self.sinks + len(pooled)

    def step(self, t, k_t=None, v_t=None):
        self.slots.append(self._slot(t, k_t, v_t))
        if len(self.slots) - self.rws > self.W:
            self.slots = self.slots[:self.sinks] + self._pool(self.slots[self.sinks:])
            self.rws = len(self.slots)

    def positions(self):
        return [s["pos"] for s in self.slots]

    def members(self):
        return [tuple(sorted(s["members"])) for s in self.slots]


def merge_pyramid_schedule(n_steps, L, W0=512, beta=1.0, sinks=4, prompt_len=0, skip_prefill_compression=False,
                           with_members=False):
    """out[l][s]: the slots of layer l after prefill (s = 0) and after decode step s (s >= 1), as a list of
    fractional mean positions (len = number of slots); with_members: list of (pos, member tuple)."""
    out = []
    for layer in range(L):
        ref = MergePyramidLayerRef(layer, L, W0, beta, sinks, "mean", skip_prefill_compression)
        ref.prefill(prompt_len)

        def snap():
            if with_members:
                return list(zip(ref.positions(), ref.members()))
            return ref.positions()

        states = [snap()]
        for t in range(prompt_len, prompt_len + n_steps):
            ref.step(t)
            states.append(snap())
        out.append(states)
    return out
