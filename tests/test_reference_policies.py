"""Checks of the plain-Python reference policies themselves: hand-computed tiny cases and invariants."""
import math
import random

import pytest

from tests import reference_policies as ref

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def vec_inputs(n_pos, n_kv, n_q, d, seed=0):
    rng = random.Random(seed)
    g = lambda: [rng.gauss(0, 1) for _ in range(d)]  # noqa: E731
    q = [[g() for _ in range(n_q)] for _ in range(n_pos)]
    k = [[g() for _ in range(n_kv)] for _ in range(n_pos)]
    v = [[g() for _ in range(n_kv)] for _ in range(n_pos)]
    return q, k, v


def scalar_inputs(qs, ks):
    """d = 1, one query head, one KV head."""
    return [[[x]] for x in qs], [[[x]] for x in ks], [[[0.0]] for _ in ks]


# ------------------------------------------------------------------------------------------------------
# recent_global
# ------------------------------------------------------------------------------------------------------


def test_recent_global_hand_slots():
    C, G, r, T = 6, 2, 2, 4
    q, k, v = vec_inputs(T + 10, 1, 1, 2)
    pol = ref.RecentGlobalRef(C, G, r)
    pol.prefill(q[:T], k[:T], v[:T])
    assert pol.slots == [[0, 1, 2, 3, -1, -1]]
    expected = {
        4: [0, 1, 2, 3, 4, -1],
        5: [0, 1, 2, 3, 4, 5],
        6: [0, 1, 6, 3, 4, 5],
        7: [0, 1, 6, 7, 4, 5],
        8: [0, 1, 6, 7, 8, 5],
        9: [0, 1, 6, 7, 8, 9],
        10: [0, 1, 10, 7, 8, 9],
        11: [0, 1, 10, 11, 8, 9],
        12: [0, 1, 10, 11, 12, 9],
        13: [0, 1, 10, 11, 12, 13],
    }
    for t in range(T, T + 10):
        pol.step(t, q[t], k[t], v[t])
        assert pol.slots == [expected[t]], t


def test_recent_global_run_is_sinks_plus_window():
    C, G, r, T = 6, 2, 2, 4
    q, k, v = vec_inputs(T + 10, 2, 4, 3)
    out = ref.run(ref.RecentGlobalRef(C, G, r), q, k, v, T, 10)
    assert out[0] == [[0, 1, 2, 3]] * 2
    for i, kept in enumerate(out[1:]):
        t = T + i
        want = sorted(set(range(G)) | set(range(max(0, t - (C - G) + 1), t + 1)))
        assert kept == [want, want]


def test_all_protected_is_an_error():
    q, k, v = vec_inputs(4, 1, 1, 2)
    pol = ref.RecentGlobalRef(3, 1, 2)
    pol.prefill(q[:3], k[:3], v[:3])
    with pytest.raises(ValueError):
        pol.step(3, q[3], k[3], v[3])


# ------------------------------------------------------------------------------------------------------
# l2, keep_it_odd, full
# ------------------------------------------------------------------------------------------------------


def test_l2_hand():
    # keys along x with norms 5, 1, 3, 2 | 10, 1, 4
    norms = [5, 1, 3, 2, 10, 1, 4]
    k = [[[float(n), 0.0]] for n in norms]
    q = [[[1.0, 0.0]] for _ in norms]
    v = k
    pol = ref.L2Ref(4, 1, 1)
    pol.prefill(q[:4], k[:4], v[:4])
    pol.step(4, q[4], k[4], v[4])  # unprotected: pos1 (1), pos2 (3) -> pos2 goes
    assert pol.slots == [[0, 1, 4, 3]]
    pol.step(5, q[5], k[5], v[5])  # unprotected: pos1 (1), pos3 (2) -> pos3 goes
    assert pol.slots == [[0, 1, 4, 5]]
    pol.step(6, q[6], k[6], v[6])  # unprotected: pos1 (1), pos4 (10) -> pos4 goes
    assert pol.slots == [[0, 1, 6, 5]]


def test_keep_it_odd_hand():
    q, k, v = vec_inputs(9, 1, 1, 2)
    out = ref.run(ref.KeepItOddRef(5, 1, 1), q, k, v, 5, 4)
    assert [o[0] for o in out] == [
        [0, 1, 2, 3, 4],
        [0, 1, 3, 4, 5],  # evens first: 2
        [0, 1, 3, 5, 6],  # 4
        [0, 3, 5, 6, 7],  # no unprotected even left: oldest odd (1)
        [0, 3, 5, 7, 8],  # 6
    ]
    out = ref.run(ref.KeepItOddRef(5, 1, 1, keep_parity=0), q, k, v, 5, 2)
    assert [o[0] for o in out] == [[0, 1, 2, 3, 4], [0, 2, 3, 4, 5], [0, 2, 4, 5, 6]]


def test_keep_it_odd_prompt_compressor():
    q, k, v = vec_inputs(12, 1, 1, 2)
    # protected: sink 0, recent 10, 11; then most recent odds 9, 7, 5
    assert ref.compress_prompt("keep_it_odd", q, k, 6, 1, 2) == [[0, 5, 7, 9, 10, 11]]
    # not enough odds: 9, 7, 5, 3, 1, then the most recent even (8)
    assert ref.compress_prompt("keep_it_odd", q, k, 9, 1, 2) == [[0, 1, 3, 5, 7, 8, 9, 10, 11]]


def test_full_never_evicts():
    q, k, v = vec_inputs(10, 2, 2, 2)
    out = ref.run(ref.FullRef(10, 0, 0), q, k, v, 4, 6)
    assert out[-1] == [list(range(10))] * 2
    with pytest.raises(ValueError):
        ref.run(ref.FullRef(9, 0, 0), q, k, v, 4, 6)


# ------------------------------------------------------------------------------------------------------
# heavy_hitter (H2O)
# ------------------------------------------------------------------------------------------------------

# d = 1, keys ln1, ln3, ln2 | ln4, 0; queries 1, 1, -1 | 1, 1.
# prompt attention: q0 -> [1]; q1 -> [1/4, 3/4]; q2 -> exp(-k) = 1, 1/3, 1/2 -> [6/11, 2/11, 3/11]
HH_Q, HH_K = [1.0, 1.0, -1.0, 1.0, 1.0], [0.0, LN3, LN2, LN4, 0.0]


def test_group_attention_gqa_mean():
    # two query heads sharing one KV head: [1/4, 3/4] and [3/4, 1/4] average to [1/2, 1/2]
    probs = ref.group_attention([[1.0], [-1.0]], [[0.0], [LN3]], 2, 0)
    assert probs == pytest.approx([0.5, 0.5])


