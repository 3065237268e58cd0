"""Bad input and faults, across the entry points: generate.py, eval.py, parallelize_evals.py, compare_strategies.py,
quantize.py, perplexity.py, visualize_eviction.py, benchmark.py.

Each case of the table asserts the exit code, exactly one stderr line, starting with `error:` (or `interrupted`),
no traceback, and, for writers, that the results an earlier run left are intact (same bytes, no temporary file
left behind). The table runs in-process (main(argv), ~no start-up cost) on a tiny random checkpoint; the cases
that need a real process (two runs at once, SIGINT, kill -9, a closed pipe) run as subprocesses.

Read-only output folders: the tests may run as root, where chmod does not stop a write, so a read-only file system
is simulated in-process: os.open / open / os.mkdir / os.replace raise EROFS for paths below the folder (`read_only`).
A kill between the write and the rename is simulated two ways: os.replace raising (the tool's own clean-up runs),
and a real SIGKILL at that point in a subprocess (cli's KVC_FAULT_BEFORE_RENAME hook; nothing cleans up).
"""
import builtins
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

import benchmark
import cli
import compare_strategies
import eval as ev
import generate
import parallelize_evals
import perplexity
import quantize
import visualize_eviction
from model import ModelArgs

REPO = Path(__file__).resolve().parent.parent
TINY = dict(name="tiny-rel", vocab_size=320, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
            block_size=256)
MAINS = {"generate": generate.main, "eval": ev.main, "parallelize_evals": parallelize_evals.main, "compare_strategies": compare_strategies.main,
         "quantize": quantize.main, "perplexity": perplexity.main, "visualize_eviction": visualize_eviction.main,
         "benchmark": benchmark.main}
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)  # ~3000 byte tokens


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random 2-layer checkpoint folder (config.json, model.pth, a byte-level tokenizer.json), context 256."""
    from tests.test_tp import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("rel") / "tiny", ModelArgs(**TINY))


def damaged_copy(tiny: Path, dest: Path, how: str) -> Path:
    """A copy of the tiny checkpoint folder with model.pth truncated / empty / text, or config.json cut short."""
    dest.mkdir(parents=True)
    for f in tiny.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    weights = dest / "model.pth"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "text":
        weights.write_text("not a checkpoint\n")
    elif how == "config":
        cfg = (dest / "config.json").read_text()
        (dest / "config.json").write_text(cfg[: len(cfg) // 2])
    return dest


def invoke(entry: str, argv) -> int:
    try:
        rc = MAINS[entry]([str(x) for x in argv])
    except SystemExit as e:
        rc = e.code
    return 0 if rc is None else rc


def assert_one_line(err: str, code: int, needle: str = "", progress: bool = False):
    """stderr is one line (`error: ...`, or `interrupted` for 130) naming the problem. With progress (a run that
    failed while writing its results, after its work), the run's own progress lines may come first: the failure
    is still one line, the last, and the only error line."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    first = "interrupted" if code == 130 else "error: "
    if progress:
        assert sum(x.startswith("error:") for x in lines) == (code != 130), err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith(first), err
    assert needle in lines[0], (needle, err)


