"""leaderboard.py: every configuration filled from one recorded prefill gives the tokens of a plain run of that
configuration (generate.generate; the question-agnostic case: the context prefilled, then the question as one
multi-token decode call), and it writes eval.py's files."""
import json
from pathlib import Path

import pytest
import torch

import compare_strategies
import eval as ev
import generate as gen
import leaderboard
import policies
import tasks as T
from tests.conftest import run_cli

CONFIGS = ["keydiff", "heavy_hitter", "adakv_keydiff", "kvzip", "recent_global"]
ARGS = ["--tasks", "niah_single_2", "--seq_length", "256", "--num_samples", "2", "--max_new_tokens", "6",
        "--compression_ratio", "0.5", "--setting", "both", "--no_progress"]


@pytest.fixture(scope="module")
def board(tmp_path_factory, smol_dir):
    out = tmp_path_factory.mktemp("board")
    leaderboard.main([*ARGS, "--cache_config", "full", *CONFIGS, "--out_dir", str(out)])
    return out / smol_dir.name


def records(folder: Path) -> list:
    (task_dir,) = folder.iterdir()
    return [json.loads(x) for x in (task_dir / "predictions.jsonl").read_text().splitlines()]


def plain_run(model, tokenizer, name, ids, cut, gen_len):
    cfg = policies.read_config(name)
    policies.setup(model, cfg, compression_ratio=0.5, budget_scope="prompt", prompt_len=cut,
                   max_seq_length=len(ids) + gen_len, tokenizer=tokenizer, max_cache_length=None)
    eos = set(tokenizer.eos_ids) | set(model.config.eos_ids)
    if cut == len(ids):
        return gen.generate(model, ids, gen_len, eos_ids=eos)[0]
    for c in model.caches:
        c.reset()
    with torch.no_grad():
        gen.prefill_chunks(model, ids[:cut], gen.prefill, 0, {})
        logits = model(torch.tensor([ids[cut:]]), torch.arange(cut, len(ids)))  # the question in one call
        tokens = [int(logits[0, -1].argmax())]
        while len(tokens) < gen_len and tokens[-1] not in eos:
            tokens.append(int(gen.decode_one_token(model, torch.tensor([[tokens[-1]]]),
                                                   torch.tensor([len(ids) + len(tokens) - 1]))))
    return tokens


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("agnostic", [False, True], ids=["aware", "agnostic"])
def test_shared_prefill_equals_a_plain_run(board, smol_model, smol_tokenizer, name, agnostic):
    (folder,) = [d for d in board.iterdir() if d.name.startswith(name + "__")
                 and d.name.endswith("__question_agnostic") == agnostic]
    recs = records(folder)
    samples = T.get_task("niah_single_2").build(T.PromptEncoder(smol_tokenizer, True), 256, 2, 0, None)
    assert [r["id"] for r in recs] == [0, 1]
    for s, r in zip(samples, recs):
        ids = T.PromptEncoder(smol_tokenizer, True)(s["input"], s.get("answer_prefix", ""))
        cut = T.question_start(s, T.PromptEncoder(smol_tokenizer, True), ids) if agnostic else len(ids)
        tokens = plain_run(smol_model, smol_tokenizer, name, ids, cut, 6)
        text = smol_tokenizer.decode(tokens[:-1] if tokens[-1] in smol_tokenizer.eos_ids else tokens)
        assert r["prediction"] == text
        assert r["stats"]["context_tokens"] == cut


def test_folders_are_eval_py_folders_with_intervals(board):
    names = sorted(d.name for d in board.iterdir())
    assert len(names) == 1 + 2 * len(CONFIGS)  # full once; each config aware and agnostic
    m = json.loads(next((board / "full").iterdir()).joinpath("metrics.json").read_text())
    assert m["num_samples"] == 2 and len(m["score_ci95"]) == 2
    cfg_dirs = [d for d in names if d.startswith("keydiff__") and "agnostic" not in d]
    p, dests = ev.build_parser()
    a = policies.parse_args(p, ["--cache_config", "keydiff", "--compression_ratio", "0.5", "--budget_scope", "prompt"])
    assert cfg_dirs == [ev.config_name(a, {x.dest: x.default for x in ev.build_parser()[0]._actions}, dests)]


def test_compare_strategies_reads_every_configuration(board):
    rows = compare_strategies.load([board], skipped=[])
    assert len(rows) == 1 + 2 * len(CONFIGS)
    assert "50% of the prompt" in compare_strategies.table(rows)


def test_a_second_run_skips_finished_configurations(board):
    r = run_cli("leaderboard.py", *ARGS, "--cache_config", "full", *CONFIGS, "--out_dir", str(board.parent))
    assert r.returncode == 0 and "every configuration is finished" in r.stderr


@pytest.mark.parametrize("flags,words", [
    (["--setting", "agnostic", "--tasks", "gsm8k"], "question-agnostic"),
    (["--temperature", "0.5"], "greedily"),
    (["--compile_prefill"], "greedily"),
    (["--cache_config", "nope"], "unknown --cache_config"),
])
def test_bad_input_is_one_line(tmp_path, flags, words):
    r = run_cli("leaderboard.py", "--num_samples", "1", "--seq_length", "256", *flags, "--out_dir", str(tmp_path))
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
