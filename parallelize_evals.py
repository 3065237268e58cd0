"""Run many eval.py commands over GPUs (or CPU workers), resumably, one log per worker.

    # a command file, one command per line (# comments and blank lines ignored), as in experiments/*.txt
    python parallelize_evals.py --command_file experiments/rulerniah.txt --num_gpus 8

    # the cartesian product configs x tasks x cache sizes (+ one full-cache run per task with --add_full)
    python parallelize_evals.py --configs l2 lsh heavy_hitter --tasks niah_single_2 vt --cache_sizes 0.5 0.25 \
        --add_full --eval_args "--num_samples 20 --seq_length 1024" --num_gpus 4

    # CPU only: 2 workers of 1 thread each; --dry_run prints the commands and the device assignment
    python parallelize_evals.py --command_file experiments/smollm2_cpu.txt --num_gpus 0 --workers 2 --dry_run

Worker k runs with CUDA_VISIBLE_DEVICES=k (with --num_gpus 0: CUDA_VISIBLE_DEVICES="" and --threads_per_worker
CPU threads). Free workers take the next command from a shared queue; --dry_run shows the round-robin order in
which they start. A command that exits 0 leaves a done-marker (STATE_DIR/done/HASH.json) and is skipped on the
next invocation (eval.py itself also skips finished tasks), so an interrupted sweep resumes where it stopped.
Logs: STATE_DIR/logs/worker{k}.log. Configs: a cache_configs/NAME.yaml, else a policy name of policies.POLICIES.
"""
import argparse
import hashlib
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from policies import POLICIES

REPO = Path(__file__).resolve().parent


def read_command_file(path: Path) -> list:
    cmds = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            cmds.append(line)
    return cmds


def config_flags(name: str) -> list:
    if (REPO / "cache_configs" / f"{name}.yaml").exists() or name.endswith(".yaml"):
        return ["--cache_config", name]
    if name in POLICIES:
        return ["--cache_strategy", name]
    known = sorted(p.stem for p in (REPO / "cache_configs").glob("*.yaml"))
    raise SystemExit(f"error: unknown config {name!r}: no cache_configs/{name}.yaml and no such policy "
                     f"(configs: {', '.join(known)}; policies: {', '.join(POLICIES)})")


def cartesian(configs, tasks, sizes, add_full, eval_args, python="python") -> list:
    extra = shlex.split(eval_args or "")
    cmds = []
    for task in tasks:
        if add_full:
            cmds.append(shlex.join([python, "eval.py", "--cache_strategy", "full", "--tasks", task, *extra]))
        for cfg in configs:
            for size in sizes:
                cmds.append(shlex.join([python, "eval.py", *config_flags(cfg), "--max_cache_length", str(size),
                                        "--tasks", task, *extra]))
    return cmds


def command_key(cmd: str) -> str:
    return hashlib.sha1(" ".join(shlex.split(cmd)).encode()).hexdigest()[:16]


