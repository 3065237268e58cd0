"""LaCache (lacache.py) against the plain-Python reference (reference_policies.LaCacheRef / lacache_keep):
kept positions per layer after prefill and after every decode step, the budget it reports, position mode
"cache", one compiled decode graph with no recompiles, and the one-line configuration errors."""
import argparse

import pytest
import torch

import model
import policies
import runtime
from lacache import LaCache, ladder_params, ladder_schedule, ladder_shape

try:  # tests/ is on sys.path under pytest's default import mode (no tests/__init__.py) ...
    import reference_policies as ref
except ImportError:  # ... and a package otherwise
    from tests import reference_policies as ref

HKV, H, D = 2, 4, 8


def make_layers(L, S, O, C, S0, max_seq=400, position_mode="absolute"):
    """One LaCache per layer (absolute mode by default: the kept positions do not depend on the mode)."""
    layers = [LaCache(1, HKV, D, C, torch.float32, max_seq_length=max_seq, layer_idx=i, n_layers=L, span=S,
                      overlap=O, start_size=S0, position_mode=position_mode) for i in range(L)]
    cos, sin = model.rope_tables(model.ModelArgs(n_head=H, n_local_heads=HKV, dim=H * D), max_seq)
    for c in layers:
        c.set_rope(cos, sin)
    return layers


def kept(c):
    """Sorted kept positions; every sequence and KV head of a layer holds the same ones."""
    assert bool((c.pos == c.pos[0, 0]).all()), "content independent: all heads must keep the same positions"
    return sorted(p for p in c.pos[0, 0].tolist() if p >= 0)


def stream(layers, prompt_len, n_total, seed=0):
    """Prefill prompt_len tokens, then decode up to n_total; yields (tokens seen, kept per layer, masks)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, HKV, n_total, D, generator=g)
    v = torch.randn(1, HKV, n_total, D, generator=g)
    q = torch.randn(1, H, n_total, D, generator=g)
    with torch.no_grad():
        for c in layers:
            c.prefill(torch.arange(prompt_len), k[:, :, :prompt_len], v[:, :, :prompt_len], q[:, :, :prompt_len])
        yield prompt_len, [kept(c) for c in layers], None
        for t in range(prompt_len, n_total):
            s = slice(t, t + 1)
            masks = [c.update(torch.tensor([t]), k[:, :, s], v[:, :, s], q[:, :, s])[3] for c in layers]
            yield t + 1, [kept(c) for c in layers], masks


def reference_stream(L, S, O, C, S0, prompt_len, n_total):
    r = ref.LaCacheRef(L, S, O, C, S0)
    for _ in range(prompt_len):
        r.append()
    yield r.kept()
    for _ in range(prompt_len, n_total):
        r.append()
        yield r.kept()


def events(L, S, O, C, S0, n):
    r = ref.LaCacheRef(L, S, O, C, S0)
    for _ in range(n):
        r.append()
    return {kind for _, kind, _ in r.events}


# ---------------------------------------------------------------------------------------------------------------
# Kept positions vs the reference
# ---------------------------------------------------------------------------------------------------------------
def test_worked_example_step_by_step():
    """ALGORITHMS.md's example: L=8, S=4, O=0, C=24, S0=2, 40 tokens fed one by one (a start-over on the way)."""
    L, S, O, C, S0 = 8, 4, 0, 24, 2
    assert events(L, S, O, C, S0, 40) == {"ladder", "start_over"}
    ours = stream(make_layers(L, S, O, C, S0, max_seq=40), 1, 40)
    for (n, got, _), want in zip(ours, reference_stream(L, S, O, C, S0, 1, 40)):
        assert got == want, f"differs from the reference after {n} tokens"
    want0 = [0, 1, 2, 6, 10] + list(range(12, 29, 2)) + list(range(30, 40))
    want1 = [0, 1, 5, 9] + list(range(11, 30, 2)) + list(range(30, 40))
    assert got == [want0 if i % 2 == 0 else want1 for i in range(L)]


CONFIGS = [  # (L, S, O, C, S0), steps: each hits ladders and start-overs within the steps
    pytest.param(8, 4, 2, 40, 4, 160, id="overlap2_A2"),
    pytest.param(6, 2, 0, 30, 1, 160, id="R2"),
    pytest.param(6, 1, 0, 20, 2, 140, id="R5_grows"),
    pytest.param(12, 4, 1, 40, 4, 110, id="overlap1_L12"),
]


