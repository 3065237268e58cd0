"""hybrid (FastGen): profiling and decode against the plain-Python reference, constructed heads, budget and mask
invariants, token classes from the tokenizer, and one compiled graph."""
import argparse
import random

import pytest
import torch

import policies
import runtime
from hybrid import HYBRID_POLICIES, HybridCache, hybrid_stats, token_class_tables
from model import attention
from tests import reference_hybrid as ref
from tests.policy_harness import as_tensor, engine_run, kept_positions, random_stream

H, HKV, D, STEPS = 4, 2, 8, 30
VOCAB = 16
SPECIAL_IDS, PUNCT_IDS = {0, 1}, {2, 3, 4}  # ids 0-1 special, 2-4 punctuation


def tables():
    special = torch.tensor([i in SPECIAL_IDS for i in range(VOCAB)])
    punct = torch.tensor([i in PUNCT_IDS for i in range(VOCAB)])
    return special, punct


def token_stream(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def classes(ids):
    return [(1 if i in SPECIAL_IDS else 0) | (2 if i in PUNCT_IDS else 0) for i in ids]


def make_cache(C, G, r, n_kv=HKV, **hp):
    special, punct = tables()
    return HybridCache(1, n_kv, D, C, torch.float32, global_tokens=G, recent_window=r, special_ids=special,
                       punct_ids=punct, **hp)


def drive(c, q, k, v, ids, prompt_len, n_steps):
    """As tests/policy_harness.engine_run, with set_tokens before each forward; also the visible positions."""
    Q, K, V = as_tensor(q), as_tensor(k), as_tensor(v)
    kept, visible = [], []
    with torch.no_grad():
        c.set_tokens(torch.tensor([ids[:prompt_len]]), True)
        c.prefill(torch.arange(prompt_len), K[:, :, :prompt_len], V[:, :, :prompt_len], Q[:, :, :prompt_len])
        kept.append(kept_positions(c))
        for t in range(prompt_len, prompt_len + n_steps):
            sl = slice(t, t + 1)
            c.set_tokens(torch.tensor([[ids[t]]]), False)
            qq, kk, vv, mask = c.update(torch.tensor([t]), K[:, :, sl], V[:, :, sl], Q[:, :, sl])
            _, probs = attention(qq, kk, vv, mask, need_probs=True)
            c.record_attention(probs)
            kept.append(kept_positions(c))
            visible.append([sorted(c.pos[0, h][mask[0, h, 0]].tolist()) for h in range(c.pos.shape[1])])
    return kept, visible


def stream(n, seed, sharp=()):
    """Random q/k/v; the query heads in `sharp` are scaled up (peaked attention), to vary the chosen policies."""
    q, k, v = random_stream(n, H, HKV, D, seed=seed)
    for p in range(n):
        for j in sharp:
            q[p][j] = [3.0 * x for x in q[p][j]]
    return q, k, v


# (C, G, r, prompt_len, min_recovery_frac, local_ratio, frequent_ratio, sharp query heads)
CASES = [
    (16, 2, 3, 10, 0.98, 0.3, 0.3, ()),
    (16, 2, 3, 10, 0.64, 0.3, 0.3, ()),
    (20, 2, 2, 40, 0.93, 0.2, 0.3, (0, 1)),
    (16, 2, 3, 12, 0.6, 0.3, 0.3, (0, 1)),
    (20, 2, 2, 40, 0.7, 0.2, 0.3, (0, 1)),
    (24, 1, 2, 40, 0.8, 0.3, 0.2, (2, 3)),
    (12, 2, 0, 30, 0.5, 0.2, 0.2, ()),
    (14, 3, 4, 25, 0.9, 0.25, 0.4, (0, 1, 2, 3)),
    (16, 2, 3, 30, 0.35, 0.3, 0.3, ()),
]


def run_case(case, seed):
    C, G, r, T, frac, lr, fr, sharp = case
    q, k, v = stream(T + STEPS, seed, sharp)
    ids = token_stream(T + STEPS, seed)
    c = make_cache(C, G, r, min_recovery_frac=frac, hybrid_local_ratio=lr, hybrid_frequent_ratio=fr)
    ours = drive(c, q, k, v, ids, T, STEPS)
    r_ = ref.HybridRef(C, G, r, frac, lr, fr)
    expected = ref.run(r_, q, k, v, classes(ids), T, STEPS)
    return c, r_, ours, expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}_T{c[3]}_frac{c[4]}")
def test_profiling_matches_reference(case):
    c, r_, _, _ = run_case(case, seed=case[3])
    assert c.head_policies() == r_.names()
    for h in range(HKV):
        assert c.recovery[0, h].tolist() == pytest.approx(r_.recovery[h], abs=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}_T{c[3]}_frac{c[4]}")
def test_decode_matches_reference_step_by_step(case):
    _, _, (kept, visible), (kept_ref, visible_ref) = run_case(case, seed=case[3])
    assert kept[0] == kept_ref[0], "prefill"
    for step in range(STEPS):
        assert kept[step + 1] == kept_ref[step + 1], f"kept positions differ at step {step}"
        assert visible[step] == visible_ref[step], f"attended positions differ at step {step}"


