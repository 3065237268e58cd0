"""Generate text with a compressed, compiled KV cache.

    python generate.py --prompt "What does the llama say?"            # SmolLM2-135M-Instruct, prepared offline
    python generate.py --cache_strategy lsh --lsh_dim 8 --prompt prompts/long_story.txt --compile
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import cache as kvcache
import cli
import policies
import quantize
import speculative
import tp
from cache import Param
from cli import UserError
from model import Transformer
from runtime import compile_fns, decode_one_token, peak_memory_bytes, prefill, synchronize
from tokenizer import StreamDecoder, get_tokenizer


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, *, eos_ids=(), sampling=None,
             prefill_fn=prefill, decode_fn=decode_one_token, callback=None, feed_long_prompts=False,
             prefill_chunk: int = 0, prefill_len: int = None):
    """Greedy / sampled decoding of one sequence. Returns (new token ids, timing dict).

    feed_long_prompts: a prompt longer than the smallest layer budget is prefilled up to budget - 1 tokens
    and the rest is teacher-forced through the decode step, so the policy evicts as it would while decoding.
    prefill_len: how many prompt tokens are prefilled, the rest fed the same way (overrides feed_long_prompts;
    the leaderboard's question-agnostic setting).
    prefill_chunk: the prompt is prefilled that many tokens at a time, the caches compressing after each chunk.
    """
    sampling = sampling or {}
    device = model.tok_embeddings.weight.device
    for c in model.caches:
        c.reset()
    t0 = time.perf_counter()
    n0 = prefilled_length(model, len(prompt), feed_long_prompts) if prefill_len is None else prefill_len
    nxt = prefill_chunks(model, prompt[:n0], prefill_fn, prefill_chunk, sampling)
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
    synchronize(device)
    t_end = time.perf_counter()
    decode_steps = len(tokens) - 1
    return tokens, {
        "prompt_tokens": len(prompt),
        "new_tokens": len(tokens),
        "time_to_first_token_s": t_first - t0,
        "decode_s": t_end - t_first,
        "decode_tokens_per_s": decode_steps / (t_end - t_first) if decode_steps else 0.0,
    }


def prefilled_length(model, prompt_len: int, feed_long_prompts: bool) -> int:
    """How many prompt tokens are prefilled: all, or with feed_long_prompts at most the smallest layer budget - 1
    (the rest goes through the decode step)."""
    return min(prompt_len, kvcache.prefill_budget(model) - 1) if feed_long_prompts else prompt_len


def prefill_chunks(model, prompt: list, prefill_fn, chunk: int, sampling: dict, row: int = None) -> torch.Tensor:
    """The prompt into the caches, `chunk` tokens at a time (0: at once); returns prefill_fn's result for the last
    prompt position (the first new token, or logits). With the kvzip compressor a prompt longer than the budget is
    prefilled once with its reconstruction after it (the instruction, then the prompt again): the caches score the
    prompt by the reconstruction's attention and keep only the prompt."""
    device = model.tok_embeddings.weight.device
    extension = kvzip_extension(model, len(prompt))
    if extension is not None:
        if chunk:
            raise ValueError("--prefill_chunk and the kvzip compressor (which reads the whole prompt twice) exclude "
                             "each other")
        ids = prompt + extension + prompt
        x = torch.tensor([ids], dtype=torch.long, device=device)
        return prefill_fn(model, x, torch.arange(len(ids), device=device), row=row, context_len=len(prompt),
                          **sampling).clone()
    step = chunk or len(prompt)
    for s in range(0, len(prompt), step):
        x = torch.tensor([prompt[s:s + step]], dtype=torch.long, device=device)
        nxt = prefill_fn(model, x, torch.arange(s, s + x.shape[1], device=device), row=row, **sampling).clone()
    return nxt


def kvzip_extension(model, prompt_len: int):
    """The reconstruction instruction's ids when a layer compresses long prompts with kvzip and this prompt is longer
    than that layer's budget; else None."""
    caches = [c for c in model.caches if c.prompt_compressor == "kvzip"]
    if not caches or prompt_len <= min(c.budget for c in caches):
        return None
    if caches[0].kvzip_instruction is None:
        raise ValueError("the kvzip compressor needs the tokenizer (policies.setup(..., tokenizer=...)) for its "
                         "reconstruction instruction")
    return caches[0].kvzip_instruction


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, eos_ids=(), sampling=None,
                   prefill_fn=prefill, decode_fn=decode_one_token, prefill_chunk: int = 0, feed_long_prompts=False):
    """Decodes len(prompts) sequences together; the caches must be set up for that batch size (cache.setup).
    Each prompt is prefilled alone into its own caches (no padding), then every decode step advances all
    sequences at their own positions. A finished sequence keeps stepping (its tokens are dropped), so the
    compiled step never changes. feed_long_prompts: as generate's, per sequence - a sequence still feeding its
    prompt's tail gets its next prompt token in the step where the others get their last sampled token.
    Returns (one token list per prompt, timing dict; decode_tokens_per_s counts the tokens of all sequences
    generated once every sequence has its first token)."""
    sampling = sampling or {}
    device = model.tok_embeddings.weight.device
    if kvcache.batch_size(model) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for caches set up for a batch of {kvcache.batch_size(model)}")
    for c in model.caches:
        c.reset()
    t0 = time.perf_counter()
    fed = [prefilled_length(model, len(p), feed_long_prompts) for p in prompts]  # prompt tokens in the caches
    first = [prefill_chunks(model, p[:n], prefill_fn, prefill_chunk, sampling, row=b)
             for b, (p, n) in enumerate(zip(prompts, fed))]
    nxt = torch.cat(first, dim=0)  # [B, 1]
    tokens = [[t] if n == len(p) else [] for t, n, p in zip(nxt.view(-1).tolist(), fed, prompts)]
    # A sequence's cache statistics are taken when it finishes (it keeps stepping afterwards).
    done, finished = [False] * len(prompts), [None] * len(prompts)

    def check_done(b):
        done[b] = bool(tokens[b]) and (tokens[b][-1] in eos_ids or len(tokens[b]) >= max_new_tokens)
        if done[b]:
            finished[b] = kvcache.cache_stats(model, b)

    for b in range(len(prompts)):
        check_done(b)
    t_first = time.perf_counter() if all(tokens) else None
    pos = torch.tensor([[n] for n in fed], dtype=torch.long, device=device)  # [B, 1]
    steps = decoded = 0
    while not all(done):
        feeding = [b for b, p in enumerate(prompts) if fed[b] < len(p)]
        if feeding:  # teacher forcing: those sequences' input is their next prompt token
            cur = nxt.view(-1).tolist()
            for b in feeding:
                cur[b] = prompts[b][fed[b]]
                fed[b] += 1
            nxt = torch.tensor(cur, dtype=torch.long, device=device).view(-1, 1)
        nxt = decode_fn(model, nxt, pos, **sampling).clone()
        pos += 1
        steps += t_first is not None
        for b, t in enumerate(nxt.view(-1).tolist()):
            if not done[b] and fed[b] == len(prompts[b]):
                tokens[b].append(t)
                decoded += t_first is not None
                check_done(b)
        if t_first is None and all(tokens):
            t_first = time.perf_counter()
    synchronize(device)
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return tokens, {
        "batch_size": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": [len(t) for t in tokens],
        "time_to_first_token_s": t_first - t0,  # all prompts prefilled (and fed), one after the other
        "decode_s": t_end - t_first,
        "decode_steps": steps,
        "decode_tokens_per_s": decoded / (t_end - t_first) if steps else 0.0,
        "decode_steps_per_s": steps / (t_end - t_first) if steps else 0.0,
        "sequence_cache_stats": finished,
    }


