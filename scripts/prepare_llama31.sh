#!/usr/bin/env bash
# meta-llama/Llama-3.1-8B-Instruct -> checkpoints/meta-llama/Llama-3.1-8B-Instruct (extra args go to the converter, e.g. --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/prepare.sh meta-llama/Llama-3.1-8B-Instruct "$@"
