"""perplexity.py on SmolLM2-135M (fp32, CPU): streaming one token at a time through the decode step gives the
same NLLs as one causal forward over the text (full cache), lacache streams within its budget and keeps what
the reference keeps, and bad input is one line with exit status 2."""
import argparse
import json
import math

import pytest
import torch

import perplexity
import policies

try:  # tests/ is on sys.path under pytest's default import mode (no tests/__init__.py) ...
    import reference_policies as ref
except ImportError:  # ... and a package otherwise
    from tests import reference_policies as ref

N = 48  # NLLs scored per run (SmolLM2 has 30 layers: lacache needs >= start_size 4 + 30 + 1 = 35 slots)


@pytest.fixture(scope="module")
def ids(smol_tokenizer):
    return smol_tokenizer.encode(perplexity.default_text())[:N + 1]


def setup(model, *flags):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    a = policies.parse_args(p, [str(f) for f in flags])
    return policies.setup(model, a, batch_size=1, prompt_len=1, max_seq_length=N)


@pytest.fixture(scope="module")
def full_nll(smol_model, ids):
    setup(smol_model, "--cache_strategy", "full")
    return perplexity.streaming_nll(smol_model, ids)


def test_default_text_is_long_and_deterministic():
    text = perplexity.default_text()
    assert len(text) > 100_000 and text == perplexity.default_text()


def test_full_cache_streaming_equals_one_causal_forward(smol_model, ids, full_nll):
    setup(smol_model, "--cache_strategy", "full")
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = smol_model(x[:, :N], torch.arange(N), prefill=True)[0]
    want = torch.nn.functional.cross_entropy(logits.float(), x[0, 1:], reduction="none")
    assert full_nll.shape == (N,)
    assert torch.allclose(full_nll, want, atol=2e-3, rtol=1e-3)
    assert math.exp(float(full_nll.mean())) == pytest.approx(math.exp(float(want.mean())), rel=1e-3)


def test_lacache_streams_within_budget_and_keeps_the_reference_positions(smol_model, ids, full_nll):
    caches = setup(smol_model, "--cache_strategy", "lacache", "--max_cache_length", 35, "--recent_window", 0)
    nll = perplexity.streaming_nll(smol_model, ids)
    ppl, full = math.exp(float(nll.mean())), math.exp(float(full_nll.mean()))
    assert math.isfinite(ppl)
    want = ref.lacache_keep(N, 30, 16, 0, 35, 4)
    for c, w in zip(caches, want):
        assert sorted(p for p in c.pos[0, 0].tolist() if p >= 0) == w
    assert all(c.kept() == 35 * c.pos.shape[1] for c in caches)
    # Eviction changes the scores, yet the ladder keeps the perplexity close to the full cache's (measured:
    # within a few percent either way over the first 48-64 tokens; 18.28 vs 17.59 over 512 tokens at 50%).
    assert not torch.allclose(nll, full_nll)
    assert abs(math.log(ppl / full)) < 0.2


def test_lacache_without_eviction_equals_full(smol_model, ids, full_nll):
    """Nothing evicted: the rank of every key is its position, so position_mode cache is the full cache."""
    setup(smol_model, "--cache_strategy", "lacache", "--max_cache_length", 1.0)
    assert {c.position_mode for c in smol_model.caches} == {"cache"} and not smol_model.caches[0].ladders
    nll = perplexity.streaming_nll(smol_model, ids[:17])  # causal: the first 16 NLLs of the full run
    assert torch.allclose(nll, full_nll[:16], atol=1e-4)


def test_cli_json_record(smol_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    perplexity.main(["--text", text, "--num_eval_tokens", 12, "--ppl_checkpoints", 6, "--json", "--checkpoint_path",
                     smol_dir / "model.pth", "--cache_strategy", "lacache", "--cache_size", 40, "--recent_window", 0])
    r = json.loads(capsys.readouterr().out)
    assert r["num_eval_tokens"] == 12 and r["cache_strategy"] == ["lacache"] and r["max_cache_length"] == [40.0]
    assert set(r["checkpoints"]) == {"6", "12"} and r["perplexity"] == pytest.approx(math.exp(r["mean_nll"]))


@pytest.mark.parametrize("argv,message", [
    (["--text", "/nonexistent/book.txt"], "cannot read --text /nonexistent/book.txt"),
    (["--num_eval_tokens", "1"], "--num_eval_tokens must be >= 2"),
    (["--cache_size", "64", "--max_cache_length", "0.5"], "give only one of them"),
    (["--cache_size", "0"], "--cache_size must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        perplexity.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