# ---------------------------------------------------------------------------------------------------------------
# Python API (the command line below uses it too)
# ---------------------------------------------------------------------------------------------------------------
def load(checkpoint_path=None, device: str = "auto", dtype="auto"):
    """(model, tokenizer) from a checkpoint (model.pth, a quantized file from quantize.py, or their folder; None:
    the default SmolLM2-135M-Instruct, prepared offline on first use). Set up its caches with policies.setup."""
    device = cli.resolve_device(device)
    dtype = cli.resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    weights = cli.resolve_checkpoint(checkpoint_path)
    return quantize.load_model(weights, device, dtype), get_tokenizer(weights.parent)


def complete(model, tokenizer, prompt, max_new_tokens: int = 200, *, chat: bool = True, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, prefill_fn=prefill, decode_fn=decode_one_token, callback=None,
             feed_long_prompts: bool = False, prefill_chunk: int = 0) -> dict:
    """Decodes one sequence: prompt is text (wrapped in the model's chat template when chat and the model has one)
    or a list of token ids. The caches must be set up (policies.setup) for len(prompt) + max_new_tokens positions.
    Returns {"text", "token_ids", "prompt_token_ids", "stats"} (stats: timings and cache_stats)."""
    ids = prompt if isinstance(prompt, list) else encode_prompt(tokenizer, prompt, chat, model.config.chat_format)
    if not ids:
        raise UserError("the prompt is empty")
    eos = set(tokenizer.eos_ids) | set(model.config.eos_ids)
    tokens, stats = generate(model, ids, max_new_tokens, eos_ids=eos,
                             sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p), prefill_fn=prefill_fn,
                             decode_fn=decode_fn, callback=callback, feed_long_prompts=feed_long_prompts,
                             prefill_chunk=prefill_chunk)
    stats.update(tp.reduce_stats(kvcache.cache_stats(model)))  # under torchrun: summed over the ranks' heads
    text_ids = tokens[:-1] if tokens[-1] in eos else tokens  # the stop token is not part of the text
    return {"text": tokenizer.decode(text_ids), "token_ids": tokens, "prompt_token_ids": ids, "stats": stats}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def read_prompt_file(path) -> str:
    """The text of a --prompt_file (UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror if isinstance(e, OSError) else e}")


def encode_prompt(tokenizer, text: str, chat: bool, chat_format, allow_special: bool = False) -> list:
    """Token ids of a user prompt: wrapped in the model's chat template when chat and the model has one. The text
    stays text: special-token strings in it (e.g. <|im_end|>) are encoded as ordinary characters unless
    allow_special, so a prompt cannot open or close a chat turn."""
    if not text.strip():
        raise UserError("the prompt is empty")
    if chat and chat_format:
        return tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True,
                                     allow_special=allow_special)
    return tokenizer.encode(text, allow_special=allow_special)


class TextStream:
    """Prints the completion as tokens arrive (whole UTF-8 characters only)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.decoder, self.out = StreamDecoder(tokenizer), out

    def __call__(self, token: int):
        self.out.write(self.decoder.put(token))
        self.out.flush()

    def close(self):
        self.out.write(self.decoder.flush())


