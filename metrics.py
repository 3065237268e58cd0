"""Scoring functions for eval.py, each a plain function of (prediction, references) -> float in [0, 1].

- RULER's string match (`string_match_all`, `string_match_part`): every / any reference as a case-insensitive
  substring of the prediction (RULER scripts/eval/synthetic/constants.py; reported x100 there, as fractions here).
- LongBench's QA F1 (`qa_f1`): SQuAD-style normalisation (lower case, no punctuation, no articles), token-level
  F1, the best over the references (LongBench metrics.py `qa_f1_score`, max over answers as in its eval.py).
- ROUGE-L (`rouge_l`): F1 of the longest common subsequence of word tokens (Lin 2004 with beta = 1, as Google's
  `rouge_score` computes it: lower-cased, non-alphanumerics as separators, no stemming). LongBench calls the
  `rouge` package, whose "rouge-l" is a summary-level variant (sentences split on ".", unique-word unions);
  on one-sentence answers without repeated words the two agree.
- GSM8K numeric answers (`gsm8k_exact_match`): the gold is the number after "####"; the prediction's answer is
  the number after "The answer is" / "####" when present, else its last number (lm-eval's "flexible extract").
- Multiple choice by log-likelihood (`mc_accuracy`): argmax of the summed log-probabilities (lm-eval `acc`) and
  of the log-probabilities per character of the continuation (lm-eval `acc_norm`).
- A 95% confidence interval for a task's mean score (`mean_interval`), from scipy.stats.
"""
import math
import re
import string
from collections import Counter

import numpy as np
import scipy.stats

def mean_interval(scores: list, level: float = 0.95) -> tuple:
    """A `level` confidence interval, in percent, for the mean of per-sample scores in [0, 1]: Wilson's score
    interval when every score is 0 or 1 (it stays informative at 0% and 100%, where resampling collapses to a
    point: 10/10 gives 72-100%), else a percentile bootstrap of the mean (2,000 resamples, a fixed seed, so the
    same records give the same interval)."""
    n = len(scores)
    if all(x in (0, 1) for x in scores):
        ci = scipy.stats.binomtest(int(sum(scores)), n).proportion_ci(level, method="wilson")
    elif len(set(scores)) == 1:
        return 100.0 * scores[0], 100.0 * scores[0]
    else:
        ci = scipy.stats.bootstrap((np.asarray(scores, dtype=float),), np.mean, confidence_level=level,
                                   n_resamples=2000, method="percentile", rng=0).confidence_interval
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def paired_p_value(a: list, b: list) -> float:
    """Two-sided p-value of the hypothesis that two methods scored on the same samples (a[i], b[i]: sample i) do
    equally well: McNemar's exact test when every score is 0 or 1 (only the samples where exactly one of the two
    is right count: a binomial test of how they split), else the Wilcoxon signed-rank test. 1.0 when the two never
    differ. Pairing removes the spread between samples, so it finds differences the two intervals overlap on."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b) if x != y]
    if not diffs:
        return 1.0
    if all(x in (0, 1) for x in (*a, *b)):
        return float(scipy.stats.binomtest(sum(d > 0 for d in diffs), len(diffs), 0.5).pvalue)
    return float(scipy.stats.wilcoxon(diffs).pvalue)


_NONPRINTABLE = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(pred: str) -> str:
    """RULER strips non-printable characters from the prediction before matching."""
    return _NONPRINTABLE.sub("\n", pred).strip()


def string_match_all(pred: str, refs: list) -> float:
    """Fraction of the references found (case-insensitive substring) in the prediction."""
    if not refs:
        raise ValueError("string_match_all needs at least one reference")
    p = ruler_postprocess(pred).lower()
    return sum(1.0 for r in refs if str(r).lower() in p) / len(refs)


def string_match_part(pred: str, refs: list) -> float:
    """1 if any reference is in the prediction (RULER's QA tasks)."""
    p = ruler_postprocess(pred).lower()
    return float(any(str(r).lower() in p for r in refs))


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD / LongBench)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred_tokens: list, ref_tokens: list) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(pred: str, refs: list) -> float:
    """LongBench qa_f1_score, the best over the references."""
    p = normalize_answer(pred).split()
    return max(token_f1(p, normalize_answer(r).split()) for r in refs)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_tokens(text: str) -> list:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(pred: str, refs: list) -> float:
    """ROUGE-L F1 (LCS of word tokens), the best over the references; 0 when either side is empty."""
    p = rouge_tokens(pred)
    best = 0.0
    for r in refs:
        t = rouge_tokens(r)
        if not p or not t:
            continue
        lcs = lcs_length(p, t)
        if lcs:
            precision, recall = lcs / len(p), lcs / len(t)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def _clean_number(s: str):
    s = s.replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return None
    return x


def gsm8k_gold(answer: str):
    """The number after '####' in a GSM8K reference solution."""
    if "####" not in answer:
        return _clean_number(answer.strip())
    return _clean_number(answer.split("####")[-1].strip())


def gsm8k_extract(pred: str):
    """The model's final number: after 'The answer is' or '####' when present, else the last number."""
    for marker in (r"answer is[:\s]*", r"####\s*"):
        m = list(re.finditer(marker + r"(" + _NUMBER.pattern + r")", pred, flags=re.IGNORECASE))
        if m:
            return _clean_number(m[-1].group(1))
    nums = _NUMBER.findall(pred)
    return _clean_number(nums[-1]) if nums else None


def gsm8k_exact_match(pred: str, refs: list) -> float:
    gold = gsm8k_gold(refs[0])
    got = gsm8k_extract(pred)
    return float(gold is not None and got is not None and math.isclose(got, gold, rel_tol=0, abs_tol=1e-6))


def exact_match(pred: str, refs: list) -> float:
    """Normalised exact match against any reference."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(r) for r in refs))


def mc_accuracy(logprobs: list, choices: list, gold: int) -> dict:
    """lm-eval's acc (argmax of summed log-probabilities) and acc_norm (per character of the continuation)."""
    acc = float(max(range(len(logprobs)), key=lambda i: logprobs[i]) == gold)
    norm = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    acc_norm = float(max(range(len(norm)), key=lambda i: norm[i]) == gold)
    return {"accuracy": acc, "accuracy_norm": acc_norm}


# Text metrics by name: eval.py scores each prediction with the metrics its task lists.
TEXT_METRICS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "gsm8k_exact_match": gsm8k_exact_match,
    "exact_match": exact_match,
}


def llm_judge(question: str, pred: str, refs: list, model: str = "gpt-4o-mini", timeout: float = 60.0):
    """GPT-as-a-judge (the LSH-E seed's GPT4-Judge): 1 if the judge says the answer matches the reference.

    Returns None (metric skipped) when no OPENAI_API_KEY is set. Uses the HTTP API directly (no SDK)."""
    import json
    import os
    import urllib.request

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        return None
    prompt = (f"Question: {question}\nReference answer: {refs[0]}\nCandidate answer: {pred}\n\n"
              "Is the candidate answer correct with respect to the reference? Reply with one word: yes or no.")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0})
    req = urllib.request.Request(os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1") + "/chat/completions",
                                 data=body.encode(), headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())["choices"][0]["message"]["content"]
    return float(reply.strip().lower().startswith("yes"))
