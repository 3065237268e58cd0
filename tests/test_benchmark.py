"""benchmark.py: byte and bandwidth arithmetic on known shapes, the transformers twin on identical weights, a CPU run
on a tiny random model (no compile: CI-sized) with JSON / markdown / profiler outputs, one-line errors."""
import json

import pytest
import torch

import benchmark as bm
import cache as kvcache
import policies
import quantize
from generate import generate
from model import ModelArgs, random_model

TINY = dict(name="tiny", vocab_size=512, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
            block_size=256)


def tiny(**kw):
    return ModelArgs(**{**TINY, **kw})


def full_cache(model, max_seq, prompt_len=8):
    p = bm.build_parser()
    a = policies.parse_args(p, [])
    policies.setup(model, a, batch_size=1, prompt_len=prompt_len, max_seq_length=max_seq)


def test_weight_bytes_known_case():
    # per layer: wqkv (4 + 2 * 2) * 16 x 64, wo 64 x 64, w1 and w3 128 x 64, w2 64 x 128, two norms of 64
    layer = 128 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128 + 2 * 64
    untied = random_model(tiny(), "cpu", torch.float32)
    # two layers, the final norm, the output head, ONE embedding row
    assert bm.weight_bytes_per_token(untied) == 4 * (2 * layer + 64 + 512 * 64 + 64)
    tied = random_model(tiny(tie_word_embeddings=True), "cpu", torch.float32)
    assert bm.weight_bytes_per_token(tied) == 4 * (2 * layer + 64 + 512 * 64)  # the head reads the whole table
    half = random_model(tiny(), "cpu", torch.bfloat16)
    assert bm.weight_bytes_per_token(half) == 2 * (2 * layer + 64 + 512 * 64 + 64)


def test_weight_bytes_quantized():
    m = quantize.quantize_model(random_model(tiny(tie_word_embeddings=True), "cpu", torch.float32), "int8")
    linear = 128 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128  # int8 codes, 1 byte each
    rows = 128 + 64 + 128 + 128 + 64  # one fp32 scale per output row
    per_layer = linear + 4 * rows + 4 * 2 * 64
    head = 512 * 64 + 4 * 512  # the tied head got its own int8 copy: the embedding now costs one row
    assert bm.weight_bytes_per_token(m) == 2 * per_layer + 4 * 64 + head + 4 * 64
    m4 = quantize.quantize_model(random_model(tiny(), "cpu", torch.float32), "int4.g32")
    # int4: half a byte per weight + per group of 32 a (scale, zero) pair in the compute dtype (fp32 here)
    w4 = bm.weight_bytes_per_token(m4)
    params = 2 * (linear + 2 * 64) + 64 + 512 * 64 + 64
    assert w4 < 0.3 * 4 * params


def test_kv_bytes_and_bandwidth_arithmetic():
    model = random_model(tiny(), "cpu", torch.float32)
    full_cache(model, 40)
    kv = bm.kv_bytes_per_token(model)
    # K and V: 2 layers x 2 (k, v) x 2 KV heads x 40 slots x 16 dims x 4 bytes; plus positions and counters
    assert kv >= 2 * 2 * 2 * 40 * 16 * 4
    assert kv == sum(b.numel() * b.element_size() for c in model.caches for b in c.buffers())
    assert kv == kvcache.cache_stats(model)["kv_cache_bytes"]
    assert bm.achieved_bandwidth(1_000_000, 250.0) == 250_000_000.0
    bw = bm.copy_bandwidth("cpu", nbytes=1 << 20, repeats=3)
    assert bw["bytes_per_s"] > 0 and bw["bytes"] == 1 << 20
    assert bw["bytes_per_s"] == pytest.approx(2 * (1 << 20) / bw["median_s"])


@pytest.mark.parametrize("kw", [dict(), dict(arch="qwen2", attention_bias=True, tie_word_embeddings=True)])
def test_transformers_twin_runs_identical_weights(kw):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = random_model(tiny(**kw), "cpu", torch.float32)
    with torch.no_grad():  # larger weights than random_model's 0.02, so the argmax is far from ties
        for p in model.parameters():
            p.mul_(20 if p.dim() > 1 else 1)
    hf = bm.build_hf_model(model, 64)
    assert hf.model.layers[0].self_attn.q_proj.weight.data_ptr() == model.layers[0].attention.wqkv.weight.data_ptr()
    prompt = torch.randint(0, 512, (12,)).tolist()
    full_cache(model, 24, len(prompt))
    with torch.no_grad():
        ours = model(torch.tensor([prompt]), torch.arange(12), prefill=True)
        theirs = hf(torch.tensor([prompt])).logits
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, float(ours.abs().max()))
    tokens, _ = generate(model, prompt, 8)
    for mode in ("dynamic", "static"):
        htokens, stats = bm.HFRunner(hf, mode, "cpu", 24).generate(prompt, 8)
        assert htokens == tokens, mode
        assert stats["decode_tokens_per_s"] > 0


