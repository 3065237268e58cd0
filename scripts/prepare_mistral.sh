#!/usr/bin/env bash
# mistralai/Mistral-7B-Instruct-v0.2 -> checkpoints/mistralai/Mistral-7B-Instruct-v0.2 (extra args go to the converter, e.g. --dtype bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/prepare.sh mistralai/Mistral-7B-Instruct-v0.2 "$@"
