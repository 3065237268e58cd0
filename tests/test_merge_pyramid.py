"""merge_pyramid: slot positions, members and pooled K/V step by step against the plain-Python reference,
buffer sizing, sinks, validation, one compile for the whole decode, and a run through generate.py."""
import argparse
import json
import random

import pytest
import torch

import generate
import policies
import runtime
from merge_pyramid import MergePyramidCache, pool_pairs, pyramid_windows
from model import ModelArgs, random_model
from tests import reference_policies as ref
from tests.conftest import run_cli
from tests.policy_harness import random_stream

N_LAYERS, H, HKV, D = 4, 4, 2, 8

CONFIGS = [  # W0, beta, sinks, prompt_len, skip_prefill_compression
    (8, 1.0, 4, 5, False),  # prompt shorter than W_k
    (8, 1.0, 4, 40, False),  # prompt compressed at prefill
    (6, 2.0, 2, 30, False),  # a real pyramid: W_k = 6, 5, 4, 3
    (5, 0.5, 0, 13, False),  # beta < 1 (windows grow with the layer), no sinks
    (7, 1.0, 3, 2, False),  # prompt shorter than the sinks
    (8, 1.5, 3, 25, True),  # whole prompt kept, merged at the first decode step
    (9, 1.0, 4, 6, True),  # skip with a short prompt: nothing to skip
]


def tensor(x, dtype=torch.float64):
    """[N][H][d] lists -> [1, H, N, d], exactly (float64 holds the reference's Python floats)."""
    return torch.tensor(x, dtype=dtype).permute(1, 0, 2).unsqueeze(0)


def make_cache(layer, W0, beta, sinks, prompt_len, skip, steps, pooling="mean", dtype=torch.float64):
    budget = MergePyramidCache.sized_budget(prompt_len, prompt_len + steps,
                                            {"skip_prefill_compression": skip})
    return MergePyramidCache(1, HKV, D, budget, dtype, max_seq_length=prompt_len + steps, layer_idx=layer,
                             n_layers=N_LAYERS, initial_local_window=W0, steepness_coefficient=beta,
                             sink_tokens=sinks, seq_pooling_type=pooling, skip_prefill_compression=skip)


def drive(c, k, v, prompt_len, steps, dtype=torch.float64):
    """Prefill then decode; yields after prefill ('prefill', None) and twice per step: after update(t)
    ('attend', mask) and after merge_pending() ('settled', None)."""
    q = [[[0.0] * D for _ in range(H)] for _ in k]
    K, V, Q = tensor(k, dtype), tensor(v, dtype), tensor(q, dtype)
    with torch.no_grad():
        c.prefill(torch.arange(prompt_len), K[:, :, :prompt_len], V[:, :, :prompt_len], Q[:, :, :prompt_len])
        yield "prefill", None
        for t in range(prompt_len, prompt_len + steps):
            _, _, _, mask = c.update(torch.tensor([t]), K[:, :, t:t + 1], V[:, :, t:t + 1], Q[:, :, t:t + 1])
            yield "attend", mask
            c.merge_pending()
            yield "settled", None


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "W{}_b{}_s{}_T{}{}".format(*c[:4], "_skip" * c[4]))
def test_positions_and_members_match_schedule(cfg):
    W0, beta, sinks, T, skip = cfg
    steps = 60
    expected = ref.merge_pyramid_schedule(steps, N_LAYERS, W0, beta, sinks, T, skip, with_members=True)
    _, k, v = random_stream(T + steps, H, HKV, D)
    for layer in range(N_LAYERS):
        c = make_cache(layer, W0, beta, sinks, T, skip, steps)
        step = 0
        for phase, mask in drive(c, k, v, T, steps):
            ours = list(zip(c.positions(), c.members()))
            if phase == "attend":  # the new token's query sees the previous settled state plus itself
                t = T + step
                assert ours == expected[layer][step] + [(float(t), (t,))], f"layer {layer} step {t}"
                assert torch.equal(mask[0, :, 0], c.pos[0] >= 0)
                continue
            step += phase == "settled"
            assert ours == expected[layer][step], f"layer {layer} after step {step} ({phase})"
            n = len(ours)
            assert c.pos[0, :, :n].tolist() == [[int(p) for p, _ in ours]] * HKV  # floor of the mean position
            assert (c.pos[0, :, n:] == -1).all()


