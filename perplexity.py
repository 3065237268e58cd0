"""Streaming perplexity, as the LaCache seed's run.py (StreamingLLM's eval loop), for any cache strategy.

    python perplexity.py --cache_strategy lacache --max_cache_length 256 --span 16 --overlap 0 --num_eval_tokens 1024
    python perplexity.py --cache_strategy lacache --cache_size 256 --span 8 --overlap 4 --text book.txt --compile
    python perplexity.py --num_eval_tokens 1024                      # full cache, the baseline

A long text is fed one token at a time from position 0 (the first token by a 1-token prefill, every later one
through the same decode step generate.py compiles), so the cache evicts exactly as it would while decoding.
The negative log-likelihood of each next token is accumulated; perplexity = exp(mean NLL) is printed at the
--ppl_checkpoints token counts and at the end (--json: one JSON record instead).

Default text: the prose of Python's own documentation topics (pydoc_data.topics, in sorted key order), so the
run needs no download. --cache_size N is the seed's spelling of --max_cache_length N (an absolute slot count).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cache as kvcache
import cli
import policies
import quantize
import runtime
from cli import UserError
from tokenizer import get_tokenizer


def default_text() -> str:
    """Python's documentation topics, concatenated deterministically (offline, ~460k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path) -> str:
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --text {path}: {e.strerror if isinstance(e, OSError) else e}")


def nll_step(model, cur: torch.Tensor, input_pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One decode step; returns the NLL [B] of target [B] under the next-token distribution."""
    logits = model(cur, input_pos)[:, -1]
    return F.cross_entropy(logits.float(), target, reduction="none")


@torch.no_grad()
def streaming_nll(model, ids: list, step_fn=nll_step, checkpoints=(), report=None) -> torch.Tensor:
    """NLL of ids[1:], feeding ids[:-1] one token at a time through the model's (already set up) caches.

    report(count, ppl) is called when count NLLs are in, for each count in checkpoints.
    Returns the NLLs [len(ids) - 1] (fp32, on the model's device)."""
    device = model.tok_embeddings.weight.device
    for c in model.caches:
        c.reset()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    n = len(ids) - 1
    nll = torch.empty(n, device=device)
    logits = model(x[:, :1], torch.arange(1, device=device), prefill=True)[:, -1]
    nll[0] = F.cross_entropy(logits.float(), x[:, 1])
    marks = set(checkpoints)
    for i in range(1, n):
        # clone: a CUDA graph (reduce-overhead) reuses its output buffer
        nll[i] = step_fn(model, x[:, i:i + 1], torch.tensor([i], device=device), x[:, i + 1]).clone()[0]
        if report and i + 1 in marks:
            report(i + 1, math.exp(float(nll[:i + 1].mean())))
    return nll


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("perplexity")
    g.add_argument("--text", default=None, help="UTF-8 text file to score (default: pydoc_data.topics prose)")
    g.add_argument("--num_eval_tokens", type=int, default=1024, help="next-token predictions scored (>= 2)")
    g.add_argument("--cache_size", type=int, default=None,
                   help="the seed's flag: slots per layer, same as an absolute --max_cache_length")
    g.add_argument("--ppl_checkpoints", type=int, nargs="*", default=[500, 1000, 2000],
                   help="also report perplexity after this many tokens")
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    cli.add_model_args(p)
    policies.add_cache_args(p)
    return p


def main(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    cli.run_main(lambda: run(policies.parse_args(p, argv), argv))


def run(a, argv):
    if a.num_eval_tokens < 2:
        raise UserError(f"--num_eval_tokens must be >= 2, got {a.num_eval_tokens}")
    if a.cache_size is not None:
        if any(x == "--max_cache_length" or x.startswith("--max_cache_length=") for x in argv):
            raise UserError("--cache_size is the seed's name for --max_cache_length; give only one of them")
        if a.cache_size < 1:
            raise UserError(f"--cache_size must be >= 1, got {a.cache_size}")
        a.max_cache_length = [float(a.cache_size)]
    if any(c < 1 for c in a.ppl_checkpoints):
        raise UserError(f"--ppl_checkpoints must be >= 1, got {a.ppl_checkpoints}")
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    text = read_text(a.text)
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    tokenizer = get_tokenizer(weights.parent)
    ids = tokenizer.encode(text)
    if len(ids) < 3:
        raise UserError(f"the text has {len(ids)} tokens; at least 3 are needed")
    n_eval = min(a.num_eval_tokens, len(ids) - 1)
    if n_eval < a.num_eval_tokens:
        print(f"note: the text has {len(ids)} tokens; scoring {n_eval} instead of {a.num_eval_tokens}",
              file=sys.stderr)
    ids = ids[:n_eval + 1]
    model = quantize.load_model(weights, device, dtype)
    policies.setup(model, a, batch_size=1, prompt_len=1, max_seq_length=n_eval, tokenizer=tokenizer)
    step = runtime.compile_decode(nll_step, device) if a.compile else nll_step
    marks = {}

    def report(count, ppl):
        marks[count] = ppl
        if not a.json:
            print(f"tokens {count}: perplexity {ppl:.4f}", flush=True)

    t0 = time.perf_counter()
    nll = streaming_nll(model, ids, step, [c for c in a.ppl_checkpoints if c < n_eval], report)
    mean = float(nll.mean())
    seconds = time.perf_counter() - t0
    marks[n_eval] = math.exp(mean)
    stats = kvcache.cache_stats(model)
    budgets = sorted({layer["kv_budget"] for layer in stats["layers"]})
    record = {
        "model": model.config.name or str(weights.parent.name), "text": a.text or "pydoc_data.topics",
        "num_eval_tokens": n_eval, "cache_strategy": a.cache_strategy, "max_cache_length": a.max_cache_length,
        "kv_budget_slots": budgets, "perplexity": math.exp(mean), "mean_nll": mean,
        "checkpoints": {str(k): v for k, v in sorted(marks.items())},
        "kept_tokens": stats["kept_tokens"], "kv_cache_bytes": stats["kv_cache_bytes"],
        "seconds": seconds, "tokens_per_s": n_eval / seconds, "compiled": bool(a.compile),
        "device": device, "dtype": str(dtype).split(".")[-1],
    }
    if a.json:
        print(json.dumps(record))
    else:
        print(f"perplexity over {n_eval} tokens: {math.exp(mean):.4f} (mean NLL {mean:.4f}); cache "
              f"{'+'.join(a.cache_strategy)}, slots per layer {budgets[0] if len(budgets) == 1 else budgets}, "
              f"kept {stats['kept_tokens']:.0f}/{stats['seen_tokens']} tokens; {n_eval / seconds:.1f} tokens/s")
    return record


if __name__ == "__main__":
    main()