GENERATION_PARAMS = {  # checked when parsed (policies.add_param_flag), like the cache options
    "batch_size": Param(int, None, "sequences decoded together (default: the number of prompts; the prompts repeat "
                                   "to fill it)", min=1),
    "max_new_tokens": Param(int, 200, "most new tokens per sequence (a stop token ends it earlier)", min=1),
    "max_seq_length": Param(int, None, "longest sequence the caches are sized for (default: the longest prompt + "
                                       "max_new_tokens; at most the model's context)", min=1),
    "num_samples": Param(int, 1, "completions of the same prompt(s), one after the other (different when sampling)",
                         min=1),
    "temperature": Param(float, 0.0, "0 = greedy (default)", min=0),
    "top_k": Param(int, 0, "sample from the k most likely tokens only (0 = off)", min=0),
    "top_p": Param(float, 1.0, "sample from the smallest set of tokens whose probability reaches p (1 = off)",
                   above=0, max=1),
    "speculate_k": Param(int, None, "speculative decoding: draft tokens verified per target forward (default 4)",
                         min=1),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+", default=None,
                   help="the prompt text (always text; for a file use --prompt_file); several prompts are decoded as "
                        "a batch (default: 'Hello, my name is')")
    p.add_argument("--prompt_file", nargs="+", type=Path, default=None,
                   help="read the prompt(s) from UTF-8 text file(s) instead of --prompt")
    for name, param in GENERATION_PARAMS.items():
        policies.add_param_flag(p, name, param, param.default)
    p.add_argument("--seed", type=int, default=None, help="random seed (sampling; default: a fresh one)")
    p.add_argument("--no_chat", action="store_true", help="send the raw prompt, without the chat template")
    p.add_argument("--allow_special_tokens", action="store_true",
                   help="parse special-token strings in the prompt (e.g. <|im_end|>) into their control tokens "
                        "(default: the prompt stays text)")
    p.add_argument("--json", action="store_true", help="print one JSON record (text, ids, statistics) instead")
    p.add_argument("--quiet", action="store_true", help="no progress or statistics on stderr (errors still)")
    cli.add_model_args(p, batches=True)
    p.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="speculative decoding: a draft model (model.pth or its folder; the target's vocabulary), "
                        "given the same cache flags as the target")
    policies.add_cache_args(p)
    return p


def main(argv=None):
    tp.quiet_other_ranks()  # under torchrun only rank 0 prints (tp.py)
    p = build_parser()
    cli.run_main(lambda: run(policies.parse_args(p, argv)))
    tp.finish()  # under torchrun: every rank has finished before the process group goes


def note(a, text: str):
    """A progress or hint line on stderr (none under --json / --quiet)."""
    if not (a.json or a.quiet):
        print(text, file=sys.stderr, flush=True)