@pytest.mark.parametrize("pooling", ["mean", "max", "best"])
def test_pooled_kv_match_reference(pooling):
    """K/V values of every slot equal the reference's (which pools the vectors), in float64, exactly."""
    W0, beta, sinks, T, steps = 6, 2.0, 2, 33, 70
    _, k, v = random_stream(T + steps, H, HKV, D, seed=3)
    for layer in (0, N_LAYERS - 1):
        c = make_cache(layer, W0, beta, sinks, T, False, steps, pooling)
        r = ref.MergePyramidLayerRef(layer, N_LAYERS, W0, beta, sinks, pooling)
        merges = 0
        for phase, _ in drive(c, k, v, T, steps):
            if phase == "prefill":
                r.prefill(T, k[:T], v[:T])
            elif phase == "attend":
                continue
            else:
                t = int(c.seen) - 1  # the position just appended
                before = len(r.slots)
                r.step(t, k[t], v[t])
                merges += len(r.slots) < before + 1
            n = int(c.n)
            assert n == len(r.slots)
            for name, buf in (("k", c.store.k), ("v", c.store.v)):
                want = torch.tensor([s[name] for s in r.slots], dtype=torch.float64).permute(1, 0, 2)
                assert torch.equal(buf[0, :, :n], want), f"{pooling} {name} layer {layer} at {int(c.seen)}"
        assert merges >= 5


def test_best_pooling_tie_rule():
    """Per channel: the even series wins ties; the padded pair of an odd region counts for the odd series."""
    region = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 3.0, 1.0], [5.0, 4.0, 7.0]]
    x = torch.tensor(region).T[None, None].transpose(2, 3)  # [1, 1, 5, 3]
    even, odd = torch.arange(0, 5, 2), torch.tensor([1, 3, 4])
    ours = pool_pairs(x[:, :, even], x[:, :, odd], "best")[0, 0].tolist()
    assert ours == ref.best_pool(region)
    # channel 0: even wins 1 of 3 pairs -> odd; channel 1: 0 of 3 -> odd; channel 2: 0 of 3 -> odd
    assert ours == [[0.0, 1.0, 0.0], [1.0, 3.0, 1.0], [5.0, 4.0, 7.0]]
    tie = [[1.0], [0.0], [0.0], [1.0]]  # one pair each way: even
    t = torch.tensor(tie)[None, None]
    assert pool_pairs(t[:, :, ::2], t[:, :, 1::2], "best")[0, 0].tolist() == ref.best_pool(tie) == [[1.0], [0.0]]


@pytest.mark.parametrize("pooling", ["mean", "max", "best"])
def test_sinks_are_never_merged(pooling):
    sinks, T, steps = 4, 30, 80
    _, k, v = random_stream(T + steps, H, HKV, D, seed=5)
    K = tensor(k, torch.float32)
    c = make_cache(N_LAYERS - 1, 6, 3.0, sinks, T, False, steps, pooling, torch.float32)
    for phase, _ in drive(c, k, v, T, steps, torch.float32):
        assert torch.equal(c.store.k[:, :, :sinks], K[:, :, :sinks])  # bitwise
        assert c.members()[:sinks] == [(p,) for p in range(sinks)]
    assert c.kept() < (T + steps) * HKV / 3  # many merges happened meanwhile


def test_windows_and_buffer_sizes():
    assert pyramid_windows(30, 512, 1.7) == ref.merge_pyramid_windows(30, 512, 1.7)
    assert pyramid_windows(7, 100, 0.3) == ref.merge_pyramid_windows(7, 100, 0.3)
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    args = policies.parse_args(p, ["--cache_strategy", "merge_pyramid", "--initial_local_window", "40",
                                "--steepness_coefficient", "2.5"])
    caches = policies.build_caches(args, 6, 2, 8, 1, 10_000, torch.float32, "cpu", prompt_len=3000)
    windows = ref.merge_pyramid_windows(6, 40, 2.5)
    assert [c.local_window for c in caches] == windows
    assert [c.kv_budget for c in caches] == [4 + 2 * w + 2 for w in windows]  # the default sinks: 4
    assert [c.store.k.shape[2] for c in caches] == [c.kv_budget for c in caches]
    # Capped by the longest sequence of the run.
    caches = policies.build_caches(args, 6, 2, 8, 1, 50, torch.float32, "cpu", prompt_len=20)
    assert [c.kv_budget for c in caches] == [min(50, 4 + 2 * w + 2) for w in windows]
    # skip_prefill_compression: the whole prompt plus one appended token must fit.
    args = policies.parse_args(p, ["--cache_strategy", "merge_pyramid", "--initial_local_window", "40",
                                "--skip_prefill_compression"])
    caches = policies.build_caches(args, 6, 2, 8, 1, 10_000, torch.float32, "cpu", prompt_len=3000)
    assert {c.kv_budget for c in caches} == {3001}
    caches = policies.build_caches(args, 6, 2, 8, 1, 10_000, torch.float32, "cpu")  # prompt length unknown
    assert {c.kv_budget for c in caches} == {10_000}