def test_cpu_run_writes_json_markdown_and_trace(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = tmp_path / "tiny.json"
    tiny().to_json(cfg)
    out = tmp_path / "bench"
    bm.main(["--random_weights", "--model", str(cfg), "--device", "cpu", "--context_lengths", "12",
             "--max_new_tokens", "4", "--num_runs", "2", "--warmup_runs", "0", "--strategies", "full",
             "recent_global", "--budgets", "15", "--weights", "base", "int8", "int4.g32", "--compare_hf",
             "--hf_modes", "dynamic", "static", "--out", str(out), "--profile", str(tmp_path / "prof")])
    data = json.loads((tmp_path / "bench.json").read_text())
    meta, results = data["meta"], data["results"]
    assert meta["device_kind"] == "cpu" and meta["copy_bandwidth_bytes_per_s"] > 0 and meta["commit"]
    assert [(r["weights"], r["strategy"], r["budget"]) for r in results] == [
        (w, s, b) for w in ("base", "int8", "int4.g32") for s, b in (("full", "all"), ("recent_global", "15"))]
    for r in results:
        assert len(r["decode_tokens_per_s_runs"]) == 2 and r["decode_tokens_per_s"] > 0
        assert r["time_to_first_token_s"] > 0 and r["context"] == 12 and r["new_tokens"] == 4
        assert r["achieved_bandwidth_bytes_per_s"] == pytest.approx(
            (r["weight_bytes_per_token"] + r["kv_bytes_per_token"]) * r["decode_tokens_per_s"])
        assert r["bandwidth_ratio"] == pytest.approx(r["achieved_bandwidth_bytes_per_s"]
                                                     / meta["copy_bandwidth_bytes_per_s"])
        assert (set(r["hf"]) == {"dynamic", "static"}) == (r["weights"] == "base")
        for h in r["hf"].values():
            assert h["speedup"] == pytest.approx(r["decode_tokens_per_s"] / h["decode_tokens_per_s"])
        assert all(p.endswith(".json") for p in r["profile"])
    assert results[1]["kv_budget_slots"] == [15, 15] and results[0]["kv_budget_slots"] == [16, 16]
    assert results[0]["kv_cache_bytes"] > results[1]["kv_cache_bytes"]
    assert "int4 aten._weight_int4pack_mm_for_cpu" in results[4]["weights_kernel"]
    md = (tmp_path / "bench.md").read_text()
    assert md.count("\n| tiny |") == 6 and "ours / HF dynamic" in md and meta["commit"] in md
    assert len(list((tmp_path / "prof").glob("trace_*.json"))) == 6 + 2 * 2  # ours x6, transformers x2 x2


@pytest.mark.parametrize("args,needle", [
    (["--random_weights", "--model", "Llama-9000"], "unknown model preset 'Llama-9000'"),
    (["--random_weights", "--strategies", "full", "nope"], "unknown strategy 'nope'"),
    (["--random_weights", "--weights", "int3"], "unknown weight format 'int3'"),
    (["--random_weights", "--hf_modes", "eager"], "unknown --hf_modes 'eager'"),
    (["--random_weights", "--strategies", "recent_global", "--budgets", "5", "--context_lengths", "64"],
     "smaller than --global_tokens"),
    (["--random_weights", "--checkpoint_path", "x/model.pth"], "exclude each other"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bm.main([*args, "--device", "cpu", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "b.json").exists()


def test_cli_one_line_error_subprocess():
    from tests.conftest import run_cli

    r = run_cli("benchmark.py", "--random_weights", "--model", "Nope-1B", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown model preset" in r.stderr


def test_batch_sizes_report_total_throughput(tmp_path):
    cfg = tmp_path / "tiny.json"
    tiny().to_json(cfg)
    bm.main(["--random_weights", "--model", str(cfg), "--device", "cpu", "--context_lengths", "12",
             "--max_new_tokens", "6", "--num_runs", "1", "--warmup_runs", "0", "--strategies", "recent_global",
             "--budgets", "15", "--batch_sizes", "1", "3", "--out", str(tmp_path / "b")])
    one, three = json.loads((tmp_path / "b.json").read_text())["results"]
    assert (one["batch_size"], three["batch_size"]) == (1, 3)
    assert one["decode_tokens_per_s"] == pytest.approx(one["decode_steps_per_s"])
    # three sequences per step: total tokens/s = 3 x steps/s (all run the full length: no end-of-sequence)
    assert three["decode_tokens_per_s"] == pytest.approx(3 * three["decode_steps_per_s"])
    assert three["kv_cache_bytes"] == 3 * one["kv_cache_bytes"]
    assert three["achieved_bandwidth_bytes_per_s"] == pytest.approx(
        (three["weight_bytes_per_token"] + three["kv_bytes_per_token"]) * three["decode_steps_per_s"])
    assert "| 3 |" in (tmp_path / "b.md").read_text()