def run(a):
    if a.prompt is not None and a.prompt_file is not None:
        raise UserError("give the prompt as --prompt TEXT or --prompt_file PATH, not both")
    texts = [read_prompt_file(f) for f in a.prompt_file] if a.prompt_file else a.prompt or ["Hello, my name is"]
    for t in texts:
        if not t.strip():
            raise UserError("the prompt is empty")
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    cli.model_config(weights)  # a damaged config.json is one line naming it, before anything reads it
    batch = a.batch_size or len(texts)
    if batch < len(texts):
        raise UserError(f"{len(texts)} prompts do not fit --batch_size {batch} (give at most {batch} prompts)")
    cli.check_compile_flags(a, batch)
    speculate = a.draft_checkpoint_path is not None or a.speculate_k is not None
    if speculate:  # speculative decoding (speculative.py): flags checked before anything is loaded
        k = speculative.check_args(a, batch, device)
        draft_weights = cli.resolve_checkpoint(a.draft_checkpoint_path)
    # torchrun --nproc_per_node K: tensor parallelism (tp.py). Each rank holds 1/K of the heads and of the MLP, on
    # cuda:LOCAL_RANK (or cpu); ranks > 0 print nothing; the same seed on every rank keeps sampling in step.
    dist = tp.maybe_init_distributed(a.device, config=weights.parent / "config.json")
    if dist:
        if speculate:
            raise UserError("speculative decoding is not supported under torchrun (tensor parallelism) yet")
        device, a.seed = dist.device, tp.shared_seed(a.seed)
    tokenizer = get_tokenizer(weights.parent)
    model = tp.load_sharded(weights, dist, dtype) if dist else quantize.load_model(weights, device, dtype)
    cfg = model.config
    prompts = [encode_prompt(tokenizer, texts[i % len(texts)], not a.no_chat, cfg.chat_format, a.allow_special_tokens)
               for i in range(batch)]
    prompt = max(prompts, key=len)  # the longest sizes the caches
    if len(prompt) >= cfg.block_size:
        raise UserError(f"prompt of {len(prompt)} tokens does not fit the model's context of {cfg.block_size}")
    if a.max_seq_length is not None and a.max_seq_length > cfg.block_size:
        raise UserError(f"--max_seq_length {a.max_seq_length} exceeds the model's context of {cfg.block_size} tokens")
    max_seq_length = a.max_seq_length or min(len(prompt) + a.max_new_tokens, cfg.block_size)
    if len(prompt) + a.max_new_tokens > max_seq_length:
        raise UserError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({a.max_new_tokens}) exceeds "
                        f"max_seq_length {max_seq_length} (model context {cfg.block_size})")
    if a.seed is not None:
        torch.manual_seed(a.seed)
    policies.setup(model, a, batch_size=batch, prompt_len=len(prompt), max_seq_length=max_seq_length,
                   tokenizer=tokenizer)
    if a.compile and not device.startswith("cuda") and a.max_new_tokens * a.num_samples < 1000:
        note(a, f"note: on a CPU the compiled decode step is ~1.2-1.4x faster than eager but takes about a minute to "
                f"compile; for {a.max_new_tokens * a.num_samples} new tokens it does not pay off (drop --compile)")
    if len(prompt) >= 2048:
        note(a, f"prefilling {len(prompt)} prompt tokens ...")
    if speculate:
        draft = speculative.load_draft(draft_weights, model, a, tokenizer, device, dtype, len(prompt), max_seq_length)
        spec_fns = speculative.compile_fns(device, a.compile)
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    eos = set(tokenizer.eos_ids) | set(cfg.eos_ids)
    if batch > 1:
        return run_batch(a, model, tokenizer, prompts, eos, sampling, device, dtype)
    prefill_fn, decode_fn = compile_fns(device, a.compile, a.compile_prefill)
    if speculate:  # every graph of every length a speculative run may need
        compile_s = warm_up(a, lambda: speculative.warm_up(model, draft, prompt, a.max_new_tokens, k, sampling=sampling,
                                                           prefill_fn=prefill_fn, fns=spec_fns))
    else:
        compile_s = warm_up(a, lambda: generate(model, prompt, min(4, a.max_new_tokens), sampling=sampling,
                                                prefill_fn=prefill_fn, decode_fn=decode_fn,
                                                feed_long_prompts=a.feed_long_prompts, prefill_chunk=a.prefill_chunk))
    records = []
    for i in range(a.num_samples):
        stream = None if a.json else TextStream(tokenizer)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if speculate:
            tokens, stats = speculative.speculative_generate(model, draft, prompt, a.max_new_tokens, k, eos_ids=eos,
                                                             sampling=sampling, prefill_fn=prefill_fn, fns=spec_fns,
                                                             callback=stream)
            stats.update(tp.reduce_stats(kvcache.cache_stats(model)))
            text_ids = tokens[:-1] if tokens[-1] in eos else tokens  # the stop token is not part of the text
            record = {"text": tokenizer.decode(text_ids), "token_ids": tokens, "stats": stats}
        else:
            record = complete(model, tokenizer, prompt, a.max_new_tokens, **sampling, prefill_fn=prefill_fn,
                              decode_fn=decode_fn, callback=stream, feed_long_prompts=a.feed_long_prompts,
                              prefill_chunk=a.prefill_chunk)
            del record["prompt_token_ids"]
        stats = record["stats"]
        stats.update(compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(device))
        records.append(record)
        if stream:
            stream.close()
            print("\n", file=sys.stdout, flush=True)
            if not a.quiet:
                print(format_stats(stats, i, a.num_samples), file=sys.stderr)
    if a.json:
        out = records[0] if a.num_samples == 1 else {"samples": records}
        print(json.dumps({**out, "prompt_token_ids": prompt, "device": device, "dtype": str(dtype).split(".")[-1],
                          "model": cfg.name}))
    sys.stdout.flush()  # a closed pipe surfaces here, inside run_main, not at the interpreter's exit


