"""Decode benchmark: time to first token, decode tokens/s, memory, KV-cache bytes and achieved memory bandwidth,
for a sweep of cache strategies x budgets x context lengths x weight formats; optionally side by side with
transformers on the same weights in the same process.

    python benchmark.py                                  # CPU: SmolLM2-135M-Instruct, 256-token context, eager
    python benchmark.py --compile --compare_hf           # + transformers (eager on CPU), runs interleaved
    python benchmark.py --random_weights --model Meta-Llama-3-8B --compile --compare_hf \\
        --context_lengths 1024 --weights base int8 int4.g128         # GPU: no checkpoint needed

Measurement (per configuration): torch._dynamo is reset, the caches are built (cache.setup) and the decode
step compiled (generate.compile_fns); one short warm-up generation triggers compilation (its wall time is
reported as warmup_s, and less its eager prefill as compile_s, apart from the speed figures); then --warmup_runs
untimed and --num_runs timed generations of --max_new_tokens tokens each (EOS ignored, greedy, a fixed random
prompt of the context length).
Time to first token and decode tokens/s are medians over the timed runs. With --compare_hf every round runs
ours, then each transformers mode, so background load hits both sides alike; the ratio is ours / transformers
(of the medians; the median of the per-round ratios is reported too).

Bandwidth: bytes read per decode step (one token per sequence; the table's "MB read/step") = weight bytes (every
linear's weights and scales, norms, one embedding row unless the head is tied to it) + the bytes of all KV-cache
buffers (a static cache is read whole every step: K/V for every slot, masked or not, positions and policy state).
achieved = bytes per step x steps/s, compared
with the device-to-device copy bandwidth measured in the same process before and after the sweep (a copy of N
bytes moves 2N: read + write; the larger of the two medians is used, so the ratio errs low).

Outputs: --out PREFIX writes PREFIX.json (every run's numbers and the environment) and PREFIX.md (the table).
--profile DIR writes a torch.profiler chrome trace (and a top-ops table) of one generation per configuration.
Both are written atomically (a temporary file, then a rename), and their folder is checked for writing before
the sweep starts. Context length + new tokens must fit the model's context window (block_size).
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import copy
import datetime
import gc
import json
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path

import torch

import cache as kvcache
import cli
import generate as gen
import policies
import quantize
import runtime
from cli import UserError
from model import PRESETS, ModelArgs, random_model
from quantize import load_model

REPO = Path(__file__).resolve().parent
HF_MODES = ("dynamic", "static", "static+compile")


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------
def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all parameters and weight buffers (quantized linears' codes and
    scales), except the embedding table, of which one row is read (unless the output head is tied to it)."""
    emb = model.tok_embeddings.weight
    tied = getattr(model.output, "weight", None) is emb
    total, seen = 0, set()
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if ".kv_cache." not in n and not n.startswith("rope_")]
    for name, t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        if t is emb and not tied:
            total += emb.shape[1] * emb.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """Bytes of every cache buffer (K/V or their quantized codes and scales, positions, policy state)."""
    return sum(c.nbytes() for c in model.caches)


def achieved_bandwidth(bytes_per_token: float, tokens_per_s: float) -> float:
    return bytes_per_token * tokens_per_s


def copy_bandwidth(device: str, nbytes: int = None, repeats: int = 10) -> dict:
    """Device-to-device copy bandwidth in bytes/s (read + write: 2 * nbytes per copy), median of `repeats`."""
    cuda = device.startswith("cuda")
    nbytes = nbytes or (1 << 30 if cuda else 1 << 28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inner = 10 if cuda else 2
    for _ in range(2):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        sync()
        times.append((time.perf_counter() - t) / inner)
    del src, dst
    med = statistics.median(times)
    return {"bytes": nbytes, "median_s": med, "bytes_per_s": 2 * nbytes / med, "best_bytes_per_s": 2 * nbytes / min(times)}


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------
def git_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    sha = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(dirty) if dirty is not None else None}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


