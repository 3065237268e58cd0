#!/usr/bin/env bash
# meta-llama/Meta-Llama-3-8B-Instruct -> checkpoints/meta-llama/Meta-Llama-3-8B-Instruct (extra args go to the converter, e.g. --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/prepare.sh meta-llama/Meta-Llama-3-8B-Instruct "$@"