def snapshot(root: Path, names=None) -> dict:
    """Every file below root (dot files included; only those called one of `names` when given) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (names is None or p.name in names)} if root.exists() else {}


def temporaries(root: Path) -> list:
    return [p for p in root.rglob(f"*{cli.TMP_SUFFIX}")] if root.exists() else []


def read_only(monkeypatch, root: Path):
    """Simulates a read-only file system below root (EROFS on every write, as mount -o ro gives; works as root)."""
    root = os.path.abspath(root)
    real_os_open, real_open, real_io_open, real_mkdir = os.open, builtins.open, io.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def under(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)

    def deny(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    def os_open(p, flags, *a, **k):
        if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            deny(p)
        return real_os_open(p, flags, *a, **k)

    def py_open(real):
        def opener(p, mode="r", *a, **k):
            if under(p) and any(c in mode for c in "wax+"):
                deny(p)
            return real(p, mode, *a, **k)
        return opener

    def mkdir(p, *a, **k):
        if under(p):
            if os.path.exists(p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(p))
            deny(p)
        return real_mkdir(p, *a, **k)

    def moved(real):
        def move(src, dst, *a, **k):
            if under(src) or under(dst):
                deny(dst)
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open(real_open))
    monkeypatch.setattr(io, "open", py_open(real_io_open))
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", moved(real_replace))
    monkeypatch.setattr(os, "rename", moved(real_rename))


def fail_rename(monkeypatch, name: str):
    """os.replace onto a file called `name` fails (as if the process died between the write and the rename; the
    tool's own clean-up still runs)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            raise OSError(errno.EIO, "Input/output error (simulated fault before the rename)", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


class Ctx:
    """What a case's argv / setup / fault / check functions get: tmp (a fresh folder), tiny (the checkpoint)."""

    def __init__(self, tmp: Path, tiny: Path, monkeypatch):
        self.tmp, self.tiny, self.mp = tmp, tiny, monkeypatch
        self.out = tmp / "out"
        self.keep = None  # the folder whose files the case checks are intact afterwards
        self.keep_names = None  # only these files of it (a run that recomputes rewrites the others on purpose)
        self.held = []  # locks held during the call

    @property
    def eval_args(self) -> list:
        return ["--checkpoint_path", self.tiny, "--tasks", "ppl", "--seq_length", "48", "--num_samples", "2",
                "--no_progress", "--out_dir", self.out]

    @property
    def task_dir(self) -> Path:
        return self.out / "tiny" / "full" / "ppl-len48-gen0-n2"

    def text_file(self, text=TEXT) -> Path:
        f = self.tmp / "text.txt"
        f.write_text(text)
        return f

    def command_file(self, *lines) -> Path:
        f = self.tmp / "cmds.txt"
        f.write_text("\n".join(lines) + "\n")
        return f

    def fake_metrics(self, root: Path, config="l2__max_cache_length=0.5", task="vt", corrupt=False) -> Path:
        d = root / "SmolLM2-135M-Instruct" / config / f"{task}-len384-gen32-n10"
        d.mkdir(parents=True)
        m = {"task": task, "config": config, "model": "SmolLM2-135M-Instruct", "score": 50.0,
             "primary": "string_match_all", "higher_is_better": True, "metrics": {"string_match_all": 50.0},
             "stats": {"compression_ratio": 0.5, "kv_cache_bytes": 2**20, "layer_kv_budget": [208] * 30,
                       "max_seq_length": 416, "decode_tokens_per_s": 10.0}}
        text = json.dumps(m)
        (d / "metrics.json").write_text(text[: len(text) // 2] if corrupt else text)
        return d / "metrics.json"

    def earlier_eval(self, names=None):
        """A finished eval.py run in self.out; its files (or those called `names`) must stay intact."""
        assert invoke("eval", self.eval_args) == 0
        self.keep, self.keep_names = self.out, names

    def tiny_config_json(self) -> Path:
        f = self.tmp / "tiny.json"
        ModelArgs(**TINY).to_json(f)
        return f

    def hold_lock(self, folder: Path, flag="--out_dir"):
        cm = cli.folder_lock(folder, flag)
        cm.__enter__()
        self.held.append(cm)


@dataclass
class Case:
    id: str
    entry: str
    argv: Callable  # Ctx -> list
    code: int
    needle: str = ""
    setup: Optional[Callable] = None  # Ctx -> None (before the call; may set ctx.keep)
    fault: Optional[Callable] = None  # Ctx -> None (monkeypatches, right before the call)
    check: Optional[Callable] = None  # (Ctx, stdout) -> None
    progress: bool = False  # fails after its work: the run's progress lines precede the one error line


def _gen(ctx, *argv, prompt=True, ckpt=None) -> list:
    """generate.py on the tiny checkpoint (a short prompt unless prompt=False), plus argv."""
    return ["--checkpoint_path", ckpt or ctx.tiny / "model.pth", "--max_new_tokens", "2", "--no_chat",
            *(["--prompt", "hello there"] if prompt else []), *argv]


def _existing(ctx, name, data=b"old results\n") -> Path:
    f = ctx.tmp / "keep" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    ctx.keep = f.parent
    return f


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------
def _ppl_text(ctx, n):
    return ["--checkpoint_path", ctx.tiny, "--text", ctx.text_file(), "--num_eval_tokens", n]


def _vis(ctx, *extra):
    return ["--checkpoint_path", ctx.tiny, "--out", ctx.tmp / "ev.png", *extra]


def _bench(ctx, *extra):
    return ["--random_weights", "--model", ctx.tiny_config_json(), "--device", "cpu", "--out", ctx.tmp / "b", *extra]


def _pe(ctx, *extra):
    return ["--state_dir", ctx.tmp / "state", *extra]


def _quant(ctx, *extra, ckpt=None):
    return ["--checkpoint_path", ckpt or ctx.tiny / "model.pth", *extra]


def _pe_mixed_file(ctx):
    return ctx.command_file("nosuchprogram --flag", 'python -c "import sys; print(1)', "python -c pass")


def _pe_mixed_check(ctx, out):
    assert "1 ran ok, 2 failed, 0 skipped" in out, out
    assert len(list((ctx.tmp / "state" / "done").glob("*.json"))) == 1
    log = (ctx.tmp / "state" / "logs" / "worker0.log").read_text()
    assert "cannot start nosuchprogram" in log and "cannot parse the command" in log
    # the next invocation skips the one that succeeded and tries the two failed ones again
    again = io.StringIO()
    real = sys.stdout
    sys.stdout = again
    try:
        rc = invoke("parallelize_evals", _pe(ctx, "--command_file", ctx.tmp / "cmds.txt", "--num_gpus", "0"))
    finally:
        sys.stdout = real
    assert rc == 1 and "0 ran ok, 2 failed, 1 skipped (done before)" in again.getvalue()


CASES = [
    # ---- eval.py -----------------------------------------------------------------------------------------------
    Case("eval-num_samples-0", "eval", lambda c: [*c.eval_args, "--num_samples", "0"], 2, "--num_samples"),
    Case("eval-seq_length-1", "eval", lambda c: [*c.eval_args, "--seq_length", "1"], 2, "--seq_length"),
    Case("eval-max_new_tokens-neg", "eval", lambda c: [*c.eval_args, "--max_new_tokens", "-1"], 2,
         "--max_new_tokens"),
    Case("eval-batch_size-0", "eval", lambda c: [*c.eval_args, "--batch_size", "0"], 2, "--batch_size"),
    Case("eval-temperature-nan", "eval", lambda c: [*c.eval_args, "--temperature", "nan"], 2, "--temperature"),
    Case("eval-top_p-0", "eval", lambda c: [*c.eval_args, "--top_p", "0"], 2, "--top_p"),
    Case("eval-top_k-neg", "eval", lambda c: [*c.eval_args, "--top_k", "-1"], 2, "--top_k"),
    Case("eval-num_threads-0", "eval", lambda c: [*c.eval_args, "--num_threads", "0"], 2, "--num_threads"),
    Case("eval-unknown-task", "eval", lambda c: [*c.eval_args, "--tasks", "nope"], 2, "nope"),
    Case("eval-task_opts-no-equals", "eval", lambda c: [*c.eval_args, "--task_opts", "depth"], 2, "KEY=VALUE"),
    Case("eval-unknown-flag", "eval", lambda c: [*c.eval_args, "--bogus"], 2, "--bogus"),
    Case("eval-not-a-number", "eval", lambda c: [*c.eval_args, "--num_samples", "many"], 2, "many"),
    Case("eval-context-window", "eval", lambda c: [*c.eval_args, "--seq_length", "250", "--max_new_tokens", "10"], 2,
         "exceeds the model's context of 256"),
    Case("eval-out_dir-is-a-file", "eval", lambda c: [*c.eval_args, "--out_dir", c.tmp / "f"], 2, "is a file",
         setup=lambda c: (c.tmp / "f").write_text("x")),
    Case("eval-missing-checkpoint", "eval", lambda c: [*c.eval_args, "--checkpoint_path", c.tmp / "no" / "model.pth"],
         2, "not found"),
    Case("eval-corrupt-config", "eval", lambda c: [*c.eval_args, "--checkpoint_path", c.tmp / "bad"], 2,
         "config.json is corrupt", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "config")),
    Case("eval-truncated-checkpoint", "eval", lambda c: [*c.eval_args, "--checkpoint_path", c.tmp / "bad"], 2,
         "not a readable checkpoint", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "truncated")),
    Case("eval-folder-locked", "eval", lambda c: [*c.eval_args, "--overwrite"], 2, "another run is using",
         setup=lambda c: (c.earlier_eval(), c.hold_lock(c.task_dir))),
    Case("eval-read-only-out_dir", "eval", lambda c: [*c.eval_args, "--overwrite"], 1, "Read-only file system",
         setup=lambda c: c.earlier_eval(), fault=lambda c: read_only(c.mp, c.out)),
    Case("eval-read-only-new-out_dir", "eval", lambda c: c.eval_args, 1, "Read-only file system",
         fault=lambda c: read_only(c.mp, c.tmp)),
    Case("eval-metrics-rename-fails", "eval", lambda c: [*c.eval_args, "--overwrite"], 1, "metrics.json",
         setup=lambda c: c.earlier_eval(("metrics.json", "runs.jsonl")), fault=lambda c: fail_rename(c.mp, "metrics.json")),
    Case("eval-args-rename-fails", "eval", lambda c: [*c.eval_args, "--overwrite"], 1, "args.json",
         setup=lambda c: c.earlier_eval(), fault=lambda c: fail_rename(c.mp, "args.json")),
    # ---- parallelize_evals.py ------------------------------------------------------------------------------------
    Case("pe-missing-program-and-bad-quote", "parallelize_evals",
         lambda c: _pe(c, "--command_file", _pe_mixed_file(c), "--num_gpus", "0"), 1, "2 of 3 commands failed",
         check=_pe_mixed_check),
    Case("pe-gpus-without-gpu", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("python -c pass"), "--num_gpus", "2"), 2,
         "0 GPU(s) visible", fault=lambda c: c.mp.setattr(parallelize_evals, "visible_gpus", lambda: 0)),
    Case("pe-num_gpus-negative", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("python -c pass"), "--num_gpus", "-1"), 2, "--num_gpus"),
    Case("pe-workers-0", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("python -c pass"), "--num_gpus", "0", "--workers", "0"),
         2, "--workers"),
    Case("pe-missing-command-file", "parallelize_evals", lambda c: _pe(c, "--command_file", c.tmp / "none.txt"), 2,
         "not found"),
    Case("pe-command-file-is-a-folder", "parallelize_evals", lambda c: _pe(c, "--command_file", c.tmp), 2,
         "is a folder"),
    Case("pe-file-and-configs", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("x"), "--configs", "l2"), 2, "not both"),
    Case("pe-nothing-to-run", "parallelize_evals", lambda c: _pe(c, "--num_gpus", "0"), 2, "give --command_file"),
    Case("pe-unknown-config", "parallelize_evals",
         lambda c: _pe(c, "--configs", "nope", "--tasks", "vt", "--cache_sizes", "0.5", "--num_gpus", "0"), 2,
         "unknown config 'nope'"),
    Case("pe-eval_args-bad-quote", "parallelize_evals",
         lambda c: _pe(c, "--configs", "l2", "--tasks", "vt", "--cache_sizes", "0.5", "--eval_args", "--x 'y",
                       "--num_gpus", "0"), 2, "--eval_args"),
    Case("pe-unknown-flag", "parallelize_evals", lambda c: _pe(c, "--bogus"), 2, "--bogus"),
    Case("pe-state_dir-locked", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("python -c pass"), "--num_gpus", "0"), 2,
         "another run is using", setup=lambda c: c.hold_lock(c.tmp / "state", "--state_dir"),
         check=lambda c, out: None if not (c.tmp / "state" / "done").exists() else pytest.fail("ran anyway")),
    Case("pe-state_dir-is-a-file", "parallelize_evals",
         lambda c: ["--state_dir", c.tmp / "f", "--command_file", c.command_file("python -c pass"), "--num_gpus",
                    "0"], 2, "is a file", setup=lambda c: (c.tmp / "f").write_text("x")),
    Case("pe-read-only-state_dir", "parallelize_evals",
         lambda c: _pe(c, "--command_file", c.command_file("python -c pass"), "--num_gpus", "0"), 1,
         "Read-only file system", fault=lambda c: read_only(c.mp, c.tmp / "state")),
    # ---- compare_strategies.py -----------------------------------------------------------------------------------
    Case("cs-missing-folder", "compare_strategies", lambda c: [c.tmp / "none"], 2, "no such results folder"),
    Case("cs-empty-folder", "compare_strategies", lambda c: [c.tmp], 2, "no usable metrics.json"),
    Case("cs-all-corrupt", "compare_strategies", lambda c: [c.tmp / "r"], 2, "metrics.json: corrupt",
         setup=lambda c: c.fake_metrics(c.tmp / "r", corrupt=True)),
    Case("cs-out_md-is-a-folder", "compare_strategies", lambda c: [c.tmp / "r", "--out_md", c.tmp], 2, "is a folder",
         setup=lambda c: c.fake_metrics(c.tmp / "r")),
    Case("cs-update_md-rename-fails", "compare_strategies",
         lambda c: [c.tmp / "r", "--update_md", c.tmp / "keep" / "doc.md"], 1, "doc.md",
         setup=lambda c: (c.fake_metrics(c.tmp / "r"), _existing(c, "doc.md", b"# notes\n")),
         fault=lambda c: fail_rename(c.mp, "doc.md")),
    Case("cs-read-only-out_png", "compare_strategies",
         lambda c: [c.tmp / "r", "--out_png", c.tmp / "keep" / "plot.png"], 1, "Read-only file system",
         setup=lambda c: (c.fake_metrics(c.tmp / "r"), _existing(c, "plot.png")),
         fault=lambda c: read_only(c.mp, c.tmp / "keep")),
    Case("cs-unknown-flag", "compare_strategies", lambda c: [c.tmp, "--bogus"], 2, "--bogus"),
    # ---- quantize.py -----------------------------------------------------------------------------------------------
    Case("q-out-is-a-folder", "quantize", lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "keep"), 2,
         "is a folder", setup=lambda c: _existing(c, "other.pth")),
    Case("q-truncated-checkpoint", "quantize",
         lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "q.pth", ckpt=c.tmp / "bad" / "model.pth"), 2,
         "not a readable checkpoint", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "truncated")),
    Case("q-empty-checkpoint", "quantize",
         lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "q.pth", ckpt=c.tmp / "bad" / "model.pth"), 2,
         "empty file", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "empty")),
    Case("q-text-checkpoint", "quantize",
         lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "q.pth", ckpt=c.tmp / "bad" / "model.pth"), 2,
         "not a readable checkpoint", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "text")),
    Case("q-corrupt-config", "quantize",
         lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "q.pth", ckpt=c.tmp / "bad" / "model.pth"), 2,
         "config.json is corrupt", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "config")),
    Case("q-groupsize-48", "quantize", lambda c: _quant(c, "--mode", "int4", "--groupsize", "48"), 2, "48"),
    Case("q-groupsize-with-int8", "quantize", lambda c: _quant(c, "--mode", "int8", "--groupsize", "64"), 2,
         "--groupsize"),
    Case("q-unknown-mode", "quantize", lambda c: _quant(c, "--mode", "int3"), 2, "int3"),
    Case("q-missing-checkpoint", "quantize", lambda c: _quant(c, "--mode", "int8", ckpt=c.tmp / "no" / "model.pth"),
         2, "not found"),
    Case("q-out-is-the-source", "quantize", lambda c: _quant(c, "--mode", "int8", "--out", c.tiny / "model.pth"), 2,
         "the checkpoint being quantized"),
    Case("q-read-only-out", "quantize", lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "keep" / "q.pth"), 1,
         "Read-only file system", setup=lambda c: _existing(c, "q.pth"), fault=lambda c: read_only(c.mp, c.tmp / "keep")),
    Case("q-rename-fails", "quantize", lambda c: _quant(c, "--mode", "int8", "--out", c.tmp / "keep" / "q.pth"), 1,
         "q.pth", setup=lambda c: _existing(c, "q.pth"), fault=lambda c: fail_rename(c.mp, "q.pth")),
    # ---- generate.py -------------------------------------------------------------------------------------------------
    Case("gen-empty-prompt", "generate", lambda c: _gen(c, "--prompt", "  "), 2, "the prompt is empty"),
    Case("gen-prompt-and-prompt_file", "generate", lambda c: _gen(c, "--prompt_file", c.text_file()), 2, "not both"),
    Case("gen-prompt_file-missing", "generate", lambda c: _gen(c, prompt=False, *["--prompt_file", c.tmp / "x.txt"]),
         2, "cannot read prompt file"),
    Case("gen-prompt_file-is-a-folder", "generate", lambda c: _gen(c, prompt=False, *["--prompt_file", c.tmp]), 2,
         "cannot read prompt file"),
    Case("gen-temperature-nan", "generate", lambda c: _gen(c, "--temperature", "nan"), 2, "finite"),
    Case("gen-top_p-0", "generate", lambda c: _gen(c, "--top_p", "0"), 2, "--top_p"),
    Case("gen-max_new_tokens-0", "generate", lambda c: _gen(c, "--max_new_tokens", "0"), 2, "--max_new_tokens"),
    Case("gen-batch_size-0", "generate", lambda c: _gen(c, "--batch_size", "0"), 2, "--batch_size"),
    Case("gen-max_seq_length-past-context", "generate", lambda c: _gen(c, "--max_seq_length", "1000"), 2,
         "model's context of 256"),
    Case("gen-prompt-past-context", "generate", lambda c: _gen(c, "--prompt", "x" * 400), 2, "does not fit"),
    Case("gen-unknown-strategy", "generate", lambda c: _gen(c, "--cache_strategy", "nope"), 2, "nope"),
    Case("gen-max_cache_length-inf", "generate", lambda c: _gen(c, "--max_cache_length", "inf"), 2,
         "--max_cache_length"),
    Case("gen-pooling_kernel-0", "generate", lambda c: _gen(c, "--pooling_kernel", "0"), 2, "--pooling_kernel"),
    Case("gen-cache_group_size-0", "generate", lambda c: _gen(c, "--cache_group_size", "0"), 2, "--cache_group_size"),
    Case("gen-unknown-cache_config", "generate", lambda c: _gen(c, "--cache_config", "nope"), 2, "shipped configs"),
    Case("gen-feed-and-chunk", "generate", lambda c: _gen(c, "--feed_long_prompts", "--prefill_chunk", "8"), 2,
         "--feed_long_prompts"),
    Case("gen-speculate-without-draft", "generate", lambda c: _gen(c, "--speculate_k", "2"), 2,
         "--draft_checkpoint_path"),
    Case("gen-bad-device", "generate", lambda c: _gen(c, "--device", "tpu"), 2, "--device"),
    Case("gen-missing-checkpoint", "generate", lambda c: _gen(c, ckpt=c.tmp / "no" / "model.pth"), 2, "not found"),
    Case("gen-truncated-checkpoint", "generate", lambda c: _gen(c, ckpt=c.tmp / "bad" / "model.pth"), 2,
         "not a readable checkpoint", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "truncated")),
    Case("gen-corrupt-config", "generate", lambda c: _gen(c, ckpt=c.tmp / "bad" / "model.pth"), 2, "config.json",
         setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "config")),
    # ---- perplexity.py -----------------------------------------------------------------------------------------------
    Case("ppl-context-window", "perplexity", lambda c: _ppl_text(c, "300"), 2, "past the model's context of 256"),
    Case("ppl-context-window-absolute-positions", "perplexity",
         lambda c: [*_ppl_text(c, "300"), "--cache_strategy", "recent_global", "--max_cache_length", "64"], 2,
         "--position_mode cache"),
    Case("ppl-num_eval_tokens-1", "perplexity", lambda c: _ppl_text(c, "1"), 2, "--num_eval_tokens"),
    Case("ppl-missing-text", "perplexity", lambda c: ["--checkpoint_path", c.tiny, "--text", c.tmp / "none.txt"], 2,
         "cannot read --text"),
    Case("ppl-text-not-utf8", "perplexity", lambda c: ["--checkpoint_path", c.tiny, "--text", c.tmp / "bin.txt"], 2,
         "cannot read --text", setup=lambda c: (c.tmp / "bin.txt").write_bytes(b"\xff\xfe\x00bad")),
    Case("ppl-cache_size-0", "perplexity", lambda c: [*_ppl_text(c, "10"), "--cache_size", "0"], 2, "--cache_size"),
    Case("ppl-cache_size-and-max_cache_length", "perplexity",
         lambda c: [*_ppl_text(c, "10"), "--cache_size", "8", "--max_cache_length", "8"], 2, "give only one"),
    Case("ppl-num_threads-0", "perplexity", lambda c: [*_ppl_text(c, "10"), "--num_threads", "0"], 2,
         "--num_threads"),
    Case("ppl-truncated-checkpoint", "perplexity",
         lambda c: ["--checkpoint_path", c.tmp / "bad", "--text", c.text_file(), "--num_eval_tokens", "10"], 2,
         "not a readable checkpoint", setup=lambda c: damaged_copy(c.tiny, c.tmp / "bad", "truncated")),
    # ---- visualize_eviction.py ---------------------------------------------------------------------------------------
    Case("ve-out-is-a-folder", "visualize_eviction", lambda c: [*_vis(c, "--prompt", "hello"), "--out", c.tmp], 2,
         "is a folder"),
    Case("ve-prompt-and-prompt_file", "visualize_eviction",
         lambda c: _vis(c, "--prompt", "hi", "--prompt_file", c.text_file()), 2, "not both"),
    Case("ve-empty-prompt", "visualize_eviction", lambda c: _vis(c, "--prompt", "  "), 2, "empty"),
    Case("ve-missing-prompt_file", "visualize_eviction", lambda c: _vis(c, "--prompt_file", c.tmp / "none.txt"), 2,
         "cannot read prompt file"),
    Case("ve-max_new_tokens-0", "visualize_eviction", lambda c: _vis(c, "--prompt", "hi", "--max_new_tokens", "0"), 2,
         "--max_new_tokens"),
    Case("ve-prompt-beyond-context", "visualize_eviction", lambda c: _vis(c, "--prompt", "x" * 300), 2,
         "exceeds the model's context of 256"),
    Case("ve-task-beyond-context", "visualize_eviction", lambda c: _vis(c, "--seq_length", "512"), 2,
         "exceeds the model's context of 256"),
    Case("ve-read-only-out", "visualize_eviction",
         lambda c: [*_vis(c, "--prompt", "hello"), "--out", c.tmp / "keep" / "ev.png"], 1, "Read-only file system",
         setup=lambda c: _existing(c, "ev.png"), fault=lambda c: read_only(c.mp, c.tmp / "keep")),
    Case("ve-png-rename-fails", "visualize_eviction",
         lambda c: [*_vis(c, "--prompt", "hello world", "--max_new_tokens", "2"), "--out", c.tmp / "keep" / "ev.png"],
         1, "ev.png", setup=lambda c: _existing(c, "ev.png"), fault=lambda c: fail_rename(c.mp, "ev.png")),
    # ---- benchmark.py --------------------------------------------------------------------------------------------------
    Case("bm-context-beyond-window", "benchmark", lambda c: _bench(c, "--context_lengths", "300"), 2,
         "exceeds the model's context of 256"),
    Case("bm-context-plus-new-beyond-window", "benchmark",
         lambda c: _bench(c, "--context_lengths", "250", "--max_new_tokens", "10"), 2, "= 260 exceeds"),
    Case("bm-preset-context-100000", "benchmark",
         lambda c: ["--random_weights", "--device", "cpu", "--context_lengths", "100000", "--out", c.tmp / "b"], 2,
         "exceeds the model's context of 8192"),
    Case("bm-out-is-a-folder", "benchmark", lambda c: _bench(c, "--context_lengths", "8", "--out", c.tmp / "d"), 2,
         "is a folder", setup=lambda c: (c.tmp / "d.json").mkdir()),
    Case("bm-read-only-out", "benchmark",
         lambda c: _bench(c, "--context_lengths", "8", "--out", c.tmp / "keep" / "b"), 1, "Read-only file system",
         setup=lambda c: _existing(c, "b.json"), fault=lambda c: read_only(c.mp, c.tmp / "keep")),
    Case("bm-num_runs-0", "benchmark", lambda c: _bench(c, "--num_runs", "0"), 2, "--num_runs"),
    # ---- --dynamic_batch: needs --compile and a batch ----------------------------------------------------------
    Case("gen-dynamic_batch-no-compile", "generate", lambda c: _gen(c, "--dynamic_batch", "--batch_size", "2"), 2,
         "needs --compile"),
    Case("gen-dynamic_batch-one-sequence", "generate", lambda c: _gen(c, "--dynamic_batch", "--compile"), 2,
         "single sequence"),
    Case("eval-dynamic_batch-batch-1", "eval", lambda c: [*c.eval_args, "--dynamic_batch", "--compile"], 2,
         "single sequence"),
    Case("bm-dynamic_batch-batch-1", "benchmark", lambda c: _bench(c, "--dynamic_batch", "--compile"), 2,
         "single sequence"),
    Case("bm-json-rename-fails", "benchmark",
         lambda c: _bench(c, "--context_lengths", "8", "--max_new_tokens", "2", "--num_runs", "1", "--warmup_runs",
                          "0", "--out", c.tmp / "keep" / "b"), 1, "b.json",
         setup=lambda c: _existing(c, "b.json"),
         fault=lambda c: (fail_rename(c.mp, "b.json"), c.mp.setattr(
             benchmark, "copy_bandwidth", lambda device, _real=benchmark.copy_bandwidth: _real(device, 1 << 20, 2))),
         progress=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_and_faults(case, tiny, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, tiny, monkeypatch)
    try:
        if case.setup:
            case.setup(ctx)
        argv = case.argv(ctx)
        before = snapshot(ctx.keep, ctx.keep_names) if ctx.keep else None
        capsys.readouterr()
        with monkeypatch.context() as mp:
            ctx.mp = mp
            if case.fault:
                case.fault(ctx)
            code = invoke(case.entry, argv)
        out, err = capsys.readouterr()
        assert code == case.code, (code, err)
        assert_one_line(err, case.code, case.needle, case.progress)
        if before is not None:  # the earlier results: the same files, the same bytes, no temporary left
            assert snapshot(ctx.keep, ctx.keep_names) == before
        assert temporaries(tmp_path) == []
        if case.check:
            case.check(ctx, out)
    finally:
        for cm in ctx.held:
            cm.__exit__(None, None, None)


def test_case_count():
    per_entry = {}
    for c in CASES:
        per_entry[c.entry] = per_entry.get(c.entry, 0) + 1
    assert len(CASES) >= 60 and all(n >= 6 for n in per_entry.values()), per_entry


# ---------------------------------------------------------------------------------------------------------------
# Faults that are not errors: the run recovers and says so
# ---------------------------------------------------------------------------------------------------------------
def _ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_corrupt_metrics_is_redone_with_a_note(tiny, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, tiny, monkeypatch)
    ctx.earlier_eval()
    metrics = ctx.task_dir / "metrics.json"
    good = json.loads(metrics.read_text())
    metrics.write_text(metrics.read_text()[:40])  # a file cut short by a crash of an older version
    capsys.readouterr()
    assert invoke("eval", ctx.eval_args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    note = [x for x in err.splitlines() if x.startswith("note:")]
    assert len(note) == 1 and str(metrics) in note[0] and "corrupt" in note[0] and "computing ppl again" in note[0]
    assert "resuming after 2 finished samples" in err  # the predictions were whole: nothing recomputed
    assert json.loads(metrics.read_text())["score"] == pytest.approx(good["score"])


def test_half_written_last_line_is_dropped_on_resume(tiny, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path, tiny, monkeypatch)
    ctx.earlier_eval()
    preds = ctx.task_dir / "predictions.jsonl"
    lines = preds.read_text().splitlines()
    (ctx.task_dir / "metrics.json").unlink()
    preds.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while appending sample 1
    capsys.readouterr()
    assert invoke("eval", ctx.eval_args) == 0
    assert "resuming after 1 finished samples" in capsys.readouterr().err
    assert _ids(preds) == [0, 1]
    assert preds.read_text().splitlines()[0] == lines[0]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "metrics.json"
    f.write_text('{"score": 1}')
    fail_rename(monkeypatch, "metrics.json")
    with pytest.raises(OSError) as e:
        cli.atomic_write_text(f, '{"score": 2}')
    assert e.value.filename == str(f)  # the error names the file asked for, not the temporary
    assert f.read_text() == '{"score": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_append_line_is_whole_or_nothing(tmp_path, monkeypatch):
    f = tmp_path / "p.jsonl"
    cli.append_line(f, '{"id": 0}')
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:5]))  # a full disk: a short write
    with pytest.raises(OSError) as e:
        cli.append_line(f, '{"id": 1, "long": "record"}')
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert f.read_text() == '{"id": 0}\n'  # cut back: no half line for the next append to be glued to


