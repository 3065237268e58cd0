"""metrics.py on hand-computed cases; eval.py end to end on SmolLM2 (tiny lengths): files, skip/resume,
caches set up once, log-likelihood and streaming perplexity checked against plain forward passes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch

import eval as ev
import metrics as M
import policies
import runtime
import tasks as T
from model import ModelArgs

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "datasets"


# ---------------------------------------------------------------------------------------------------------------
# Metrics, hand-computed
# ---------------------------------------------------------------------------------------------------------------
def test_string_match_all_and_part():
    assert M.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert M.string_match_all("The numbers are 123.", ["123", "456", "789"]) == pytest.approx(1 / 3)
    assert M.string_match_all("VAR abc, var DEF", ["ABC", "def"]) == 1.0  # case-insensitive
    assert M.string_match_all("nothing here", ["x1"]) == 0.0
    assert M.string_match_part("only 456", ["123", "456"]) == 1.0
    assert M.string_match_part("none", ["123", "456"]) == 0.0


def test_qa_f1_hand_computed():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: overlap 2, P = 2/2, R = 2/3, F1 = 0.8
    assert M.qa_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert M.qa_f1("Paris.", ["paris"]) == 1.0  # punctuation and case are normalised
    assert M.qa_f1("London", ["Paris", "london"]) == 1.0  # best over references
    assert M.qa_f1("blue", ["red"]) == 0.0
    # repeated tokens count with multiplicity: pred [x, x, y], ref [x, y, y] -> common {x:1, y:1} = 2 -> F1 2/3
    assert M.qa_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)


def test_rouge_l_hand_computed():
    assert M.lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert M.lcs_length("a b c".split(), "c b a".split()) == 1
    # pred 5 tokens, ref 3 tokens, LCS 3: P = 3/5, R = 1, F1 = 2 * 0.6 / 1.6 = 0.75
    assert M.rouge_l("a b c d e", ["a c e"]) == pytest.approx(0.75)
    # "police killed the gunman" vs "police kill the gunman": LCS 3 (police, the, gunman) of 4 and 4 -> 0.75
    assert M.rouge_l("police killed the gunman", ["police kill the gunman"]) == pytest.approx(0.75)
    assert M.rouge_l("The Cat, sat!", ["the cat sat"]) == 1.0
    assert M.rouge_l("", ["x"]) == 0.0


def test_gsm8k_numeric_answer():
    gold = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,250"
    assert M.gsm8k_gold(gold) == 1250
    assert M.gsm8k_exact_match("So 1000 + 250 = 1250. The answer is 1,250.", [gold]) == 1.0
    assert M.gsm8k_exact_match("The answer is $1250.00", [gold]) == 1.0
    assert M.gsm8k_exact_match("First 12, then 1250, finally 7", [gold]) == 0.0  # last number wins: 7
    assert M.gsm8k_exact_match("The answer is 1250. Check: 2 * 625 = 1250", [gold]) == 1.0
    assert M.gsm8k_exact_match("no idea", [gold]) == 0.0
    assert M.gsm8k_extract("#### -3") == -3


def test_score_interval_wilson_closed_forms_and_bootstrap():
    z = 1.959963984540054  # the 95% normal quantile
    lo, hi = M.mean_interval([1] * 10)  # Wilson at p = 1: [n / (n + z^2), 1]
    assert lo == pytest.approx(100 * 10 / (10 + z * z)) and hi == pytest.approx(100)
    lo, hi = M.mean_interval([1] * 5 + [0] * 5)  # p = 1/2: 1/2 -+ z / (2 sqrt(n + z^2))
    half = z / (2 * (10 + z * z) ** 0.5)
    assert (lo, hi) == (pytest.approx(100 * (0.5 - half)), pytest.approx(100 * (0.5 + half)))
    scores = [0.5, 1.0, 0.0, 0.25] * 5  # not 0/1: a bootstrap of the mean, reproducible
    lo, hi = M.mean_interval(scores)
    assert lo < 100 * sum(scores) / len(scores) < hi and (lo, hi) == M.mean_interval(scores)


def test_paired_p_values_closed_forms():
    # McNemar exact: 10 samples only a gets right, none only b: two-sided binomial 2 * 0.5^10
    assert M.paired_p_value([1] * 10 + [0] * 5 + [1] * 3, [0] * 10 + [0] * 5 + [1] * 3) == pytest.approx(2 / 1024)
    assert M.paired_p_value([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(1.0)  # 2 and 2: no evidence
    assert M.paired_p_value([1, 0], [1, 0]) == 1.0
    # not 0/1: Wilcoxon signed-rank, exact; six differences of one sign: 2 / 2^6
    assert M.paired_p_value([0.5, 1, 0.2, 0.3, 0.9, 0.1], [0.1, 0.2, 0.1, 0.2, 0.3, 0.05]) == pytest.approx(2 / 64)


def test_mc_accuracy():
    # acc: argmax of sums (-1.0 is B); acc_norm divides by characters: A -1.2/6 = -0.2 beats B -1.0/2 = -0.5
    r = M.mc_accuracy([-1.2, -1.0, -5.0], ["banana", "ab", "c"], gold=0)
    assert r == {"accuracy": 0.0, "accuracy_norm": 1.0}


def test_llm_judge_skipped_without_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert M.llm_judge("q", "a", ["a"]) is None


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------
def _parse(argv):
    p, cache_dests = ev.build_parser()
    defaults = {a.dest: a.default for a in p._actions}
    return policies.parse_args(p, argv), defaults, cache_dests


def test_config_name_same_for_yaml_and_flags():
    a1, d1, c1 = _parse(["--cache_config", "l2", "--max_cache_length", "0.25"])
    a2, d2, c2 = _parse(["--cache_strategy", "l2", "--max_cache_length", "0.25"])
    assert ev.config_name(a1, d1, c1) == ev.config_name(a2, d2, c2) == "l2__max_cache_length=0.25"
    a3, d3, c3 = _parse(["--cache_strategy", "full"])
    assert ev.config_name(a3, d3, c3) == "full"


def test_task_opts_targeting():
    ts = ev.make_tasks(["niah_single_2", "vt", "cwe"], {"cwe.icl": "False", "niah.max_new_tokens": "12",
                                                        "num_cw": "5"})
    niah, vt, cwe = ts
    assert niah.max_new_tokens == 12 and vt.max_new_tokens == 30
    assert vt.opts["icl"] is True and cwe.opts["icl"] is False and cwe.opts["num_cw"] == 5
    with pytest.raises(ev.UserError, match="match no option"):
        ev.make_tasks(["vt"], {"depth": "3"})


# ---------------------------------------------------------------------------------------------------------------
# eval.py end to end (tiny)
# ---------------------------------------------------------------------------------------------------------------
BASE = ["--seq_length", "192", "--num_samples", "2", "--max_new_tokens", "3", "--no_progress", "--num_threads", "2"]


def run_eval(tmp, *args, capsys=None):
    ev.main(["--out_dir", str(tmp), *BASE, *args])
    return capsys.readouterr().err if capsys else ""


def test_eval_writes_results_and_skips(tmp_path, smol_dir, capsys, monkeypatch):
    calls = {"setup": 0, "compile": 0}
    real_setup, real_compile = policies.setup, runtime.compile_fns

    def count_setup(*a, **k):
        calls["setup"] += 1
        return real_setup(*a, **k)

    def count_compile(*a, **k):
        calls["compile"] += 1
        return real_compile(*a, **k)

    monkeypatch.setattr(policies, "setup", count_setup)
    monkeypatch.setattr(runtime, "compile_fns", count_compile)
    args = ["--tasks", "niah_single_1", "vt", "--task_opts", "vt.icl=False", "--cache_strategy", "recent_global",
            "--max_cache_length", "0.5"]
    err = run_eval(tmp_path, *args, capsys=capsys)
    assert calls == {"setup": 1, "compile": 1}  # once per run, not per task or sample
    cfg = tmp_path / "SmolLM2-135M-Instruct" / "recent_global__max_cache_length=0.5"
    d = cfg / "niah_single_1-len192-gen3-n2"
    assert sorted(p.name for p in d.iterdir()) == [".lock", "args.json", "metrics.json", "predictions.jsonl"]
    preds = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [0, 1] and all(p["prompt_tokens"] <= 192 for p in preds)
    assert all(p["stats"]["new_tokens"] <= 3 for p in preds)
    m = json.loads((d / "metrics.json").read_text())
    assert m["primary"] == "string_match_all" and 0 <= m["score"] <= 100
    hits = [p["scores"]["string_match_all"] for p in preds]  # one needle: each sample scores 0 or 1
    ci = scipy.stats.binomtest(int(sum(hits)), len(hits)).proportion_ci(0.95, method="wilson")
    assert m["score_ci95"] == [pytest.approx(100 * ci.low), pytest.approx(100 * ci.high)]
    st = m["stats"]
    assert st["max_seq_length"] == 195 and st["layer_kv_budget"] == [98] * 30  # round(0.5 * 195), same for all
    assert 0.4 < st["compression_ratio"] < 0.6 and st["kv_cache_bytes"] > 0 and st["peak_memory_bytes"] > 0
    assert st["decode_tokens_per_s"] > 0 and st["time_to_first_token_s"] > 0
    a = json.loads((d / "args.json").read_text())
    assert a["argv"][:2] == ["--out_dir", str(tmp_path)] and a["max_seq_length"] == 195
    assert a["args"]["cache_strategy"] == ["recent_global"] and a["command"].startswith("python eval.py")
    assert (cfg / "vt-len192-gen3-n2-iclFalse" / "metrics.json").exists()
    runs = [json.loads(x) for x in (cfg / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and [t["task"] for t in runs[0]["tasks"]] == ["niah_single_1", "vt"]
    assert "niah_single_1: string_match_all =" in err

    # Re-running skips finished tasks (no model, no new run record)
    mtime = (d / "metrics.json").stat().st_mtime_ns
    err = run_eval(tmp_path, *args, capsys=capsys)
    assert "niah_single_1: done" in err and "vt: done" in err
    assert (d / "metrics.json").stat().st_mtime_ns == mtime and calls["setup"] == 1
    assert len((cfg / "runs.jsonl").read_text().splitlines()) == 1

    # An interrupted task resumes after its last finished sample
    (d / "metrics.json").unlink()
    (d / "predictions.jsonl").write_text((d / "predictions.jsonl").read_text().splitlines()[0] + "\n")
    err = run_eval(tmp_path, *args, capsys=capsys)
    assert "resuming after 1 finished samples" in err and "vt: done" in err
    again = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in again] == [0, 1] and again[1]["prediction"] == preds[1]["prediction"]

    # --overwrite recomputes
    run_eval(tmp_path, *args, "--overwrite", capsys=capsys)
    assert (d / "metrics.json").stat().st_mtime_ns != mtime


def test_full_cache_loglikelihood_matches_forward(smol_model, smol_tokenizer):
    """The prefill + decode-step log-likelihood equals one causal forward over prompt + choice (full cache)."""
    p, dests = ev.build_parser()
    a = policies.parse_args(p, ["--cache_strategy", "full"])
    model = smol_model
    prompt = smol_tokenizer.encode("Question: What colour is the sky on a clear day?\nAnswer:")
    cont = smol_tokenizer.encode(" It is blue.", bos=False)
    n = len(prompt) + len(cont)
    policies.setup(model, a, batch_size=1, prompt_len=len(prompt), max_seq_length=n)
    rt = ev.Runtime(a, model, smol_tokenizer, "cpu", n)
    with torch.no_grad():
        logits = rt.prompt_logits(prompt)
        lp = float(torch.log_softmax(logits[0], -1)[cont[0]])
        for j in range(1, len(cont)):
            logits = rt.step(cont[j - 1], len(prompt) + j - 1)
            lp += float(torch.log_softmax(logits[0], -1)[cont[j]])
        for c in model.caches:
            c.reset()
        full = model(torch.tensor([prompt + cont]), torch.arange(n), prefill=True)[0]
        ref = sum(float(torch.log_softmax(full[len(prompt) - 1 + j], -1)[t]) for j, t in enumerate(cont))
    assert lp == pytest.approx(ref, abs=2e-3)


def test_streaming_ppl_full_matches_forward(tmp_path, smol_model, smol_tokenizer, capsys):
    """Token-by-token perplexity with the full cache (perplexity.streaming_nll) equals the teacher-forced perplexity
    of one forward."""
    run_eval(tmp_path, "--tasks", "ppl", "--seq_length", "48", "--num_samples", "1", "--cache_strategy", "full",
             "--task_opts", "text=stdlib", "checkpoints=16,32", capsys=capsys)
    m = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    ids = T.get_task("ppl", text="stdlib").build(T.PromptEncoder(smol_tokenizer, True), 48, 1, 0)[0]["ids"]
    p, _ = ev.build_parser()
    policies.setup(smol_model, policies.parse_args(p, ["--cache_strategy", "full"]), 1, 48, 48)
    with torch.no_grad():
        logits = smol_model(torch.tensor([ids]), torch.arange(48), prefill=True)[0]
    nll = [-float(torch.log_softmax(logits[i], -1)[ids[i + 1]]) for i in range(47)]
    assert m["metrics"]["ppl"] == pytest.approx(math.exp(sum(nll) / 47), rel=2e-3)
    assert m["ppl_at"]["16"] == pytest.approx(math.exp(sum(nll[:16]) / 16), rel=2e-3)
    assert list(m["ppl_at"]) == ["16", "32", "47"] and m["higher_is_better"] is False
    pred = json.loads(next(tmp_path.rglob("predictions.jsonl")).read_text().splitlines()[0])
    assert pred["runner"] == "perplexity.streaming_nll"


def test_multiple_choice_and_longbench_from_fixtures(tmp_path, smol_dir, capsys):
    run_eval(tmp_path, "--tasks", "gsm8k_mc", "hotpotqa", "--data_dir", str(FIXTURES), "--seq_length", "192",
             "--cache_strategy", "l2", "--max_cache_length", "0.5", capsys=capsys)
    cfg = tmp_path / "SmolLM2-135M-Instruct" / "l2__max_cache_length=0.5"
    mc = json.loads((cfg / "gsm8k_mc-len192-gen3-n2" / "metrics.json").read_text())
    assert set(mc["metrics"]) == {"accuracy", "accuracy_norm"} and mc["kind"] == "loglikelihood"
    preds = [json.loads(x) for x in (cfg / "gsm8k_mc-len192-gen3-n2" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["logprobs"]) == 4 and p["prediction"] in "ABCD" for p in preds)
    lb = json.loads((cfg / "hotpotqa-len192-gen3-n2" / "metrics.json").read_text())
    assert set(lb["metrics"]) == {"qa_f1", "rouge_l"} and lb["primary"] == "qa_f1"


def _cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "KVCOMPILE_DATA_DIR"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def test_missing_dataset_is_one_line_error(tmp_path):
    r = _cli("--tasks", "gsm8k", "--out_dir", str(tmp_path), "--seq_length", "256")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task gsm8k") and "--data_dir" in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_input_is_one_line_error(tmp_path, capsys):
    for args in (["--tasks", "vt", "--task_opts", "depth"], ["--num_samples", "0"]):
        with pytest.raises(SystemExit) as e:
            ev.main(["--out_dir", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for args in (["--tasks", "nope"], ["--tasks", "vt", "--seq_length", "64"]):
        r = _cli(*args, "--out_dir", str(tmp_path))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, args


def test_hybrid_gets_token_classes(smol_model, smol_tokenizer):
    """policies.setup installs FastGen's special/punctuation tables when given the tokenizer."""
    p, _ = ev.build_parser()
    policies.setup(smol_model, policies.parse_args(p, ["--cache_strategy", "hybrid", "--max_cache_length", "0.5"]),
                   1, 64, 64, tokenizer=smol_tokenizer)
    c = smol_model.caches[0]
    assert c.punct_ids.numel() == smol_model.config.vocab_size and bool(c.punct_ids[smol_tokenizer.encode(".")[0]])


