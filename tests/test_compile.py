"""The compiled decode step (issue 3): compiled and eager decoding agree, and every policy's step compiles once.

Compiling is the expensive part on CPU, so this module compiles twice in all: SmolLM2 through the command line
(--compile --compile_prefill, once, module fixture), and one tiny random model whose layers carry every registered
policy (policies registered later are picked up), plus the score-based ones again in position_mode cache, plus
full, recent_global and the policies with their own update under --debug_attention_loss.
"""
import argparse
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

import cache as kvcache
import generate
import policies
import runtime
from model import ModelArgs, random_model
from tests.test_generate_cli import PROMPT, cli_json, memoised_smol  # noqa: F401 (memoised_smol: autouse fixture)

# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 through generate.py: --compile gives the eager tokens
# ---------------------------------------------------------------------------------------------------------------
CLI_ARGS = ["--prompt", PROMPT, "--max_new_tokens", 8, "--cache_strategy", "recent_global", "--max_cache_length", 0.5]


@pytest.fixture(scope="module")
def cli_runs():
    eager = cli_json(*CLI_ARGS)
    compiled = cli_json(*CLI_ARGS, "--compile", "--compile_prefill")
    return eager, compiled


def test_compiled_cli_decoding_matches_eager(cli_runs):
    eager, compiled = cli_runs
    assert eager["stats"]["kept_tokens"] < eager["stats"]["seen_tokens"], "the 50% cache must evict"
    assert compiled["token_ids"] == eager["token_ids"]
    assert compiled["stats"]["kept_tokens"] == eager["stats"]["kept_tokens"]


