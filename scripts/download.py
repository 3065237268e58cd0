"""Download the files of a Hugging Face model repo that conversion and tokenization need into checkpoints/ORG/NAME.

    python scripts/download.py meta-llama/Llama-3.1-8B-Instruct [--hf_token T] [--checkpoint_dir checkpoints]

Only config.json, generation_config.json, the tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json,
chat_template.jinja/.json, Llama-3's original/tokenizer.model) and the HF-format weights are fetched: *.safetensors
(+ index), or pytorch_model*.bin (+ index) only when the repo has no safetensors. The token comes from --hf_token or
the HF_TOKEN environment variable (gated repos such as meta-llama need one). With HF_HUB_OFFLINE=1 an already
downloaded folder is accepted as is. Then run scripts/convert_hf_checkpoint.py --checkpoint_dir on the folder.
"""
import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_TOP_LEVEL = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "chat_template.jinja", "chat_template.json"}
_EXTRA = {"original/tokenizer.model"}  # Llama-3's tiktoken BPE file
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_hf_weights(name: str, ext: str) -> bool:
    # Top-level HF-format weights only: not Mistral's consolidated.safetensors, not adapters, not training_args.bin.
    return "/" not in name and name.endswith(ext) and not name.startswith(("consolidated", "adapter"))


def select_files(repo_files) -> list[str]:
    """The files of a repo listing to download (pure function; see the module docstring for the rules)."""
    files = list(repo_files)
    wanted = [f for f in files if f in _TOP_LEVEL or f in _EXTRA]
    safetensors = [f for f in files if _is_hf_weights(f, ".safetensors") or _is_hf_weights(f, ".safetensors.index.json")]
    if any(f.endswith(".safetensors") for f in safetensors):
        wanted += safetensors
    else:
        wanted += [f for f in files if "/" not in f and f.startswith("pytorch_model")
                   and (f.endswith(".bin") or f.endswith(".bin.index.json"))]
    return sorted(set(wanted))


def local_dir_for(repo_id: str, checkpoint_dir: Path) -> Path:
    org, name = repo_id.split("/")
    return Path(checkpoint_dir) / org / name


def _already_downloaded(folder: Path) -> bool:
    if not (folder / "config.json").exists() and not (folder / "hf_config.json").exists():
        return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or (folder / "model.pth").exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _probe(endpoint: str):
    """Fail fast (one line) when the Hub cannot be reached, instead of huggingface_hub's ~25 s of retries.
    Skipped behind a proxy, where a direct connection says nothing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=15).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {endpoint} ({e.strerror or e}); no network? "
                              f"(set HF_HUB_OFFLINE=1 to use a copy already downloaded)") from None


def download(repo_id: str, checkpoint_dir: Path, token=None) -> Path:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hugging Face repo id of the form ORG/NAME")
    folder = local_dir_for(repo_id, checkpoint_dir)
    if _offline():
        if _already_downloaded(folder):
            print(f"HF_HUB_OFFLINE is set: using the copy already in {folder}", file=sys.stderr)
            return folder
        raise ConnectionError(f"HF_HUB_OFFLINE is set and {folder} holds no downloaded copy of {repo_id}")
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings would break the one-line error
    _probe(constants.ENDPOINT)
    files = select_files(HfApi().list_repo_files(repo_id, token=token))
    if "config.json" not in files:
        raise ValueError(f"{repo_id} has no config.json: not a transformers model repo")
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise ValueError(f"{repo_id} has no HF-format weights (*.safetensors or pytorch_model*.bin)")
    folder.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id, local_dir=str(folder), allow_patterns=files, token=token)
    return folder


def _explain(e: Exception, repo_id: str) -> str:
    """One line for the usual failures (huggingface_hub's own messages span several lines)."""
    kind = type(e).__name__
    if kind == "GatedRepoError":
        return (f"{repo_id} is gated: accept its license on huggingface.co and pass a token with access "
                f"(--hf_token or HF_TOKEN)")
    if kind == "RepositoryNotFoundError":
        return f"{repo_id} was not found (or is private/gated and no valid token was given)"
    if kind in ("RevisionNotFoundError", "EntryNotFoundError"):
        return f"{repo_id}: {kind}"
    if kind in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        return f"cannot reach the Hugging Face Hub for {repo_id} (offline): {' '.join(str(e).split())[:200]}"
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) or "Connect" in kind or "Timeout" in kind:
        return f"cannot download {repo_id}: {' '.join(str(e).split())[:300] or kind}"
    msg = " ".join(str(e).split())
    return msg if isinstance(e, ValueError) else f"{kind}: {msg[:300]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo_id", metavar="REPO", help="Hugging Face repo id, e.g. meta-llama/Llama-3.1-8B-Instruct")
    ap.add_argument("--hf_token", default=None, help="access token (default: the HF_TOKEN environment variable)")
    ap.add_argument("--checkpoint_dir", type=Path, default=REPO / "checkpoints",
                    help="files go to CHECKPOINT_DIR/ORG/NAME (default: checkpoints/ in the repo)")
    a = ap.parse_args(argv)
    token = a.hf_token or os.environ.get("HF_TOKEN") or None
    try:
        folder = download(a.repo_id, a.checkpoint_dir, token)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # one line, no traceback
        print(f"error: {_explain(e, a.repo_id)}", file=sys.stderr)
        sys.exit(2)
    print(f"downloaded {a.repo_id} to {folder}", file=sys.stderr)
    print(folder)


if __name__ == "__main__":
    main()