@pytest.mark.parametrize("extra", [[], ["--feed_long_prompts"]], ids=["prefill", "feed"])
def test_batched_eval_equals_one_at_a_time(tmp_path, smol_dir, capsys, extra):
    """--batch_size 2 over 3 samples (the last batch padded): the same predictions and per-sample cache figures;
    with --feed_long_prompts each prompt's second half goes through the batched decode step."""
    args = ["--tasks", "niah_single_1", "--cache_strategy", "recent_global", "--max_cache_length", "0.5",
            "--num_samples", "3", "--max_new_tokens", "4", *extra]
    run_eval(tmp_path / "one", *args)
    err = run_eval(tmp_path / "two", *args, "--batch_size", "2", capsys=capsys)
    config = "recent_global__feed_long_prompts=True__max_cache_length=0.5" if extra else \
        "recent_global__max_cache_length=0.5"
    d = Path("SmolLM2-135M-Instruct") / config / "niah_single_1-len192-gen4-n3"
    one, two = ([json.loads(x) for x in (tmp_path / t / d / "predictions.jsonl").read_text().splitlines()]
                for t in ("one", "two"))
    assert [p["id"] for p in two] == [0, 1, 2]
    for a, b in zip(one, two):
        assert a["prediction"] == b["prediction"] and a["scores"] == b["scores"]
        assert a["cache"]["seen_tokens"] == b["cache"]["seen_tokens"]
        assert a["cache"]["kept_tokens"] == b["cache"]["kept_tokens"] < a["cache"]["seen_tokens"]
        assert b["stats"]["batch_size"] == 2 and a["stats"]["new_tokens"] == b["stats"]["new_tokens"]
    m = json.loads((tmp_path / "two" / d / "metrics.json").read_text())
    assert m["stats"]["batch_size"] == 2 and "niah_single_1: string_match_all" in err
    with pytest.raises(SystemExit):
        run_eval(tmp_path / "bad", "--tasks", "ppl", "--batch_size", "2")
    assert "--batch_size 1" in capsys.readouterr().err


