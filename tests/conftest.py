"""Shared fixtures: the converted SmolLM2 checkpoint (made once, offline) and transformers' reference model."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
REPO = Path(__file__).resolve().parent.parent
SMOL_DIR = REPO / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    if not (SMOL_DIR / "model.pth").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "convert_gguf_checkpoint.py")], check=True)
    return SMOL_DIR


@pytest.fixture(scope="session")
def smol_model(smol_dir):
    from model import load_model

    return load_model(smol_dir, "cpu", torch.float32)


@pytest.fixture(scope="session")
def hf_smol():
    """transformers' own LlamaForCausalLM on the same GGUF file (its own dequantizer and q/k handling)."""
    from transformers import AutoModelForCausalLM

    from tokenizer import smollm2_gguf_path

    g = Path(smollm2_gguf_path())
    return AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from tokenizer import get_tokenizer

    return get_tokenizer(smol_dir)


def run_cli(*args, timeout=600):
    """Runs a repo script in a subprocess; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