def test_heavy_hitter_prefill_histories():
    q, k, v = scalar_inputs(HH_Q, HH_K)
    pol = ref.HeavyHitterRef(3, 0, 1)
    pol.prefill(q[:3], k[:3], v[:3])
    h = pol.history[0]
    assert h[0] == pytest.approx([1, 1 / 4, 6 / 11])
    assert h[1] == pytest.approx([3 / 4, 2 / 11])
    assert h[2] == pytest.approx([3 / 11])


def test_heavy_hitter_full_history_hand():
    q, k, v = scalar_inputs(HH_Q, HH_K)
    pol = ref.HeavyHitterRef(3, 0, 1)
    pol.prefill(q[:3], k[:3], v[:3])
    # t=3: pos2 protected; scores pos0 = (1 + 1/4 + 6/11)/3 = 0.598, pos1 = (3/4 + 2/11)/2 = 0.466
    pol.step(3, q[3], k[3], v[3])
    assert pol.slots == [[0, 3, 2]]
    # attention of q3 over keys 0, ln4, ln2: [1/7, 4/7, 2/7]; the new slot's history starts empty
    assert pol.history[0][0] == pytest.approx([1, 1 / 4, 6 / 11, 1 / 7])
    assert pol.history[0][1] == pytest.approx([4 / 7])
    assert pol.history[0][2] == pytest.approx([3 / 11, 2 / 7])
    # t=4: pos3 protected; pos0 = 0.4846, pos2 = 0.2792 -> pos2 goes
    pol.step(4, q[4], k[4], v[4])
    assert pol.slots == [[0, 3, 4]]


def test_heavy_hitter_history_window_hand():
    q, k, v = scalar_inputs(HH_Q, HH_K)
    out = ref.run(ref.HeavyHitterRef(3, 0, 1, history_window_size=2), q, k, v, 3, 2)
    # t=3: last two values pos0 = (1/4 + 6/11)/2 = 0.397 < pos1 = (3/4 + 2/11)/2 = 0.466 -> pos0 goes
    # q3 over keys ln4, ln3, ln2 -> [4/9, 3/9, 2/9]
    # t=4: pos1 = (2/11 + 1/3)/2 = 0.2576, pos2 = (3/11 + 2/9)/2 = 0.2475 -> pos2 goes
    assert out == [[[0, 1, 2]], [[1, 2, 3]], [[1, 3, 4]]]


def test_heavy_hitter_thresholding_hand():
    q, k, v = scalar_inputs(HH_Q, HH_K)
    pol = ref.HeavyHitterRef(3, 0, 1, attn_thresholding=True)
    pol.prefill(q[:3], k[:3], v[:3])
    # pos0: 1 >= 1, 1/4 < 1/2, 6/11 >= 1/3 ; pos1: 3/4 >= 1/2, 2/11 < 1/3 ; pos2: 3/11 < 1/3
    assert pol.history[0] == [[1.0, 0.0, 1.0], [1.0, 0.0], [0.0]]
    pol.step(3, q[3], k[3], v[3])  # pos0 2/3 > pos1 1/2 -> pos1 goes
    assert pol.slots == [[0, 3, 2]]
    # q3: [1/7, 4/7, 2/7] against 1/3
    assert pol.history[0] == [[1.0, 0.0, 1.0, 0.0], [1.0], [0.0, 0.0]]


def test_heavy_hitter_column_mean_seeding():
    q, k, v = scalar_inputs(HH_Q, HH_K)
    pol = ref.HeavyHitterRef(3, 0, 1, prefill_seeding="column_mean")
    pol.prefill(q[:3], k[:3], v[:3])
    assert pol.history[0][0] == pytest.approx([(1 + 1 / 4 + 6 / 11) / 3])
    assert pol.history[0][1] == pytest.approx([(3 / 4 + 2 / 11) / 2])


# ------------------------------------------------------------------------------------------------------
# lsh
# ------------------------------------------------------------------------------------------------------


def test_lsh_bits_and_packing():
    R = [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]]  # d=3, b=4: columns e0, e1, e2, (1,1,1)
    assert ref.lsh_bits([1.0, -2.0, 0.0], R) == [1, 0, 1, 0]  # 0 counts as +
    assert ref.pack_bits([1, 0, 1, 0]) == [5]
    assert ref.pack_bits([1, 0, 0, 0, 0, 0, 0, 1, 1]) == [129, 1]
    assert ref.pack_bits([0] * 16) == [0, 0]
    assert ref.hamming([5], [10]) == 4
    assert ref.hamming([255, 0], [0, 1]) == 9


R2 = [[1.0, 0.0], [0.0, 1.0]]  # hash = signs of the two coordinates: (+,+) 3, (+,-) 1, (-,+) 2, (-,-) 0
PP, PM, MP, MM = [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]


def test_lsh_key_hand():
    keys = [PP, MM, PM, MP, PP, PM, MP]
    k = [[x] for x in keys]
    q = [[x] for x in keys]
    pol = ref.LSHRef(4, 1, 1, R=R2)
    pol.prefill(q[:4], k[:4], k[:4])
    assert pol.hashes == [[[3], [0], [1], [2]]]
    pol.step(4, q[4], k[4], k[4])  # distances pos1: 2, pos2: 1 -> pos1 goes
    assert pol.slots == [[0, 4, 2, 3]]
    pol.step(5, q[5], k[5], k[5])  # pos2 (hash 1): 0, pos3 (hash 2): 2 -> pos3 goes
    assert pol.slots == [[0, 4, 2, 5]]
    pol.step(6, q[6], k[6], k[6])  # pos4 (hash 3): 1, pos2 (hash 1): 2 -> pos2 goes
    assert pol.slots == [[0, 4, 6, 5]]


def test_lsh_query_sums_over_group():
    keys = [PP, MM, PM, MP, PP]
    k = [[x] for x in keys]
    q = [[x, x] for x in keys]
    q[4] = [MM, MM]  # two query heads share the KV head: distances to pos1 0 + 0, to pos2 1 + 1
    pol_q = ref.LSHRef(4, 1, 1, R=R2, lsh_source="query")
    pol_k = ref.LSHRef(4, 1, 1, R=R2, lsh_source="key")
    assert ref.run(pol_q, q, k, k, 4, 1)[-1] == [[0, 1, 3, 4]]
    assert ref.run(pol_k, q, k, k, 4, 1)[-1] == [[0, 2, 3, 4]]


# ------------------------------------------------------------------------------------------------------
# prompt compressors
# ------------------------------------------------------------------------------------------------------


