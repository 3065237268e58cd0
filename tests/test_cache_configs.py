"""Cache policies and shipped configurations through generate.py on SmolLM2 (issue 3): every registered policy and
every cache_configs/*.yaml generates; --cache_config loads a YAML and command-line flags override it; the
reported KV-cache memory follows the budget; --debug_attention_loss is 0 for full and in (0, 1] when evicting.

Runs are in-process (generate.main, SmolLM2 loaded once), 8 new tokens after a ~70-token chat prompt, so a 50%
budget evicts during prefill and at every decode step. Policies and configs are discovered at collection time,
so ones added later are covered without editing this file.
"""
import pytest
import yaml

import policies
from tests.test_generate_cli import PROMPT, cli_json, memoised_smol  # noqa: F401 (memoised_smol: autouse fixture)

CONFIGS = sorted(policies.CONFIG_DIR.glob("*.yaml"))
N_NEW = 8
# Flags that make a policy evict after a short prompt (its own defaults are sized for long contexts).
POLICY_FLAGS = {
    "sink_recent": ["--sink_tokens", 4, "--recent_tokens", 16, "--middle_strategy", "none"],
    "merge_pyramid": ["--initial_local_window", 16],
}
FULL_DEBUG = ("--cache_strategy", "full", "--debug_attention_loss")
QUARTER_DEBUG = ("--cache_config", "recent_global", "--max_cache_length", 0.25, "--debug_attention_loss")

_RUNS = {}


def run(*argv) -> dict:
    """cli_json, memoised: each command line is generated once per session (a policy run through its own
    single-policy config and that config's own run are the same command line)."""
    key = tuple(map(str, argv))
    if key not in _RUNS:
        _RUNS[key] = cli_json("--prompt", PROMPT, "--max_new_tokens", N_NEW, *argv)
    return _RUNS[key]


def strategies_of(config) -> list:
    values = yaml.safe_load(config.read_text()) or {}
    s = values.get("cache_strategy", ["full"])
    return s if isinstance(s, list) else [s]


def policy_argv(policy) -> tuple:
    """The policy's own shipped config when it has one (cache_configs/POLICY.yaml with only that policy),
    else the policy at half the tokens; plus the flags that make it evict after the short test prompt."""
    own = policies.CONFIG_DIR / f"{policy}.yaml"
    base = ("--cache_config", policy) if own.exists() and strategies_of(own) == [policy] else \
        ("--cache_strategy", policy, "--max_cache_length", 0.5)
    return (*base, *POLICY_FLAGS.get(policy, []))


def test_shipped_configs_include_one_per_cold_compress_policy():
    names = {p.stem for p in CONFIGS}
    assert {"full", "random", "recent_global", "l2", "heavy_hitter", "keep_it_odd", "lsh", "sink_recent",
            "local_global", "heavy_hitter_pyramid", "l2_funnel"} <= names


@pytest.mark.parametrize("policy", sorted(policies.POLICIES))
def test_every_policy_generates_on_smollm2(policy):
    r = run(*policy_argv(policy))
    s = r["stats"]
    assert len(r["token_ids"]) == N_NEW, "no stop token within 8 tokens for this prompt"
    assert {layer["policy"] for layer in s["layers"]} == {policies.POLICIES[policy].__name__}
    if policy == "full":
        assert s["kept_tokens"] == s["seen_tokens"]
    else:
        assert s["kept_tokens"] < s["seen_tokens"], f"{policy} kept everything: the test prompt is too short"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_generates_on_smollm2(config):
    r = run("--cache_config", config.stem)
    assert len(r["token_ids"]) == N_NEW
    assert {x["policy"] for x in r["stats"]["layers"]} == {policies.POLICIES[s].__name__ for s in strategies_of(config)}


def test_local_global_alternates_window_and_full_layers():
    layers = run("--cache_config", "local_global")["stats"]["layers"]
    assert [x["policy"] for x in layers[:4]] == ["RecentGlobalCache", "FullCache"] * 2


def test_command_line_overrides_the_config():
    shipped = run("--cache_config", "recent_global")  # max_cache_length: [0.5] in the YAML
    override = run(*QUARTER_DEBUG)
    max_seq = shipped["stats"]["prompt_tokens"] + N_NEW
    assert {x["kv_budget"] for x in shipped["stats"]["layers"]} == {round(0.5 * max_seq)}
    assert {x["kv_budget"] for x in override["stats"]["layers"]} == {round(0.25 * max_seq)}
    assert "attention_loss" in override["stats"] and "attention_loss" not in shipped["stats"]


def test_quarter_budget_reports_about_a_quarter_of_full_memory():
    """kv_cache_bytes counts K, V, positions and per-slot policy state, not the debug shadow cache. Both caches
    are proportional to their slots (full: prompt + 8 = M ~ 80 slots per layer, quarter: round(M / 4)), so the
    ratio is round(M / 4) / M, within 0.5 / M (< 0.01) of 0.25; the 0-dim counters are a few bytes per layer.
    0.25 +- 0.02 leaves room for that; a cache that did not shrink, or counted its slots twice, is far outside."""
    full = run(*FULL_DEBUG)["stats"]["kv_cache_bytes"]
    quarter = run(*QUARTER_DEBUG)["stats"]["kv_cache_bytes"]
    assert quarter / full == pytest.approx(0.25, abs=0.02)


def test_attention_loss_is_zero_for_full_and_positive_when_evicting():
    full = run(*FULL_DEBUG)["stats"]
    small = run(*QUARTER_DEBUG)["stats"]
    assert full["attention_loss"] == 0
    assert small["kept_tokens"] < small["seen_tokens"]
    assert 0 < small["attention_loss"] <= 1
