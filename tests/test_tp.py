"""Tensor parallelism (tp.py): `torchrun --nproc_per_node 2` on CPU (gloo) computes what one process computes.

Two launches in all (each costs process start-up, and the second a cold torch.compile):
  - tests/tp_driver.py, eager, on a tiny random model whose layers carry every registered policy (one each; a
    budget of 16 slots against a 24-token prompt, so every layer but full's compresses the prompt and evicts while
    decoding): full cache, every policy, every policy with int8 weights, and a sampled run. Against the same cases
    in this process: the same greedy tokens, logits within fp32 rounding, and in every layer the positions rank 0's
    KV head and rank 1's hold, side by side, equal to what one process holds (no policy looks across KV heads).
  - generate.py --compile --json on a 2-layer tied model: the compiled decode step works sharded, only rank 0
    prints (one JSON record), with the single-process tokens and cache statistics summed over the ranks.
Bad input: a head count K does not divide is one `error: ...` line, before any rank waits for another.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import policies
import quantize
import tp
from model import ModelArgs, random_model
from tests.test_compile import BASE_FLAGS, POLICY_FLAGS
from tests.tp_driver import run_cases
from tokenizer import BYTE_ENCODER

REPO = Path(__file__).resolve().parent.parent
PROMPT_LEN, NEW = 24, 40


def torchrun(*args, timeout=600):
    """2 processes on this machine (a free rendezvous port: --standalone); torchrun sets OMP_NUM_THREADS=1 each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def save_checkpoint(folder: Path, cfg: ModelArgs, seed: int = 0) -> Path:
    """A random-weight checkpoint folder as model.load_model reads it (config.json + model.pth), with a byte-level
    tokenizer.json (256 bytes + placeholder tokens up to the vocabulary) so that generate.py runs on it too."""
    folder.mkdir(parents=True)
    model = random_model(cfg, "cpu", torch.float32, seed=seed)
    with torch.no_grad():  # logits far from ties: greedy picks are not decided by rounding noise
        model.output.weight.mul_(20)
    cfg.to_json(folder / "config.json")
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        del state["output.weight"]
    torch.save(state, folder / "model.pth")
    vocab = {BYTE_ENCODER[b]: b for b in range(256)} | {f"<t{i}>": i for i in range(256, cfg.vocab_size)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    return folder


def policy_flags(policies: list) -> list:
    """generate.py's cache flags for one layer per policy (tests/test_compile.py's small budgets and flags)."""
    flags = dict(BASE_FLAGS)
    for s in policies:
        flags.update(POLICY_FLAGS.get(s, {}))
    argv = ["--cache_strategy", *policies, "--cache_strategy_pattern", "repeat"]
    for k, v in flags.items():
        argv += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return argv


# ---------------------------------------------------------------------------------------------------------------
# Every policy, eager, through tests/tp_driver.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [rank 0's, rank 1's]) for every case of the spec."""
    tmp = tmp_path_factory.mktemp("tp")
    names = sorted(policies.POLICIES)
    cfg = ModelArgs(name="tiny-tp", vocab_size=512, n_layer=len(names), n_head=4, n_local_heads=2, dim=64,
                    intermediate_size=128, block_size=512)
    folder = save_checkpoint(tmp / "ckpt", cfg)
    quantize.quantize_checkpoint(folder / "model.pth", {"mode": "int8"})  # model_int8.pth beside it
    every = policy_flags(names)
    spec = {"checkpoint": str(folder), "new_tokens": NEW,
            "prompt": torch.randint(0, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist(),
            "cases": [{"name": "full", "cache": ["--cache_strategy", "full"]},
                      {"name": "policies", "cache": every},
                      {"name": "int8", "weights": "model_int8.pth", "cache": every, "int8_cpu_kernel": False},
                      # adakv: one budget shared by the layer's heads, which the ranks split between them
                      {"name": "adakv", "cache": policy_flags(["l2", "heavy_hitter"])
                       + ["--keep_set", "adakv"]},
                      {"name": "sampled", "cache": every, "sampling": {"temperature": 1.0, "top_k": 50}}]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    r = torchrun("tests/tp_driver.py", tmp / "spec.json", tmp / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = [torch.load(tmp / f"out.rank{i}.pt", weights_only=False) for i in range(2)]
    assert [s["rank"] for s in sharded] == [0, 1] and all(s["world"] == 2 for s in sharded)
    single = run_cases({**spec, "cases": [c for c in spec["cases"] if "sampling" not in c]})  # eager, here
    return single, [s["results"] for s in sharded]


@pytest.mark.parametrize("case", ["full", "policies", "int8", "adakv"])
def test_sharded_run_equals_single_process(runs, case):
    single, ranks = runs
    ref = single[case]
    for out in (r[case] for r in ranks):
        assert out["tokens"] == ref["tokens"]
        diff = float((out["logits"] - ref["logits"]).abs().max())
        assert diff <= 1e-5 * float(ref["logits"].abs().max()), diff  # summation order only (fp32)
        assert out["kv_heads"] == [1] * len(ref["positions"])  # n_local_heads 2 over 2 ranks: one KV head each
    for layer, (p0, p1, want) in enumerate(zip(ranks[0][case]["positions"], ranks[1][case]["positions"],
                                               ref["positions"])):
        assert torch.equal(torch.cat([p0, p1], dim=1), want), (case, layer)


def test_every_policy_evicts(runs):
    """The comparison above is worth something only if the budgets bite: every layer but full's kept < seen."""
    single, ranks = runs
    layers = single["policies"]["stats"]["layers"]
    assert sorted(x["policy"] for x in layers) == sorted(cls.__name__ for cls in policies.POLICIES.values())
    seen = single["policies"]["stats"]["seen_tokens"]
    assert seen == PROMPT_LEN + NEW - 1
    for x in layers:
        assert (x["kept_tokens"] < seen) == (x["policy"] != "FullCache"), x


@pytest.mark.parametrize("case", ["full", "policies"])
def test_statistics_are_summed_over_ranks(runs, case):
    single, ranks = runs
    ref = single[case]["stats"]
    for s in (r[case]["stats"] for r in ranks):
        assert s["tensor_parallel_ranks"] == 2 and "tensor_parallel_ranks" not in ref
        assert s["seen_tokens"] == ref["seen_tokens"] and s["full_kv_cache_bytes"] == ref["full_kv_cache_bytes"]
        assert s["kept_tokens"] == pytest.approx(ref["kept_tokens"])
        assert s["compression_ratio"] == pytest.approx(ref["compression_ratio"])
        for a, b in zip(s["layers"], ref["layers"]):
            assert a["kept_tokens"] == pytest.approx(b["kept_tokens"]) and a["kv_budget"] == b["kv_budget"]
        # Both ranks' K/V together; per-layer tables (LSH's projection, counters) exist once per rank.
        assert ref["kv_cache_bytes"] <= s["kv_cache_bytes"] <= 1.05 * ref["kv_cache_bytes"]


def test_ranks_sample_the_same_tokens(runs):
    """Temperature sampling on both ranks from one shared seed: the same tokens (no token is sent between ranks)."""
    _, ranks = runs
    a, b = ranks[0]["sampled"], ranks[1]["sampled"]
    assert a["seed"] == b["seed"] and a["tokens"] == b["tokens"]
    assert a["tokens"] != ranks[0]["policies"]["tokens"]  # it did sample (the greedy run has the same caches)


# ---------------------------------------------------------------------------------------------------------------
# generate.py under torchrun, compiled
# ---------------------------------------------------------------------------------------------------------------
CLI = ["--prompt", "Hello there, this is a prompt of some length for testing.", "--max_new_tokens", 20,
       "--device", "cpu", "--json", "--cache_strategy", "heavy_hitter", "lsh", "--max_cache_length", 16,
       "--global_tokens", 2, "--recent_window", 4, "--observation_window", 4, "--lsh_dim", 8]


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    cfg = ModelArgs(name="tiny-tp-tied", vocab_size=512, n_layer=2, n_head=4, n_local_heads=2, dim=64,
                    intermediate_size=128, block_size=512, tie_word_embeddings=True)
    return save_checkpoint(tmp_path_factory.mktemp("tp_cli") / "ckpt", cfg, seed=1)


def test_generate_compiled_under_torchrun(cli_checkpoint):
    r = torchrun("generate.py", "--checkpoint_path", cli_checkpoint, *CLI, "--compile")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # rank 0's record only
    sharded = json.loads(lines[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(["--checkpoint_path", str(cli_checkpoint), *map(str, CLI)])  # one process, eager
    single = json.loads(out.getvalue())
    assert sharded["token_ids"] == single["token_ids"] and sharded["text"] == single["text"]
    s, ref = sharded["stats"], single["stats"]
    assert s["compile_s"] > 0 and s["tensor_parallel_ranks"] == 2
    assert ref["kept_tokens"] < ref["seen_tokens"]  # the budget evicts
    for key in ("seen_tokens", "kept_tokens", "full_kv_cache_bytes"):
        assert s[key] == ref[key], key


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def tiny(**kw):
    return ModelArgs(**{**dict(vocab_size=64, n_layer=1, n_head=4, n_local_heads=2, dim=32, intermediate_size=64,
                               block_size=64), **kw})


@pytest.mark.parametrize("world,kw,needle", [
    (4, {}, "n_local_heads (KV heads) 2 is not"),
    (3, {}, "n_head 4 and n_local_heads (KV heads) 2 and intermediate_size 64 are not"),
    (2, {"intermediate_size": 63}, "intermediate_size 63 is not"),
])
def test_indivisible_model_is_one_clear_error(world, kw, needle):
    model = random_model(tiny(**kw), "cpu", torch.float32)
    with pytest.raises(ValueError) as e:
        tp.shard_model(model, 0, world)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert model.layers[0].attention.n_head == 4 and model.config.n_head == 4  # left as it was


def test_int4_is_rejected_and_int8_is_sliced():
    m4 = quantize.quantize_model(random_model(tiny(), "cpu", torch.float32), "int4.g32", prepare_kernels=False)
    with pytest.raises(ValueError, match="int4 checkpoints cannot be sharded"):
        tp.shard_model(m4, 0, 2)
    m8 = quantize.quantize_model(random_model(tiny(), "cpu", torch.float32), "int8", prepare_kernels=False)
    wqkv, w2 = m8.layers[0].attention.wqkv, m8.layers[0].feed_forward.w2
    full_w, full_s, full_w2 = wqkv.weight.clone(), wqkv.scales.clone(), w2.weight.clone()
    tp.shard_model(m8, 1, 2, group=object())  # no forward here: any group object will do
    hd = 8  # dim 32 / 4 heads; rank 1: q heads 2-3 (rows 16:32), KV head 1 (k rows 40:48, v rows 56:64)
    rows = torch.cat([torch.arange(16, 32), torch.arange(40, 48), torch.arange(56, 64)])
    assert torch.equal(wqkv.weight, full_w[rows]) and torch.equal(wqkv.scales, full_s[rows])
    assert wqkv.weight.dtype == torch.int8 and wqkv.out_features == 4 * hd
    assert torch.equal(w2.weight, full_w2[:, 32:]) and w2.scales.shape == (32,)  # per output row: all kept
    assert m8.config.n_head == 2 and m8.config.n_local_heads == 1 and m8.config.intermediate_size == 32


def test_generate_reports_indivisible_heads_before_any_rank_waits(tmp_path):
    """Rank 0 of a 2-process run, alone: it must fail on one line (exit 2) without joining the process group,
    which would wait for rank 1 forever."""
    folder = save_checkpoint(tmp_path / "ckpt", tiny(n_local_heads=1, vocab_size=512))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(folder), "--prompt", "hi",
                        "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: tensor parallelism over 2 ranks")
    assert "n_local_heads (KV heads) 1 is not" in r.stderr


def test_torchrun_prints_one_error_line(tmp_path):
    """Both ranks hit the error; only rank 0's line is printed (torchrun adds its own failure report)."""
    folder = save_checkpoint(tmp_path / "ckpt", tiny(n_local_heads=1, vocab_size=512))
    r = torchrun("generate.py", "--checkpoint_path", folder, "--prompt", "hi", "--device", "cpu", timeout=300)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "n_local_heads (KV heads) 1 is not" in errors[0], r.stderr[-3000:]