def test_snapkv_pools_the_keys_before_the_window_counting_zero_padding():
    """SnapKV's code: the window's own columns are dropped before pooling, the padding counts (sum / kernel), and
    the window positions score +inf."""
    A = [[0.0] * 5 for _ in range(4)] + [[0.1, 0.2, 0.3, 0.4, 0.0]]
    pooled = ref.snapkv_scores(None, [None] * 5, 0, 1, observation_window=1, pool_kernel=5, A=A)
    assert pooled[:4] == pytest.approx([0.6 / 5, 1.0 / 5, 1.0 / 5, 0.9 / 5]) and pooled[4] == math.inf


def test_snapkv_selection():
    # one strongly attended key (pos 3); observation window 2 and sink 0 always kept; ties -> lower pos
    T = 8
    ks = [0.0] * T
    ks[3] = 5.0
    q, k, _ = scalar_inputs([1.0] * T, ks)
    kept = ref.compress_prompt("heavy_hitter", q, k, 5, 1, 1, observation_window=2, pool_kernel=1)
    assert kept == [[0, 1, 3, 6, 7]]


def test_recent_global_and_l2_compressors():
    norms = [9, 1, 7, 2, 8, 3, 6, 5, 4, 9]
    k = [[[float(n)], [float(10 - n)]] for n in norms]
    q = [[[1.0], [1.0]] for _ in norms]
    assert ref.compress_prompt("recent_global", q, k, 5, 2, 1) == [[0, 1, 7, 8, 9]] * 2
    # sinks 0, 1 and recent 8, 9 always; then the lowest norms of 2..7
    assert ref.compress_prompt("l2", q, k, 6, 2, 2) == [[0, 1, 3, 5, 8, 9], [0, 1, 2, 4, 8, 9]]
    rnd = ref.compress_prompt("random", q, k, 6, 2, 2, seed=3)
    assert rnd[0] == rnd[1] and len(rnd[0]) == 6 and {0, 1, 8, 9} <= set(rnd[0])


# ------------------------------------------------------------------------------------------------------
# invariants on random streams
# ------------------------------------------------------------------------------------------------------

R_RAND = [[random.Random(7 + c).gauss(0, 1) for _ in range(8)] for c in range(4)]
W_O_RAND = [[[random.Random(100 + 12 * j + m).gauss(0, 1) for _ in range(4)] for m in range(3)] for j in range(4)]
ROPE_COS, ROPE_SIN = ref.rope_tables(64, 4)
EA = {"cos": ROPE_COS, "sin": ROPE_SIN, "ea_future_positions": 4, "ea_query_window": 6}
POLICIES = [
    # the first entries of random, l2, keep_it_odd and lsh pass recent_global explicitly: they were written when it
    # was every policy's default prompt compressor (each policy's own compressor is now its default)
    ("random", {"seed": 1, "prompt_compressor": "recent_global"}),
    ("random", {"seed": 1}),
    ("recent_global", {}),
    ("l2", {"prompt_compressor": "recent_global"}),
    ("l2", {}),
    ("heavy_hitter", {"observation_window": 4}),
    ("heavy_hitter", {"observation_window": 4, "history_window_size": 3, "attn_thresholding": True}),
    ("heavy_hitter", {"prompt_compressor": "l2", "prefill_seeding": "column_mean"}),
    ("keep_it_odd", {"prompt_compressor": "recent_global"}),
    ("keep_it_odd", {"prompt_compressor": "keep_it_odd"}),
    ("lsh", {"R": R_RAND, "prompt_compressor": "recent_global"}),
    ("lsh", {"R": R_RAND}),
    ("lsh", {"R": R_RAND, "lsh_source": "query", "prompt_compressor": "random"}),
    ("keydiff", {}),
    ("tova", {}),
    ("tova", {"tova_heads": "group"}),
    ("tova", {"keep_wrapper": ("chunkkv", {"chunk_size": 1})}),
    ("expected_attention", dict(EA)),
    ("expected_attention", dict(EA, ea_use_covariance=False, ea_use_vnorm=False, ea_epsilon=0.01)),
    ("l2", {"prompt_compressor": "tova"}),
    ("l2", {"prompt_compressor": "expected_attention", "compressor_options": {"cos": ROPE_COS, "sin": ROPE_SIN,
                                                                            "ea_future_positions": 8}}),
    ("random", {"seed": 2, "prompt_compressor": "lsh", "compressor_options": {"R": R_RAND}}),
    ("l2", {"W_o": W_O_RAND, "decode_criticalkv": True}),
    ("heavy_hitter", {"observation_window": 4, "W_o": W_O_RAND, "decode_criticalkv": True,
                      "keep_wrapper": ("criticalkv", {})}),
    ("keydiff", {"W_o": W_O_RAND, "decode_criticalkv": True, "keep_wrapper": "criticalkv"}),
    ("tova", {"tova_heads": "group", "W_o": W_O_RAND, "decode_criticalkv": True}),
    ("expected_attention", dict(EA, W_o=W_O_RAND, decode_criticalkv=True)),
]


@pytest.mark.parametrize("name,hp", POLICIES)
@pytest.mark.parametrize("prompt_len", [3, 8, 13])
def test_invariants_random_streams(name, hp, prompt_len):
    C, G, r, n_steps = 8, 2, 3, 25
    q, k, v = vec_inputs(prompt_len + n_steps, 2, 4, 4, seed=prompt_len)
    out = ref.run(ref.make_policy(name, C, G, r, **hp), q, k, v, prompt_len, n_steps)
    assert len(out) == n_steps + 1
    for i, kept in enumerate(out):
        seen = prompt_len + i
        last = seen - 1  # newest position
        for heads in kept:
            assert len(heads) == len(set(heads)) <= C
            assert len(heads) == min(C, seen)
            assert all(0 <= p <= last for p in heads)
            assert set(range(min(G, seen))) <= set(heads)  # sinks
            window = range(max(0, last - r), seen) if i else range(max(0, seen - r), seen)
            assert set(window) <= set(heads)  # recent window (and the new token)


def test_feed_long_prompts():
    q, k, v = vec_inputs(20, 1, 2, 3)
    out = ref.run(ref.RecentGlobalRef(6, 1, 2), q, k, v, 12, 8, feed_long_prompts=True)
    assert len(out) == 1 + (12 - 6) + 8
    assert out[0] == [list(range(6))]
    assert out[-1] == [[0] + list(range(15, 20))]


# ------------------------------------------------------------------------------------------------------
# lacache
# ------------------------------------------------------------------------------------------------------


