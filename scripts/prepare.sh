#!/usr/bin/env bash
# Download a Hugging Face model (Llama / Mistral / Qwen2) and convert it in place:
#   scripts/prepare.sh ORG/NAME [converter args, e.g. --dtype bfloat16]
# -> checkpoints/ORG/NAME/{model.pth,config.json,tokenizer.*}. Gated repos (meta-llama, mistralai) need HF_TOKEN
# in the environment: it passes to download.py through the environment, not argv (where `ps` would show it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/prepare.sh ORG/NAME [--dtype bfloat16|float16|float32]" >&2
    exit 2
fi
REPO_ID="$1"
shift
python scripts/download.py "$REPO_ID" --checkpoint_dir checkpoints
python scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$REPO_ID" "$@"
