"""Quality versus compression: run any cache configuration on evaluation tasks, offline.

    python eval.py --tasks niah_single_2 vt --cache_strategy l2 --max_cache_length 0.5 --num_samples 20 --seq_length 1024
    python eval.py --tasks rulerniah --cache_config lsh --lsh_dim 8 --feed_long_prompts --seq_length 4096
    python eval.py --tasks ppl --cache_strategy recent_global --max_cache_length 256 --seq_length 2000

Writes results/MODEL/CONFIG/TASK-lenL-genG-nN/ with predictions.jsonl (one record per sample, written as it
finishes), metrics.json (scores and run statistics) and args.json (the exact command and resolved arguments);
results/MODEL/CONFIG/runs.jsonl gets one line per invocation (tokens/s with compile warm-up excluded, time to
first token, peak memory, KV-cache bytes, compression achieved). Finished tasks are skipped and unfinished ones
resume after their last written sample, unless --overwrite.

One max_seq_length = --seq_length + --max_new_tokens sizes every cache for the whole run, so a fractional
--max_cache_length gives the same number of slots for every sample and task; caches are built once and reset
per sample, and the compiled functions (--compile) are made and warmed up once. Task list: see tasks.py.

Safe to interrupt and to run side by side: every result file is written atomically (a temporary file, fsync,
rename) and each sample's line is appended whole, so a run killed at any moment (even kill -9) resumes after its
last whole sample; a run holds a lock on each task folder it computes, and a second run on the same folder stops
with one line instead of interleaving. A damaged metrics.json is reported and its task computed again.
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import contextlib
import hashlib
import json
import math
import shlex
import subprocess
import time
from pathlib import Path

import torch

import cache as kvcache
import cli
import generate as gen
import metrics as M
import perplexity
import policies
import quantize
import runtime
import tasks as T
from cli import UserError
from runtime import peak_memory_bytes
from runtime import synchronize as sync
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# Arguments and names
# ---------------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", nargs="+", default=["niah_single_2"], help="tasks (see tasks.py): " + ", ".join(T.task_names()))
    g.add_argument("--num_samples", type=int, default=20, help="samples per task (dataset tasks: the first N rows)")
    g.add_argument("--seq_length", type=int, default=4096,
                   help="prompt tokens of synthetic tasks (chat template included), the perplexity window, and "
                        "the truncation length of dataset prompts")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="longest generation of the run (default: the longest default of its tasks); each task "
                        "generates at most min(its default, this); caches hold seq_length + max_new_tokens")
    g.add_argument("--task_opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="task options, e.g. depth=50 num_cw=5 haystack=noise text=kjv (applied to every task "
                        "that has the option)")
    g.add_argument("--seed", type=int, default=0, help="task generation and sampling seed")
    g.add_argument("--out_dir", type=Path, default=REPO / "results")
    g.add_argument("--overwrite", action="store_true", help="recompute finished tasks")
    g.add_argument("--data_dir", type=Path, default=None,
                   help="JSONL files TASK.jsonl in the hub schema for dataset tasks (or $KVCOMPILE_DATA_DIR)")
    g.add_argument("--no_chat", action="store_true", help="raw prompts, without the chat template")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--batch_size", type=int, default=1,
                   help="generation samples decoded together (one batched cache per layer: the same outputs as one "
                        "at a time under greedy decoding); decode tokens/s then counts the whole batch")
    g.add_argument("--llm_judge", action="store_true",
                   help="also score free-response tasks with an LLM judge (needs OPENAI_API_KEY; skipped otherwise)")
    g.add_argument("--judge_model", default="gpt-4o-mini")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--print_dir", action="store_true", help="print the results folder of this configuration and exit")
    cli.add_model_args(p, batches=True)
    before = {a.dest for a in p._actions}
    policies.add_cache_args(p)
    cache_dests = [a.dest for a in p._actions if a.dest not in before]
    return p, cache_dests


def _fmt(v):
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def config_name(a, defaults: dict, cache_dests: list) -> str:
    """A readable folder name: the config (or strategy) and every cache flag that differs from the built-in
    defaults (a YAML config's values included), so equal settings share a folder however they were given."""
    base = Path(a.cache_config).stem if a.cache_config else "+".join(a.cache_strategy)
    parts = [base]
    for d in sorted(cache_dests):
        if d == "cache_config" or (d == "cache_strategy" and (not a.cache_config or a.cache_strategy == [base])):
            continue
        v = getattr(a, d)
        if v != defaults.get(d):
            parts.append(f"{d}={_fmt(v)}")
    if a.dtype != "auto":
        parts.append(f"dtype={a.dtype}")
    name = "__".join(parts)
    if len(name) > 200:
        name = name[:150] + "__" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name.replace("/", "_")


def parse_task_opts(items) -> dict:
    opts = {}
    for it in items:
        if "=" not in it:
            raise UserError(f"--task_opts takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        opts[k] = v
    return opts


def make_tasks(names, opts: dict) -> list:
    """KEY=VALUE applies to every task that has the option; TASK.KEY=VALUE to that task only (aliases work)."""
    out, seen, used = [], set(), set()
    for n in names:
        try:
            name = T.canonical(n)
        except T.TaskError as e:
            raise UserError(str(e))
        if name in seen:
            continue
        seen.add(name)
        known = set(T.get_task(name).options) | {"max_new_tokens"}
        mine = {}
        for k, v in opts.items():
            target, _, key = k.rpartition(".")
            if target:
                if target not in T.task_names():
                    raise UserError(f"--task_opts {k}: unknown task {target!r}")
                if T.canonical(target) != name:
                    continue
            elif key not in known:
                continue
            mine[key] = v
            used.add(k)
        out.append(T.get_task(name, **mine))
    unused = sorted(set(opts) - used)
    if unused:
        raise UserError(f"--task_opts {unused} match no option of the tasks {[t.name for t in out]}")
    return out


def task_dir_name(task, a, gen_len: int) -> str:
    name = f"{task.name}-len{a.seq_length}-gen{gen_len}-n{a.num_samples}"
    if a.seed:
        name += f"-seed{a.seed}"
    if a.no_chat:
        name += "-nochat"
    if a.temperature > 0:
        name += f"-t{_fmt(a.temperature)}-k{a.top_k}-p{_fmt(a.top_p)}"
    changed = {k: v for k, v in task.opts.items() if v != task.options.get(k)}
    if changed:
        name += "-" + "_".join(f"{k}{_fmt(v)}" for k, v in sorted(changed.items())).replace("/", "_")[:60]
    return name


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------------------------
# The run: model, caches and compiled functions made once
# ---------------------------------------------------------------------------------------------------------------
def prefill_logits(model, x, input_pos):
    return model(x, input_pos, prefill=True, last_only=True)[:, -1]


def step_logits(model, cur, input_pos):
    return model(cur, input_pos)[:, -1]


class Runtime:
    def __init__(self, a, model, tokenizer, device, max_seq_length):
        self.a, self.model, self.tokenizer, self.device = a, model, tokenizer, device
        self.max_seq_length = max_seq_length
        self.sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
        self.eos = set(tokenizer.eos_ids) | set(model.config.eos_ids)
        self.prefill_fn, self.decode_fn = runtime.compile_fns(device, a.compile, a.compile_prefill, a.dynamic_batch)
        self.prefill_logits, self.step_logits = prefill_logits, step_logits
        if a.compile:
            self.step_logits = runtime.compile_decode(step_logits, device)
        if a.compile_prefill:
            self.prefill_logits = runtime.compile_prefill(prefill_logits)
        self.nll_step = None  # perplexity.py's step, compiled on first use
        self.warm = set()
        self.compile_s = 0.0

    def warm_up(self, kind, ids):
        """Compile (and run once) what `kind` needs, before anything is timed."""
        if kind in self.warm or not (self.a.compile or self.a.compile_prefill):
            self.warm.add(kind)
            return
        t = time.perf_counter()
        if kind == "generate" and self.a.batch_size > 1:
            gen.generate_batch(self.model, [ids] * self.a.batch_size, 4, sampling=self.sampling,
                               prefill_fn=self.prefill_fn, decode_fn=self.decode_fn, prefill_chunk=self.a.prefill_chunk,
                               feed_long_prompts=self.a.feed_long_prompts)
        elif kind == "generate":
            gen.generate(self.model, ids, 4, sampling=self.sampling, prefill_fn=self.prefill_fn,
                         decode_fn=self.decode_fn, feed_long_prompts=self.a.feed_long_prompts,
                         prefill_chunk=self.a.prefill_chunk)
        elif kind == "perplexity":
            perplexity.streaming_nll(self.model, ids[:6], step_fn=self.get_nll_step())
        else:
            self.prompt_logits(ids)
            pos = len(ids)
            for j in range(3):
                self.step(ids[-1], pos + j)
        self.compile_s += time.perf_counter() - t
        self.warm.add(kind)

    def get_nll_step(self):
        if self.nll_step is None:
            self.nll_step = perplexity.nll_step
            if self.a.compile:
                self.nll_step = runtime.compile_decode(perplexity.nll_step, self.device)
        return self.nll_step

    def step(self, token: int, pos: int) -> torch.Tensor:
        cur = torch.tensor([[token]], dtype=torch.long, device=self.device)
        return self.step_logits(self.model, cur, torch.tensor([pos], device=self.device)).clone()

    def prompt_logits(self, ids: list) -> torch.Tensor:
        """Reset the caches, prefill the prompt (up to budget - 1 tokens with --feed_long_prompts, the rest
        through the decode step, as generate.generate does) and return the last position's logits [1, V]."""
        for c in self.model.caches:
            c.reset()
        n0 = gen.prefilled_length(self.model, len(ids), self.a.feed_long_prompts)
        step = self.a.prefill_chunk or n0
        for s in range(0, n0, step):  # --prefill_chunk: the prompt a chunk at a time
            x = torch.tensor([ids[s:min(s + step, n0)]], dtype=torch.long, device=self.device)
            logits = self.prefill_logits(self.model, x, torch.arange(s, s + x.shape[1], device=self.device)).clone()
        for i in range(n0, len(ids)):
            logits = self.step(ids[i], i)
        return logits


def cache_summary(model, stats: dict = None) -> dict:
    s = stats or kvcache.cache_stats(model)
    out = {k: v for k, v in s.items() if k != "layers"}
    out["layer_kept_tokens"] = [x["kept_tokens"] for x in s["layers"]]
    out["layer_kv_budget"] = [x["kv_budget"] for x in s["layers"]]
    return out


def run_generate(rt, task, sample, gen_len):
    ids = sample["ids"]
    tokens, st = gen.generate(rt.model, ids, gen_len, eos_ids=rt.eos, sampling=rt.sampling,
                              prefill_fn=rt.prefill_fn, decode_fn=rt.decode_fn,
                              feed_long_prompts=rt.a.feed_long_prompts, prefill_chunk=rt.a.prefill_chunk)
    return score_generation(rt, task, sample, tokens, st)


def run_generate_batch(rt, task, chunk, gen_len):
    """Up to --batch_size samples decoded together; a short last chunk is filled with copies of its last prompt
    (outputs dropped) so the compiled step keeps its shape. Per sample: its tokens, its cache statistics at its
    end, and the batch's timings (time to first token = all prompts prefilled; tokens/s = the whole batch)."""
    batch = rt.a.batch_size
    prompts = [s["ids"] for s in chunk] + [chunk[-1]["ids"]] * (batch - len(chunk))
    tokens, st = gen.generate_batch(rt.model, prompts, gen_len, eos_ids=rt.eos, sampling=rt.sampling,
                                    prefill_fn=rt.prefill_fn, decode_fn=rt.decode_fn, prefill_chunk=rt.a.prefill_chunk,
                                    feed_long_prompts=rt.a.feed_long_prompts)
    per_seq = st.pop("sequence_cache_stats")
    out = []
    for b, s in enumerate(chunk):
        stats = {"prompt_tokens": len(s["ids"]), "new_tokens": len(tokens[b]), "batch_size": batch,
                 "time_to_first_token_s": st["time_to_first_token_s"], "decode_tokens_per_s": st["decode_tokens_per_s"]}
        r = score_generation(rt, task, s, tokens[b], stats)
        r["cache"] = cache_summary(rt.model, per_seq[b])
        out.append(r)
    return out


def score_generation(rt, task, sample, tokens, st):
    text_ids = tokens[:-1] if tokens and tokens[-1] in rt.eos else tokens
    pred = rt.tokenizer.decode(text_ids)
    scores = task.score(pred, sample)
    if rt.a.llm_judge and task.kind == "generate" and "question" in sample:
        j = M.llm_judge(sample["question"], pred, sample["references"], model=rt.a.judge_model)
        if j is not None:
            scores["llm_judge"] = j
    return {"prediction": pred, "references": sample["references"], "scores": scores, "stats": st}


def run_loglikelihood(rt, task, sample):
    enc = T.PromptEncoder(rt.tokenizer, not rt.a.no_chat)
    ids = sample["ids"]
    logprobs = []
    t0 = time.perf_counter()
    for choice in sample["choices"]:
        cont = enc.continuation(choice)
        logits = rt.prompt_logits(ids)
        lp = 0.0
        for j, t in enumerate(cont):
            if j:
                logits = rt.step(cont[j - 1], len(ids) + j - 1)
            lp += float(torch.log_softmax(logits[0].float(), -1)[t])
        logprobs.append(lp)
    sync(rt.device)
    scores = task.score_choices(logprobs, sample)
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    return {"prediction": sample["choices"][best], "references": sample["references"], "logprobs": logprobs,
            "scores": scores, "stats": {"prompt_tokens": len(ids), "seconds": time.perf_counter() - t0}}


def run_perplexity(rt, task, sample):
    """Feed the window one token at a time through the decode step (the first token by a 1-token prefill) and
    take the NLL of each next token (perplexity.streaming_nll)."""
    ids = sample["ids"]
    t0 = time.perf_counter()
    nll = perplexity.streaming_nll(rt.model, ids, step_fn=rt.get_nll_step()).double().cpu().tolist()
    runner = "perplexity.streaming_nll"
    sync(rt.device)
    dt = time.perf_counter() - t0
    cps = {str(n): math.exp(sum(nll[:n]) / n) for n in task.checkpoints(len(nll))}
    return {"prediction": None, "references": None, "nll": nll, "runner": runner,
            "scores": {"ppl": math.exp(sum(nll) / len(nll))}, "ppl_at": cps,
            "stats": {"prompt_tokens": len(ids), "seconds": dt, "tokens_per_s": len(ids) / dt}}


def aggregate(task, records, cache_info, extra, judge_skipped=False) -> dict:
    n = len(records)
    out = {"task": task.name, "description": task.description, "kind": task.kind, "num_samples": n,
           "primary": task.primary, "higher_is_better": task.higher_is_better, "metrics": {}}
    if task.kind == "perplexity":
        nll = [x for r in records for x in r["nll"]]
        out["metrics"]["ppl"] = math.exp(sum(nll) / len(nll))
        L = min(len(r["nll"]) for r in records)
        out["ppl_at"] = {str(c): math.exp(sum(sum(r["nll"][:c]) for r in records) / (c * n))
                         for c in task.checkpoints(L)}
        out["tokens_scored"] = len(nll)
    else:
        names = sorted({k for r in records for k in r["scores"]})
        for m in names:
            vals = [r["scores"][m] for r in records if m in r["scores"]]
            out["metrics"][m] = 100.0 * sum(vals) / len(vals)
        if task.kind == "generate" and judge_skipped:
            out["llm_judge"] = "skipped: OPENAI_API_KEY is not set"

    def mean(key):
        vals = [r["stats"][key] for r in records if key in r["stats"]]
        return sum(vals) / len(vals) if vals else None

    stats = {"time_to_first_token_s": mean("time_to_first_token_s"),
             "decode_tokens_per_s": mean("decode_tokens_per_s"),
             "prompt_tokens": mean("prompt_tokens"), "new_tokens": mean("new_tokens"),
             "tokens_per_s": mean("tokens_per_s"), "seconds_per_sample": mean("seconds"),
             "compression_ratio": sum(r["cache"]["compression_ratio"] for r in records) / n,
             "kept_tokens": sum(r["cache"]["kept_tokens"] for r in records) / n,
             "seen_tokens": sum(r["cache"]["seen_tokens"] for r in records) / n}
    stats = {k: v for k, v in stats.items() if v is not None}
    out["stats"] = {**stats, **cache_info, **extra}
    out["score"] = out["metrics"][task.primary]
    if task.kind != "perplexity":  # 95% interval of the mean primary score over the samples
        out["score_ci95"] = list(M.mean_interval([r["scores"][task.primary] for r in records
                                                        if task.primary in r["scores"]]))
    return out


def save_record(pred_path: Path, records: list, rec: dict, bar, primary: str):
    """Appends one sample's record to predictions.jsonl (one whole line) and to records, and shows the running
    mean of the primary score on the progress bar (None: no bar)."""
    cli.append_line(pred_path, json.dumps(rec))
    records.append(rec)
    if bar:
        bar.update(1)
        bar.set_postfix_str(f"{primary}={sum(x['scores'][primary] for x in records) / len(records):.3g}")


def read_records(path: Path, fingerprint: str) -> list:
    """Finished samples of an interrupted run (same fingerprint), in order, stopping at the first gap (a half-written
    or damaged line, another run's record)."""
    if not path.exists():
        return []
    recs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # a half-written last line
        if not isinstance(r, dict) or r.get("fingerprint") != fingerprint or r.get("id") != len(recs):
            break
        recs.append(r)
    return recs


def finished(d: Path, task, quiet: bool = False) -> dict:
    """The metrics of a finished task folder, or None. A damaged metrics.json (a crash of an older version, a
    disk fault) is said on stderr and the task counts as unfinished: it is computed again (resuming after the
    samples its predictions.jsonl holds)."""
    path = d / "metrics.json"
    if not path.exists():
        return None
    try:
        m = cli.read_json(path)
        if not isinstance(m, dict) or not isinstance(m.get("score"), (int, float)):
            raise UserError(f"{path} is corrupt (no score)")
    except (UserError, OSError) as e:
        if not quiet:
            print(f"note: {cli.one_line(e)}; computing {task.name} again", file=sys.stderr)
        return None
    return m


def check_sampling(a):
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if a.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: off), got {a.top_k}")
    if not (0 < a.top_p <= 1):
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    cli.check_at_least(a, num_threads=1)


def main(argv=None):
    p, cache_dests = build_parser()
    defaults = {a.dest: a.default for a in p._actions}
    cli.run_main(lambda: run(policies.parse_args(p, argv), defaults, cache_dests,
                             argv if argv is not None else sys.argv[1:]))


def run(a, defaults, cache_dests, argv):
    cli.check_at_least(a, num_samples=1, seq_length=2, max_new_tokens=0)
    check_sampling(a)
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    cli.check_at_least(a, batch_size=1)
    cli.check_compile_flags(a, a.batch_size)
    a.max_cache_length = list(a.max_cache_length)
    tasks = make_tasks(a.tasks, parse_task_opts(a.task_opts))
    if a.batch_size > 1 and any(t.kind != "generate" for t in tasks):
        raise UserError("--batch_size > 1 batches generation tasks; run perplexity and multiple-choice tasks "
                        f"({', '.join(t.name for t in tasks if t.kind != 'generate')}) with --batch_size 1")
    gen_len = a.max_new_tokens if a.max_new_tokens is not None else max(t.max_new_tokens for t in tasks)
    if any(t.kind == "generate" for t in tasks) and gen_len < 1:
        raise UserError("generation tasks need --max_new_tokens >= 1")
    device = cli.resolve_device(a.device)
    dtype = cli.resolve_dtype(a.dtype, device)
    weights = cli.resolve_checkpoint(a.checkpoint_path)
    model_name = weights.parent.name
    cfg_name = config_name(a, defaults, cache_dests)
    cfg_dir = Path(a.out_dir) / model_name / cfg_name
    if a.print_dir:
        print(cfg_dir, flush=True)  # flushed here: a closed pipe is reported by cli.run_main, not at exit
        return
    max_seq_length = a.seq_length + gen_len
    quantize.check_checkpoint_file(weights)  # a truncated model.pth: one line now, not after the samples are built
    block_size = cli.model_config(weights).block_size
    if max_seq_length > block_size:  # before any work: the samples, the model, the caches
        raise UserError(f"--seq_length {a.seq_length} + max_new_tokens {gen_len} = {max_seq_length} exceeds the "
                        f"model's context of {block_size} tokens; lower --seq_length or --max_new_tokens")
    if Path(a.out_dir).exists() and not Path(a.out_dir).is_dir():
        raise UserError(f"--out_dir {a.out_dir} is a file, not a folder")

    todo = []
    for task in tasks:
        d = cfg_dir / task_dir_name(task, a, gen_len)
        m = None if a.overwrite else finished(d, task)
        if m is not None:
            print(f"{task.name}: done ({d}); score {m['score']:.2f} (--overwrite recomputes)", file=sys.stderr)
            continue
        todo.append((task, d))
    if not todo:
        return
    tokenizer = get_tokenizer(weights.parent)
    built = build_samples(a, todo, T.PromptEncoder(tokenizer, not a.no_chat), gen_len)  # writes nothing
    with contextlib.ExitStack() as locks:  # one run per task folder, held until the run ends
        for task, d, _ in built:
            locks.enter_context(cli.folder_lock(d))
            cli.remove_stale_temporaries(d)  # a killed run's half-written files (none are read)
        # a run that held a folder may have finished it meanwhile
        built = [(task, d, s) for task, d, s in built if a.overwrite or finished(d, task, quiet=True) is None]
        if built:
            run_tasks(a, built, tokenizer, weights, device, dtype, gen_len, max_seq_length, cfg_dir, cfg_name,
                      model_name, argv)


def build_samples(a, todo, encoder, gen_len) -> list:
    """Every task's samples, built before any folder is made or the model loads: a missing dataset fails fast."""
    built = []
    for task, d in todo:
        samples = task.build(encoder, a.seq_length, a.num_samples, a.seed, a.data_dir)
        if not samples:
            raise UserError(f"task {task.name}: no samples")
        for s in samples:
            if "ids" not in s:
                s["ids"] = encoder(s["input"], s.get("answer_prefix", ""))
        longest = max(len(s["ids"]) for s in samples)
        if longest > a.seq_length:
            raise UserError(f"task {task.name}: a prompt of {longest} tokens exceeds --seq_length {a.seq_length}")
        if task.kind == "loglikelihood":  # each choice's tokens follow the prompt in the cache
            need = max(len(s["ids"]) + len(encoder.continuation(c)) for s in samples for c in s["choices"])
            if need > a.seq_length + gen_len:
                raise UserError(f"task {task.name}: prompt + choice reach {need} tokens, more than --seq_length "
                                f"{a.seq_length} + --max_new_tokens {gen_len}; raise --max_new_tokens")
        built.append((task, d, samples))
    return built


def run_tasks(a, built, tokenizer, weights, device, dtype, gen_len, max_seq_length, cfg_dir, cfg_name, model_name,
              argv):
    model = quantize.load_model(weights, device, dtype)
    for task, d, samples in built:
        longest = max(len(s["ids"]) for s in samples)
        if task.kind != "perplexity" and longest < 0.5 * a.seq_length:
            print(f"note: {task.name}'s longest prompt is {longest} tokens but caches are sized for "
                  f"{max_seq_length} (--seq_length {a.seq_length} + {gen_len}): a fractional --max_cache_length "
                  "evicts little; lower --seq_length to compress these prompts", file=sys.stderr)
    policies.setup(model, a, batch_size=a.batch_size, prompt_len=a.seq_length, max_seq_length=max_seq_length,
                   tokenizer=tokenizer)
    rt = Runtime(a, model, tokenizer, device, max_seq_length)
    judge_skipped = False
    if a.llm_judge and not os.environ.get("OPENAI_API_KEY"):
        print("note: --llm_judge skipped: OPENAI_API_KEY is not set", file=sys.stderr)
        judge_skipped, a.llm_judge = True, False

    with torch.no_grad():
        evaluate(a, built, model, tokenizer, device, dtype, rt, cfg_dir, cfg_name, model_name, weights,
                 max_seq_length, gen_len, argv, judge_skipped)


def evaluate(a, built, model, tokenizer, device, dtype, rt, cfg_dir, cfg_name, model_name, weights, max_seq_length,
             gen_len, argv, judge_skipped):
    run_started = time.perf_counter()
    run_summary = []
    base_args = {"argv": list(argv), "command": "python eval.py " + shlex.join(argv), "config": cfg_name,
                 "model": model_name, "checkpoint": str(weights), "device": device,
                 "dtype": str(dtype).split(".")[-1], "max_seq_length": max_seq_length, "max_new_tokens": gen_len,
                 "git_commit": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "args": jsonable(vars(a))}
    for task, d, samples in built:
        d.mkdir(parents=True, exist_ok=True)
        task_gen = min(task.max_new_tokens, gen_len)
        fingerprint = hashlib.sha1(json.dumps([base_args["config"], a.seq_length, gen_len, a.seed, a.no_chat,
                                               task.opts, [s["ids"] for s in samples]]).encode()).hexdigest()[:16]
        cli.atomic_write_text(d / "args.json", json.dumps({**base_args, "task": task.name, "task_options": task.opts,
                                                           "task_max_new_tokens": task_gen,
                                                           "fingerprint": fingerprint}, indent=2) + "\n")
        pred_path = d / "predictions.jsonl"
        records = [] if a.overwrite else read_records(pred_path, fingerprint)
        # the kept prefix, rewritten whole (a damaged tail or another configuration's lines go); then one appended
        # line per finished sample
        cli.atomic_write_text(pred_path, "".join(json.dumps(r) + "\n" for r in records))
        if records:
            print(f"{task.name}: resuming after {len(records)} finished samples", file=sys.stderr)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rt.warm_up(task.kind, samples[0]["ids"])
        bar = None
        if not a.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), initial=len(records), desc=f"{cfg_name[:40]} {task.name}",
                       file=sys.stderr, mininterval=5, dynamic_ncols=True)
        todo = samples[len(records):]
        step = a.batch_size if task.kind == "generate" else 1
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            torch.manual_seed(a.seed * 1_000_003 + chunk[0]["id"])  # sampling: per-sample (per-batch) seeds
            if task.kind == "generate" and a.batch_size > 1:
                results = run_generate_batch(rt, task, chunk, task_gen)
            elif task.kind == "generate":
                results = [run_generate(rt, task, chunk[0], task_gen)]
            elif task.kind == "loglikelihood":
                results = [run_loglikelihood(rt, task, chunk[0])]
            else:
                results = [run_perplexity(rt, task, chunk[0])]
            for s, r in zip(chunk, results):
                if "cache" not in r:
                    r["cache"] = cache_summary(model)
                rec = {"id": s["id"], "fingerprint": fingerprint, "prompt_tokens": len(s["ids"]), **r,
                       "meta": s.get("meta", {})}
                rec["cache"].pop("layer_kv_budget", None)
                save_record(pred_path, records, rec, bar, task.primary)
        if bar:
            bar.close()
        cs = kvcache.cache_stats(model, 0 if a.batch_size > 1 else None)  # per-sequence figures (sequence 0's)
        first = model.caches[0]
        info = {"kv_cache_bytes": kvcache.cache_stats(model)["kv_cache_bytes"], "batch_size": a.batch_size,
                "full_kv_cache_bytes_at_max_seq_length":
                a.batch_size * 2 * len(model.caches) * first.pos.shape[1] * max_seq_length * first.head_dim
                * torch.empty((), dtype=first.kv_dtype).element_size(),
                "layer_kv_budget": [x["kv_budget"] for x in cs["layers"]], "policies":
                sorted({x["policy"] for x in cs["layers"]})}
        extra = {"peak_memory_bytes": peak_memory_bytes(device), "compile_s": rt.compile_s,
                 "max_seq_length": max_seq_length, "device": device, "dtype": base_args["dtype"]}
        m = aggregate(task, records, info, extra, judge_skipped)
        m.update(config=cfg_name, model=model_name, seq_length=a.seq_length, max_new_tokens=task_gen,
                 max_cache_length=a.max_cache_length, cache_strategy=a.cache_strategy)
        cli.atomic_write_text(d / "metrics.json", json.dumps(m, indent=2) + "\n")
        line = f"{task.name}: {task.primary} = {m['score']:.2f}"
        if task.kind == "perplexity":
            line += " (" + ", ".join(f"@{k}: {v:.2f}" for k, v in m["ppl_at"].items()) + ")"
        else:
            line += " (95% interval {:.1f}-{:.1f}, {} samples)".format(*m["score_ci95"], m["num_samples"])
        st = m["stats"]
        line += (f"; kept {100 * st['compression_ratio']:.1f}% of the KV cache, "
                 f"{st['kv_cache_bytes'] / 2**20:.2f} MiB")
        if "decode_tokens_per_s" in st:
            line += f", {st['decode_tokens_per_s']:.1f} tok/s, TTFT {1000 * st['time_to_first_token_s']:.0f} ms"
        print(line, file=sys.stderr)
        run_summary.append({"task": task.name, "dir": d.name, "score": m["score"], "primary": task.primary,
                            **{k: st.get(k) for k in ("decode_tokens_per_s", "time_to_first_token_s", "tokens_per_s",
                                                      "compression_ratio", "kv_cache_bytes", "peak_memory_bytes")}})
    # one whole line per invocation (runs of other tasks of this configuration may append at the same time)
    cli.append_line(cfg_dir / "runs.jsonl", json.dumps({
        "command": base_args["command"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.perf_counter() - run_started, "compile_s": rt.compile_s, "device": device,
        "max_seq_length": max_seq_length, "peak_memory_bytes": peak_memory_bytes(device), "tasks": run_summary}))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    main()