def test_lacache_worked_example():
    ref_cache = ref.LaCacheRef(8, 4, 0, 24, 2)
    assert (ref_cache.B, ref_cache.A, ref_cache.R) == (2, 1, 1)
    for _ in range(40):
        ref_cache.append()
    kept = ref_cache.kept()
    want0 = [0, 1, 2, 6, 10] + list(range(12, 29, 2)) + list(range(30, 40))
    want1 = [0, 1, 5, 9] + list(range(11, 30, 2)) + list(range(30, 40))
    assert len(want0) == len(want1) == 24
    for l in range(8):
        assert kept[l] == (want0 if l % 2 == 0 else want1)
    assert any(kind == "start_over" for _, kind, _ in ref_cache.events)
    assert ref.lacache_keep(40, 8, 4, 0, 24, 2) == kept


@pytest.mark.parametrize("L,S,O,C,S0", [(8, 4, 0, 24, 2), (8, 4, 2, 40, 4), (6, 2, 0, 30, 1), (12, 4, 1, 64, 4)])
def test_lacache_invariants(L, S, O, C, S0):
    la = ref.LaCacheRef(L, S, O, C, S0)
    for n in range(1, 400):
        la.append()
        for P in la.kept():
            assert P == sorted(set(P))
            assert len(P) <= la.C
            assert P[:min(S0, n)] == list(range(min(S0, n)))  # sinks in every layer
            # the newest L - (R - 1) tokens are never laddered.  (ALGORITHMS.md says "newest >= L", which the
            # literal rules only guarantee for R = 1: g = ceil(need / R) groups may remove up to R - 1 more
            # tokens than needed, e.g. L=6, S=2, O=0, C=30, S0=1 drops position 72 at n = 78.)
            newest = list(range(max(0, n - (L - la.R + 1)), n))
            assert P[-len(newest):] == newest


# ------------------------------------------------------------------------------------------------------
# sink_recent
# ------------------------------------------------------------------------------------------------------


def test_sink_recent_readme_examples():
    keep = ref.sink_recent_keep(4096, 256, 512)
    assert len(keep) == 768 and keep == list(range(256)) + list(range(3584, 4096))
    # middle blocks 2..27 (nb = 26), kb = 4 at floor(linspace(0, 25, 4)) = 0, 8, 16, 25
    assert ref.sink_recent_middle_blocks(4096, 256, 512, "uniform", 512) == [2, 10, 18, 27]
    keep = ref.sink_recent_keep(4096, 256, 512, "uniform", 512)
    mid = [p for b in (2, 10, 18, 27) for p in range(b * 128, (b + 1) * 128)]
    assert keep == list(range(256)) + mid + list(range(3584, 4096))
    assert len(keep) == 1280
    assert ref.sink_recent_middle_blocks(4096, 256, 512, "uniform", 0, uniform_stride=2) == list(range(2, 28, 2))
    assert ref.sink_recent_keep(700, 256, 512, "uniform", 512) == list(range(700))


def test_sink_recent_partial_blocks_and_exact_linspace():
    # sink 100 -> first whole middle block is 1 (128..255); recent start 1000 -> last whole block 6
    assert ref.sink_recent_middle_blocks(1500, 100, 500, "uniform", 10_000) == [1, 2, 3, 4, 5, 6]
    assert ref.sink_recent_middle_blocks(1500, 100, 500, "uniform", 100) == [1]  # kb = max(1, 0)
    # exact floor: torch.linspace(0, 16, 15).long() in float32 would give 7 instead of 8 here
    assert ref.floor_linspace(17, 15) == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16]


def test_sink_recent_decode_hand():
    args = dict(sink=2, recent=3, middle_strategy="uniform", middle_budget_tokens=4, block_n=2)
    assert ref.sink_recent_keep(12, **args) == [0, 1, 2, 3, 6, 7, 9, 10, 11]
    out = ref.sink_recent_decode(12, 2, **args)
    assert out == [[0, 1, 2, 3, 6, 7, 9, 10, 11], [0, 1, 2, 3, 6, 7, 10, 11, 12], [0, 1, 2, 3, 6, 7, 11, 12, 13]]
    assert ref.sink_recent_decode(12, 1, mode="rank", **args)[-1] == [0, 1, 2, 3, 6, 7, 10, 11, 12]


@pytest.mark.parametrize("mode", ["freeze", "rank"])
@pytest.mark.parametrize("strategy,budget,stride", [("none", 0, 0), ("uniform", 8, 0), ("uniform", 0, 2)])
@pytest.mark.parametrize("prompt_len", [5, 40])
def test_sink_recent_decode_invariants(mode, strategy, budget, stride, prompt_len):
    sink, recent, bn = 3, 6, 4
    out = ref.sink_recent_decode(prompt_len, 60, sink, recent, strategy, budget, stride, bn, mode=mode)
    cap = sink + recent + max(budget, 3 * bn) + bn
    for i, kept in enumerate(out):
        n = prompt_len + i
        assert kept == sorted(set(kept)) and all(0 <= p < n for p in kept)
        assert set(range(min(sink, n))) <= set(kept)
        assert set(range(max(0, n - recent), n)) <= set(kept)
        assert len(kept) <= max(cap, prompt_len)
        if i:  # never needs an evicted token back
            assert set(kept) <= set(out[i - 1]) | {n - 1}
    if mode == "freeze" and strategy == "uniform" and stride == 0:
        assert len(out[-1]) == sink + recent + budget  # fixed budget once full


def test_sink_recent_chunked_prefill_matches_one_shot_when_one_chunk():
    args = (256, 512, "uniform", 512, 0)
    assert ref.sink_recent_chunked_prefill(4096, *args, chunk=4096) == ref.sink_recent_keep(4096, *args)
    kept = ref.sink_recent_chunked_prefill(4096, *args, chunk=512)
    assert kept[:256] == list(range(256)) and kept[-512:] == list(range(3584, 4096))


# ------------------------------------------------------------------------------------------------------
# merge_pyramid
# ------------------------------------------------------------------------------------------------------


def test_merge_pyramid_windows():
    assert ref.merge_pyramid_windows(4, 8, 2.0) == [8, 7, 6, 5]
    assert ref.merge_pyramid_windows(3, 512, 1.0) == [512, 512, 512]


def test_pool_pair_and_best():
    assert ref.pool_pair([1.0, 4.0], [3.0, 2.0], "mean") == [2.0, 3.0]
    assert ref.pool_pair([1.0, 4.0], [3.0, 2.0], "max") == [3.0, 4.0]
    region = [[1.0, 0.0], [0.0, 5.0], [3.0, 1.0], [2.0, 2.0]]
    assert ref.best_pool(region) == [[1.0, 5.0], [3.0, 2.0]]  # channel 0 even series, channel 1 odd
    assert ref.best_pool([[1.0], [0.0], [0.0], [1.0]]) == [[1.0], [0.0]]  # 1 vs 1: tie -> even
    assert ref.best_pool([[1.0], [0.0], [5.0]]) == [[1.0], [5.0]]  # odd length repeats the last one
    assert ref.pool_region([[1.0], [3.0], [5.0]], "mean") == [[2.0], [5.0]]