def test_reference_cases_cover_every_policy():
    chosen = set()
    for case in CASES:
        _, r_, _, _ = run_case(case, seed=case[3])
        chosen |= set(r_.names())
    assert chosen == set(HYBRID_POLICIES)


def test_a_batch_profiles_and_decodes_each_sequence_as_alone():
    """Three prompts of different lengths in one cache (different local / frequent sizes and head policies): each
    sequence's policies, kept and attended positions equal its run alone."""
    C, G, r, lens, hp = 20, 2, 2, [40, 25, 12], dict(min_recovery_frac=0.7, hybrid_local_ratio=0.2,
                                                     hybrid_frequent_ratio=0.3)
    data = [(stream(n + STEPS, seed, (0, 1)), token_stream(n + STEPS, seed)) for seed, n in enumerate(lens)]
    alone = []
    for n, ((q, k, v), ids) in zip(lens, data):
        c = make_cache(C, G, r, **hp)
        alone.append((drive(c, q, k, v, ids, n, STEPS), c.head_policies()))
    special, punct = tables()
    c = HybridCache(len(lens), HKV, D, C, torch.float32, global_tokens=G, recent_window=r, special_ids=special,
                    punct_ids=punct, **hp)
    qkv = [[as_tensor(x) for x in s] for s, _ in data]
    kept, visible = [[] for _ in lens], [[] for _ in lens]
    with torch.no_grad():
        for b, (n, (Q, K, V), (_, ids)) in enumerate(zip(lens, qkv, data)):
            c.set_tokens(torch.tensor([ids[:n]]), True, row=b)
            c.prefill(torch.arange(n), K[:, :, :n], V[:, :, :n], Q[:, :, :n], row=b)
        for j in range(STEPS):
            def at(i):  # q, k or v of each sequence's token j after its prompt
                return torch.cat([x[i][:, :, n + j:n + j + 1] for x, n in zip(qkv, lens)])
            c.set_tokens(torch.tensor([[ids[n + j]] for (_, ids), n in zip(data, lens)]), False)
            qq, kk, vv, mask = c.update(torch.tensor([[n + j] for n in lens]), at(1), at(2), at(0))
            _, probs = attention(qq, kk, vv, mask, need_probs=True)
            c.record_attention(probs)
            for b in range(len(lens)):
                with c.row_view(b) as row:
                    kept[b].append(kept_positions(row))
                visible[b].append([sorted(c.pos[b, h][mask[b, h, 0]].tolist()) for h in range(HKV)])
    for b, ((alone_kept, alone_visible), policies_alone) in enumerate(alone):
        assert c.head_policies(b) == policies_alone, f"sequence {b}"
        assert kept[b] == alone_kept[1:] and visible[b] == alone_visible, f"sequence {b}"
    assert len({tuple(p) for _, p in alone}) > 1 and c.n_local.tolist() == [8, 5, 2]


def constructed_heads(T=40):
    """KV head 0: every query points at the special tokens' keys; KV head 1: all queries zero (uniform)."""
    ids = [5] * T
    for p in (0, 6, 13, 21, 30):
        ids[p] = 0  # special (position 0 like a BOS)
    u = [1.0] + [0.0] * (D - 1)
    k = [[[8.0 * x for x in u] if ids[p] == 0 else [0.0] * D, [0.1] * D] for p in range(T)]
    q = [[[8.0 * x for x in u]] * 2 + [[0.0] * D] * 2 for _ in range(T)]
    v = [[[0.0] * D] * 2 for _ in range(T)]
    return q, k, v, ids


def test_special_attention_picks_special_and_uniform_picks_full():
    q, k, v, ids = constructed_heads()
    c = make_cache(64, 1, 2)
    drive(c, q, k, v, ids, 40, 0)
    assert c.head_policies() == ["special", "full"]
    r_ = ref.HybridRef(64, 1, 2)
    ref.run(r_, q, k, v, classes(ids), 40, 0)
    assert r_.names() == ["special", "full"]


@pytest.mark.parametrize("seed", range(4))
def test_never_over_budget_and_masks_follow_the_policy(seed):
    g = random.Random(seed)
    C, G, r, T = g.randrange(10, 20), g.randrange(0, 3), g.randrange(0, 4), g.randrange(3, 40)
    frac = g.choice([0.4, 0.7, 0.9])
    q, k, v = stream(T + 40, seed, sharp=(0, 1))
    ids = token_stream(T + 40, seed + 100)
    cls = classes(ids)
    c = make_cache(C, G, r, min_recovery_frac=frac)
    kept, visible = drive(c, q, k, v, ids, T, 40)
    n_local, n_freq = max(1, int(0.3 * T)), int(0.3 * T)
    for step, (heads, vis) in enumerate(zip(kept[1:], visible)):
        t = T + step
        for h, name in enumerate(c.head_policies()):
            assert len(heads[h]) <= C and t in heads[h] and t in vis[h]
            assert set(vis[h]) <= set(heads[h])
            core = {p for p in vis[h] if p < G or (cls[p] & 1)}
            if name == "special":
                assert set(vis[h]) - core <= {t}
            elif name == "special_punct":
                assert {p for p in vis[h] if not cls[p]} - core <= {t}
            elif name == "special_punct_local":
                assert {p for p in vis[h] if not cls[p] and p <= t - n_local} - core == set()
            elif name == "special_punct_local_frequent":
                assert len({p for p in vis[h] if not cls[p] and p <= t - n_local} - core) <= n_freq
            else:
                assert vis[h] == heads[h]


