"""Driver of tests/test_tp.py: runs several cases in one launch, under `torchrun --nproc_per_node K` (gloo on CPU) or
in one process (run_cases), and saves what each rank computed.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_driver.py SPEC.json OUT

SPEC.json: {"checkpoint": folder, "prompt": [ids], "new_tokens": n, "cases": [{"name", "weights" (model.pth |
model_int8.pth), "int8_cpu_kernel" (optional, default true), "cache": [cache flags, as on generate.py's command
line], "sampling" (optional: sampling.sample's temperature / top_k / top_p, with tp.shared_seed's seed; greedy
without)}]}. Each rank writes OUT.rank{r}.pt: per
case the tokens, the logits of every step (prefill's last position, then each decode step), every layer's cached
positions [1, Hkv / K, C] (this rank's KV heads) and the cache statistics summed over the ranks (tp.reduce_stats).
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: tests/ is on sys.path, the engine is one level up
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import cache as kvcache  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402
import tp  # noqa: E402
import quantize  # noqa: E402
from quantize import load_model  # noqa: E402
from sampling import sample  # noqa: E402


def cache_args(argv: list):
    p = argparse.ArgumentParser()
    policies.add_cache_args(p)
    return policies.parse_args(p, [str(x) for x in argv])


def run_case(model, prompt: list, new_tokens: int, cache_argv: list, sampling: dict) -> dict:
    max_seq = len(prompt) + new_tokens
    policies.setup(model, cache_args(cache_argv), batch_size=1, prompt_len=len(prompt), max_seq_length=max_seq)
    logits = []

    def pick(out):  # out: [1, T, vocab] -> the next token, keeping the last position's logits
        logits.append(out[:, -1].clone())
        return sample(out[:, -1], **sampling)

    tokens, _ = generate.generate(model, prompt, new_tokens,
                                  prefill_fn=lambda m, x, pos, **_: pick(m(x, pos, prefill=True)),
                                  decode_fn=lambda m, cur, pos, **_: pick(m(cur, pos)))
    return {"tokens": tokens, "logits": torch.cat(logits), "positions": [c.pos.clone() for c in model.caches],
            "kv_heads": [c.pos.shape[1] for c in model.caches],
            "stats": tp.reduce_stats(kvcache.cache_stats(model))}


def run_cases(spec: dict, d=None) -> dict:
    """Every case of spec on this process's model (sharded over the ranks when d, a tp.Dist, is given)."""
    folder = Path(spec["checkpoint"])
    models, results = {}, {}
    for case in spec["cases"]:
        w = case.get("weights", "model.pth")
        if w not in models:
            models[w] = tp.load_sharded(folder / w, d, torch.float32) if d else load_model(folder / w, "cpu",
                                                                                          torch.float32)
        sampling = case.get("sampling", {})
        seed = (tp.shared_seed(None) if d else 0) if sampling else None  # generate.py's rule: one seed, all ranks
        if seed is not None:
            torch.manual_seed(seed)
        # "int8_cpu_kernel": false -> the dequantize-and-matmul path, so sharded and single runs differ only in
        # fp32 summation order (the kernel rounds each rank's partial product to bf16 before the all-reduce)
        kernel_rows = quantize.CPU_KERNEL_MAX_ROWS
        quantize.CPU_KERNEL_MAX_ROWS = kernel_rows if case.get("int8_cpu_kernel", True) else 0
        try:
            results[case["name"]] = {**run_case(models[w], spec["prompt"], spec["new_tokens"], case["cache"],
                                                sampling), "seed": seed}
        finally:
            quantize.CPU_KERNEL_MAX_ROWS = kernel_rows
    return results


def main():
    spec_path, out = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    d = tp.maybe_init_distributed("cpu")
    results = run_cases(spec, d)
    rank = d.rank if d else 0
    torch.save({"rank": rank, "world": d.world if d else 1, "results": results}, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