def test_merge_pyramid_decode_schedule_hand():
    out = ref.merge_pyramid_schedule(13, 1, W0=4, beta=1.0, sinks=1, prompt_len=3, with_members=True)[0]
    pos = [[p for p, _ in s] for s in out]
    assert pos[0] == [0, 1, 2]
    assert pos[2] == [0, 1, 2, 3, 4]  # tail 4 = W: no merge yet
    assert pos[3] == [0, 1.5, 3.5, 5.0]  # t=5: tail 5 > 4, [1..5] pooled, 5 repeated
    assert pos[7] == [0, 1.5, 3.5, 5.0, 6, 7, 8, 9]
    assert pos[8] == [0, 2.5, 5.5, 7.5, 9.5]  # t=10
    assert pos[13] == [0, 4.0, 8.5, 11.5, 13.5, 15.0]  # t=15: (2.5, 5.5) pooled again
    assert out[13][1][1] == (1, 2, 3, 4, 5, 6)  # members of the 4.0 slot (their own mean is 3.5)
    assert out[8][1][1] == (1, 2, 3, 4)


def test_merge_pyramid_prefill_compression_hand():
    out = ref.merge_pyramid_schedule(1, 1, W0=4, sinks=1, prompt_len=12)[0]
    assert out[0] == [0, 2.5, 5.5, 7.5, 9, 10, 11]
    out = ref.merge_pyramid_schedule(1, 1, W0=4, sinks=1, prompt_len=12, skip_prefill_compression=True)[0]
    assert out[0] == list(range(12))
    assert out[1] == [0, 1.5, 3.5, 5.5, 7.5, 9.5, 11.5]


def test_merge_pyramid_layer_vectors_and_invariants():
    layer = ref.MergePyramidLayerRef(0, 1, W0=4, sinks=1, pooling="max")
    k = [[[float(p), float(-p)]] for p in range(6)]
    layer.prefill(0)
    for t in range(6):
        layer.step(t, k[t], k[t])
    assert layer.positions() == [0, 1.5, 3.5, 5.0]
    assert [s["k"][0] for s in layer.slots] == [[0.0, 0.0], [2.0, -1.0], [4.0, -3.0], [5.0, -5.0]]
    sched = ref.merge_pyramid_schedule(300, 4, W0=16, beta=2.0, sinks=4, prompt_len=50)
    for l, states in enumerate(sched):
        W = ref.merge_pyramid_windows(4, 16, 2.0)[l]
        for s, slots in enumerate(states):
            assert slots[:4] == [0, 1, 2, 3]  # sinks never merged
            assert slots == sorted(slots) and len(set(slots)) == len(slots)
            assert len(slots) <= 4 + 2 * W + 2
            assert slots[-1] == 50 + s - 1 or s == 0 or len(slots) < len(states[s - 1]) + 1


# ------------------------------------------------------------------------------------------------------
# default prompt compressors (each policy's own) and prompt scores
# ------------------------------------------------------------------------------------------------------


def test_default_prompt_compressor_is_the_policys_own():
    C, G, r, T = 6, 1, 2, 14
    q, k, v = vec_inputs(T, 2, 4, 4, seed=3)
    for name, kw, comp, ckw in [("l2", {}, "l2", {}), ("keep_it_odd", {}, "keep_it_odd", {}),
                                ("keep_it_odd", {"keep_parity": 0}, "keep_it_odd", {"keep_parity": 0}),
                                ("recent_global", {}, "recent_global", {}), ("random", {}, "random", {}),
                                ("lsh", {"R": R_RAND}, "lsh", {"R": R_RAND}), ("keydiff", {}, "keydiff", {}),
                                ("tova", {}, "tova", {}),
                                ("heavy_hitter", {"observation_window": 3}, "heavy_hitter",
                                 {"observation_window": 3})]:
        pol = ref.make_policy(name, C, G, r, **kw)
        pol.prefill(q, k, v)
        assert pol.kept() == ref.compress_prompt(comp, q, k, C, G, r, **ckw), name
    # the engine's random: sinks + recent r, then the highest hash_uniform(position, 0, layer) draws
    for layer in (0, 3):
        pol = ref.HashedRandomRef(C, G, r, layer=layer)
        pol.prefill(q, k, v)
        mid = sorted(range(G, T - r), key=lambda p: (-ref.hash_uniform(p, 0, layer), p))[:C - G - r]
        want = sorted([0, T - 2, T - 1] + mid)
        assert pol.kept() == [want, want]
    assert ref.HashedRandomRef(C, G, r, prompt_compressor="recent_global").prompt_compressor == "recent_global"


@pytest.mark.parametrize("comp", ["recent_global", "l2", "keep_it_odd", "heavy_hitter"])
@pytest.mark.parametrize("C", [7, 11])
def test_prompt_scores_reproduce_the_compressors(comp, C):
    """The wrappers see the same ranking as the plain compressor: keep P, then the highest scores."""
    q, k, _ = vec_inputs(16, 2, 4, 3, seed=C)
    scores, prot = ref.prompt_scores(comp, q, k, 2, 3, observation_window=4, pool_kernel=3)
    want = ref.compress_prompt(comp, q, k, C, 2, 3, observation_window=4, pool_kernel=3)
    assert ref.keep_from_scores(scores, prot, C) == want


# ------------------------------------------------------------------------------------------------------
# keydiff
# ------------------------------------------------------------------------------------------------------


def test_keydiff_evicts_the_key_most_aligned_with_the_others():
    k = [[[2.0, 0.0]], [[0.0, 3.0]], [[1.0, 1.0]], [[1.0, 1.0]]]
    q = [[[1.0, 0.0]] for _ in k]
    pol = ref.KeyDiffRef(3, 0, 0)
    pol.prefill(q[:3], k[:3], k[:3])
    # anchor = mean of e_x, e_y, u, u (u = (1, 1)/sqrt 2): along (1, 1); cos = 1/sqrt2, 1/sqrt2, 1
    s2 = 1 / math.sqrt(2)
    assert pol.score(0, 3, q[3], k[3]) == pytest.approx([-s2, -s2, -1.0])
    pol.step(3, q[3], k[3], k[3])
    assert pol.slots == [[0, 1, 3]]


