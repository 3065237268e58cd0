"""scripts/compare_kvpress.py's naming and agreement report, in the main environment (no kvpress, no model)."""
import importlib.util
import json
from pathlib import Path

import pytest

from cli import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ck():
    spec = importlib.util.spec_from_file_location("compare_kvpress", REPO / "scripts" / "compare_kvpress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_press_names_and_config_folders(ck):
    assert ck.canonical_press("SnapKV") == "snapkv"
    assert ck.canonical_press("adakv_keydiff") == ck.canonical_press("AdaKV(KeyDiff)") == "adakv(keydiff)"
    assert ck.canonical_press("full") == "none"
    assert ck.config_name("snapkv", 0.5) == "kvpress-snapkv__compression_ratio=0.5"
    assert ck.config_name("criticalkv(snapkv)", 0.25) == "kvpress-criticalkv_snapkv__compression_ratio=0.25"
    assert ck.config_name("none", 0.0) == "kvpress-full"
    assert ck.config_name("snapkv", 0.5, {"window_size": 16}, question_agnostic=True) == \
        "kvpress-snapkv__compression_ratio=0.5__window_size=16__question_agnostic"
    assert ck.parse_press_opts(["window_size=16", "n_sink=4.0"]) == {"window_size": 16, "n_sink": 4.0}
    for bad in ("foo", "adakv(bar)", "snapkv(keydiff)"):
        with pytest.raises(UserError):
            ck.canonical_press(bad)


def test_engine_twins(ck):
    hh = {"cache_strategy": ["heavy_hitter"], "keep_set": "topk", "prompt_compression_strategy": None,
          "compression_ratio": 0.5}
    assert ck.engine_matches("snapkv", 0.5, hh) and not ck.engine_matches("snapkv", 0.75, hh)
    assert not ck.engine_matches("criticalkv(snapkv)", 0.5, hh)
    assert ck.engine_matches("criticalkv(snapkv)", 0.5, {**hh, "keep_set": "criticalkv"})
    assert ck.engine_matches("kvzip", 0.5, {**hh, "cache_strategy": ["l2"], "prompt_compression_strategy": "kvzip"})
    assert ck.engine_matches("none", 0.0, {"cache_strategy": ["full"]})
    assert not ck.engine_matches("knorm", 0.5, {**hh, "compression_ratio": None})


def _write(cfg: Path, task_dir: str, preds: list, args: dict):
    d = cfg / task_dir
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps(args))
    (d / "metrics.json").write_text(json.dumps({"primary": "string_match_all", "score": 0.0}))
    lines = []
    for i, (pred, score, tokens) in enumerate(preds):
        lines.append(json.dumps({"id": i, "prompt_tokens": tokens, "prediction": pred, "references": ["7"],
                                 "scores": {"string_match_all": score}, "meta": {"k": i}}))
    (d / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_agreement_pairs_and_shares(ck, tmp_path, capsys):
    model = tmp_path / "SmolLM2-135M-Instruct"
    eng_args = {"args": {"cache_strategy": ["recent_global"], "keep_set": "topk", "prompt_compression_strategy": None,
                         "compression_ratio": 0.5}}
    _write(model / "recent_global__compression_ratio=0.5", "niah_single_2-len512-gen128-n3",
           [("a 7", 1.0, 500), ("b", 0.0, 501), ("c 7", 1.0, 502)], eng_args)
    _write(model / "heavy_hitter__compression_ratio=0.5", "niah_single_2-len512-gen128-n3",
           [("a 7", 1.0, 500)], {"args": {**eng_args["args"], "cache_strategy": ["heavy_hitter"]}})
    kv = model / "kvpress-streaming_llm__compression_ratio=0.5"
    _write(kv, "niah_single_2-len512-gen128-n4", [("a 7", 1.0, 500), ("c", 0.0, 501), ("c 7!", 1.0, 502),
                                                  ("d", 0.0, 503)],
           {"kvpress": {"press": "streaming_llm", "compression_ratio": 0.5, "question_agnostic": False}})
    _write(model / "kvpress-snapkv__compression_ratio=0.5", "niah_single_2-len1024-gen128-n1", [("a", 0.0, 9)],
           {"kvpress": {"press": "snapkv", "compression_ratio": 0.5, "question_agnostic": False}})
    pairs = ck.auto_pairs(model)
    assert [(e.name, k.name, p) for e, k, p in pairs] == [
        ("heavy_hitter__compression_ratio=0.5", "kvpress-snapkv__compression_ratio=0.5", "snapkv"),
        ("recent_global__compression_ratio=0.5", kv.name, "streaming_llm")]
    (row,) = ck.agreement(model / "recent_global__compression_ratio=0.5", kv)
    assert row["task"] == "niah_single_2-len512-gen128" and row["n"] == 3 and row["mismatched_prompts"] == 0
    assert row["same_prediction"] == pytest.approx(1 / 3) and row["same_score"] == pytest.approx(1.0)
    assert row["engine_score"] == pytest.approx(200 / 3)
    assert ck.agreement(model / "heavy_hitter__compression_ratio=0.5",
                        model / "kvpress-snapkv__compression_ratio=0.5") == []  # another length: nothing in common
    assert ck.run_agreement([model]) == 0
    out = capsys.readouterr().out
    assert "| streaming_llm ~ recent_global | niah_single_2-len512-gen128 |" in out and "| 33% | 100% |" in out
    # a prompt that differs (another tokenizer, another seed) is not compared
    _write(model / "x", "niah_single_2-len512-gen128-n1", [("a 7", 1.0, 499)], eng_args)
    (row,) = ck.agreement(model / "x", kv)
    assert row["n"] == 0 and row["mismatched_prompts"] == 1


def test_agreement_bad_input_is_one_line(ck, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ck.main(["--agreement", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --agreement")


def test_question_agnostic_configs_pair_only_with_each_other(ck, tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct"
    args = {"cache_strategy": ["keydiff"], "keep_set": "topk", "prompt_compression_strategy": None,
            "compression_ratio": 0.5}
    for agnostic in (False, True):
        suffix = "__question_agnostic" if agnostic else ""
        _write(model / f"keydiff__compression_ratio=0.5{suffix}", "niah_single_2-len512-gen16-n1", [("a", 1.0, 5)],
               {"args": args, "question_agnostic": agnostic})
        _write(model / f"kvpress-keydiff__compression_ratio=0.5{suffix}", "niah_single_2-len512-gen16-n1",
               [("a", 1.0, 5)], {"kvpress": {"press": "keydiff", "compression_ratio": 0.5,
                                             "question_agnostic": agnostic}})
    pairs = sorted((e.name, k.name) for e, k, _ in ck.auto_pairs(model))
    assert pairs == [("keydiff__compression_ratio=0.5", "kvpress-keydiff__compression_ratio=0.5"),
                     ("keydiff__compression_ratio=0.5__question_agnostic",
                      "kvpress-keydiff__compression_ratio=0.5__question_agnostic")]
