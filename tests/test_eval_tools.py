"""parallelize_evals.py (dry run, a real CPU run of 2 tiny commands, resume), compare_strategies.py (table, plot,
markdown update) and visualize_eviction.py (heat map from a real run's cache.pos)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import compare_strategies as cs
import visualize_eviction as ve

REPO = Path(__file__).resolve().parent.parent


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# parallelize_evals.py
# ---------------------------------------------------------------------------------------------------------------
def test_dry_run_cartesian_assigns_gpus(tmp_path):
    r = run("parallelize_evals.py", "--configs", "l2", "lsh", "--tasks", "niah_single_2", "vt", "--cache_sizes", "0.5",
            "0.25", "--add_full", "--eval_args", "--num_samples 5 --seq_length 512", "--num_gpus", "3", "--dry_run",
            "--state_dir", tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    assert len(lines) == 2 * (1 + 2 * 2)  # per task: full + 2 configs x 2 sizes
    assert lines[0].startswith("[gpu 0] CUDA_VISIBLE_DEVICES=0 ") and "--cache_strategy full --tasks niah_single_2" in lines[0]
    assert lines[1].startswith("[gpu 1] CUDA_VISIBLE_DEVICES=1 ") and "--cache_config l2 --max_cache_length 0.5" in lines[1]
    assert lines[3].startswith("[gpu 0] ")  # round robin over 3 GPUs
    assert all("--num_samples 5 --seq_length 512" in x for x in lines)
    assert not (tmp_path / "done").exists()  # a dry run writes nothing


def test_dry_run_command_file_and_errors(tmp_path):
    f = tmp_path / "cmds.txt"
    f.write_text("# comment\n\npython eval.py --cache_config l2 --tasks cwe\npython eval.py --cache_strategy full --tasks cwe\n")
    r = run("parallelize_evals.py", "--command_file", f, "--num_gpus", "0", "--workers", "2", "--dry_run",
            "--state_dir", tmp_path)
    assert r.returncode == 0
    assert r.stdout.splitlines()[1:] == [
        "[cpu worker 0] CUDA_VISIBLE_DEVICES= python eval.py --cache_config l2 --tasks cwe",
        "[cpu worker 1] CUDA_VISIBLE_DEVICES= python eval.py --cache_strategy full --tasks cwe"]
    r = run("parallelize_evals.py", "--configs", "nonexistent_policy", "--tasks", "vt", "--cache_sizes", "0.5",
            "--dry_run", "--num_gpus", "0")
    assert r.returncode != 0 and "unknown config" in r.stderr
    r = run("parallelize_evals.py", "--num_gpus", "0", "--dry_run")
    assert r.returncode != 0 and r.stderr.startswith("error:")


def test_real_cpu_run_resumes(tmp_path, smol_dir):
    out = tmp_path / "results"
    common = f"--tasks niah_single_1 --seq_length 128 --num_samples 1 --max_new_tokens 2 --no_progress --out_dir {out}"
    f = tmp_path / "cmds.txt"
    f.write_text(f"python eval.py --cache_strategy full {common}\n"
                 f"python eval.py --cache_strategy recent_global --max_cache_length 0.5 {common}\n")
    state = tmp_path / "state"
    r = run("parallelize_evals.py", "--command_file", f, "--num_gpus", "0", "--workers", "2", "--state_dir", state)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ran ok, 0 failed, 0 skipped" in r.stdout
    assert len(list((state / "done").glob("*.json"))) == 2
    assert sorted(p.name for p in (state / "logs").iterdir()) == ["worker0.log", "worker1.log"]
    assert (state / ".lock").exists()
    logs = "".join(p.read_text() for p in (state / "logs").iterdir())
    assert logs.count("=== exit 0") == 2 and "--num_threads 1" not in logs  # the flag is added, not logged
    metrics = sorted(out.rglob("metrics.json"))
    assert [m.parent.parent.name for m in metrics] == ["full", "recent_global__max_cache_length=0.5"]
    r = run("parallelize_evals.py", "--command_file", f, "--num_gpus", "0", "--workers", "2", "--state_dir", state)
    assert r.returncode == 0 and "0 ran ok, 0 failed, 2 skipped" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# compare_strategies.py
# ---------------------------------------------------------------------------------------------------------------
def fake_metrics(root: Path, config: str, task: str, score: float, kept: float, primary="string_match_all",
                 ci=None):
    d = root / "SmolLM2-135M-Instruct" / config / f"{task}-len384-gen32-n10"
    d.mkdir(parents=True)
    m = {"task": task, "config": config, "model": "SmolLM2-135M-Instruct", "score": score, "primary": primary,
         "higher_is_better": primary != "ppl", "metrics": {primary: score},
         "stats": {"compression_ratio": kept, "kv_cache_bytes": int(kept * 2**20 * 18),
                   "layer_kv_budget": [int(416 * kept)] * 30, "max_seq_length": 416, "decode_tokens_per_s": 10.0}}
    if ci:
        m["score_ci95"] = ci
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def fake_results(tmp_path):
    root = tmp_path / "results"
    fake_metrics(root, "full", "niah_single_2", 100.0, 1.0)
    fake_metrics(root, "full", "ppl", 9.5, 1.0, primary="ppl")
    for cfg, s50, s25 in (("l2", 60.0, 20.0), ("heavy_hitter", 90.0, 70.0)):
        fake_metrics(root, f"{cfg}__max_cache_length=0.5", "niah_single_2", s50, 0.5,
                     ci=[26.2, 87.8] if cfg == "l2" else None)
        fake_metrics(root, f"{cfg}__max_cache_length=0.25", "niah_single_2", s25, 0.25)
        fake_metrics(root, f"{cfg}__max_cache_length=0.5", "ppl", 11.0, 0.5, primary="ppl")
    fake_metrics(root, "merge_pyramid__initial_local_window=101", "niah_single_2", 40.0, 0.45)
    return root


def test_compare_table_and_plot(fake_results, tmp_path):
    rows = cs.load([fake_results])
    labels = cs.strategy_labels(rows)
    assert labels["l2__max_cache_length=0.5"] == "l2" and labels["merge_pyramid__initial_local_window=101"] == "merge_pyramid"
    t = cs.table(rows)
    lines = t.strip().splitlines()
    assert lines[0].startswith("| model | strategy | slots per layer | niah_single_2 (string_match_all) | ppl (ppl")
    assert lines[2].split(" | ")[1] == "full"  # full first, then strategies by name and budget
    assert "| heavy_hitter | 208/416 (50%) | 90.0 (50% kept) | 11.00 (50% kept) |" in t
    assert "| l2 | 104/416 (25%) | 20.0 (25% kept) |  |" in t
    png = tmp_path / "plot.png"
    md = tmp_path / "doc.md"
    assert "| l2 | 208/416 (50%) | 60.0 [26-88] (50% kept) |" in t  # the run's 95% interval, where it has one
    md.write_text(f"# Results\n\nintro\n\n{cs.MARK_BEGIN}\nold table\n{cs.MARK_END}\n\nanalysis\n")
    assert cs.main([str(fake_results), "--out_png", str(png), "--update_md", str(md)]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    doc = md.read_text()
    assert "old table" not in doc and "| heavy_hitter |" in doc and doc.endswith("analysis\n")
    assert doc.startswith("# Results\n\nintro\n\n")


def test_compare_errors(tmp_path, capsys):
    for args, needle in (([str(tmp_path / "missing")], "no such results folder"),
                         ([str(tmp_path)], "no usable metrics.json")):
        with pytest.raises(SystemExit) as e:
            cs.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# visualize_eviction.py
# ---------------------------------------------------------------------------------------------------------------
def test_visualize_recent_global_from_real_cache(tmp_path, smol_dir):
    png, js = tmp_path / "ev.png", tmp_path / "ev.json"
    assert ve.main(["--cache_strategy", "recent_global", "--max_cache_length", "40", "--task", "niah_single_1",
                    "--seq_length", "128", "--max_new_tokens", "3", "--out", str(png), "--save_json", str(js)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    d = json.loads(js.read_text())
    seen = d["seen"]
    assert len(d["rows"]) == 30 and d["sink"] == 4 and d["needles"]
    # StreamingLLM keeps the 4 sinks and the newest 36 positions in every layer
    expected = list(range(4)) + list(range(seen - 36, seen))
    assert all(k == expected for k in d["kept"])


def test_visualize_per_head_and_error(tmp_path, smol_dir):
    png, js = tmp_path / "h.png", tmp_path / "h.json"
    assert ve.main(["--cache_strategy", "l2", "--max_cache_length", "32", "--prompt",
                    "The quick brown fox jumps over the lazy dog. " * 6, "--max_new_tokens", "2", "--per_head",
                    "--out", str(png), "--save_json", str(js)]) == 0
    d = json.loads(js.read_text())
    assert len(d["rows"]) == 90 and d["rows"][1] == "L0.h1"
    assert all(len(k) == 32 for k in d["kept"])  # each KV head keeps its own 32 positions
    with pytest.raises(SystemExit) as e:
        ve.main(["--cache_strategy", "nope", "--out", str(png)])
    assert e.value.code == 2


def test_significance_table_pairs_samples(tmp_path):
    """Two configurations at one budget and full, 12 shared samples: a right on 10 where b fails -> McNemar p =
    2 / 2^10 against the best; full and a differ on no sample -> 1."""
    root = tmp_path / "results"
    per_sample = {"full": [1] * 10 + [0] * 2, "a__max_cache_length=0.5": [1] * 10 + [0] * 2,
                  "b__max_cache_length=0.5": [0] * 10 + [0] * 2}
    for cfg, xs in per_sample.items():
        fake_metrics(root, cfg, "niah_single_2", 100 * sum(xs) / len(xs), 1.0 if cfg == "full" else 0.5)
        d = next((root / "SmolLM2-135M-Instruct" / cfg).iterdir())
        (d / "predictions.jsonl").write_text("".join(json.dumps({"id": i, "scores": {"string_match_all": x}}) + "\n"
                                                     for i, x in enumerate(xs)))
    md = tmp_path / "sig.md"
    assert cs.main([str(root), "--significance", str(md), "--out_md", str(tmp_path / "t.md")]) == 0
    rows = {line.split(" | ")[2]: line for line in md.read_text().splitlines()[2:]}
    assert set(rows) == {"a", "b"}
    assert rows["a"].endswith("|  | 1 |")  # the best itself; no difference from full
    assert rows["b"].endswith(f"| {2 / 1024:.3g} | {2 / 1024:.3g} |")