def test_keydiff_anchor_includes_the_incoming_key():
    # slots e_x, e_y tie without the new key (-> slot 0); the incoming e_y pulls the anchor to e_y -> slot 1
    k = [[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 5.0]]]
    q = [[[1.0, 0.0]] for _ in k]
    out = ref.run(ref.KeyDiffRef(2, 0, 0), q, k, k, 2, 1)
    assert out[-1] == [[0, 2]]


def test_keydiff_prompt_compressor_hand():
    # keys e_x, e_x, e_x, e_y, -e_x: anchor (0.4, 0.2); -cos = -0.894, -0.894, -0.894, -0.447, 0.894
    ex, ey, mx = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
    k = [[x] for x in (ex, ex, ex, ey, mx)]
    q = [[ex] for _ in k]
    scores, prot = ref.prompt_scores("keydiff", q, k, 1, 1)
    c = 0.4 / math.sqrt(0.2)
    assert scores[0] == pytest.approx([-c, -c, -c, -0.2 / math.sqrt(0.2), c])
    assert prot == [0, 4]
    assert ref.compress_prompt("keydiff", q, k, 2, 0, 0) == [[3, 4]]
    assert ref.compress_prompt("keydiff", q, k, 3, 1, 1) == [[0, 3, 4]]


# ------------------------------------------------------------------------------------------------------
# tova
# ------------------------------------------------------------------------------------------------------


def test_tova_one_head_evicts_the_least_attended():
    # q = 1, keys ln1, ln3, ln2 | new ln4: attention 1/10, 3/10, 2/10 | 4/10 (the new key normalises too)
    q, k, v = scalar_inputs([1.0] * 4, [0.0, LN3, LN2, LN4])
    for heads in ("layer", "group"):
        pol = ref.TOVARef(3, 0, 0, tova_heads=heads)
        pol.prefill(q[:3], k[:3], v[:3])
        assert pol.score(0, 3, q[3], k[3]) == pytest.approx([0.1, 0.3, 0.2])
        pol.step(3, q[3], k[3], v[3])
        assert pol.slots == [[3, 1, 2]]


def test_tova_prompt_compressor_uses_the_last_query():
    q, k, _ = scalar_inputs([-1.0, -1.0, -1.0, 1.0], [0.0, LN3, LN2, LN4])  # only q[3] counts
    assert ref.compress_prompt("tova", q, k, 2, 0, 0) == [[1, 3]]
    assert ref.compress_prompt("tova", q, k, 2, 1, 0) == [[0, 3]]
    q[3] = [[-1.0]]  # attention 1, 1/3, 1/2, 1/4: keeps 0 and 2
    assert ref.compress_prompt("tova", q, k, 2, 0, 0) == [[0, 2]]


def test_tova_layer_and_group_differ():
    # two KV heads, one query head each, q = 1.  head 0: keys 0, ln3 | new 0 -> 1/5, 3/5 | 1/5;
    # head 1: keys ln4, 0 | new 0 -> 4/6, 1/6 | 1/6.  layer: pos0 (1/5 + 4/6)/2 > pos1 (3/5 + 1/6)/2 -> pos1 goes in
    # both heads; group: head 0 drops pos0, head 1 drops pos1.
    k = [[[0.0], [LN4]], [[LN3], [0.0]], [[0.0], [0.0]]]
    q = [[[1.0], [1.0]] for _ in k]
    assert ref.run(ref.TOVARef(2, 0, 0), q, k, k, 2, 1)[-1] == [[0, 2], [0, 2]]
    assert ref.run(ref.TOVARef(2, 0, 0, tova_heads="group"), q, k, k, 2, 1)[-1] == [[1, 2], [0, 2]]
    # the prompt compressor makes the same choice from the last prompt query
    assert ref.compress_prompt("tova", q, k, 2, 0, 1) == [[0, 2], [0, 2]]
    assert ref.compress_prompt("tova", q, k, 2, 0, 1, tova_heads="group") == [[1, 2], [0, 2]]


def test_tova_layer_mode_rejects_different_layouts():
    k = [[[float(p + 1)], [float(8 - p)]] for p in range(8)]  # l2 keeps 0..3 in head 0, 3..6 in head 1
    q = [[[1.0], [1.0]] for _ in k]
    pol = ref.TOVARef(4, 0, 0, prompt_compressor="l2")
    pol.prefill(q[:7], k[:7], k[:7])
    assert pol.kept() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    with pytest.raises(ValueError, match="layout"):
        pol.step(7, q[7], k[7], k[7])
    with pytest.raises(ValueError):
        ref.TOVARef(4, 0, 0, W_o=[[[1.0]]] * 2, decode_criticalkv=True)


# ------------------------------------------------------------------------------------------------------
# expected_attention
# ------------------------------------------------------------------------------------------------------


def identity_tables(n, d):
    return [[1.0] * d for _ in range(n)], [[0.0] * d for _ in range(n)]


def test_expected_attention_without_covariance_is_softmax_of_the_mean_query_times_vnorm():
    d, G, T = 4, 1, 6
    rng = random.Random(5)
    qa, qb = [rng.gauss(0, 1) for _ in range(d)], [rng.gauss(0, 1) for _ in range(d)]
    _, k, v = vec_inputs(T + 1, 1, 2, d, seed=9)
    q = [[[9.0] * d, [-9.0] * d]] + [[qa, qb] for _ in range(1, T + 1)]  # the sink's query is not counted
    cos, sin = identity_tables(T + 8, d)

    def expected(keys, values):
        pa = ref.softmax([ref.dot(qa, x) / math.sqrt(d) for x in keys])
        pb = ref.softmax([ref.dot(qb, x) / math.sqrt(d) for x in keys])
        return [(a + b) / 2 * ref.l2norm(val) for a, b, val in zip(pa, pb, values)]

    scores, prot = ref.prompt_scores("expected_attention", q[:T], k[:T], G, 1, v=v[:T], cos=cos, sin=sin,
                                     ea_future_positions=3)
    want = expected([k[p][0] for p in range(G, T)], [v[p][0] for p in range(G, T)])
    assert prot == [0, T - 1]
    assert scores[0] == pytest.approx([max(want)] + want)  # the sink gets the max (kvpress)
    # decode: the same query again leaves S = 0; candidates = slots at positions >= G + the new key
    pol = ref.ExpectedAttentionRef(T, G, 1, cos=cos, sin=sin, ea_future_positions=3)
    pol.prefill(q[:T], k[:T], v[:T])
    pol.begin_step(T, q[T], k[T])  # the running update with q_T (= the mean query: S stays 0)
    assert pol.n == T - G + 1 and all(x == 0.0 for row in pol.S[0] for x in row)
    got = pol.score(0, T, q[T], k[T])
    want = expected([k[p][0] for p in range(G, T + 1)], [v[p][0] for p in range(G, T)] + [[0.0]])
    assert got[0] == math.inf and got[1:] == pytest.approx(want[:-1])
    pol = ref.ExpectedAttentionRef(T, G, 1, cos=cos, sin=sin, ea_future_positions=3, ea_use_vnorm=False,
                                   ea_epsilon=0.5)
    pol.prefill(q[:T], k[:T], v[:T])
    pol.begin_step(T, q[T], k[T])
    vn = [ref.l2norm(v[p][0]) for p in range(G, T)]
    assert pol.score(0, T, q[T], k[T])[1:] == pytest.approx([w / n + 0.5 for w, n in zip(want, vn)])


