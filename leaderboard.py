"""Many policies and budgets on the same samples, the way kvpress's leaderboard measures them, one prefill per sample.

    python leaderboard.py --tasks niah_single_2 vt --seq_length 2048 --num_samples 50 \\
        --cache_config recent_global heavy_hitter keydiff --compression_ratio 0.25 0.5 0.75 --setting both
    python compare_strategies.py results/leaderboard --out_png leaderboard.png

The method (kvpress's): a budget is a compression ratio R of the PROMPT - each layer keeps int(T x (1 - R)) of the
T prompt tokens per KV head (on average over heads for --keep_set adakv) - and the budget binds once, when the prompt
is compressed; the answer's tokens are then all kept (--budget_scope prompt). Decoding is greedy.
  question-aware (--setting aware): the whole prompt (context, question, answer prefix) is compressed;
  question-agnostic (--setting agnostic, RULER tasks): the context is compressed before the question is seen, then
  the question and the answer prefix go through each policy's decode step on the compressed cache.

Why one prefill serves every configuration: a policy only decides what the cache keeps; the prompt's hidden states
are computed with full attention whatever is kept. So each sample's prompt is prefilled once, with every layer's
(un-rotated) q, k, v recorded, and each configuration's caches are then filled from those records (each layer's
cache.prefill gets the tensors the model would hand it) instead of running the model again. The context of the
question-agnostic setting is a prefix of the prompt, so its records are a prefix of the same ones (causal
attention). Configurations whose compression runs the model again (kvzip's reconstruction) or that prefill in chunks
get their own prefill. tests/test_leaderboard.py checks that tokens and kept positions equal a plain run.

Results go where eval.py puts them (OUT_DIR/MODEL/CONFIG/TASK-lenL-genG-nN/: predictions.jsonl, metrics.json with 95%
intervals, args.json), CONFIG being eval.py's name for the same flags (plus __question_agnostic), so
compare_strategies.py reads them as any eval.py run; finished folders are skipped and a killed run resumes after each
configuration's last whole sample. `--cache_config full` is the uncompressed reference (one per task, no ratio).
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import contextlib
import hashlib
import json
import shlex
import time
import types
from pathlib import Path

import torch

import cli
import eval as ev
import generate as gen
import policies
import quantize
import tasks as T
from cache import FullCache
from cli import UserError
from runtime import prefill
from tokenizer import get_tokenizer

SETTINGS = {"aware": [False], "agnostic": [True], "both": [False, True]}


class PrefillRecorder(FullCache):
    """A full cache that also keeps what its prefill was given: positions and un-rotated k, v, q of the prompt."""

    def prefill(self, input_pos, k, v, q, row=None, context_len=None):
        self.recorded = (input_pos, k, v, q)
        return super().prefill(input_pos, k, v, q, row=row, context_len=context_len)


def build_parser():
    p, cache_dests = ev.build_parser()
    p.description = __doc__
    p.set_defaults(out_dir=ev.REPO / "results" / "leaderboard", seq_length=2048)
    for action in p._actions:  # several values here: one configuration per (config, ratio)
        if action.dest == "cache_config":
            action.nargs, action.default = "+", ["full"]
            action.help = "cache_configs/ names (or YAML paths); each runs at every --compression_ratio"
        if action.dest == "compression_ratio":
            action.nargs, action.default, action.type = "+", [0.5], float
            action.help = "kvpress's ratios: the share of the prompt removed"
    p.add_argument("--setting", choices=tuple(SETTINGS), default="aware",
                   help="question-aware (question in the compressed prompt), question-agnostic, or both")
    return p, cache_dests


def configurations(a, cache_dests, argv: list) -> list:
    """(folder name, cache options Namespace, question_agnostic) per configuration, named as eval.py names them."""
    defaults = {x.dest: x.default for x in ev.build_parser()[0]._actions}
    shared = strip_flags(argv, ("--cache_config", "--compression_ratio", "--setting"))
    out = []
    eval_parser = ev.build_parser()[0]
    for name in a.cache_config:
        full = policies.read_config(name).get("cache_strategy") == ["full"]
        for ratio in [None] if full else a.compression_ratio:
            for agnostic in [False] if full else SETTINGS[a.setting]:
                flags = ["--cache_config", name]
                if ratio is not None:
                    flags += ["--compression_ratio", str(ratio), "--budget_scope", "prompt"]
                cfg = policies.parse_args(eval_parser, shared + flags)
                eval_parser = ev.build_parser()[0]  # parse_args set the YAML's values as defaults
                cfg_name = ev.config_name(cfg, defaults, cache_dests) + ("__question_agnostic" if agnostic else "")
                out.append((cfg_name, cfg, agnostic))
    return out


def strip_flags(argv: list, names: tuple) -> list:
    """argv without the given flags and their values."""
    out, skipping = [], False
    for x in argv:
        if x.startswith("--"):
            skipping = x.split("=", 1)[0] in names
            if skipping:
                continue
        if not skipping:
            out.append(x)
    return out


def main(argv=None):
    p, cache_dests = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.one_line_errors(p)
    cli.run_main(lambda: run(p.parse_args(argv), cache_dests, argv))


def run(a, cache_dests, argv):
    cli.check_at_least(a, num_samples=1, seq_length=2)
    if (a.temperature != 0 or a.batch_size != 1 or a.compile or a.compile_prefill or a.feed_long_prompts
            or a.print_dir):
        raise UserError("leaderboard.py decodes greedily, one sample at a time, eagerly: leave --temperature, "
                        "--batch_size, --compile, --compile_prefill, --feed_long_prompts and --print_dir at their "
                        "defaults")
    for r in a.compression_ratio:
        if not 0 <= r < 1:
            raise UserError(f"--compression_ratio must be in [0, 1), got {r}")
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    tasks = ev.make_tasks(a.tasks, ev.parse_task_opts(a.task_opts))
    not_gen = [t.name for t in tasks if t.kind != "generate"]
    if not_gen:
        raise UserError(f"leaderboard.py runs generation tasks; {', '.join(not_gen)} are not")
    if a.setting != "aware" and any(t.name not in T.SYNTHETIC for t in tasks):
        raise UserError(f"--setting {a.setting}: the question-agnostic setting splits RULER prompts at their "
                        f"question ({', '.join(T.SYNTHETIC)})")
    configs = configurations(a, cache_dests, argv)
    gen_len = a.max_new_tokens if a.max_new_tokens is not None else max(t.max_new_tokens for t in tasks)
    if a.max_new_tokens is not None:
        cli.check_at_least(a, max_new_tokens=1)
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    quantize.check_checkpoint_file(weights)
    if a.seq_length + gen_len > cli.model_config(weights).block_size:
        raise UserError(f"--seq_length {a.seq_length} + {gen_len} new tokens exceed the model's context")
    tokenizer = get_tokenizer(weights.parent)
    encoder = T.PromptEncoder(tokenizer, not a.no_chat)
    model_dir = Path(a.out_dir) / weights.parent.name
    todo = [(task, [(n, c, ag, model_dir / n / ev.task_dir_name(task, a, gen_len)) for n, c, ag in configs])
            for task in tasks]
    todo = [(task, [x for x in cfgs if a.overwrite or ev.finished(x[3], task, quiet=True) is None])
            for task, cfgs in todo]
    todo = [(task, cfgs) for task, cfgs in todo if cfgs]
    if not todo:
        print("every configuration is finished (--overwrite recomputes)", file=sys.stderr)
        return
    built = ev.build_samples(a, [(task, None) for task, _ in todo], encoder, gen_len)
    model = quantize.load_model(weights, device, dtype)
    rt = types.SimpleNamespace(tokenizer=tokenizer, eos=set(tokenizer.eos_ids) | set(model.config.eos_ids), a=a)
    with contextlib.ExitStack() as locks, torch.no_grad():
        for (task, cfgs), (_, _, samples) in zip(todo, built):
            for *_, d in cfgs:
                locks.enter_context(cli.folder_lock(d))
                cli.remove_stale_temporaries(d)
            splits = {}
            if any(ag for _, _, ag, _ in cfgs):
                splits = {s["id"]: T.question_start(s, encoder, s["ids"]) for s in samples}
            run_task(a, argv, model, rt, task, cfgs, samples, splits, min(task.max_new_tokens, gen_len), weights)


def run_task(a, argv, model, rt, task, cfgs, samples, splits, gen_len, weights):
    command = "python leaderboard.py " + shlex.join(argv)
    runs = []
    for name, cfg, agnostic, d in cfgs:
        d.mkdir(parents=True, exist_ok=True)
        fingerprint = hashlib.sha1(json.dumps([name, a.seq_length, gen_len, a.seed, a.no_chat, task.opts,
                                               [s["ids"] for s in samples]]).encode()).hexdigest()[:16]
        cli.atomic_write_text(d / "args.json", json.dumps({
            "argv": list(argv), "command": command, "config": name, "model": weights.parent.name,
            "checkpoint": str(weights), "git_commit": ev.git_commit(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "task": task.name, "task_options": task.opts,
            "task_max_new_tokens": gen_len, "question_agnostic": agnostic, "fingerprint": fingerprint,
            "args": ev.jsonable(vars(cfg))}, indent=2) + "\n")
        records = [] if a.overwrite else ev.read_records(d / "predictions.jsonl", fingerprint)
        cli.atomic_write_text(d / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        runs.append({"name": name, "cfg": cfg, "agnostic": agnostic, "dir": d, "fingerprint": fingerprint,
                     "records": records})
    started = time.perf_counter()
    bar = None
    if not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc=f"{task.name} x {len(runs)} configurations", file=sys.stderr,
                   mininterval=5, dynamic_ncols=True)
    for i, s in enumerate(samples):
        due = [r for r in runs if len(r["records"]) == i]
        if due:
            run_sample(model, rt, task, s, splits.get(s["id"]), gen_len, due)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    for r in runs:
        recs = r["records"]
        info = {"batch_size": 1, "policies": sorted(r["cfg"].cache_strategy),  # caches are sized per sample here
                "kv_cache_bytes": sum(x["cache"]["kv_cache_bytes"] for x in recs) / len(recs)}
        m = ev.aggregate(task, recs, info,
                         {"device": str(model.tok_embeddings.weight.device), "question_agnostic": r["agnostic"]})
        m.update(config=r["name"], model=weights.parent.name, seq_length=a.seq_length, max_new_tokens=gen_len,
                 compression_ratio_of_prompt=r["cfg"].compression_ratio, cache_strategy=r["cfg"].cache_strategy)
        cli.atomic_write_text(r["dir"] / "metrics.json", json.dumps(m, indent=2) + "\n")
        print(f"{task.name} {r['name']}: {task.primary} = {m['score']:.1f} (95% interval "
              "{:.1f}-{:.1f}, {} samples)".format(*m["score_ci95"], m["num_samples"]), file=sys.stderr)
    print(f"{task.name}: {len(samples)} samples x {len(runs)} configurations in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)


def own_prefill(cfg) -> bool:
    """Configurations whose compression needs the model itself: kvzip reads the prompt again, chunks attend to
    the compressed cache."""
    return cfg.prompt_compression_strategy == "kvzip" or bool(cfg.prefill_chunk)


def run_sample(model, rt, task, sample, split, gen_len, due):
    """One sample: the full prefill once (recorded), then every due configuration from the records."""
    ids = sample["ids"]
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter()
    mc, w = model.config, model.tok_embeddings.weight
    with torch.device(device):
        recorders = [PrefillRecorder(1, mc.n_local_heads, mc.head_dim, len(ids), w.dtype, max_seq_length=len(ids))
                     for _ in model.layers]
    policies.install(model, recorders, len(ids))
    first = prefill(model, torch.tensor([ids], device=device), torch.arange(len(ids), device=device))
    recorded = [c.recorded for c in recorders]
    prefill_s = time.perf_counter() - t0
    for r in due:
        cut = split if r["agnostic"] else len(ids)
        policies.setup(model, r["cfg"], prompt_len=cut, max_seq_length=len(ids) + gen_len, tokenizer=rt.tokenizer)
        shared = not own_prefill(r["cfg"])
        # question-agnostic: the context is prefilled, the question goes through the decode step
        tokens, st = gen.generate(model, ids, gen_len, eos_ids=rt.eos, prefill_len=cut,
                                  prefill_fn=replaying(recorded, first) if shared else prefill,
                                  prefill_chunk=r["cfg"].prefill_chunk)
        st = {"prompt_tokens": len(ids), "new_tokens": len(tokens), "context_tokens": cut,
              "time_to_first_token_s": st["time_to_first_token_s"] + (prefill_s if shared else 0.0),
              "decode_tokens_per_s": st["decode_tokens_per_s"], "seconds": st["time_to_first_token_s"] + st["decode_s"],
              "shared_prefill_s": prefill_s if shared else None}
        rec = ev.score_generation(rt, task, sample, tokens, st)
        rec["cache"] = ev.cache_summary(model)
        rec["cache"].pop("layer_kv_budget", None)
        rec = {"id": sample["id"], "fingerprint": r["fingerprint"], "prompt_tokens": len(ids), **rec,
               "meta": sample.get("meta", {})}
        ev.save_record(r["dir"] / "predictions.jsonl", r["records"], rec, None, task.primary)


def replaying(recorded, first):
    """A prefill function for generate(): fills each layer's cache from the recorded full prefill of the prompt's
    first x.shape[1] tokens, as the model's own prefill would (the attention output is not needed), and returns
    the recorded first new token (generate() replaces it when the rest of the prompt is fed after)."""
    def replay(model, x, input_pos, **_):
        cut = x.shape[1]
        for layer, (pos, k, v, q) in zip(model.layers, recorded):
            cache = layer.attention.kv_cache
            cache.set_tokens(x, True, None)
            cache.prefill(pos[:cut], k[:, :, :cut], v[:, :, :cut], q[:, :, :cut], need_output=False)
        return first
    return replay


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    main()
