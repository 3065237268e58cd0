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

Every command counts: one that cannot start (a missing program, an unbalanced quote) fails like one that exits
non-zero (logged, counted, no done-marker, so it is tried again next time) and the others still run; the summary
line says how many succeeded, failed and were skipped. One sweep per STATE_DIR at a time (a lock). Ctrl-C stops
the running commands (each gets the interrupt), prints the summary so far and exits 130.
With the parent's CUDA_VISIBLE_DEVICES set (e.g. 2,3), worker k gets its k-th entry. --num_gpus N needs N visible
GPUs (a --dry_run still shows the plan, with a note, e.g. to prepare a sweep for another machine).
"""
import os
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load torch: the one line cli.run_main gives later
    import signal

    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import argparse
import hashlib
import json
import queue
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import cli
from cli import UserError
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
    raise UserError(f"unknown config {name!r}: no cache_configs/{name}.yaml and no such policy "
                    f"(configs: {', '.join(known)}; policies: {', '.join(POLICIES)})")


def cartesian(configs, tasks, sizes, add_full, eval_args, python="python") -> list:
    try:
        extra = shlex.split(eval_args or "")
    except ValueError as e:
        raise UserError(f"--eval_args {eval_args!r}: {e}") from None
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
    try:
        words = " ".join(shlex.split(cmd))
    except ValueError:  # an unbalanced quote: the command fails when run; its key is its text
        words = cmd
    return hashlib.sha1(words.encode()).hexdigest()[:16]


def gpu_ids(num_gpus: int) -> list:
    """The device each GPU worker gets: the k-th of the parent's CUDA_VISIBLE_DEVICES when set, else k."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [x.strip() for x in visible.split(",") if x.strip()]
        return ids[:num_gpus]
    return [str(k) for k in range(num_gpus)]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def worker_env(k: int, num_gpus: int, threads: int) -> dict:
    env = dict(os.environ)
    if num_gpus > 0:
        env["CUDA_VISIBLE_DEVICES"] = gpu_ids(num_gpus)[k]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def device_label(k: int, num_gpus: int) -> str:
    return f"gpu {k}" if num_gpus > 0 else f"cpu worker {k}"


def command_args(c: str, num_gpus: int, threads: int) -> list:
    """argv of a command line (ValueError: an unbalanced quote)."""
    args = shlex.split(c)
    if not args:
        raise ValueError("empty command")
    if args[0] in ("python", "python3"):
        args[0] = sys.executable
    head = " ".join(args[:3])
    if num_gpus == 0 and ("eval.py" in head or "leaderboard.py" in head) and "--num_threads" not in args:
        args += ["--num_threads", str(threads)]
    return args


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
    cli.one_line_errors(p)
    return cli.run_main(lambda: run(p.parse_args(argv)))


def run(a):
    if a.command_file:
        if a.configs or a.tasks:
            raise UserError("give either --command_file or --configs/--tasks/--cache_sizes, not both")
        if not a.command_file.exists():
            raise UserError(f"command file {a.command_file} not found")
        if a.command_file.is_dir():
            raise UserError(f"command file {a.command_file} is a folder")
        try:
            cmds = read_command_file(a.command_file)
        except UnicodeDecodeError as e:
            raise UserError(f"command file {a.command_file} is not UTF-8 text ({e.reason})") from None
    else:
        if not a.tasks or not (a.configs and a.cache_sizes or a.add_full):
            raise UserError("give --command_file, or --tasks with --configs and --cache_sizes (and/or --add_full)")
        cmds = cartesian(a.configs, a.tasks, a.cache_sizes, a.add_full, a.eval_args, python=sys.executable)
    cli.check_at_least(a, workers=1, threads_per_worker=1)
    if a.num_gpus is not None and a.num_gpus < 0:
        raise UserError(f"--num_gpus must be >= 0 (0: CPU workers), got {a.num_gpus}")
    visible = visible_gpus() if a.num_gpus is None or a.num_gpus > 0 else 0
    if a.num_gpus is None:
        a.num_gpus = visible
    elif a.num_gpus > visible:
        if not a.dry_run:
            raise UserError(f"--num_gpus {a.num_gpus}: {visible} GPU(s) visible on this machine; use --num_gpus "
                            f"{visible}" + (" --workers N for CPU workers" if visible == 0 else ""))
        print(f"note: {visible} GPU(s) visible on this machine; a real run here would refuse --num_gpus "
              f"{a.num_gpus}", file=sys.stderr)
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
        ids = gpu_ids(a.num_gpus) if a.num_gpus > 0 else []
        for i, c in enumerate(pending):
            k = i % n_workers
            env = "CUDA_VISIBLE_DEVICES=" + (ids[k] if k < len(ids) else str(k) if a.num_gpus > 0 else "")
            print(f"[{device_label(k, a.num_gpus)}] {env} {c}")
        return 0

    with cli.folder_lock(a.state_dir, "--state_dir"):
        return sweep(a, pending, skipped, n_workers, done_dir, log_dir)