def test_expected_attention_covariance_term_hand():
    # queries (1, 0), (-1, 0): mu = 0, S = diag(1, 0); logit = k^T S k / (2 d) = k0^2 / 4
    q = [[[1.0, 0.0]], [[-1.0, 0.0]], [[1.0, 0.0]], [[-1.0, 0.0]]]
    k = [[[2.0, 0.0]], [[0.0, 2.0]], [[1.0, 0.0]], [[0.0, 0.0]]]
    v = [[[3.0, 4.0]], [[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 0.0]]]
    cos, sin = identity_tables(8, 2)
    scores, _ = ref.prompt_scores("expected_attention", q, k, 0, 0, v=v, cos=cos, sin=sin, ea_future_positions=2)
    p = ref.softmax([1.0, 0.0, 0.25, 0.0])
    assert scores[0] == pytest.approx([p[0] * 5, p[1] * 1, p[2] * 2, p[3] * 1])
    scores, _ = ref.prompt_scores("expected_attention", q, k, 0, 0, v=v, cos=cos, sin=sin, ea_future_positions=2,
                                  ea_use_covariance=False)
    assert scores[0] == pytest.approx([0.25 * 5, 0.25, 0.5, 0.25])


def test_expected_attention_applies_the_mean_future_rotation():
    # cos = 0, sin = 1: R x = P x = (-x1, x0); the mean query (1, 0) becomes (0, 1) and favours the key along e_y
    q = [[[1.0, 0.0]] for _ in range(3)]
    k = [[[2.0, 0.0]], [[0.0, 2.0]], [[0.0, 0.0]]]
    ident = identity_tables(8, 2)
    quarter = ([[0.0, 0.0]] * 8, [[1.0, 1.0]] * 8)
    kw = dict(ea_use_vnorm=False, ea_future_positions=4)
    assert ref.compress_prompt("expected_attention", q, k, 1, 0, 0, cos=ident[0], sin=ident[1], **kw) == [[0]]
    assert ref.compress_prompt("expected_attention", q, k, 1, 0, 0, cos=quarter[0], sin=quarter[1], **kw) == [[1]]
    assert ref.mean_rotation(*quarter, 3, 4) == [[0.0, -1.0], [1.0, 0.0]]
    # the standard tables: Rbar is the mean of the per-position rotations, e.g. d = 2, angles p
    cos, sin = ref.rope_tables(10, 2)
    Rb = ref.mean_rotation(cos, sin, 2, 3)
    c, s = sum(math.cos(p) for p in (2, 3, 4)) / 3, sum(math.sin(p) for p in (2, 3, 4)) / 3
    assert Rb == [[pytest.approx(c), pytest.approx(-s)], [pytest.approx(s), pytest.approx(c)]]


def test_running_covariance_equals_batch_population_covariance():
    rng = random.Random(11)
    xs = [[rng.gauss(0, 1) for _ in range(3)] for _ in range(7)]
    n, mu, S = ref.population_stats([], 3)
    for i, x in enumerate(xs):
        n, mu, S = ref.ea_update(n, mu, S, x, window=7)  # n <= W throughout
        bn, bmu, bS = ref.population_stats(xs[:i + 1])
        assert n == bn and mu == pytest.approx(bmu)
        assert [a for row in S for a in row] == pytest.approx([a for row in bS for a in row])
    # past the window the weight stays 1/W: W = 1 keeps only the newest query
    n, mu, S = ref.ea_update(*ref.population_stats(xs), [5.0, -1.0, 2.0], window=1)
    assert n == 8 and mu == pytest.approx([5.0, -1.0, 2.0]) and S == [[0.0] * 3] * 3


def test_expected_attention_policy_statistics_follow_prompt_then_decode_queries():
    G, T, steps = 2, 5, 4
    q, k, v = vec_inputs(T + steps, 1, 2, 4, seed=4)
    cos, sin = ref.rope_tables(T + steps + 8, 4)
    pol = ref.ExpectedAttentionRef(6, G, 1, cos=cos, sin=sin, ea_future_positions=3, ea_query_window=100)
    pol.prefill(q[:T], k[:T], v[:T])
    for t in range(T, T + steps + 1):
        for j in range(2):
            n, mu, S = ref.population_stats([q[p][j] for p in range(G, t)])
            assert pol.n == n == t - G
            assert pol.mu[j] == pytest.approx(mu)
            assert [a for row in pol.S[j] for a in row] == pytest.approx([a for row in S for a in row])
        if t < T + steps:
            pol.step(t, q[t], k[t], v[t])


# ------------------------------------------------------------------------------------------------------
# lsh prompt compressor
# ------------------------------------------------------------------------------------------------------


def test_lsh_prompt_compressor_keeps_keys_close_to_recent_queries():
    keys = [MM, PP, MM, PM, MP, MM]
    k = [[x] for x in keys]
    q = [[MM] for _ in keys]
    q[5] = [PP]  # distances to PP: pos1 0, pos2 2, pos3 1, pos4 1
    assert ref.compress_prompt("lsh", q, k, 3, 1, 1, R=R2, observation_window=1) == [[0, 1, 5]]
    assert ref.compress_prompt("lsh", q, k, 4, 1, 1, R=R2, observation_window=1) == [[0, 1, 3, 5]]
    assert ref.compress_prompt("lsh", q, k, 5, 1, 1, R=R2, observation_window=1) == [[0, 1, 3, 4, 5]]
    q[4] = [PM]  # window 2 adds the distances to PM: pos1 1, pos2 1, pos3 0, pos4 2 -> sums 1, 3, 1, 3
    assert ref.compress_prompt("lsh", q, k, 5, 1, 1, R=R2, observation_window=2) == [[0, 1, 2, 3, 5]]
    scores, _ = ref.prompt_scores("lsh", q, k, 1, 1, R=R2, observation_window=2)
    assert scores[0][1:5] == [-1.0, -3.0, -1.0, -3.0]