# ---------------------------------------------------------------------------------------------------------------
# transformers, on the same weights (views of ours: no second copy)
# ---------------------------------------------------------------------------------------------------------------
def build_hf_model(model, max_len: int = 0):
    """An HF LlamaForCausalLM (Qwen2ForCausalLM for qwen2) from our config, its weights views of ours."""
    import transformers
    from torch import nn

    cfg = model.config
    w = model.tok_embeddings.weight
    major = int(transformers.__version__.split(".")[0])
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_local_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=max(cfg.block_size, max_len), rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu")
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if major >= 5:
        common["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_base}
    else:
        common.update(rope_theta=cfg.rope_base, rope_scaling=scaling)
    if cfg.arch == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:  # llama and mistral: the same computation without a sliding window (the engine has none either)
        config = transformers.LlamaConfig(**common, attention_bias=cfg.attention_bias, mlp_bias=False)
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = cls(config)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(w.device)  # real inv_freq buffers

    def put(module, name, tensor):
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))

    put(hf.model.embed_tokens, "weight", model.tok_embeddings.weight)
    put(hf.model.norm, "weight", model.norm.weight)
    put(hf.lm_head, "weight", model.output.weight)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_local_heads * cfg.head_dim
    for ours, theirs in zip(model.layers, hf.model.layers):
        a, t = ours.attention, theirs.self_attn
        for i, (name, lo, hi) in enumerate((("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))):
            put(getattr(t, name), "weight", a.wqkv.weight[lo:hi])
            if cfg.attention_bias:
                put(getattr(t, name), "bias", a.wqkv.bias[lo:hi])
        put(t.o_proj, "weight", a.wo.weight)
        f, m = ours.feed_forward, theirs.mlp
        put(m.gate_proj, "weight", f.w1.weight)
        put(m.up_proj, "weight", f.w3.weight)
        put(m.down_proj, "weight", f.w2.weight)
        put(theirs.input_layernorm, "weight", ours.attention_norm.weight)
        put(theirs.post_attention_layernorm, "weight", ours.ffn_norm.weight)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model has tensors not copied from ours: {left[:4]}")
    hf.generation_config.pad_token_id = None
    return hf.eval()


class HFRunner:
    """transformers' forward in the same greedy loop as generate.generate (one host sync per token)."""

    def __init__(self, hf, mode: str, device: str, max_len: int):
        import transformers

        self.hf, self.mode, self.device, self.max_len = hf, mode, device, max_len
        self.legacy = int(transformers.__version__.split(".")[0]) < 5  # 4.x takes cache_position
        self.cache = None
        if mode != "dynamic":
            self.cache = transformers.StaticCache(config=hf.config, max_cache_len=max_len)
        step = self._step
        if mode == "static+compile":
            step = runtime.compile_decode(self._step, device)
        self.step = step

    def _forward(self, ids, pos, cache, **kw):
        extra = {"cache_position": pos} if self.legacy else {}
        return self.hf(input_ids=ids, position_ids=pos[None], past_key_values=cache, use_cache=True, **extra,
                       **kw).logits

    def _step(self, cur, pos, cache):
        return self._forward(cur, pos, cache)[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, prompt: list, max_new_tokens: int):
        import transformers

        device = torch.device(self.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        cache = self.cache
        if cache is None:
            try:
                cache = transformers.DynamicCache(config=self.hf.config)
            except TypeError:  # transformers 4.x
                cache = transformers.DynamicCache()
        else:
            cache.reset()
        t0 = time.perf_counter()
        x = torch.tensor([prompt], dtype=torch.long, device=device)
        logits = self._forward(x, torch.arange(len(prompt), device=device), cache, logits_to_keep=1)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(nxt)]
        t_first = time.perf_counter()
        pos = torch.tensor([len(prompt)], dtype=torch.long, device=device)
        while len(tokens) < max_new_tokens:
            nxt = self.step(nxt, pos, cache).clone()
            pos += 1
            tokens.append(int(nxt))
        sync()
        t_end = time.perf_counter()
        steps = len(tokens) - 1
        return tokens, {"time_to_first_token_s": t_first - t0,
                        "decode_tokens_per_s": steps / (t_end - t_first) if steps else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p, batches=True)
    p.add_argument("--random_weights", action="store_true",
                   help="no checkpoint: random weights of --model's shape (timings are valid: same bytes per token)")
    p.add_argument("--model", default=None,
                   help=f"with --random_weights: a preset ({', '.join(PRESETS)}) or a config.json path "
                        f"(default SmolLM2-135M)")
    p.add_argument("--strategies", nargs="+", default=["full"],
                   help=f"cache policies to sweep (one per run, all layers): {', '.join(policies.POLICIES)}")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5],
                   help="slots per layer for non-full strategies: a fraction (<= 1) of context + new tokens, or "
                        "a token count (like --max_cache_length); full always holds everything")
    p.add_argument("--context_lengths", nargs="+", type=int, default=None,
                   help="prompt tokens before decoding (default: 256 on CPU, 1024 on GPU)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="decoded tokens per run (default 64 CPU, 200 GPU)")
    p.add_argument("--weights", nargs="+", default=None,
                   help="weight formats: base (the checkpoint / --dtype), int8, int4 (= int4.g128), int4.gN "
                        "(N = 32/64/128/256); a checkpoint's model_<format>.pth is used when present, else the "
                        "model is quantized in memory")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1],
                   help="sequences decoded together (different random prompts of the context length, one batched "
                        "cache per layer); decode tok/s then counts all sequences")
    p.add_argument("--num_runs", type=int, default=5, help="timed runs per configuration (medians reported)")
    p.add_argument("--warmup_runs", type=int, default=1, help="untimed runs after the compile warm-up")
    p.add_argument("--compare_hf", action="store_true",
                   help="also run transformers on the same weights, prompt and lengths, interleaved (base weights)")
    p.add_argument("--hf_modes", nargs="+", default=None,
                   help=f"transformers variants: {', '.join(HF_MODES)} (default: static+compile on GPU; "
                        f"dynamic and static, i.e. eager, on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random prompt (and random weights) seed")
    p.add_argument("--inductor_tuning", choices=["auto", "on", "off"], default="auto",
                   help="torch._inductor.config.coordinate_descent_tuning, as gpt-fast sets it (auto: on for CUDA); "
                        "process-wide, so transformers' compiled step gets it too")
    p.add_argument("--out", type=Path, default=REPO / "results" / "benchmark", help="writes OUT.json and OUT.md")
    p.add_argument("--profile", type=Path, default=None,
                   help="folder for a torch.profiler trace (chrome JSON) of one generation per configuration")
    policies.add_cache_args(p)
    return p