def test_buffer_is_exactly_as_large_as_needed():
    """The occupancy reaches sinks + 2 W_k + 2 (the derived bound) and never more."""
    sinks, W0, T, steps = 3, 7, 50, 100
    _, k, v = random_stream(T + steps, H, HKV, D, seed=2)
    c = make_cache(0, W0, 1.0, sinks, T, False, steps)
    assert c.kv_budget == sinks + 2 * W0 + 2
    peak = max(int(c.n) for _ in drive(c, k, v, T, steps))
    assert peak == c.kv_budget


def test_long_prompt_larger_than_the_buffer():
    """A prompt much longer than the buffer is compressed from the prompt tensors at prefill."""
    T, steps = 300, 5
    _, k, v = random_stream(T + steps, H, HKV, D, seed=4)
    c = make_cache(1, 8, 1.0, 4, T, False, steps)
    assert c.kv_budget == 22 < T
    r = ref.MergePyramidLayerRef(1, N_LAYERS, 8, 1.0, 4)
    r.prefill(T)
    for phase, _ in drive(c, k, v, T, steps):
        if phase == "prefill":
            assert list(zip(c.positions(), c.members())) == list(zip(r.positions(), r.members()))


@pytest.mark.parametrize("flag,value,why", [
    ("steepness_coefficient", 0.0, "must be > 0"),
    ("steepness_coefficient", -1.0, "must be > 0"),
    ("seq_pooling_type", "median", "must be one of mean, max, best, got 'median'"),
    ("initial_local_window", 0, "must be >= 1"),
    ("sink_tokens", -1, "must be >= 0"),
])
def test_bad_hyperparameters_are_rejected(flag, value, why, capsys):
    """The constructor and the command line give the same reason (one declaration per hyper-parameter)."""
    with pytest.raises(ValueError, match=f"--{flag} {why}"):
        MergePyramidCache(1, 1, 8, 32, torch.float32, **{flag: value})
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    with pytest.raises(SystemExit):
        policies.parse_args(p, ["--cache_strategy", "merge_pyramid", f"--{flag}", str(value)])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument --{flag}: {why}") and "\n" not in err


def test_a_layer_without_window_is_rejected():
    with pytest.raises(ValueError, match="gives layer 1 a window of 0 tokens"):
        MergePyramidCache(1, 1, 8, 32, torch.float32, layer_idx=0, n_layers=4, initial_local_window=1,
                          steepness_coefficient=4.0)


def test_quantized_cache_is_rejected():
    with pytest.raises(ValueError, match="--cache_bits"):
        MergePyramidCache(1, 1, 8, 32, torch.float32, cache_bits=8)


def test_shipped_config():
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    args = policies.parse_args(p, ["--cache_config", "merge_pyramid"])
    assert args.cache_strategy == ["merge_pyramid"]
    assert (args.initial_local_window, args.steepness_coefficient, args.sink_tokens, args.seq_pooling_type) == \
        (512, 1.0, 4, "mean")
    caches = policies.build_caches(args, 2, 1, 8, 1, 4096, torch.float32, "cpu", prompt_len=100)
    assert [c.kv_budget for c in caches] == [4 + 2 * 512 + 2] * 2


