"""Compare cache strategies from eval.py results: a markdown table and a plot of score versus compression.

    python compare_strategies.py results/                                   # table on stdout
    python compare_strategies.py results/ --out_md table.md --out_png docs/quality_vs_compression.png
    python compare_strategies.py results/ --update_md docs/results.md       # replace the table between markers

Reads every metrics.json below the given folders (results/MODEL/CONFIG/TASK-.../metrics.json). A strategy is
the configuration without its budget flags (max_cache_length, initial_local_window, sink/recent/middle sizes),
so each strategy becomes one line through its budgets. The x axis is the compression eval.py measured: the
fraction of the tokens seen that each layer's cache still holds at the end of a sample (mean over samples and
layers, `compression_ratio` of cache.cache_stats; 1 = nothing evicted).

A metrics.json that cannot be read or lacks the fields the table needs is skipped with a warning naming it; the
outputs (--out_md, --update_md, --out_png) are written atomically (a temporary file, then a rename).
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import io
import json
import signal
from collections import defaultdict
from pathlib import Path

import cli
import metrics as M
from cli import UserError

BUDGET_KEYS = {"max_cache_length", "compression_ratio", "initial_local_window", "sink_tokens", "recent_tokens",
               "middle_budget_tokens", "uniform_stride", "block_n", "cache_length_pattern", "pyramid_beta"}
MARK_BEGIN, MARK_END = "<!-- compare_strategies:begin -->", "<!-- compare_strategies:end -->"


def problem(m) -> str:
    """Why a metrics record cannot enter the table (None: it can)."""
    if not isinstance(m, dict):
        return "not a JSON object"
    for key, kind in (("score", (int, float)), ("config", str), ("task", str), ("model", str), ("primary", str),
                      ("stats", dict)):
        if not isinstance(m.get(key), kind):
            return f"no {key}"
    for key in ("compression_ratio", "kv_cache_bytes"):
        if not isinstance(m["stats"].get(key), (int, float)):
            return f"no stats.{key}"
    return None


def load(paths, model=None, tasks=None, skipped: list = None) -> list:
    """Every usable metrics.json below `paths`; the unusable ones go to `skipped` as 'PATH: why' (and are said on
    stderr when skipped is None)."""
    rows = []
    for root in paths:
        root = Path(root)
        files = [root] if root.name == "metrics.json" else sorted(root.rglob("metrics.json"))
        for f in files:
            try:
                m = cli.read_json(f)
                why = problem(m)
            except (OSError, UserError) as e:
                why = cli.one_line(e.strerror if isinstance(e, OSError) and e.strerror else e)
                why = why.replace(f"{f} is corrupt ", "corrupt ")
            if why:
                if skipped is None:
                    print(f"warning: skipping {f}: {why}", file=sys.stderr)
                else:
                    skipped.append(f"{f}: {why}")
                continue
            if model and m.get("model") != model or tasks and m["task"] not in tasks:
                continue
            m["_path"] = str(f)
            rows.append(m)
    return rows


def split_config(name: str) -> tuple:
    """'l2__max_cache_length=0.5__prompt_compression_strategy=l2' -> ('l2', 'prompt_compression_strategy=l2',
    'max_cache_length=0.5')."""
    parts = name.split("__")
    rest = [p for p in parts[1:] if p.split("=")[0] not in BUDGET_KEYS]
    budget = [p for p in parts[1:] if p.split("=")[0] in BUDGET_KEYS]
    return parts[0], "__".join(rest), "__".join(budget)


def strategy_labels(rows) -> dict:
    """config -> legend label: the base name, or base + its non-budget flags where two variants share a base."""
    variants = defaultdict(set)
    for r in rows:
        base, rest, _ = split_config(r["config"])
        variants[base].add(rest)
    labels = {}
    for r in rows:
        base, rest, _ = split_config(r["config"])
        labels[r["config"]] = base if len(variants[base]) == 1 or not rest else f"{base} ({rest.replace('__', ', ')})"
    return labels


def budget_label(r) -> str:
    st = r["stats"]
    slots = st.get("layer_kv_budget")
    if "compression_ratio_of_prompt" in r:  # leaderboard.py: a share of each prompt (None: the full cache)
        ratio = r["compression_ratio_of_prompt"]
        return "the whole prompt" if ratio is None else f"{100 * (1 - ratio):.0f}% of the prompt"
    if not slots:
        return "?"
    avg = sum(slots) / len(slots)
    return f"{avg:.0f}/{st['max_seq_length']} ({100 * avg / st['max_seq_length']:.0f}%)"


def fmt_score(r) -> str:
    """The score, with its 95% interval over the samples where the run recorded one (eval.py: not for perplexity)."""
    if r["primary"] == "ppl":
        return f"{r['score']:.2f}"
    ci = r.get("score_ci95")
    return f"{r['score']:.1f}" + (f" [{ci[0]:.0f}-{ci[1]:.0f}]" if ci else "")


def table(rows) -> str:
    labels = strategy_labels(rows)
    task_order = []
    for r in rows:
        if r["task"] not in task_order:
            task_order.append(r["task"])
    task_order.sort(key=lambda t: (t == "ppl", t))
    by_cfg = defaultdict(dict)
    for r in rows:
        by_cfg[(r["model"], r["config"])][r["task"]] = r
    head = ["model", "strategy", "slots per layer"] + [
        f"{t} ({next(r['primary'] for r in rows if r['task'] == t)}{', lower is better' if t == 'ppl' else ''})"
        for t in task_order] + ["kept (mean)", "KV MiB (mean)", "decode tok/s (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sort_key(item):
        (model, cfg), tasks = item
        label = labels[cfg]
        kept = sum(r["stats"]["compression_ratio"] for r in tasks.values()) / len(tasks)
        return (model, label != "full", label, -kept)

    for (model, cfg), tasks in sorted(by_cfg.items(), key=sort_key):
        any_r = next(iter(tasks.values()))
        cells = [model, labels[cfg], budget_label(next((r for t, r in tasks.items() if t != "ppl"), any_r))]
        for t in task_order:
            r = tasks.get(t)
            cells.append("" if r is None else f"{fmt_score(r)} ({100 * r['stats']['compression_ratio']:.0f}% kept)")
        rs = [r for t, r in tasks.items() if t != "ppl"] or list(tasks.values())  # ppl runs use other cache sizes
        cells.append(f"{100 * sum(r['stats']['compression_ratio'] for r in rs) / len(rs):.0f}%")
        cells.append(f"{sum(r['stats']['kv_cache_bytes'] for r in rs) / len(rs) / 2**20:.2f}")
        tps = [r["stats"].get("decode_tokens_per_s") or r["stats"].get("tokens_per_s") for r in rs]
        tps = [x for x in tps if x]
        cells.append(f"{sum(tps) / len(tps):.1f}" if tps else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_scores(r) -> dict:
    """id -> the primary score of each sample, from the predictions.jsonl beside a metrics.json."""
    path = Path(r["_path"]).with_name("predictions.jsonl")
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                out[rec["id"]] = float(rec["scores"][r["primary"]])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def significance(rows) -> str:
    """Per task folder (the same samples) and budget: the configurations ranked by score, each with the paired
    p-value (metrics.paired_p_value over the samples both scored) against the best one and against full."""
    labels = strategy_labels(rows)
    groups = defaultdict(list)
    for r in rows:
        if r["primary"] != "ppl":
            groups[Path(r["_path"]).parent.name].append(r)
    head = ["task folder", "budget", "strategy", "score [95% interval]", "n", "p vs best", "p vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for folder in sorted(groups):
        sub = groups[folder]
        scores = {r["_path"]: sample_scores(r) for r in sub}
        full = next((r for r in sub if labels[r["config"]] == "full"), None)
        budgets = sorted({split_config(r["config"])[2] for r in sub if r is not full})
        for budget in budgets:
            ranked = sorted((r for r in sub if r is not full and split_config(r["config"])[2] == budget),
                            key=lambda r: -r["score"])
            for r in ranked:
                lines.append("| " + " | ".join([folder, budget_label(r), labels[r["config"]], fmt_score(r),
                                                str(r.get("num_samples", len(scores[r["_path"]]))),
                                                paired_cell(scores, r, ranked[0]),
                                                paired_cell(scores, r, full)]) + " |")
    return "\n".join(lines) + "\n"


def paired_cell(scores: dict, r, other) -> str:
    """The paired p-value of r against other over the samples both scored ('' for itself or no other)."""
    if other is None or other is r:
        return ""
    a, b = scores[r["_path"]], scores[other["_path"]]
    ids = sorted(set(a) & set(b))
    return f"{M.paired_p_value([a[i] for i in ids], [b[i] for i in ids]):.3g}" if ids else ""


def plot(rows, out: Path, title: str = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = strategy_labels(rows)
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == "ppl", t))
    n = len(tasks)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4.6 * cols, 9), 3.8 * nrows + (1.2 if n == 1 else 0)),
                             squeeze=False)  # one panel: room for the title and a legend of many strategies
    names = sorted({labels[r["config"]] for r in rows}, key=lambda s: (s != "full", s))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {s: cmap(i % cmap.N) for i, s in enumerate(names)}
    markers = "osD^v<>pPXh*"
    for ax, task in zip(axes.flat, tasks):
        sub = [r for r in rows if r["task"] == task]
        for i, s in enumerate(names):
            pts = sorted((r["stats"]["compression_ratio"], r["score"], r.get("score_ci95") or (r["score"],) * 2)
                         for r in sub if labels[r["config"]] == s)
            if not pts:
                continue
            xs, ys, cis = zip(*pts)
            yerr = [[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]]  # 95% interval
            if s == "full":
                ax.axhline(ys[0], color="k", ls="--", lw=1, label="full")
                ax.errorbar(xs, ys, yerr=yerr, fmt="k*", ms=10, capsize=3)
            else:
                ax.errorbar(xs, ys, yerr=yerr, marker=markers[i % len(markers)], color=colors[s], label=s, lw=1.5,
                            ms=5, capsize=3, elinewidth=0.8)
        r0 = sub[0]
        ax.set_title(f"{task}", fontsize=10)
        ax.set_xlabel("KV kept / tokens seen")
        ax.set_ylabel(f"{r0['primary']}" + (" (lower is better)" if not r0.get("higher_is_better", True) else ""))
        if task == "ppl" or r0["primary"] == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * ((len(handles) - 1) // 6), 1, 0.95 if title else 1))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    cli.atomic_write_bytes(out, buf.getvalue())


def update_markdown(path: Path, text: str):
    try:
        doc = path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError as e:
        raise UserError(f"--update_md {path} is not UTF-8 text ({e.reason})") from None
    block = f"{MARK_BEGIN}\n{text}{MARK_END}"
    if MARK_BEGIN in doc and MARK_END in doc:
        pre, rest = doc.split(MARK_BEGIN, 1)
        _, post = rest.split(MARK_END, 1)
        doc = pre + block + post
    else:
        doc = doc + ("\n" if doc and not doc.endswith("\n") else "") + block + "\n"
    cli.atomic_write_text(path, doc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, default=[Path("results")], help="results folders or metrics.json")
    p.add_argument("--model", default=None, help="only this model folder name")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    p.add_argument("--out_md", type=Path, default=None, help="write the table here (default: stdout)")
    p.add_argument("--update_md", type=Path, default=None,
                   help=f"replace the table between {MARK_BEGIN} and {MARK_END} in this markdown file")
    p.add_argument("--out_png", type=Path, default=None, help="plot of score versus compression (matplotlib, Agg)")
    p.add_argument("--title", default=None)
    p.add_argument("--significance", type=Path, default=None,
                   help="also write, per task and budget, the configurations ranked with paired p-values (McNemar's "
                        "exact test on 0/1 scores) against the best one and against full")
    cli.one_line_errors(p)
    return cli.run_main(lambda: run(p.parse_args(argv)))


def run(a):
    missing = [str(x) for x in a.paths if not x.exists()]
    if missing:
        raise UserError(f"no such results folder: {', '.join(missing)}")
    for flag, path in (("--out_md", a.out_md), ("--update_md", a.update_md), ("--out_png", a.out_png),
                       ("--significance", a.significance)):
        if path is not None:  # before reading anything: a bad output path fails first
            if path.is_dir():
                raise UserError(f"{flag} {path} is a folder, not a file")
            cli.check_writable(path.parent, flag)
    skipped = []
    rows = load(a.paths, a.model, a.tasks, skipped)
    if not rows:
        raise UserError(f"no usable metrics.json under {', '.join(map(str, a.paths))}"
                        + (f" (skipped {len(skipped)}: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''})"
                           if skipped else ""))
    for x in skipped:
        print(f"warning: skipping {x}", file=sys.stderr)
    t = table(rows)
    if a.out_md:
        cli.atomic_write_text(a.out_md, t)
    if a.update_md:
        update_markdown(a.update_md, t)
    if not a.out_md and not a.update_md:
        sys.stdout.write(t)
        sys.stdout.flush()
    if a.significance:
        cli.atomic_write_text(a.significance, significance(rows))
        print(f"wrote {a.significance}", file=sys.stderr)
    if a.out_png:
        plot(rows, a.out_png, a.title)
        print(f"wrote {a.out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    sys.exit(main())
