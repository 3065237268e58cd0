"""keydiff, tova, expected_attention and the keep-set rules (chunkkv, criticalkv, adakv), step by step against the
plain-Python references (tests/reference_policies.py): the kept positions of every KV head after prefill and after
every decode step, for prompts shorter and longer than the budget."""
import pytest
import torch

import model as M
from cache import ExpectedAttentionCache
from policies import POLICIES
from tests import reference_policies as ref
from tests.policy_harness import as_tensor, engine_run, random_stream

H, HKV, D, C, G, R, STEPS = 4, 2, 8, 16, 2, 3, 30


@pytest.mark.parametrize("prompt_len", [8, 40], ids=["short_prompt", "long_prompt"])
@pytest.mark.parametrize("name,hp", [("keydiff", {}), ("tova", {}), ("tova", {"tova_heads": "group"})],
                         ids=["keydiff", "tova_layer", "tova_group"])
def test_decode_policies_match_reference(name, hp, prompt_len):
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=prompt_len + 11)
    ours, _ = engine_run(name, C, G, R, q, k, v, prompt_len, STEPS, n_heads=H, **hp)
    expected = ref.run(ref.make_policy(name, C, G, R, **hp), q, k, v, prompt_len, STEPS)
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"{name} {hp} differs from the reference at step {step}"


def tables(n):
    cos, sin = M.rope_tables(M.ModelArgs(n_head=H, n_local_heads=HKV, dim=H * D), n)
    return cos, sin


@pytest.mark.parametrize("prompt_len", [8, 40], ids=["short_prompt", "long_prompt"])
@pytest.mark.parametrize("hp", [{}, {"ea_use_covariance": False}, {"ea_query_window": 4, "ea_future_positions": 7}],
                         ids=["default", "no_covariance", "short_horizons"])
def test_expected_attention_matches_reference(hp, prompt_len):
    """The engine gets pre-RoPE q and k and rotates the keys itself; the reference gets the same pre-RoPE queries
    and the keys the engine stores (rotated), and the same fp32 RoPE tables."""
    n = prompt_len + STEPS
    q, k, v = random_stream(n, H, HKV, D, seed=prompt_len + 5)
    future = hp.get("ea_future_positions", 512)
    cos, sin = tables(n + future + 1)
    c = ExpectedAttentionCache(1, HKV, D, C, torch.float32, max_seq_length=n, global_tokens=G, recent_window=R,
                               n_heads=H, **hp)
    c.set_rope(cos, sin)
    ours, _ = engine_run(None, None, None, None, q, k, v, prompt_len, STEPS, cache=c)
    K = as_tensor(k)
    k_rot = M.apply_rope(K, cos[:n], sin[:n])[0].permute(1, 0, 2).tolist()  # [n][Hkv][D], as the engine stores
    policy = ref.make_policy("expected_attention", C, G, R, cos=cos.tolist(), sin=sin.tolist(), **hp)
    expected = ref.run(policy, q, k_rot, v, prompt_len, STEPS)
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"expected_attention {hp} differs from the reference at step {step}"


def out_projection(seed=0):
    """A random output projection [dim, H * D] (engine) and its per-query-head blocks W_o[j] (dim x D, reference)."""
    W = torch.randn(24, H * D, generator=torch.Generator().manual_seed(seed))
    return W, [W[:, j * D:(j + 1) * D].tolist() for j in range(H)]


@pytest.mark.parametrize("name", ["l2", "keydiff", "heavy_hitter", "tova"])
def test_chunkkv_prompt_keep_set_matches_reference(name):
    prompt_len = 40
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=3)
    hp = {"observation_window": 6} if name == "heavy_hitter" else {}
    ours, _ = engine_run(name, C, G, R, q, k, v, prompt_len, STEPS, n_heads=H, keep_set="chunkkv", chunkkv_size=5,
                         **hp)
    policy = ref.make_policy(name, C, G, R, keep_wrapper=("chunkkv", {"chunk_size": 5}), **hp)
    expected = ref.run(policy, q, k, v, prompt_len, STEPS)
    assert ours[0] == expected[0]
    assert ours == expected  # decoding is the inner policy's, from the same kept set


@pytest.mark.parametrize("name", ["l2", "keydiff", "heavy_hitter"])
def test_criticalkv_matches_reference_at_prefill_and_while_decoding(name):
    """Two-stage prompt selection, then every decode score rescaled by the slot's |W_o v|_1."""
    prompt_len = 40
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=4)
    W, blocks = out_projection()
    hp = {"observation_window": 6} if name == "heavy_hitter" else {}
    c = POLICIES[name](1, HKV, D, C, torch.float32, max_seq_length=prompt_len + STEPS, global_tokens=G,
                       recent_window=R, n_heads=H, keep_set="criticalkv", **hp)
    c.set_output_projection(W)
    ours, _ = engine_run(None, None, None, None, q, k, v, prompt_len, STEPS, cache=c)
    policy = ref.make_policy(name, C, G, R, keep_wrapper="criticalkv", W_o=blocks, decode_criticalkv=True, **hp)
    expected = ref.run(policy, q, k, v, prompt_len, STEPS)
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"criticalkv({name}) differs from the reference at step {step}"


@pytest.mark.parametrize("name", ["l2", "keydiff", "heavy_hitter"])
def test_adakv_prompt_keep_set_matches_reference(name):
    prompt_len = 40
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=6)
    hp = {"observation_window": 6} if name == "heavy_hitter" else {}
    ours, _ = engine_run(name, C, G, R, q, k, v, prompt_len, 0, n_heads=H, keep_set="adakv", adakv_cap=3.0, **hp)
    policy = ref.make_policy(name, C, G, R, keep_wrapper="adakv", **hp)
    ref.run(policy, q, k, v, prompt_len, 0)
    want = [sorted(p for p in slots if p >= 0) for slots in policy.slots]
    assert ours[0] == want
    if name != "keydiff":  # keydiff's per-head scores are alike in scale: equal shares are likely
        assert len({len(h) for h in want}) > 1, "the heads keep different numbers of tokens"


def test_adakv_decoding_keeps_the_layer_budget_and_the_floors():
    prompt_len = 40
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=6)
    ours, _ = engine_run("l2", C, G, R, q, k, v, prompt_len, STEPS, n_heads=H, keep_set="adakv", adakv_cap=3.0)
    floor = max(1, int(C * 0.2))
    for step, heads in enumerate(ours):
        assert sum(len(h) for h in heads) == HKV * C, step
        assert min(len(h) for h in heads) >= floor, step
        t = prompt_len + step - 1
        for h in heads:  # sinks and the recent window are always held
            assert set(range(G)) <= set(h) and (step == 0 or set(range(t - R, t + 1)) <= set(h))


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-9])
def test_keep_topk_is_scale_free(scale):
    """Attention-based prompt scores are ~1e-7 on a 2k prompt: the kept set must be the top scores at any scale (a
    position penalty for ties once outweighed them and kept early positions), as the plain-Python rule says."""
    import types

    from cache import keep_topk

    g = torch.Generator().manual_seed(0)
    T_, C_ = 400, 100
    score = torch.rand(1, 2, T_, generator=g, dtype=torch.float64) * scale
    protected = torch.zeros(1, 2, T_, dtype=torch.bool)
    protected[..., :2] = protected[..., -5:] = True
    keep = keep_topk(types.SimpleNamespace(budget=C_), score, protected, None)
    expected = ref.keep_from_scores(score[0].tolist(), [0, 1, *range(T_ - 5, T_)], C_)
    assert keep[0].tolist() == [sorted(x) for x in expected]
