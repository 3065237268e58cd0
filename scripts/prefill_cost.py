"""Prefill cost of every policy against the full cache's, interleaved in one process (each round prefills the
same prompt once per configuration, so background load hits every configuration alike); medians over rounds.

    OMP_NUM_THREADS=1 python scripts/prefill_cost.py --rounds 2 --out results/prefill_cost.json

Budget: --compression_ratio 0.5 (half the prompt removed) for every configuration but the full cache. Eager prefill
(what generate.py runs without --compile_prefill), fp32, the default model unless --checkpoint_path is given.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the engine is one level up
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import cli  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402
import runtime  # noqa: E402
from quantize import load_model  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

CONFIGS = {
    "full": dict(cache_strategy="full"),
    **{name: dict(cache_strategy=name) for name in ("recent_global", "random", "keep_it_odd", "l2", "heavy_hitter",
                                                      "keydiff", "tova", "expected_attention", "hybrid",
                                                      "sink_recent", "merge_pyramid")},
    "lsh": dict(cache_strategy="lsh", lsh_dim=8),
    "lacache": dict(cache_strategy="lacache", recent_window=0),
    "adakv(keydiff)": dict(cache_strategy="keydiff", keep_set="adakv"),
    "chunkkv(keydiff)": dict(cache_strategy="keydiff", keep_set="chunkkv"),
    "criticalkv(heavy_hitter)": dict(cache_strategy="heavy_hitter", keep_set="criticalkv"),
    "kvzip(l2)": dict(cache_strategy="l2", prompt_compression_strategy="kvzip"),
}


def run(a):
    cli.check_at_least(a, rounds=1)
    folder = cli.resolve_checkpoint(a.checkpoint_path).parent
    model = load_model(folder, "cpu", torch.float32)
    tok = get_tokenizer(folder)
    ids = generate.encode_prompt(tok, Path(a.prompt_file).read_text(), True, "chatml")[:a.max_prompt_tokens]
    T = len(ids)
    times = {k: [] for k in CONFIGS}
    for rnd in range(a.rounds):
        for name, opts in CONFIGS.items():
            budget = {} if name == "full" else {"compression_ratio": 0.5}
            policies.setup(model, max_seq_length=T + 8, prompt_len=T, tokenizer=tok, **budget, **opts)
            t = time.perf_counter()
            with torch.no_grad():
                generate.prefill_chunks(model, ids, runtime.prefill, 0, {})
            times[name].append(time.perf_counter() - t)
            print(f"round {rnd} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    full = statistics.median(times["full"])
    out = {"prompt_tokens": T, "threads": torch.get_num_threads(), "rounds": a.rounds,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "vs_full": {k: statistics.median(v) / full for k, v in times.items()}}
    for k in CONFIGS:
        print(f"| {k} | {out['median_s'][k]:.1f} | {out['vs_full'][k]:.2f}x |")
    if a.out:
        cli.atomic_write_text(Path(a.out), json.dumps(out, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=None, help="model.pth (default: the embedded model)")
    p.add_argument("--prompt_file", default=str(REPO / "prompts" / "long_story.txt"), help="the prompt's text")
    p.add_argument("--max_prompt_tokens", type=int, default=3000, help="the prompt is cut to this many tokens")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every configuration (medians reported)")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    return cli.run_main(lambda: run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