def check_args(a, device):
    unknown = [s for s in a.strategies if s not in policies.POLICIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; allowed: {', '.join(policies.POLICIES)}")
    if a.random_weights and a.checkpoint_path is not None:
        raise UserError("--random_weights and --checkpoint_path exclude each other")
    if a.model is not None and not a.random_weights:
        raise UserError("--model picks the shape for --random_weights (use --checkpoint_path for real weights)")
    if any(b <= 0 for b in a.budgets):
        raise UserError(f"--budgets must be > 0, got {a.budgets}")
    if a.context_lengths is not None and any(c < 1 for c in a.context_lengths):
        raise UserError(f"--context_lengths must be >= 1, got {a.context_lengths}")
    if a.max_new_tokens is not None and a.max_new_tokens < 2:
        raise UserError(f"--max_new_tokens must be >= 2 (decode speed needs a decode step), got {a.max_new_tokens}")
    if any(n < 1 for n in a.batch_sizes):
        raise UserError(f"--batch_sizes must be >= 1, got {a.batch_sizes}")
    cli.check_compile_flags(a, max(a.batch_sizes))
    if a.num_runs < 1 or a.warmup_runs < 0:
        raise UserError("--num_runs must be >= 1 and --warmup_runs >= 0")
    cuda = device.startswith("cuda")
    a.context_lengths = a.context_lengths or [1024 if cuda else 256]
    a.max_new_tokens = a.max_new_tokens or (200 if cuda else 64)
    a.hf_modes = a.hf_modes or (["static+compile"] if cuda else ["dynamic", "static"])
    bad = [m for m in a.hf_modes if m not in HF_MODES]
    if bad:
        raise UserError(f"unknown --hf_modes {bad[0]!r}; allowed: {', '.join(HF_MODES)}")
    formats = []
    for w in a.weights or ["base"]:
        formats.append(w if w == "base" else quantize.format_name(quantize.parse_mode(w)))
    a.weights = list(dict.fromkeys(formats))
    if a.compare_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--compare_hf needs transformers (pip install -r requirements-dev.txt)") from None


def model_args(a) -> ModelArgs:
    name = a.model or "SmolLM2-135M"
    if name in PRESETS:
        return ModelArgs.from_name(name)
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return ModelArgs.from_json(path)
    raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)} (or a config.json path)")