def warm_up(a, run_once) -> float:
    """With --compile / --compile_prefill, one short run compiles every graph first, so that compile time is
    reported apart from decode speed; returns its seconds (0 when nothing is compiled)."""
    if not (a.compile or a.compile_prefill):
        return 0.0
    note(a, "compiling: one short warm-up run (a first compile takes about a minute on a CPU; a compile of the same "
            "configuration found in torch's cache takes seconds) ...")
    graphs = counters["stats"]["unique_graphs"]
    t = time.perf_counter()
    run_once()
    if a.seed is not None:  # the timed run samples as if the warm-up had not happened
        torch.manual_seed(a.seed)
    seconds = time.perf_counter() - t
    note(a, f"compiled {counters['stats']['unique_graphs'] - graphs} graph(s) in {seconds:.1f} s")
    return seconds


def run_batch(a, model, tokenizer, prompts, eos, sampling, device, dtype):
    """--batch_size > 1: all prompts decoded together; completions and per-sequence statistics at the end."""
    prefill_fn, decode_fn = compile_fns(device, a.compile, a.compile_prefill, a.dynamic_batch)
    compile_s = warm_up(a, lambda: generate_batch(model, prompts, min(4, a.max_new_tokens), sampling=sampling,
                                                  prefill_fn=prefill_fn, decode_fn=decode_fn,
                                                  prefill_chunk=a.prefill_chunk, feed_long_prompts=a.feed_long_prompts))
    records = []
    for i in range(a.num_samples):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tokens, stats = generate_batch(model, prompts, a.max_new_tokens, eos_ids=eos, sampling=sampling,
                                       prefill_fn=prefill_fn, decode_fn=decode_fn, prefill_chunk=a.prefill_chunk,
                                       feed_long_prompts=a.feed_long_prompts)
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
    mib = 2 ** 20
    budget, seen = s["kv_budget_slots"], s["seen_tokens"]
    share = f", {100 * budget / s['prompt_tokens']:.0f}% of the prompt" if s.get("prompt_tokens") else ""
    lines = [
        f"{head}prompt tokens: {s['prompt_tokens']}, new tokens: {s['new_tokens']}",
        f"time to first token: {s['time_to_first_token_s'] * 1000:.1f} ms; decode: {s['decode_tokens_per_s']:.2f} tokens/s"
        + (f" (compile warm-up {s['compile_s']:.1f} s, excluded)" if s["compile_s"] else "")
        + f"; peak memory: {s['peak_memory_bytes'] / mib:.1f} MiB",
        f"KV cache: kept {s['kept_tokens']:.0f} of {seen} tokens per layer ({100 * s['compression_ratio']:.1f}%); "
        f"budget {budget:.0f} slots per layer{share}"
        + (" - not smaller than the tokens seen: nothing was evicted" if budget >= seen else ""),
        f"KV bytes: {s['kv_cache_bytes'] / mib:.2f} MiB allocated, {s['kept_kv_bytes'] / mib:.2f} MiB held by the kept "
        f"tokens, {s['full_kv_cache_bytes'] / mib:.2f} MiB for a full cache of the same tokens",
    ]
    if "attention_loss" in s:
        lines.append(f"attention mass on evicted tokens (vs a shadow full cache): {s['attention_loss']:.4f}")
    if "speculative" in s:
        lines.append(speculative.format_stats(s["speculative"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