def test_compile_prefill_equals_eager(tmp_path):
    """--compile_prefill compiles the prompt step without fullgraph: heavy_hitter compresses a prompt longer than
    its budget on the host (SnapKV), which a fullgraph prefill cannot trace. Multiple-choice scoring runs through
    that prefill; compiled and eager log-probabilities agree."""
    from tests.test_tp import save_checkpoint

    folder = save_checkpoint(tmp_path / "tiny", ModelArgs(name="tiny-eval", vocab_size=320, n_layer=2, n_head=4,
                                                           n_local_heads=2, dim=64, intermediate_size=128,
                                                           block_size=512))
    args = ["--checkpoint_path", str(folder / "model.pth"), "--tasks", "gsm8k_mc", "--data_dir", str(FIXTURES),
            "--cache_strategy", "heavy_hitter", "--max_cache_length", "64", "--observation_window", "8"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile_prefill"])):
        torch._dynamo.reset()
        run_eval(tmp_path / name, *args, *extra)
        preds = next((tmp_path / name).rglob("predictions.jsonl"))
        runs[name] = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [p["prompt_tokens"] for p in runs["eager"]] == [p["prompt_tokens"] for p in runs["compiled"]]
    assert min(p["prompt_tokens"] for p in runs["eager"]) > 64  # the prompts were compressed
    for a, b in zip(runs["eager"], runs["compiled"]):
        assert a["prediction"] == b["prediction"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
