"""sink_recent: keep(T) and the decode schedule against the plain-Python reference (content-independent)."""
import argparse

import pytest
import torch

import cache
import policies
from cache import SinkRecentCache
from tests import reference_policies as ref
from tests.policy_harness import engine_run, random_stream

CONFIGS = [  # sink, recent, middle_strategy, middle_budget_tokens, uniform_stride, block_n
    (4, 8, "none", 0, 0, 4),
    (3, 6, "uniform", 8, 0, 4),
    (2, 5, "uniform", 0, 2, 4),
    (5, 7, "uniform", 12, 0, 3),
]


def hp(cfg):
    names = ["sink_tokens", "recent_tokens", "middle_strategy", "middle_budget_tokens", "uniform_stride", "block_n"]
    return dict(zip(names, cfg))


@pytest.mark.parametrize("T", [5, 40, 97, 300])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_keep_matches_reference(T, cfg):
    assert cache.sink_recent_keep(T, **hp(cfg)) == ref.sink_recent_keep(T, *cfg[:5], block_n=cfg[5])


def test_readme_example_keeps_sink_and_recent():
    kept = cache.sink_recent_keep(4096, 256, 512, "none", 0, 0, 128)
    assert kept == list(range(256)) + list(range(3584, 4096))


@pytest.mark.parametrize("prompt_len", [6, 30, 61])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_decode_matches_reference(cfg, prompt_len):
    steps = 40
    budget = SinkRecentCache.sized_budget(prompt_len, prompt_len + steps, hp(cfg))
    c = SinkRecentCache(1, 2, 8, budget, torch.float32, max_seq_length=prompt_len + steps, **hp(cfg))
    q, k, v = random_stream(prompt_len + steps, 4, 2, 8)
    ours, _ = engine_run("sink_recent", budget, 0, 0, q, k, v, prompt_len, steps, cache=c)
    expected = ref.sink_recent_decode(prompt_len, steps, *cfg[:5], block_n=cfg[5])
    assert [heads[0] for heads in ours] == expected
    assert all(heads[0] == heads[1] for heads in ours)


def test_cli_budget_comes_from_the_policy_flags():
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    args = p.parse_args(["--cache_strategy", "sink_recent", "--sink_tokens", "4", "--recent_tokens", "16",
                         "--middle_strategy", "uniform", "--middle_budget_tokens", "8", "--block_n", "4"])
    caches = policies.build_caches(args, 2, 1, 8, 1, 200, torch.float32, "cpu", prompt_len=100)
    assert [c.kv_budget for c in caches] == [4 + 16 + 8] * 2


def test_unknown_middle_strategy_is_rejected():
    with pytest.raises(ValueError, match="none, uniform"):
        SinkRecentCache(1, 1, 8, 32, torch.float32, middle_strategy="random")