@pytest.mark.parametrize("L,S,O,C,S0,n", CONFIGS)
def test_decode_matches_reference_every_step(L, S, O, C, S0, n):
    assert events(L, S, O, C, S0, n) == {"ladder", "start_over"}
    ours = stream(make_layers(L, S, O, C, S0), 1, n, seed=L)
    for (t, got, _), want in zip(ours, reference_stream(L, S, O, C, S0, 1, n)):
        assert got == want, f"differs from the reference after {t} tokens"


@pytest.mark.parametrize("prompt_len", [10, 21, 22, 23, 57, 130], ids=lambda t: f"prompt{t}")
def test_prefill_then_decode_matches_feeding_token_by_token(prompt_len):
    """Prompts shorter than, at, and longer than the 22 slots (C=20 + R//2): prefill keeps what feeding the
    prompt one token at a time keeps (lacache_keep), and decoding continues like the reference."""
    L, S, O, C, S0 = 6, 1, 0, 20, 2
    ours = stream(make_layers(L, S, O, C, S0), prompt_len, prompt_len + 30, seed=prompt_len)
    first = next(ours)[1]
    assert first == ref.lacache_keep(prompt_len, L, S, O, C, S0)
    for (t, got, _), want in zip(ours, list(reference_stream(L, S, O, C, S0, prompt_len, prompt_len + 30))[1:]):
        assert got == want, f"differs from the reference after {t} tokens"


def test_long_prompt_prefill_stores_the_kept_tokens_k_and_v():
    L, S, O, C, S0, T = 8, 4, 0, 24, 2, 40
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, HKV, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g)
    for c, want in zip(make_layers(L, S, O, C, S0), ref.lacache_keep(T, L, S, O, C, S0)):
        c.prefill(torch.arange(T), k, v, torch.zeros(1, H, T, D))
        n = len(want)
        assert c.pos[0, 0, :n].tolist() == want and int(c.seen) == T
        k_rot = model.apply_rope(k, c.rope_cos[:T], c.rope_sin[:T])  # absolute mode: stored at their positions
        assert torch.equal(c.store.k[:, :, :n], k_rot[:, :, want]) and torch.equal(c.store.v[:, :, :n], v[:, :, want])


# ---------------------------------------------------------------------------------------------------------------
# Budget and invariants
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,S,O,C,S0", [(8, 4, 0, 24, 2), (6, 1, 0, 20, 2), (8, 4, 2, 40, 4), (5, 2, 1, 12, 0)])
def test_schedule_is_one_group_per_compaction(L, S, O, C, S0):
    """The engine's per-step table (one group per compaction, module doc) against the reference's events."""
    r = ref.LaCacheRef(L, S, O, C, S0)
    start, groups, length = ladder_schedule(L, S, O, C, S0, 300)
    for t in range(300):
        before = len(r.events)
        r.append()
        assert length[t] == len(r.kept()[0])
        if groups[t]:
            kind, info = r.events[-1][1:]
            assert len(r.events) == before + 1 and info["g"] + info.get("g2", 0) == 1
            assert start[t] == (S0 if kind == "start_over" else info["c"] - r.A)
        else:
            assert len(r.events) == before


def test_literal_rule_for_a_large_need():
    """ladder_params is the rule for any need (a start-over with stride 2 when need - cap > cap1)."""
    B, A, R = ladder_shape(8, 4, 0)  # 2, 1, 1
    g1, g2, st, Bs, Rs, c = ladder_params(60, True, 10, L=8, A=A, B=B, R=R, C=24, half=0, S0=2)
    # room = 24 - 10 - 8 = 6: cap = 6; cap1 = 14; st = ceil(30 / 14) = 3; Bs = 2 + 2 * 1 = 4; g2 = ceil(30 / 3)
    assert (g1, g2, st, Bs, Rs, c) == (6, 10, 3, 4, 3, 12)


def test_buffer_holds_C_plus_half_R_slots_and_reports_it():
    L, S, O, C, S0 = 6, 1, 0, 20, 2
    assert ladder_shape(L, S, O) == (6, 1, 5)
    c = make_layers(L, S, O, C, S0)[0]
    assert c.kv_budget == C + 5 // 2 == c.store.k.shape[2] == c.pos.shape[2]
    assert c.ladder_budget == C