def worker_env(k: int, num_gpus: int, threads: int) -> dict:
    env = dict(os.environ)
    if num_gpus > 0:
        env["CUDA_VISIBLE_DEVICES"] = str(k)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def device_label(k: int, num_gpus: int) -> str:
    return f"gpu {k}" if num_gpus > 0 else f"cpu worker {k}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--command_file", type=Path, help="one eval.py command per line")
    p.add_argument("--configs", nargs="+", default=[], help="cache configs (YAML names) or policy names")
    p.add_argument("--tasks", nargs="+", default=[])
    p.add_argument("--cache_sizes", nargs="+", default=[], help="--max_cache_length values")
    p.add_argument("--add_full", action="store_true", help="also one full-cache run per task")
    p.add_argument("--eval_args", default="", help="extra eval.py flags for every cartesian command")
    p.add_argument("--num_gpus", type=int, default=None,
                   help="GPUs to use, one worker each (default: all visible; 0 = CPU workers)")
    p.add_argument("--workers", type=int, default=1, help="CPU workers when --num_gpus 0")
    p.add_argument("--threads_per_worker", type=int, default=1, help="CPU threads per worker (--num_gpus 0)")
    p.add_argument("--state_dir", type=Path, default=REPO / "results" / "parallel",
                   help="done-markers and worker logs")
    p.add_argument("--rerun", action="store_true", help="ignore done-markers")
    p.add_argument("--dry_run", action="store_true", help="print the commands and their device assignment")
    a = p.parse_args(argv)

    if a.command_file:
        if a.configs or a.tasks:
            raise SystemExit("error: give either --command_file or --configs/--tasks/--cache_sizes, not both")
        if not a.command_file.exists():
            raise SystemExit(f"error: command file {a.command_file} not found")
        cmds = read_command_file(a.command_file)
    else:
        if not a.tasks or not (a.configs and a.cache_sizes or a.add_full):
            raise SystemExit("error: give --command_file, or --tasks with --configs and --cache_sizes (and/or "
                             "--add_full)")
        cmds = cartesian(a.configs, a.tasks, a.cache_sizes, a.add_full, a.eval_args, python=sys.executable)
    if a.num_gpus is None:
        try:
            import torch

            a.num_gpus = torch.cuda.device_count()
        except ImportError:
            a.num_gpus = 0
    n_workers = a.num_gpus if a.num_gpus > 0 else max(1, a.workers)
    done_dir, log_dir = a.state_dir / "done", a.state_dir / "logs"
    pending, skipped = [], []
    for c in cmds:
        (skipped if (done_dir / f"{command_key(c)}.json").exists() and not a.rerun else pending).append(c)

    if a.dry_run:
        print(f"# {len(cmds)} commands, {len(skipped)} already done, {len(pending)} to run on {n_workers} "
              f"{'GPU' if a.num_gpus > 0 else 'CPU'} worker(s)")
        for c in skipped:
            print(f"[done]       {c}")
        for i, c in enumerate(pending):
            k = i % n_workers
            env = "CUDA_VISIBLE_DEVICES=" + (str(k) if a.num_gpus > 0 else "")
            print(f"[{device_label(k, a.num_gpus)}] {env} {c}")
        return 0

    done_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    q = queue.Queue()
    for c in pending:
        q.put(c)
    failures, lock = [], threading.Lock()

    def work(k):
        env = worker_env(k, a.num_gpus, a.threads_per_worker)
        with open(log_dir / f"worker{k}.log", "a") as log:
            while True:
                try:
                    c = q.get_nowait()
                except queue.Empty:
                    return
                args = shlex.split(c)
                if args and args[0] in ("python", "python3"):
                    args[0] = sys.executable
                if a.num_gpus == 0 and "eval.py" in " ".join(args[:3]) and "--num_threads" not in args:
                    args += ["--num_threads", str(a.threads_per_worker)]
                log.write(f"\n=== {time.strftime('%H:%M:%S')} [{device_label(k, a.num_gpus)}] {c}\n")
                log.flush()
                t0 = time.time()
                r = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                dt = time.time() - t0
                log.write(f"=== exit {r.returncode} after {dt:.0f} s\n")
                log.flush()
                with lock:
                    if r.returncode == 0:
                        (done_dir / f"{command_key(c)}.json").write_text(json.dumps(
                            {"command": c, "seconds": dt, "worker": k, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
                    else:
                        failures.append((c, r.returncode, k))
                    print(f"[{device_label(k, a.num_gpus)}] {'ok' if r.returncode == 0 else f'FAILED ({r.returncode})'} "
                          f"{dt:6.0f} s  {c}", flush=True)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(pending) - len(failures)} ran, {len(skipped)} skipped (done before), {len(failures)} failed"
          + (f"; logs in {log_dir}" if failures else ""), flush=True)
    for c, rc, k in failures:
        print(f"  failed (exit {rc}, see {log_dir / f'worker{k}.log'}): {c}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