def test_compile_time_is_reported_apart(cli_runs):
    eager, compiled = cli_runs
    assert eager["stats"]["compile_s"] == 0 and compiled["stats"]["compile_s"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Every policy on one tiny model: one graph for 50 decode steps, compiled tokens == eager tokens
# ---------------------------------------------------------------------------------------------------------------
PROMPT_LEN, STEPS = 24, 50
SCORED = ["random", "recent_global", "l2", "heavy_hitter", "keep_it_odd", "lsh"]  # sinks + window + score
# Small budgets so that every policy evicts (or merges) within the 50 steps. Flags are shared by all layers and
# given only when the policy that owns them is registered (policies added later need no entry to be covered).
BASE_FLAGS = {"max_cache_length": [20], "global_tokens": 2, "recent_window": 4, "observation_window": 4}
POLICY_FLAGS = {
    "sink_recent": {"sink_tokens": 2, "recent_tokens": 8},
    "lsh": {"lsh_dim": 8},
    "merge_pyramid": {"initial_local_window": 8, "sink_tokens": 2},
    "lacache": {"span": 2, "start_size": 1},  # the ladder needs start_size + n_layers + 1 <= 20 slots
}


def cache_args(strategies, **extra):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    a = policies.parse_args(p, ["--cache_strategy", *strategies, "--cache_strategy_pattern", "repeat"])
    flags = dict(BASE_FLAGS)
    for s in strategies:
        flags.update(POLICY_FLAGS.get(s, {}))
    for k, v in {**flags, **extra}.items():
        if hasattr(a, k):
            setattr(a, k, v)
    return a


def own_debug_path(name):
    """Policies that insert tokens or keep the prompt their own way (their own update, prompt_keep or
    write_prompt): the base class's attention-loss meter must still see every token."""
    cls = policies.POLICIES[name]
    base = kvcache.KVCache
    return any(getattr(cls, f) is not getattr(base, f) for f in ("update", "prompt_keep", "write_prompt"))


def layer_groups():
    """(name, strategies, extra args) per group of layers; each group is built by build_caches on its own.
    Debug layers: full, recent_global (the base-class path every scored policy shares) and every policy with its
    own update; one layer per policy there would add compile time without another code path."""
    everything = sorted(policies.POLICIES)
    debug = ["full", "recent_global"] + [s for s in everything
                                         if s not in ("full", "recent_global") and own_debug_path(s)]
    return [
        ("plain", everything, {}),
        ("position_cache", [s for s in SCORED if s in policies.POLICIES], {"position_mode": "cache"}),
        ("debug", debug, {"debug_attention_loss": True}),
        ("adakv", ["l2", "heavy_hitter"], {"keep_set": "adakv"}),  # the layer-wide eviction of adakv_slot
        ("criticalkv", ["keydiff", "expected_attention"], {"keep_set": "criticalkv"}),  # per-slot value norms
        ("int8", ["keydiff", "tova", "expected_attention"], {"cache_bits": 8}),  # scores read dequantized keys
    ]


@pytest.fixture(scope="module")
def tiny():
    groups = layer_groups()
    n_layer = sum(len(g[1]) for g in groups)
    cfg = ModelArgs(vocab_size=256, n_layer=n_layer, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                    block_size=512)
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    with torch.no_grad():  # larger logits than the 0.02-std init: greedy picks are not decided by rounding noise
        model.output.weight.mul_(20)
    max_seq = PROMPT_LEN + STEPS + 1
    caches, names = [], []
    for group, strategies, extra in groups:
        built = policies.build_caches(cache_args(strategies, **extra), len(strategies), cfg.n_local_heads,
                                      cfg.head_dim, 1, max_seq, torch.float32, "cpu", prompt_len=PROMPT_LEN,
                                      n_heads=cfg.n_head)
        caches += built
        names += [(group, s) for s in strategies]
    policies.install(model, caches, max_seq)
    prompt = torch.randint(0, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, prompt, names


def run_tiny(model, prompt, decode_fn, n_new):
    """Generated tokens and the per-layer statistics cache_stats reports (taken per group of layers: it expects
    debug_attention_loss on all layers of a model or on none)."""
    torch.manual_seed(0)  # nothing should draw random numbers (random eviction hashes); kept for determinism
    tokens, _ = generate.generate(model, prompt, n_new, decode_fn=decode_fn)
    caches = model.caches
    positions = [c.pos.clone() for c in caches]
    debug = [c for c in caches if c.debug_attention_loss]
    plain = [c for c in caches if not c.debug_attention_loss]
    by_cache = {}
    for group in (plain, debug):
        for c, layer in zip(group, kvcache.cache_stats(SimpleNamespace(caches=group))["layers"]):
            by_cache[id(c)] = layer
    return tokens, {"seen_tokens": int(caches[0].seen), "layers": [by_cache[id(c)] for c in caches],
                    "positions": positions}


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    model, prompt, names = tiny
    eager = run_tiny(model, prompt, runtime.decode_one_token, STEPS + 1)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):  # were anything to draw, compiled == eager draws
        compiled_fn = torch.compile(runtime.decode_one_token, fullgraph=True)
        run_tiny(model, prompt, compiled_fn, 2)  # prefill + one compiled decode step
        graphs_after_first_step = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails loudly, naming its guard
            compiled = run_tiny(model, prompt, compiled_fn, STEPS + 1)
    return eager, compiled, graphs_after_first_step, counters["stats"]["unique_graphs"], names


def test_every_registered_policy_is_on_the_tiny_model(tiny):
    _, _, names = tiny
    assert {s for g, s in names if g == "plain"} == set(policies.POLICIES)
    assert {s for g, s in names if g == "position_cache"} == set(SCORED)
    assert {"full", "recent_global"} <= {s for g, s in names if g == "debug"}


def test_one_graph_for_fifty_compiled_decode_steps(tiny_runs):
    _, compiled, first, last, _ = tiny_runs
    assert first == 1, "the first decode step compiles exactly one graph (fullgraph)"
    assert last == first, "later steps must not recompile"
    assert len(compiled[0]) == STEPS + 1


def test_every_policy_evicts_in_the_tiny_run(tiny_runs):
    eager, _, _, _, names = tiny_runs
    for (group, s), layer in zip(names, eager[1]["layers"]):
        if s != "full":
            assert layer["kept_tokens"] < eager[1]["seen_tokens"], (group, s)


def test_compiled_tokens_and_kept_positions_equal_eager(tiny_runs):
    eager, compiled, _, _, names = tiny_runs
    assert compiled[0] == eager[0]
    for name, a, b in zip(names, eager[1]["positions"], compiled[1]["positions"]):
        assert torch.equal(a, b), f"{name}: compiled decoding kept other positions than eager"


def test_compiled_attention_loss_is_zero_for_full_and_positive_when_evicting(tiny_runs):
    eager, compiled, _, _, names = tiny_runs
    for stats in (eager[1], compiled[1]):
        for (group, s), layer in zip(names, stats["layers"]):
            if group != "debug":
                assert "attention_loss" not in layer
            elif s == "full":
                assert layer["attention_loss"] == 0
            else:
                assert 0 < layer["attention_loss"] <= 1, s
    for a, b in zip(eager[1]["layers"], compiled[1]["layers"]):
        if "attention_loss" in a:
            assert b["attention_loss"] == pytest.approx(a["attention_loss"], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Compiled prefill (dynamic shapes): new prompt lengths do not recompile
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_prefill_does_not_recompile_per_prompt_length():
    """Policies whose prefill runs Python over the prompt (SnapKV columns, FastGen's profile, keep(T), pooling
    rounds) keep that part eager; otherwise every new prompt length would compile again."""
    strategies = ["heavy_hitter", "hybrid", "sink_recent", "merge_pyramid", "recent_global"]
    cfg = ModelArgs(vocab_size=256, n_layer=len(strategies), n_head=4, n_local_heads=2, dim=64,
                    intermediate_size=128, block_size=512)
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    max_seq = 80
    caches = policies.build_caches(cache_args(strategies), len(strategies), 2, 16, 1, max_seq, torch.float32, "cpu",
                                   prompt_len=64, n_heads=4)
    policies.install(model, caches, max_seq)
    torch._dynamo.reset()
    counters.clear()
    prefill_fn, _ = runtime.compile_fns("cpu", False, True)
    graphs = []
    for n in (30, 37, 45, 58):  # every one longer than the 16-slot budgets: the compression path each time
        generate.generate(model, list(range(1, n + 1)), 1, prefill_fn=prefill_fn)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], f"graphs after each prompt length: {graphs}"
