"""GPU checks that the CPU test suite cannot make: every policy's decode step under CUDA graphs (torch.compile
mode "reduce-overhead") against eager, batched decoding compiled, and the int8 / int4 CUDA kernels against the
dequantized matmul. Random weights of a tiny model: no checkpoint is needed. Prints one line per check and a
summary; exit 1 if any check fails.

    python scripts/gpu_check.py                 # on cuda (the default when present)
    python scripts/gpu_check.py --device cpu    # the same checks without CUDA graphs (to try the script)
"""
import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import generate  # noqa: E402
import policies  # noqa: E402
import quantize  # noqa: E402
import runtime  # noqa: E402
from model import ModelArgs, random_model  # noqa: E402

PROMPT, NEW = 40, 24
FLAGS = dict(max_cache_length=24, global_tokens=2, recent_window=4, observation_window=4, lsh_dim=8,
             sink_tokens=2, recent_tokens=8, initial_local_window=8, span=2, start_size=1)


def tiny(n_layer, device, dtype, seed=0):
    cfg = ModelArgs(vocab_size=256, n_layer=n_layer, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                    block_size=512)
    m = random_model(cfg, device, dtype, seed=seed)
    with torch.no_grad():
        m.output.weight.mul_(20)
    return m


def kept(model):
    return [c.pos.clone() for c in model.caches]


def check_policies_compiled(device, dtype, results):
    """Every policy, one layer each (and the keep-set rules on two more), compiled vs eager: tokens and positions."""
    names = sorted(policies.POLICIES)
    for extra, group in (({}, names), ({"keep_set": "adakv"}, ["l2", "keydiff"]),
                         ({"keep_set": "criticalkv"}, ["heavy_hitter", "expected_attention"]),
                         ({"cache_bits": 8}, ["recent_global", "keydiff", "tova"])):
        m = tiny(len(group), device, dtype)
        prompt = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
        flags = {k: v for k, v in FLAGS.items() if k in policies.option_names()}
        policies.setup(m, cache_strategy=group, cache_strategy_pattern="repeat", max_seq_length=PROMPT + NEW,
                       prompt_len=PROMPT, **flags, **extra)
        eager, _ = generate.generate(m, prompt, NEW)
        want = kept(m)
        torch._dynamo.reset()
        step = runtime.compile_decode(runtime.decode_one_token, device)
        generate.generate(m, prompt, 3, decode_fn=step)  # warm-up (CUDA graphs record on a later call)
        t = time.perf_counter()
        compiled, _ = generate.generate(m, prompt, NEW, decode_fn=step)
        same = compiled == eager and all(torch.equal(a, b) for a, b in zip(want, kept(m)))
        results.append((f"compiled decode == eager {extra or ''} {','.join(group)}", same,
                        f"{(time.perf_counter() - t) * 1e3:.0f} ms"))


def check_batch_compiled(device, dtype, results):
    names = ["recent_global", "heavy_hitter", "keydiff"]
    m = tiny(len(names), device, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 41, 25, 37)]
    policies.setup(m, cache_strategy=names, cache_strategy_pattern="repeat", max_seq_length=41 + NEW, batch_size=4,
                   prompt_len=41, max_cache_length=24, global_tokens=2, recent_window=4, observation_window=4)
    eager, _ = generate.generate_batch(m, prompts, NEW)
    torch._dynamo.reset()
    step = runtime.compile_decode(runtime.decode_one_token, device)
    generate.generate_batch(m, prompts, 3, decode_fn=step)
    compiled, _ = generate.generate_batch(m, prompts, NEW, decode_fn=step)
    results.append(("batched decode (4 sequences) compiled == eager", compiled == eager, ""))
    # --dynamic_batch: one symbolic graph (CUDA graphs recorded per batch size) for batches of 4 and then 3
    torch._dynamo.reset()
    step = runtime.compile_decode(runtime.decode_one_token, device, any_batch=True)
    same = True
    for batch in (4, 3):
        policies.setup(m, cache_strategy=names, cache_strategy_pattern="repeat", max_seq_length=41 + NEW,
                       batch_size=batch, prompt_len=41, max_cache_length=24, global_tokens=2, recent_window=4,
                       observation_window=4)
        eager, _ = generate.generate_batch(m, prompts[:batch], NEW)
        generate.generate_batch(m, prompts[:batch], 3, decode_fn=step)
        compiled, _ = generate.generate_batch(m, prompts[:batch], NEW, decode_fn=step)
        same = same and compiled == eager
    results.append(("--dynamic_batch decode (4 then 3 sequences) compiled == eager", same, ""))


def check_quantized(device, dtype, results):
    """The quantized kernels run and stay near full precision (random weights: int4's bound is loose; the load-time
    probe in quantize.py compares each kernel with its dequantized matmul exactly)."""
    for fmt, bound in (("int8", 0.05), ("int4.g32", 0.3)):
        m = tiny(2, device, dtype, seed=4)
        x = torch.randint(0, 256, (1, 16), device=device)
        policies.setup(m, max_seq_length=16)
        with torch.no_grad():
            ref = m(x, torch.arange(16, device=device), prefill=True)
            quantize.quantize_model(m, quantize.parse_mode(fmt))
            policies.setup(m, max_seq_length=16)
            out = m(x, torch.arange(16, device=device), prefill=True)
        err = float((out - ref).abs().max() / ref.abs().max())
        results.append((f"{fmt} logits within {bound:.0%} of full precision ({quantize.describe(m)})", err < bound,
                        f"max rel err {err:.4f}"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype) if a.device.startswith("cuda") else torch.float32
    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu'}), "
          f"torch {torch.__version__}, dtype {dtype}", flush=True)
    results = []
    for check in (check_policies_compiled, check_batch_compiled, check_quantized):
        t = time.perf_counter()
        try:
            check(a.device, dtype, results)
        except Exception as e:  # report and go on: one failing check must not hide the others
            results.append((check.__name__, False, f"{type(e).__name__}: {e}"))
        print(f"[{check.__name__}: {time.perf_counter() - t:.0f} s]", flush=True)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