# ------------------------------------------------------------------------------------------------------
# keep-set wrappers: chunkkv, criticalkv, adakv
# ------------------------------------------------------------------------------------------------------


def test_chunkkv_keeps_whole_chunks_and_skips_one_that_does_not_fit():
    # summed scores 1,1,1 | 5,5,5 | 4,4,4 | 9: chunk means 1, 5, 4, 9; protected 0 and 9
    s = [[0, 0, 0, 5, 5, 5, 4, 4, 4, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 9]]
    # C = 7: chunk 3 (nothing new), chunk 1 (3 new, 2 left), chunk 2 (3 new) skipped, chunk 0 (1, 2) fits
    assert ref.chunkkv_keep(s, [0, 9], 7, 3) == [[0, 1, 2, 3, 4, 5, 9]] * 2
    # C = 6: chunk 1 fills 3 of 4, nothing else fits: one slot stays empty
    assert ref.chunkkv_keep(s, [0, 9], 6, 3) == [[0, 3, 4, 5, 9]] * 2
    # kvpress ChunkKV (no protection, T a multiple of L): floor(C / L) whole chunks
    assert ref.chunkkv_keep([x[:9] for x in s], [], 7, 3) == [[3, 4, 5, 6, 7, 8]] * 2


def test_vnorm_is_the_group_mean_l1_norm_of_the_projected_value():
    W_o = [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]]  # two query heads sharing one KV head
    assert ref.vnorm_of([[[3.0, -1.0]]], W_o, 2) == [[(4.0 + 6.0) / 2]]
    assert ref.vnorm_of([[[3.0, -1.0], [1.0, 1.0]]], W_o, 1) == [[4.0], [2.0]]


def test_criticalkv_stage_one_pins_the_top_n1():
    s = [[0.0, 0.9, 0.8, 0.1, 0.2, 0.3]]
    vn = [[1.0, 0.01, 0.01, 5.0, 5.0, 5.0]]
    # n1 = int(4 * 0.5) = 2: positions 1 and 2 are kept despite their tiny stage-2 score (0.009)
    assert ref.criticalkv_keep(s, [0], 4, vn) == [[0, 1, 2, 5]]
    # n1 = max(1, int(0.4)) = 1: only position 1 is pinned; stage 2 (s + e) * vnorm ranks 5 (1.5), 4 (1.0)
    assert ref.criticalkv_keep(s, [0], 4, vn, first_stage_ratio=0.1) == [[0, 1, 4, 5]]


def test_adakv_per_head_budgets_sum_to_the_layer_budget_and_respect_the_safeguard():
    s = [[0, 9, 8, 7, 6, 5, 4, 3], [0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.05]]
    # n_safe = int(4 * 0.25) = 1: pinned 1 (head 0) and 6 (head 1); the remaining 4 of 8 all go to head 0
    assert ref.adakv_keep(s, [0], 4, alpha_safeguard=0.25) == [[0, 1, 2, 3, 4, 5], [0, 6]]
    rng = random.Random(2)
    for trial in range(20):
        H, T, C = 3, 20, 6
        s = [[rng.random() ** (h + 1) for _ in range(T)] for h in range(H)]
        kept = ref.adakv_keep(s, [0, 1, 19], C, alpha_safeguard=0.34)
        assert sum(len(x) for x in kept) == H * C
        for h, x in enumerate(kept):
            assert x == sorted(set(x)) and {0, 1, 19} <= set(x)
            top2 = sorted(range(T), key=lambda p: (-s[h][p], p))[:2]  # n_safe = int(6 * 0.34) = 2
            assert set(top2) <= set(x)


def test_keep_wrappers_from_a_policy_use_its_own_prompt_scores():
    C, G, r, T = 7, 1, 1, 12
    q, k, v = vec_inputs(T + 6, 2, 4, 4, seed=8)
    pol = ref.L2Ref(C, G, r, keep_wrapper=("chunkkv", {"chunk_size": 3}))
    out = ref.run(pol, q, k, v, T, 6)
    want = ref.chunkkv_keep(*ref.prompt_scores("l2", q[:T], k[:T], G, r), C, 3)
    assert out[0] == want
    n0 = len(want[0])
    for i, kept in enumerate(out):
        assert all(len(x) == min(C, n0 + i) for x in kept)  # a shortfall fills up with the next tokens
    pol = ref.KeyDiffRef(C, G, r, keep_wrapper="criticalkv", W_o=W_O_RAND)
    pol.prefill(q[:T], k[:T], v[:T])
    scores, prot = ref.prompt_scores("keydiff", q[:T], k[:T], G, r)
    assert pol.kept() == ref.criticalkv_keep(scores, prot, C, ref.vnorm_of(v[:T], W_O_RAND, 2))
    pol = ref.HeavyHitterRef(C, G, r, observation_window=3, keep_wrapper=("adakv", {"alpha_safeguard": 0.3}))
    pol.prefill(q[:T], k[:T], v[:T])
    scores, prot = ref.prompt_scores("heavy_hitter", q[:T], k[:T], G, r, observation_window=3)
    assert pol.kept() == ref.adakv_keep(scores, prot, C, alpha_safeguard=0.3)
    with pytest.raises(NotImplementedError):
        pol.step(T, q[T], k[T], v[T])


def test_criticalkv_at_decode_weights_the_inner_score_by_vnorm():
    k = [[[1.0, 0.0]], [[2.0, 0.0]], [[3.0, 0.0]], [[0.5, 0.0]]]
    v = [[[1.0, 0.0]], [[1.0, 0.0]], [[0.1, 0.0]], [[1.0, 0.0]]]
    q = [[[1.0, 0.0]] for _ in k]
    W_o = [[[1.0, 0.0], [0.0, 1.0]]]
    # l2: -1, -2, -3 -> slot 2 goes; criticalkv: (-1 + e) 1, (-2 + e) 1, (-3 + e) 0.1 = -0.3 -> slot 1 goes
    assert ref.run(ref.L2Ref(3, 0, 0), q, k, v, 3, 1)[-1] == [[0, 1, 3]]
    pol = ref.L2Ref(3, 0, 0, W_o=W_o, decode_criticalkv=True)
    assert ref.run(pol, q, k, v, 3, 1)[-1] == [[0, 2, 3]]
    assert pol.vnorms == [[1.0, 1.0, 0.1]]  # the new slot's vnorm is stored at insertion


def test_keydiff_rejects_a_zero_key():
    k = [[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]]]
    with pytest.raises(ValueError):
        ref.compress_prompt("keydiff", k, k, 2, 0, 0)
