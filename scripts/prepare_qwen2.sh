#!/usr/bin/env bash
# Qwen/Qwen2-7B-Instruct -> checkpoints/Qwen/Qwen2-7B-Instruct (extra args go to the converter, e.g. --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/prepare.sh Qwen/Qwen2-7B-Instruct "$@"