def test_no_growth_when_the_run_fits_the_budget():
    c = LaCache(1, HKV, D, 32, torch.float32, max_seq_length=32, n_layers=6, span=1, start_size=2)
    assert c.kv_budget == 32 and not c.ladders


@pytest.mark.parametrize("L,S,O,C,S0", [(8, 4, 0, 24, 2), (6, 2, 0, 30, 1), (8, 4, 2, 40, 4), (5, 2, 1, 12, 0)])
def test_invariants(L, S, O, C, S0):
    """Sinks in every layer, never over the slots, the newest token kept, mask = occupied slots, and all layers
    hold equally many tokens."""
    layers = make_layers(L, S, O, C, S0)
    for n, got, masks in stream(layers, 3, 120, seed=S0):
        assert len({len(p) for p in got}) == 1
        for c, p in zip(layers, got):
            assert len(p) <= c.kv_budget
            assert p[:min(S0, n)] == list(range(min(S0, n)))
            assert p[-1] == n - 1
        for c, mask in zip(layers, masks or []):
            assert torch.equal(mask[:, :, 0], c.pos >= 0)


# ---------------------------------------------------------------------------------------------------------------
# Position modes
# ---------------------------------------------------------------------------------------------------------------
def test_default_position_mode_is_cache():
    c = make_layers(4, 2, 0, 12, 2, position_mode=None)[0]
    assert c.position_mode == "cache" and c.rotates_keys


def test_cache_mode_rotates_keys_and_query_by_rank():
    """After compactions the slots are out of position order; attention sees the stored (un-rotated) keys
    rotated at their rank 0..n-1 among the kept positions, and the query at rank n-1."""
    L, S, O, C, S0 = 8, 4, 0, 24, 2
    layers = make_layers(L, S, O, C, S0, position_mode="cache")
    for _ in stream(layers, 5, 45):
        pass
    c = layers[3]
    k, v, q = torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D), torch.randn(1, H, 1, D)
    q_att, k_att, v_att, mask = c.update(torch.tensor([45]), k, v, q)
    pos = c.pos[0, 0]
    slots = [s for s in pos.argsort().tolist() if pos[s] >= 0]  # occupied slots in position order
    n = len(slots)
    assert pos[slots].tolist() == ref.lacache_keep(46, L, S, O, C, S0)[3]
    assert slots != sorted(slots), "the test needs slots out of position order"
    want_k = model.apply_rope(c.store.k[:, :, slots], c.rope_cos[:n], c.rope_sin[:n])
    assert torch.allclose(k_att[:, :, slots], want_k, atol=1e-6)
    assert torch.allclose(q_att, model.apply_rope(q, c.rope_cos[n - 1], c.rope_sin[n - 1]), atol=1e-6)
    assert v_att is c.store.v and torch.equal(mask[0, :, 0], c.pos[0] >= 0)


def test_absolute_mode_returns_the_stored_keys():
    layers = make_layers(8, 4, 0, 24, 2, position_mode="absolute")
    for _ in stream(layers, 5, 45):
        pass
    c = layers[0]
    k, q = torch.randn(1, HKV, 1, D), torch.randn(1, H, 1, D)
    q_att, k_att, _, _ = c.update(torch.tensor([45]), k, k, q)
    assert not c.rotates_keys and k_att is c.store.k
    assert torch.equal(q_att, model.apply_rope(q, c.rope_cos[45], c.rope_sin[45]))  # at its absolute position
    assert kept(c) == ref.lacache_keep(46, 8, 4, 0, 24, 2)[0]


# ---------------------------------------------------------------------------------------------------------------
# One compiled decode graph (fullgraph, no recompiles) equal to eager
# ---------------------------------------------------------------------------------------------------------------
TINY = dict(vocab_size=256, n_layer=4, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, block_size=512)
TL, TS, TO, TC, TS0 = 4, 1, 0, 12, 2  # B=4, A=1, R=3: 13 slots; ladders from token 14, start-overs at 35, 56
PROMPT, N = 4, 64


def cache_args(*extra):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    return policies.parse_args(p, ["--cache_strategy", "lacache", "--max_cache_length", str(TC), "--span", str(TS),
                                  "--overlap", str(TO), "--start_size", str(TS0), "--recent_window", "0", *extra])