# ---------------------------------------------------------------------------------------------------------------
# One compile for the whole decode (slow on CPU: once per module)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_vs_eager():
    args = ModelArgs(vocab_size=256, n_layer=4, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                     block_size=512)
    model = random_model(args, "cpu", torch.float32)
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    flags = ["--cache_strategy", "merge_pyramid", "--initial_local_window", "8", "--steepness_coefficient", "2",
             "--sink_tokens", "2", "--seq_pooling_type", "best"]
    rng = random.Random(0)
    prompt = [rng.randrange(256) for _ in range(20)]
    new = 64
    policies.setup(model, policies.parse_args(p, flags), 1, len(prompt), len(prompt) + new)
    eager, _ = generate.generate(model, prompt, new)
    eager_state = [(c.positions(), c.store.k.clone()) for c in model.caches]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decode = torch.compile(runtime.decode_one_token, fullgraph=True)
    compiled, _ = generate.generate(model, prompt, new, decode_fn=decode)
    return dict(model=model, prompt=prompt, new=new, eager=eager, compiled=compiled, eager_state=eager_state,
                graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_decode_compiles_once_and_matches_eager(compiled_vs_eager):
    r = compiled_vs_eager
    assert r["graphs"] == 1, "the decode step recompiled or broke the graph"
    assert len(r["compiled"]) == r["new"] >= 51  # >= 50 decode steps
    assert r["compiled"] == r["eager"]
    for c, (positions, k) in zip(r["model"].caches, r["eager_state"]):
        assert c.positions() == positions
        torch.testing.assert_close(c.store.k, k)


def test_compiled_run_merged_several_times(compiled_vs_eager):
    r = compiled_vs_eager
    T, steps = len(r["prompt"]), r["new"] - 1  # the first new token comes from prefill
    windows = ref.merge_pyramid_windows(4, 8, 2.0)
    assert len(set(windows)) > 1  # a real pyramid
    for layer, c in enumerate(r["model"].caches):
        schedule = ref.merge_pyramid_schedule(steps, 4, 8, 2.0, 2, T)[layer]
        merges = sum(len(b) < len(a) + 1 for a, b in zip(schedule[1:], schedule[2:]))
        assert merges >= 5
        c.merge_pending()
        assert c.positions() == schedule[-1]
        assert c.kv_budget == 2 + 2 * windows[layer] + 2


# ---------------------------------------------------------------------------------------------------------------
# Through generate.py on the default SmolLM2 model
# ---------------------------------------------------------------------------------------------------------------
PROMPT = ("The lighthouse keeper had kept the lamp burning for forty years. Every evening he climbed the "
          "spiral stairs, trimmed the wick, polished the great lens and wrote the weather in his log. Ships "
          "passed in the night and never knew his name. One winter a storm broke the lantern glass, and he "
          "carried an oil lamp up the stairs every hour until dawn. Tell the rest of this story in a few "
          "sentences.")


def test_generate_cli_smollm2(smol_dir):
    r = run_cli("generate.py", "--cache_strategy", "merge_pyramid", "--initial_local_window", "32",
                "--prompt", PROMPT, "--max_new_tokens", "40", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["stats"]
    assert out["text"].strip()
    assert s["seen_tokens"] > 4 + 2 * 32 + 2
    assert s["kv_cache_bytes"] < s["full_kv_cache_bytes"]
    assert all(layer["kv_budget"] == 4 + 2 * 32 + 2 for layer in s["layers"])
    assert all(layer["kept_tokens"] <= 4 + 2 * 32 + 2 for layer in s["layers"])


def test_generate_cli_rejects_bad_flag(smol_dir):
    r = run_cli("generate.py", "--cache_strategy", "merge_pyramid", "--seq_pooling_type", "median",
                "--max_new_tokens", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: argument --seq_pooling_type: must be one of mean, max, best, got 'median'"]


@pytest.mark.parametrize("pooling", ["mean", "max", "best"])
def test_a_batch_merges_each_sequence_as_alone(pooling):
    """One cache holds three sequences of different prompt lengths (their merges fall on different steps, their
    regions have different lengths): each keeps the positions, members and pooled K/V it keeps alone."""
    lens, steps, W0, sinks = [5, 17, 11], 25, 4, 2
    streams = [random_stream(n + steps, H, HKV, D, seed=i) for i, n in enumerate(lens)]
    alone = []
    for n, (_, k, v) in zip(lens, streams):
        c = make_cache(1, W0, 1.0, sinks, n, False, steps + max(lens) - n, pooling)
        for _ in drive(c, k, v, n, steps):
            pass
        alone.append((c.positions(), c.members(), c.store.k.clone(), c.store.v.clone()))
    budget = MergePyramidCache.sized_budget(max(lens), max(lens) + steps, {})
    batch = MergePyramidCache(len(lens), HKV, D, budget, torch.float64, max_seq_length=max(lens) + steps,
                              layer_idx=1, n_layers=N_LAYERS, initial_local_window=W0, sink_tokens=sinks,
                              seq_pooling_type=pooling)
    Ks, Vs = [tensor(k) for _, k, _ in streams], [tensor(v) for _, _, v in streams]
    Qs = [torch.zeros(1, H, n + steps, D, dtype=torch.float64) for n in lens]
    with torch.no_grad():
        for b, n in enumerate(lens):
            batch.prefill(torch.arange(n), Ks[b][:, :, :n], Vs[b][:, :, :n], Qs[b][:, :, :n], row=b)
        for j in range(steps):
            def at(X):  # each sequence's token j after its prompt, stacked over the batch
                return torch.cat([x[:, :, n + j:n + j + 1] for n, x in zip(lens, X)])
            batch.update(torch.tensor([[n + j] for n in lens]), at(Ks), at(Vs), at(Qs))
        batch.merge_pending()
    for b, (positions, members, k, v) in enumerate(alone):
        with batch.row_view(b) as r:
            assert (r.positions(), r.members()) == (positions, members), f"sequence {b}"
            n = len(positions)
            assert torch.equal(r.store.k[:, :, :n], k[:, :, :n]) and torch.equal(r.store.v[:, :, :n], v[:, :, :n])
    assert len({len(a[0]) for a in alone}) > 1, "the sequences should hold different numbers of slots"