def sweep(a, pending, skipped, n_workers, done_dir, log_dir):
    cli.make_folder(done_dir, "--state_dir")
    cli.make_folder(log_dir, "--state_dir")
    q = queue.Queue()
    for c in pending:
        q.put(c)
    ok, failures, lock = [], [], threading.Lock()
    running, stop = set(), threading.Event()  # the children now running; set on Ctrl-C: start nothing more

    def run_one(k, c, env, log):
        """(exit code, seconds); a command that cannot start gets 126/127 (as a shell says) or 2 (unparsable)."""
        log.write(f"\n=== {time.strftime('%H:%M:%S')} [{device_label(k, a.num_gpus)}] {c}\n")
        log.flush()
        t0 = time.time()
        try:
            args = command_args(c, a.num_gpus, a.threads_per_worker)
        except ValueError as e:
            log.write(f"=== cannot parse the command: {e}\n")
            return 2, 0.0
        try:
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            log.write(f"=== cannot start {args[0]}: {e.strerror or e}\n")
            return 127 if isinstance(e, FileNotFoundError) else 126, 0.0
        with lock:
            running.add(proc)
            late = stop.is_set()  # Ctrl-C came while it was starting: stop_children may not have seen it
        if late:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait()
        finally:
            with lock:
                running.discard(proc)
        dt = time.time() - t0
        log.write(f"=== exit {rc} after {dt:.0f} s\n")
        log.flush()
        return rc, dt

    logs = [open(log_dir / f"worker{k}.log", "a") for k in range(n_workers)]  # an unwritable folder: fails here

    def work(k):
        env = worker_env(k, a.num_gpus, a.threads_per_worker)
        with logs[k] as log:
            while not stop.is_set():
                try:
                    c = q.get_nowait()
                except queue.Empty:
                    return
                try:
                    rc, dt = run_one(k, c, env, log)
                except Exception as e:  # never lose a worker (and the commands left in the queue) to one command
                    rc, dt = 1, 0.0
                    log.write(f"=== failed to run: {type(e).__name__}: {cli.one_line(e)}\n")
                if rc == 0:
                    try:
                        cli.atomic_write_text(done_dir / f"{command_key(c)}.json", json.dumps(
                            {"command": c, "seconds": dt, "worker": k,
                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
                    except OSError as e:  # it ran; it will run again next time
                        log.write(f"=== cannot write its done-marker: {cli.one_line(e)}\n")
                with lock:
                    (ok if rc == 0 else failures).append((c, rc, k))
                    try:
                        print(f"[{device_label(k, a.num_gpus)}] {'ok' if rc == 0 else f'FAILED ({rc})'} "
                              f"{dt:6.0f} s  {c}", flush=True)
                    except (OSError, ValueError):  # stdout closed: the sweep goes on (the summary reports it)
                        pass

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n_workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()
        stop_children(running, lock)
        for t in threads:
            t.join(timeout=5)
        summary(ok, failures, skipped, len(pending), log_dir)
        raise
    summary(ok, failures, skipped, len(pending), log_dir)
    if failures:
        print(f"error: {len(failures)} of {len(pending)} commands failed (see {log_dir}); they run again next time",
              file=sys.stderr)
        return 1
    return 0


def stop_children(running: set, lock, grace_s: float = 10.0):
    """Ctrl-C: every running command gets SIGINT (eval.py stops with its samples so far written), then SIGKILL."""
    with lock:
        procs = list(running)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGINT)
        except OSError:
            pass
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary(ok, failures, skipped, n_pending, log_dir):
    not_run = n_pending - len(ok) - len(failures)
    print(f"{len(ok)} ran ok, {len(failures)} failed, {len(skipped)} skipped (done before)"
          + (f", {not_run} not run (interrupted)" if not_run else "")
          + (f"; logs in {log_dir}" if failures else ""), flush=True)
    for c, rc, k in failures:
        print(f"  failed (exit {rc}, see {log_dir / f'worker{k}.log'}): {c}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cli.run_main reports Ctrl-C
    sys.exit(main())
