"""Each policy's kept positions, step by step, against the independent plain-Python references."""
import pytest
import torch

from policies import POLICIES
from tests import reference_policies as ref
from tests.policy_harness import engine_run, random_stream

H, HKV, D, C, G, R, STEPS = 4, 2, 8, 16, 2, 3, 30

CASES = [
    ("recent_global", {}, {}),
    ("l2", {}, {}),
    ("keep_it_odd", {}, {}),
    ("heavy_hitter", {}, {}),
    ("heavy_hitter", {"history_window_size": 5}, {"history_window_size": 5}),
    ("heavy_hitter", {"attn_thresholding": True}, {"attn_thresholding": True}),
    ("heavy_hitter", {"history_window_size": 4, "attn_thresholding": True},
     {"history_window_size": 4, "attn_thresholding": True}),
]
OBS = {"observation_window": 6}  # SnapKV's window must fit the 16-slot budget with the sinks


@pytest.mark.parametrize("prompt_len", [8, 40], ids=["short_prompt", "long_prompt"])
@pytest.mark.parametrize("name,engine_hp,ref_hp", CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_kept_positions_match_reference(name, engine_hp, ref_hp, prompt_len):
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=prompt_len)
    ours, _ = engine_run(name, C, G, R, q, k, v, prompt_len, STEPS, **OBS, **engine_hp)
    expected = ref.run(ref.make_policy(name, C, G, R, **OBS, **ref_hp), q, k, v, prompt_len, STEPS)
    for step, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"{name} differs from the reference at step {step}"


@pytest.mark.parametrize("prompt_len", [8, 40], ids=["short_prompt", "long_prompt"])
def test_random_matches_hashed_reference(prompt_len):
    """random evicts by a fixed hash of (step, slot, layer); long prompts are cut by recent_global first."""
    q, k, v = random_stream(prompt_len + STEPS, H, HKV, D, seed=prompt_len + 1)
    ours, _ = engine_run("random", C, G, R, q, k, v, prompt_len, STEPS)
    expected = ref.run(ref.HashedRandomRef(C, G, R), q, k, v, prompt_len, STEPS)
    assert ours == expected


@pytest.mark.parametrize("compressor", ["recent_global", "l2", "keep_it_odd", "heavy_hitter"])
def test_prompt_compressors_match_reference(compressor):
    q, k, v = random_stream(50 + STEPS, H, HKV, D, seed=7)
    ours, _ = engine_run("recent_global", C, G, R, q, k, v, 50, STEPS, prompt_compression_strategy=compressor, **OBS)
    expected = ref.run(ref.make_policy("recent_global", C, G, R, prompt_compressor=compressor, **OBS),
                       q, k, v, 50, STEPS)
    assert ours == expected


SCORED = ["random", "recent_global", "l2", "heavy_hitter", "keep_it_odd", "lsh"]  # sinks + window + score


def test_every_scored_policy_is_covered():
    assert set(SCORED) <= set(POLICIES)


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("seed", [1, 2])
def test_invariants_on_random_streams(name, seed):
    g = torch.Generator().manual_seed(seed)
    budget = int(torch.randint(8, 24, (1,), generator=g))
    sinks, window = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
    prompt_len = int(torch.randint(2, 40, (1,), generator=g))
    q, k, v = random_stream(prompt_len + 40, H, HKV, D, seed=seed)
    hp = {"observation_window": 2}
    if name == "heavy_hitter" and seed == 2:
        hp["history_window_size"] = 3
    out, masks = engine_run(name, budget, sinks, window, q, k, v, prompt_len, 40, **hp)
    for step, kept in enumerate(out[1:]):
        t = prompt_len + step  # the position just inserted
        for head in kept:
            assert len(head) <= budget and len(set(head)) == len(head)
            assert t in head
            if len(head) == budget:
                assert set(range(min(sinks, t + 1))) <= set(head), "a sink was evicted"
                assert set(range(max(0, t - window), t + 1)) <= set(head), "the recent window was evicted"
    for mask, pos in masks:
        assert torch.equal(mask, pos >= 0), "the attention mask must cover exactly the occupied slots"


def test_full_cache_keeps_everything():
    q, k, v = random_stream(40, H, HKV, D)
    out, _ = engine_run("full", 40, G, R, q, k, v, 10, 30)
    assert out[-1] == [list(range(40))] * HKV