def test_full_heads_behave_like_heavy_hitter():
    q, k, v = random_stream(12 + 40, H, HKV, D, seed=3)
    ids = token_stream(12 + 40, 3)
    c = make_cache(16, 2, 3, min_recovery_frac=1.0)  # only `full` recovers everything: every head is full
    ours, _ = drive(c, q, k, v, ids, 12, 40)
    assert c.head_policies() == ["full", "full"]
    hh, _ = engine_run("heavy_hitter", 16, 2, 3, q, k, v, 12, 40)
    assert ours == hh


def test_without_tables_no_token_is_special_or_punctuation():
    c = HybridCache(1, 1, D, 8, torch.float32)
    assert c.token_classes(torch.tensor([[0, 5, 100]])).tolist() == [[0, 0, 0]]
    c.set_token_tables(*tables())
    assert c.token_classes(torch.tensor([[0, 3, 5, 100]])).tolist() == [[1, 2, 0, 0]]


def test_token_classes_from_the_tokenizer(smol_tokenizer):
    special, punct = token_class_tables(smol_tokenizer, 49152)
    tok = smol_tokenizer
    for text in (".", ",", "?"):
        assert punct[tok.encode(text)[0]], text
    assert not punct[tok.encode(" llama")[0]] and not special[tok.encode(" llama")[0]]
    assert special[tok.special_tokens["<|im_start|>"]] and special[tok.eos_ids[0]]
    assert not (special & punct).any()


def tiny_model():
    from model import ModelArgs, random_model

    args = ModelArgs(vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                     block_size=512)
    return random_model(args, "cpu", torch.float32)


class FakeTokenizer:
    special_tokens = {"<s>": 0, "<eot>": 1}
    bos_id, eos_ids, vocab_size = 0, [1], 256

    def encode(self, text):
        return [2 + ord(ch) % 250 for ch in text]

    def decode(self, ids):
        i = ids[0]
        return ".,;!?"[i % 5] if i % 7 == 0 else f" w{i}"


def test_setup_installs_one_shared_table_pair():
    model = tiny_model()
    policies.setup(model, cache_strategy="hybrid", max_cache_length=32, max_seq_length=64, tokenizer=FakeTokenizer())
    a, b = model.caches
    assert a.special_ids is b.special_ids and a.special_ids[:2].tolist() == [True, True]
    assert a.punct_ids.nonzero().flatten().tolist() == [i for i in range(7, 256, 7)]
    assert a.nbytes() == sum(x.nbytes for n, x in a.named_buffers() if n not in ("special_ids", "punct_ids"))


def test_config_and_flags_build_hybrid_caches():
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    args = policies.parse_args(p, ["--cache_config", "hybrid", "--min_recovery_frac", "0.9"])
    caches = policies.build_caches(args, 2, 2, 8, 1, 200, torch.float32, "cpu")
    assert policies.POLICIES["hybrid"] is HybridCache
    assert all(isinstance(c, HybridCache) for c in caches)
    assert caches[0].min_recovery_frac == 0.9 and caches[0].hybrid_local_ratio == 0.3
    assert caches[0].kv_budget == 100  # max_cache_length 0.5 of 200


def test_compiled_decode_is_one_graph_and_matches_eager():
    from torch._dynamo.utils import counters

    import generate

    model = tiny_model()
    with torch.no_grad():  # sharper attention in KV head 1 (q heads 2-3, k head 1), so heads choose differently
        for layer in model.layers:
            w = layer.attention.wqkv.weight  # rows: q heads 0-3, k heads 0-1, v heads 0-1 (16 each)
            w[32:64] *= 20
            w[80:96] *= 20
    prompt = [int(x) for x in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))]
    special, punct = token_class_tables(FakeTokenizer(), 256)
    model.setup_caches(91, lambda i: HybridCache(1, 2, 16, 24, torch.float32, layer_idx=i, n_layers=2,
                                                  max_seq_length=91, global_tokens=2, recent_window=3,
                                                  min_recovery_frac=[0.25, 0.87][i], special_ids=special,
                                                  punct_ids=punct))
    eager, _ = generate.generate(model, prompt, 51)  # 40-token prompt > 24 slots: compressed, then 50 steps
    policies = hybrid_stats(model)
    assert len({name for layer in policies["layers"] for name in layer["head_policies"]}) >= 3  # mixed heads
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(runtime.decode_one_token, fullgraph=True)
    compiled, _ = generate.generate(model, prompt, 51, decode_fn=step)
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled == eager
    assert hybrid_stats(model) == policies