class Models:
    """Builds the model for each weight format in turn (one in memory at a time)."""

    def __init__(self, a, device, dtype):
        self.a, self.device, self.dtype = a, device, dtype
        self.weights = None if a.random_weights else cli.resolve_checkpoint(a.checkpoint_path)
        self.args = model_args(a) if a.random_weights else ModelArgs.from_json(self.weights.parent / "config.json")

    def get(self, fmt: str):
        a = self.a
        if a.random_weights:
            model = random_model(self.args, self.device, self.dtype, seed=a.seed)
            source = f"random weights ({self.args.name or a.model})"
            if fmt != "base":
                quantize.quantize_model(model, fmt)
                source += ", quantized in memory"
        else:
            path = self.weights if fmt == "base" else self.weights.parent / f"model_{fmt}.pth"
            if path.exists():
                model = load_model(path, self.device, self.dtype)
                source = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
            else:
                model = load_model(self.weights, self.device, self.dtype)
                quantize.quantize_model(model, fmt)
                source = f"{self.weights.name} quantized in memory (no {path.name})"
            loaded = getattr(model, "quantization", None)
            if fmt == "base" and loaded:  # --checkpoint_path is itself a quantized file
                fmt = quantize.format_name(loaded)
        return model, fmt, source


def prompt_ids(vocab: int, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def configurations(a):
    for ctx in a.context_lengths:
        for s in a.strategies:
            for b in ([None] if s == "full" else a.budgets):
                for n in a.batch_sizes:
                    yield s, b, ctx, n


def cache_namespace(a, strategy, budget):
    ns = copy.copy(a)
    ns.cache_strategy, ns.max_cache_length = [strategy], [budget if budget is not None else 1.0]
    return ns


def validate_configurations(a, cfg: ModelArgs):
    """Builds every configuration's caches on the meta device first: a bad flag fails before any timing."""
    for strategy, budget, ctx, _ in configurations(a):
        try:
            policies.build_caches(policies.settings(cache_namespace(a, strategy, budget)), cfg.n_layer, cfg.n_local_heads, cfg.head_dim,
                                 1, ctx + a.max_new_tokens, torch.float32, "meta", prompt_len=ctx)
        except ValueError as e:
            raise UserError(f"{strategy} budget {budget_label(budget)} context {ctx}: {e}") from None


def budget_label(b):
    if b is None:
        return "all"
    return f"{b:g}" if b <= 1 else str(int(b))


def run_config(model, fmt, source, strategy, budget, ctx, a, device, hf=None, batch=1):
    cfg = model.config
    ns = cache_namespace(a, strategy, budget)
    new = a.max_new_tokens
    max_seq = ctx + new
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    policies.setup(model, ns, batch_size=batch, prompt_len=ctx, max_seq_length=max_seq)
    prefill_fn, decode_fn = runtime.compile_fns(device, a.compile, a.compile_prefill, a.dynamic_batch)
    prompt = prompt_ids(cfg.vocab_size, ctx, a.seed)
    prompts = [prompt] + [prompt_ids(cfg.vocab_size, ctx, a.seed + 1000 + b) for b in range(1, batch)]
    sync = lambda: runtime.synchronize(device)  # noqa: E731

    def ours(n):
        """(sequence 0's tokens, stats); decode_steps_per_s: steps per second (= tokens/s for one sequence)."""
        if batch == 1:
            toks, st = gen.generate(model, prompt, n, prefill_fn=prefill_fn, decode_fn=decode_fn,
                                    feed_long_prompts=ns.feed_long_prompts, prefill_chunk=ns.prefill_chunk)
            return toks, {**st, "decode_steps_per_s": st["decode_tokens_per_s"]}
        toks, st = gen.generate_batch(model, prompts, n, prefill_fn=prefill_fn, decode_fn=decode_fn,
                                      prefill_chunk=ns.prefill_chunk, feed_long_prompts=ns.feed_long_prompts)
        return toks[0], st

    label = f"{fmt} {strategy} budget={budget_label(budget)} ctx={ctx}" + (f" batch={batch}" if batch > 1 else "")
    print(f"[{label}] warm-up{' (compiling)' if a.compile or a.compile_prefill else ''} ...", file=sys.stderr,
          flush=True)
    t = time.perf_counter()
    _, warm = ours(min(8, new))
    sync()
    warmup_s = time.perf_counter() - t
    # the decode step's compile: the warm-up less its (eager) prefill, which grows with the batch and is no compile
    compile_s = warmup_s if a.compile_prefill else warmup_s - warm["time_to_first_token_s"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ours(new)  # peak memory of our run alone (before this configuration's transformers cache exists)
    peak = runtime.peak_memory_bytes(device)
    stats = kvcache.cache_stats(model)
    kv_read = kv_bytes_per_token(model)
    runners, hf_compile_s, hf_errors = {}, {}, {}
    if hf is not None and fmt == "base" and batch == 1:
        for mode in a.hf_modes:
            t = time.perf_counter()
            try:
                r = HFRunner(hf, mode, device, max_seq)
                r.generate(prompt, min(8, new))
                sync()
            except Exception as e:  # keep our numbers; say why transformers has none
                hf_errors[mode] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                print(f"[{label}] transformers {mode} failed: {hf_errors[mode]}", file=sys.stderr, flush=True)
                continue
            hf_compile_s[mode] = time.perf_counter() - t
            runners[mode] = r
    rec = {"ours": {"ttft": [], "tps": [], "tokens": None}, **{m: {"ttft": [], "tps": [], "tokens": None}
                                                                 for m in runners}}
    steps_per_s = []
    for i in range(a.warmup_runs + a.num_runs):
        timed = i >= a.warmup_runs
        toks, st = ours(new)
        if timed:
            rec["ours"]["ttft"].append(st["time_to_first_token_s"])
            rec["ours"]["tps"].append(st["decode_tokens_per_s"])
            rec["ours"]["tokens"] = toks
            steps_per_s.append(st["decode_steps_per_s"])
        for mode, r in runners.items():
            htoks, hst = r.generate(prompt, new)
            if timed:
                rec[mode]["ttft"].append(hst["time_to_first_token_s"])
                rec[mode]["tps"].append(hst["decode_tokens_per_s"])
                rec[mode]["tokens"] = htoks
        if timed:
            print(f"[{label}] run {i - a.warmup_runs + 1}/{a.num_runs}: {rec['ours']['tps'][-1]:.1f} tok/s"
                  + "".join(f", transformers {m} {rec[m]['tps'][-1]:.1f}" for m in runners), file=sys.stderr,
                  flush=True)
    tps = median(rec["ours"]["tps"])
    w_read = weight_bytes_per_token(model)
    result = {
        "model": cfg.name, "weights": fmt, "weights_source": source, "dtype": str(model.norm.weight.dtype)[6:],
        "weights_kernel": quantize.describe(model), "strategy": strategy,
        "budget": budget_label(budget), "kv_budget_slots": [c.kv_budget for c in model.caches],
        "context": ctx, "new_tokens": new, "max_seq_length": max_seq,
        "beyond_trained_context": max_seq > cfg.block_size, "compiled": bool(a.compile),
        "compiled_prefill": bool(a.compile_prefill), "warmup_s": warmup_s,
        "compile_s": compile_s if a.compile or a.compile_prefill else None,
        "time_to_first_token_s": median(rec["ours"]["ttft"]), "decode_tokens_per_s": tps,
        "time_to_first_token_s_runs": rec["ours"]["ttft"], "decode_tokens_per_s_runs": rec["ours"]["tps"],
        "peak_memory_bytes": peak, "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda")
        else "process peak RSS (ru_maxrss, whole process so far)",
        "kv_cache_bytes": stats["kv_cache_bytes"], "full_kv_cache_bytes": stats["full_kv_cache_bytes"],
        "kept_tokens": stats["kept_tokens"], "weight_bytes_per_token": w_read, "kv_bytes_per_token": kv_read,
        "batch_size": batch, "decode_steps_per_s": median(steps_per_s),
        # a step reads the weights once and every cache buffer of the batch once
        "achieved_bandwidth_bytes_per_s": achieved_bandwidth(w_read + kv_read, median(steps_per_s)),
        "hf": {},
    }
    for mode in runners:
        h = rec[mode]
        same = sum(1 for _ in iter_prefix(rec["ours"]["tokens"], h["tokens"]))
        result["hf"][mode] = {
            "compile_s": hf_compile_s[mode], "time_to_first_token_s": median(h["ttft"]),
            "decode_tokens_per_s": median(h["tps"]), "time_to_first_token_s_runs": h["ttft"],
            "decode_tokens_per_s_runs": h["tps"],
            "speedup": tps / median(h["tps"]),
            "speedup_per_round_median": median([o / t for o, t in zip(rec["ours"]["tps"], h["tps"])]),
            "greedy_prefix_match": same if strategy == "full" else None,
        }
    for mode, err in hf_errors.items():
        result["hf"][mode] = {"error": err}
    if a.profile is not None:
        result["profile"] = profile_run(ours, runners, prompt, new, a.profile, label, device)
    return result


def iter_prefix(a, b):
    for x, y in zip(a or [], b or []):
        if x != y:
            return
        yield x


def profile_run(ours, runners, prompt, new, folder: Path, label: str, device: str) -> list:
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    written = []
    stem = label.replace(" ", "_").replace("=", "")
    for name, fn in [("ours", lambda: ours(min(new, 32)))] + \
            [(f"hf-{m}", (lambda r=r: r.generate(prompt, min(new, 32)))) for m, r in runners.items()]:
        with profile(activities=acts) as prof:
            fn()
            runtime.synchronize(device)
        path = folder / f"trace_{stem}_{name.replace('+', '_')}.json"
        prof.export_chrome_trace(str(path))
        sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        cli.atomic_write_text(path.with_suffix(".txt"), prof.key_averages().table(sort_by=sort, row_limit=25))
        written.append(str(path))
    return written


def markdown(meta: dict, results: list) -> str:
    bw = meta["copy_bandwidth_bytes_per_s"]
    modes = sorted({m for r in results for m in r["hf"]}, key=HF_MODES.index)
    lines = [
        f"Device: {meta['device']} ({meta['device_kind']}); date {meta['date']}; commit {meta['commit']}"
        + (" (+ uncommitted changes in the tree)" if meta["dirty"] else "")
        + f"; torch {meta['torch']}" + (f"; transformers {meta['transformers']}" if meta.get("transformers") else ""),
        f"Copy bandwidth (device-to-device, read + write): {bw / 1e9:.1f} GB/s "
        f"(before {meta['copy_bandwidth_before']['bytes_per_s'] / 1e9:.1f}, "
        f"after {meta['copy_bandwidth_after']['bytes_per_s'] / 1e9:.1f}); "
        f"{meta['num_runs']} timed runs after {meta['warmup_runs']} warm-up, medians; command: `{meta['command']}`",
        "",
    ]
    head = ["model", "weights", "strategy", "budget", "context", "new", "batch", "compiled", "TTFT ms", "decode tok/s",
            "compile s", "peak MiB", "KV MiB", "MB read/step", "GB/s", "% of copy BW"]
    for m in modes:
        head += [f"HF {m} tok/s", f"ours / HF {m}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        per_tok = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
        row = [r["model"], r["weights"] + (f" ({r['dtype']})" if r["weights"] == "base" else ""), r["strategy"],
               r["budget"], str(r["context"]), str(r["new_tokens"]), str(r["batch_size"]),
               "yes" if r["compiled"] else "no",
               f"{r['time_to_first_token_s'] * 1e3:.1f}", f"{r['decode_tokens_per_s']:.1f}",
               "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
               f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['kv_cache_bytes'] / 2**20:.1f}", f"{per_tok / 1e6:.1f}",
               f"{r['achieved_bandwidth_bytes_per_s'] / 1e9:.2f}",
               f"{100 * r['achieved_bandwidth_bytes_per_s'] / bw:.0f}%"]
        for m in modes:
            h = r["hf"].get(m)
            if h is None or "error" in h:
                row += ["error" if h else "n/a", "n/a"]
                continue
            same = h["greedy_prefix_match"]
            row += [f"{h['decode_tokens_per_s']:.1f}",
                    f"{h['speedup']:.2f}x" + (f" ({same}/{r['new_tokens']} same tokens)" if same is not None else "")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = build_parser()
    cli.run_main(lambda: run(policies.parse_args(p, argv), argv if argv is not None else sys.argv[1:]))


def run(a, argv):
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    check_args(a, device)
    models = Models(a, device, dtype)
    check_context(a, models.args)
    js, mdp = output_paths(a)
    validate_configurations(a, models.args)
    tuning = a.inductor_tuning == "on" or (a.inductor_tuning == "auto" and device.startswith("cuda"))
    if tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    copy_before = copy_bandwidth(device)
    results = []
    for fmt in a.weights:
        model, fmt_used, source = models.get(fmt)
        hf = build_hf_model_for(model, a, fmt_used)
        for strategy, budget, ctx, batch in configurations(a):
            results.append(run_config(model, fmt_used, source, strategy, budget, ctx, a, device, hf, batch))
        del model, hf
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    copy_after = copy_bandwidth(device)
    bw = max(copy_before["bytes_per_s"], copy_after["bytes_per_s"])
    for r in results:
        r["bandwidth_ratio"] = r["achieved_bandwidth_bytes_per_s"] / bw
    try:
        import transformers
        hf_version = transformers.__version__ if a.compare_hf else None
    except ImportError:
        hf_version = None
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **git_commit(),
        "device": device_name(device), "device_kind": device, "torch": torch.__version__,
        "transformers": hf_version, "python": platform.python_version(),
        "command": "python benchmark.py " + " ".join(argv), "num_runs": a.num_runs, "warmup_runs": a.warmup_runs,
        "inductor_coordinate_descent_tuning": tuning,
        "copy_bandwidth_before": copy_before, "copy_bandwidth_after": copy_after, "copy_bandwidth_bytes_per_s": bw,
        "bandwidth_note": "achieved = (weight + KV-cache bytes read per decode token) x decode tokens/s; copy "
                          "bandwidth counts read + write (2 bytes per byte copied)",
    }
    cli.atomic_write_text(js, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = markdown(meta, results)
    cli.atomic_write_text(mdp, md)
    print(md, flush=True)  # flushed here: a closed pipe is reported by cli.run_main, not at exit
    print(f"wrote {js} and {mdp}", file=sys.stderr)


def check_context(a, cfg: ModelArgs):
    """Every context length + new tokens fits the model's window: positions past it were never trained, and a
    sweep there runs for minutes to measure a model outside its range. One line before any work."""
    longest = max(a.context_lengths) + a.max_new_tokens
    if longest > cfg.block_size:
        raise UserError(f"--context_lengths {max(a.context_lengths)} + --max_new_tokens {a.max_new_tokens} = "
                        f"{longest} exceeds the model's context of {cfg.block_size} tokens")


def output_paths(a) -> tuple:
    """OUT.json and OUT.md, checked before the sweep: their folder can be written, neither is a folder."""
    out = Path(a.out)
    js, mdp = Path(f"{out}.json"), Path(f"{out}.md")
    for p in (js, mdp):
        if p.is_dir():
            raise UserError(f"--out {out}: {p} is a folder")
    cli.check_writable(js.parent, "--out")
    if a.profile is not None:
        cli.check_writable(a.profile, "--profile")
    return js, mdp


def build_hf_model_for(model, a, fmt):
    if not a.compare_hf:
        return None
    if fmt != "base":
        print(f"note: --compare_hf skips {fmt} weights (transformers would run other weights)", file=sys.stderr)
        return None
    return build_hf_model(model, max(a.context_lengths) + a.max_new_tokens)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    main()