# ---------------------------------------------------------------------------------------------------------------
# Real processes: two runs at once, SIGINT, kill -9, a closed pipe
# ---------------------------------------------------------------------------------------------------------------
def _popen(*args, env=None, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def _wait_for(cond, timeout=120, proc=None):
    t = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _interrupt(proc, ready, before=lambda: None):
    """Once ready() holds (and before() ran), SIGINT proc; returns (stdout, stderr). A hung process is killed."""
    try:
        _wait_for(ready, proc=proc)
        before()
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_concurrent_runs_sigint_and_resume(tiny, tmp_path):
    """Run A evaluates a long task; run B on the same folder refuses with one line while A holds it; SIGINT stops A
    with 130 and the one-line note, its predictions whole; run C resumes after A's last whole sample."""
    out = tmp_path / "out"
    args = ["eval.py", "--checkpoint_path", tiny, "--tasks", "ppl", "--seq_length", "64", "--num_samples", "500",
            "--no_progress", "--out_dir", out]
    preds = out / "tiny" / "full" / "ppl-len64-gen0-n500" / "predictions.jsonl"
    a = _popen(*args)

    def second_run_refuses():
        b = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert b.returncode == 2
        assert_one_line(b.stderr, 2, "another run is using")
        assert f"held by pid {a.pid}" in b.stderr
        assert a.poll() is None  # A kept going

    _, err = _interrupt(a, lambda: _lines(preds) >= 1, second_run_refuses)
    assert a.returncode == 130
    assert_one_line(err, 130)
    done = _ids(preds)  # every line whole and in order, no duplicate
    assert done == list(range(len(done))) and len(done) >= 1
    c = _popen(*args)
    _, err = _interrupt(c, lambda: _lines(preds) > len(done))
    assert c.returncode == 130 and f"resuming after {len(done)} finished samples" in err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    again = _ids(preds)
    assert again == list(range(len(again))) and len(again) > len(done)


def test_kill_9_between_write_and_rename(tiny, tmp_path, monkeypatch, capsys):
    """A real SIGKILL after metrics.json's temporary file is written, before the rename: the old metrics.json is
    intact; the next run that computes the task removes the orphaned temporary."""
    ctx = Ctx(tmp_path, tiny, monkeypatch)
    ctx.earlier_eval()
    metrics = ctx.task_dir / "metrics.json"
    old = metrics.read_bytes()
    r = subprocess.run([sys.executable, "eval.py", *map(str, ctx.eval_args), "--overwrite"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, cli.FAULT_ENV: "metrics.json"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert metrics.read_bytes() == old
    assert len(temporaries(ctx.task_dir)) == 1  # what kill -9 leaves
    assert _ids(ctx.task_dir / "predictions.jsonl") == [0, 1]
    assert invoke("eval", [*ctx.eval_args, "--overwrite"]) == 0
    assert temporaries(ctx.task_dir) == [] and json.loads(metrics.read_text())["score"] > 0


def test_sigint_stops_parallel_sweep_and_its_commands(tmp_path):
    marker = tmp_path / "finished"
    cmds = tmp_path / "cmds.txt"
    cmds.write_text(f"python -c \"import time, pathlib; time.sleep(4); pathlib.Path('{marker}').write_text('x')\"\n"
                    "python -c pass\n")
    state = tmp_path / "state"
    p = _popen("parallelize_evals.py", "--command_file", cmds, "--num_gpus", "0", "--state_dir", state)
    log = state / "logs" / "worker0.log"
    out, err = _interrupt(p, lambda: log.exists() and "time.sleep" in log.read_text(), lambda: time.sleep(0.5))
    assert p.returncode == 130
    assert_one_line(err, 130)
    assert "not run (interrupted)" in out and "0 ran ok" in out
    time.sleep(5)
    assert not marker.exists()  # the running command was stopped too
    assert not list((state / "done").glob("*.json"))


@pytest.mark.parametrize("entry,args", [
    ("eval.py", ["--print_dir", "--out_dir", "OUT"]),
    ("compare_strategies.py", ["RESULTS"]),
])
def test_closed_stdout_is_one_line(entry, args, tmp_path, monkeypatch, tiny):
    results = tmp_path / "r"
    Ctx(tmp_path, tiny, monkeypatch).fake_metrics(results)
    args = [str(tmp_path / "o") if x == "OUT" else str(results) if x == "RESULTS" else x for x in args]
    p = _popen(entry, *args)
    p.stdout.close()  # the reader went away before the first byte (`| head -c 0`)
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 1
    assert_one_line(err, 1, "broken pipe")
