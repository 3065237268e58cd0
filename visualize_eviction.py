"""Heat map of the positions each layer's KV cache keeps after a real generation.

    python visualize_eviction.py --cache_strategy heavy_hitter --max_cache_length 0.25 --task niah_single_2 \
        --seq_length 512 --out docs/eviction_heavy_hitter.png
    python visualize_eviction.py --cache_config sink_recent --sink_tokens 16 --recent_tokens 96 \
        --middle_budget_tokens 96 --block_n 16 --prompt_file prompts/long_story.txt --per_head --out sink_recent.png

Runs generate.generate on the model (SmolLM2-135M-Instruct by default) with the given policy, then reads each
layer's `pos` buffer ([B, Hkv, C]: the original position held by each slot, -1 = empty): a position is kept in
a layer (row) if some slot of that layer (with --per_head: of that KV head) holds it. Kept positions are blue,
evicted ones grey; the red dashed line is the sink boundary (global_tokens / sink_tokens / start_size), the green
one the start of the protected recent window, the orange band the needle of a needle-in-a-haystack prompt. A
merging policy (merge_pyramid) reports a merged slot at the mean position of its members.

--prompt is text (as in generate.py; a file is --prompt_file). The picture and --save_json are written atomically
(a temporary file, then a rename); their folders are checked for writing before the model runs.
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import io
import json
import signal
from pathlib import Path

import torch

import cache as kvcache
import cli
import generate as gen
import policies
import quantize
import tasks as T
from cli import UserError
from tokenizer import get_tokenizer


def kept_matrix(model, seen: int, per_head: bool):
    """[rows, seen] bool: rows = layers (or layers x KV heads)."""
    rows, labels = [], []
    for i, c in enumerate(model.caches):
        pos = c.pos[0]  # [Hkv, C]
        heads = range(pos.shape[0]) if per_head else [None]
        for h in heads:
            p = pos[h] if h is not None else pos.reshape(-1)
            p = p[(p >= 0) & (p < seen)]
            row = torch.zeros(seen, dtype=torch.bool)
            row[p.cpu()] = True
            rows.append(row)
            labels.append(f"L{i}" + (f".h{h}" if h is not None else ""))
    return torch.stack(rows), labels


def boundaries(cache, seen: int) -> tuple:
    sink = getattr(cache, "start_size", None)
    if sink is None:
        sink = getattr(cache, "sink_tokens", None) if type(cache).__name__ == "MergePyramidCache" else None
    if sink is None:
        sink = cache.global_tokens
    recent_start = seen - 1 - cache.recent_window
    return int(sink), int(recent_start)


def needle_span(tokenizer, ids: list, needle: str):
    """Token range of a needle sentence in the prompt (by the decoded text of each token)."""
    pieces = [tokenizer.decode([t]) for t in ids]
    text = "".join(pieces)
    at = text.find(needle)
    if at < 0:
        return None
    start = end = None
    pos = 0
    for i, piece in enumerate(pieces):
        if start is None and pos + len(piece) > at:
            start = i
        pos += len(piece)
        if pos >= at + len(needle):
            end = i + 1
            break
    return (start, end) if start is not None and end is not None else None


def draw(kept, labels, sink, recent_start, needles, out: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n_rows, seen = kept.shape
    fig, ax = plt.subplots(figsize=(min(16, 4 + seen / 60), min(12, 1.5 + n_rows * 0.16)))
    ax.imshow(kept.numpy().astype(float), aspect="auto", interpolation="nearest",
              cmap=ListedColormap(["#d9d9d9", "#1f77b4"]), vmin=0, vmax=1)
    ax.axvline(sink - 0.5, color="red", ls="--", lw=1.2, label=f"sink boundary ({sink})")
    if 0 < recent_start < seen:
        ax.axvline(recent_start - 0.5, color="green", ls="--", lw=1.2, label=f"recent window starts ({recent_start})")
    for j, (a, b) in enumerate(needles):
        ax.axvspan(a - 0.5, b - 0.5, color="orange", alpha=0.35, label="needle" if j == 0 else None)
    step = max(1, n_rows // 30)
    ax.set_yticks(range(0, n_rows, step))
    ax.set_yticklabels(labels[::step], fontsize=7)
    ax.set_xlabel("original position")
    ax.set_ylabel("layer" + (" . KV head" if "." in labels[0] else ""))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    cli.atomic_write_bytes(out, buf.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("visualization")
    g.add_argument("--prompt", default=None, help="prompt text (default: a task sample, --task)")
    g.add_argument("--prompt_file", type=Path, default=None, help="a UTF-8 file holding the prompt")
    g.add_argument("--task", default="niah_single_2", help="synthetic task whose first sample is the prompt")
    g.add_argument("--seq_length", type=int, default=512, help="task prompt length in tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max_new_tokens", type=int, default=16)
    g.add_argument("--no_chat", action="store_true")
    g.add_argument("--per_head", action="store_true", help="one row per KV head instead of per layer")
    g.add_argument("--out", type=Path, default=Path("eviction.png"))
    g.add_argument("--save_json", type=Path, default=None, help="also write the kept positions per layer/head")
    g.add_argument("--num_threads", type=int, default=None)
    cli.add_model_args(p)
    policies.add_cache_args(p)
    return cli.run_main(lambda: run(policies.parse_args(p, argv)))


def check_outputs(a):
    """Before the model runs: the picture (and JSON) can be written where asked."""
    for flag, path in (("--out", a.out), ("--save_json", a.save_json)):
        if path is None:
            continue
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder, not a file")
        cli.check_writable(path.parent, flag)


def run(a):
    cli.check_at_least(a, max_new_tokens=1, seq_length=2, num_threads=1)
    if a.prompt is not None and a.prompt_file is not None:
        raise UserError("give the prompt as --prompt TEXT or --prompt_file PATH, not both")
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    cfg = cli.model_config(weights)
    check_outputs(a)
    text = gen.read_prompt_file(a.prompt_file) if a.prompt_file is not None else a.prompt
    if text is None and a.seq_length + a.max_new_tokens > cfg.block_size:  # before building the task's prompt
        raise UserError(f"--seq_length {a.seq_length} + --max_new_tokens {a.max_new_tokens} exceeds the model's "
                        f"context of {cfg.block_size} tokens")
    tokenizer = get_tokenizer(weights.parent)
    encoder = T.PromptEncoder(tokenizer, not a.no_chat)
    needles = []
    if text is not None:
        ids = gen.encode_prompt(tokenizer, text, not a.no_chat, cfg.chat_format)
        source = "prompt"
    else:
        sample = T.get_task(a.task).build(encoder, a.seq_length, 1, a.seed)[0]
        ids = encoder(sample["input"], sample.get("answer_prefix", ""))
        needles = [s for s in (needle_span(tokenizer, ids, n) for n in sample.get("meta", {}).get("needles", [])) if s]
        source = f"{a.task} sample"
    if not ids:
        raise UserError("the prompt is empty")
    max_seq_length = len(ids) + a.max_new_tokens
    if max_seq_length > cfg.block_size:
        raise UserError(f"prompt ({len(ids)} tokens) + --max_new_tokens {a.max_new_tokens} = {max_seq_length} "
                        f"exceeds the model's context of {cfg.block_size} tokens")
    model = quantize.load_model(weights, device, dtype)
    torch.manual_seed(a.seed)
    policies.setup(model, a, batch_size=1, prompt_len=len(ids), max_seq_length=max_seq_length, tokenizer=tokenizer)
    eos = set(tokenizer.eos_ids) | set(model.config.eos_ids)
    tokens, _ = gen.generate(model, ids, a.max_new_tokens, eos_ids=eos, feed_long_prompts=a.feed_long_prompts,
                             prefill_chunk=a.prefill_chunk)
    seen = int(model.caches[0].seen)
    kept, labels = kept_matrix(model, seen, a.per_head)
    sink, recent_start = boundaries(model.caches[0], seen)
    stats = kvcache.cache_stats(model)
    name = Path(a.cache_config).stem if a.cache_config else "+".join(a.cache_strategy)
    title = (f"{name}: {source}, {len(ids)} prompt + {len(tokens)} generated tokens; kept "
             f"{100 * stats['compression_ratio']:.0f}% ({stats['kept_tokens']:.0f} of {seen} per layer)")
    draw(kept, labels, sink, recent_start, needles, a.out, title)
    if a.save_json:
        cli.atomic_write_text(a.save_json, json.dumps({"seen": seen, "rows": labels, "sink": sink, "recent_start": recent_start,
                                           "needles": needles,
                                           "kept": [torch.nonzero(r).flatten().tolist() for r in kept]}))
    print(f"wrote {a.out}: {len(labels)} rows x {seen} positions; {title}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    sys.exit(main())
