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

The model's context window bounds the run: more than block_size tokens are refused (the positions past it were
never trained), except when every layer streams StreamingLLM-style, rotating keys by their rank in a cache of at
most block_size slots (--position_mode cache, lacache's default), which is what streaming perplexity measures.
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import json
import math
import signal
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


def check_context(a, cfg, n_eval: int):
    """n_eval tokens fit the model's window, or every layer streams by cache rank within it (see the docstring);
    checked on caches built on the meta device, so nothing is allocated and no flag is read twice."""
    if n_eval <= cfg.block_size:
        return
    caches = policies.build_caches(policies.settings(a), cfg.n_layer, cfg.n_local_heads, cfg.head_dim, 1, n_eval,
                                   torch.float32, "meta", prompt_len=1, n_heads=cfg.n_head)
    if all(c.position_mode == "cache" and c.kv_budget <= cfg.block_size for c in caches):
        return
    raise UserError(f"--num_eval_tokens {n_eval} runs past the model's context of {cfg.block_size} tokens (positions "
                    f"it was never trained on); lower it, or stream with caches of at most {cfg.block_size} slots "
                    "that rotate keys by their rank (--position_mode cache, as lacache does by default)")


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
    cli.check_at_least(a, num_eval_tokens=2)
    if a.cache_size is not None:
        if any(x == "--max_cache_length" or x.startswith("--max_cache_length=") for x in argv):
            raise UserError("--cache_size is the seed's name for --max_cache_length; give only one of them")
        cli.check_at_least(a, cache_size=1)
        a.max_cache_length = [float(a.cache_size)]
    if any(c < 1 for c in a.ppl_checkpoints):
        raise UserError(f"--ppl_checkpoints must be >= 1, got {a.ppl_checkpoints}")
    cli.check_at_least(a, num_threads=1)
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    text = read_text(a.text)
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    cfg = cli.model_config(weights)
    tokenizer = get_tokenizer(weights.parent)
    ids = tokenizer.encode(text)
    if len(ids) < 3:
        raise UserError(f"the text has {len(ids)} tokens; at least 3 are needed")
    n_eval = min(a.num_eval_tokens, len(ids) - 1)
    if n_eval < a.num_eval_tokens:
        print(f"note: the text has {len(ids)} tokens; scoring {n_eval} instead of {a.num_eval_tokens}",
              file=sys.stderr)
    ids = ids[:n_eval + 1]
    check_context(a, cfg, n_eval)  # before the model loads and the caches are allocated
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
        print(json.dumps(record), flush=True)  # flushed here: a closed pipe is reported by cli.run_main
    else:
        print(f"perplexity over {n_eval} tokens: {math.exp(mean):.4f} (mean NLL {mean:.4f}); cache "
              f"{'+'.join(a.cache_strategy)}, slots per layer {budgets[0] if len(budgets) == 1 else budgets}, "
              f"kept {stats['kept_tokens']:.0f}/{stats['seen_tokens']} tokens; {n_eval / seconds:.1f} tokens/s", flush=True)
    return record


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    main()