def tiny_run(step):
    m = model.random_model(model.ModelArgs(**TINY), "cpu", torch.float32, seed=0)
    caches = policies.setup(m, cache_args(), batch_size=1, prompt_len=PROMPT, max_seq_length=N)
    tokens = [(7 * t + 3) % 256 for t in range(N)]  # teacher forcing: a fixed token stream
    out, kept_steps = [], []
    with torch.no_grad():
        runtime.prefill(m, torch.tensor([tokens[:PROMPT]]), torch.arange(PROMPT))
        for t in range(PROMPT, N):
            out.append(int(step(m, torch.tensor([[tokens[t]]]), torch.tensor([t])).clone()))
            kept_steps.append([kept(c) for c in caches])
    return out, kept_steps, caches


@pytest.fixture(scope="module")
def compiled_and_eager():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = tiny_run(torch.compile(runtime.decode_one_token, fullgraph=True))
        stats = dict(torch._dynamo.utils.counters["stats"])
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        eager = tiny_run(runtime.decode_one_token)
    finally:
        torch.set_num_threads(threads)
    return compiled, eager, stats, breaks


def test_tiny_config_hits_ladders_and_start_overs():
    r = ref.LaCacheRef(TL, TS, TO, TC, TS0)
    for _ in range(N):
        r.append()
    kinds = [kind for _, kind, _ in r.events]
    assert kinds.count("ladder") >= 5 and kinds.count("start_over") >= 2 and r.R == 3


def test_compiled_decode_is_one_graph(compiled_and_eager):
    _, _, stats, breaks = compiled_and_eager
    assert stats["unique_graphs"] == 1, stats
    assert breaks == {}


def test_compiled_decode_equals_eager(compiled_and_eager):
    (tok_c, kept_c, caches_c), (tok_e, kept_e, caches_e), _, _ = compiled_and_eager
    assert tok_c == tok_e and kept_c == kept_e
    for a, b in zip(caches_c, caches_e):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.slot_rank, b.slot_rank)
        assert torch.allclose(a.store.k, b.store.k, atol=1e-5) and torch.allclose(a.store.v, b.store.v, atol=1e-5)


def test_compiled_decode_keeps_what_the_reference_keeps(compiled_and_eager):
    (_, kept_c, _), _, _, _ = compiled_and_eager
    want = list(reference_stream(TL, TS, TO, TC, TS0, PROMPT, N))[1:]
    assert kept_c == want


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def build(*flags, n_layers=TL, max_seq_length=100):
    a = cache_args(*flags)
    return policies.build_caches(a, n_layers, HKV, D, 1, max_seq_length, torch.float32, "cpu")


@pytest.mark.parametrize("flags,message", [
    (["--span", "0"], "--span: must be >= 1"),
    (["--overlap", "1"], "--overlap must satisfy 0 <= overlap < span (1)"),
    (["--span", "4", "--overlap", "-1"], "--overlap: must be >= 0"),
    (["--start_size", "-1"], "--start_size: must be >= 0"),
    (["--span", "4"], "save no slot on a 4-layer model"),
    (["--max_cache_length", "6"], "the ladder needs at least --start_size (2) + n_layers (4) + 1"),
])
def test_bad_configuration_is_one_clear_error(flags, message, capsys):
    """Out-of-range values stop at parsing (one `error:` line), inconsistent ones when the caches are built."""
    with pytest.raises((ValueError, SystemExit)) as e:
        build(*flags)
    text = str(e.value) if e.type is ValueError else capsys.readouterr().err.strip()
    assert message in text and "\n" not in text


def test_span_hint_names_a_working_span():
    with pytest.raises(ValueError, match=r"use --span <= 3"):
        build("--span", "4")


def test_small_budget_is_fine_when_nothing_is_laddered():
    caches = build("--max_cache_length", "6", max_seq_length=6)
    assert [c.kv_budget for c in caches] == [6] * TL


def test_position_mode_flag_reaches_the_cache():
    assert {c.position_mode for c in build()} == {"cache"}
    assert {c.position_mode for c in build("--position_mode", "absolute")} == {"absolute"}


def test_shipped_yaml_config():
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    a = policies.parse_args(p, ["--cache_config", "lacache"])
    assert a.cache_strategy == ["lacache"] and (a.span, a.overlap, a.start_size) == (16, 0, 4)
    caches = policies.build_caches(a, 30, HKV, D, 1, 400, torch.float32, "cpu")
    assert {type(c) for c in caches} == {LaCache} and caches[0].kv_budget == 200
