#!/usr/bin/env bash
# meta-llama/Llama-2-7b-chat-hf -> checkpoints/meta-llama/Llama-2-7b-chat-hf (extra args go to the converter, e.g. --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf "$@"
