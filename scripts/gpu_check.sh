#!/usr/bin/env bash
# The GPU session's first command (at most ~8 minutes on one H100/H200): the CUDA checks, then BENCHMARK.md's GPU
# benchmarks on random weights of the real shapes, each under a time limit, tables under results/gpu_check/.
# Record the printed tables in BENCHMARK.md with the device, the date and the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=results/gpu_check
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
git log -1 --format="commit %h %cd" 2>/dev/null || true
timeout 240 python scripts/gpu_check.py 2>&1 | tee "$out/checks.txt"
timeout 150 python benchmark.py --random_weights --model Meta-Llama-3-8B --compile --compare_hf \
    --context_lengths 1024 --weights base int8 --max_new_tokens 128 --num_runs 2 --out "$out/bench_1k" 2>&1 | tail -20
timeout 100 python benchmark.py --random_weights --model Meta-Llama-3-8B --compile \
    --strategies full recent_global heavy_hitter keydiff --budgets 4096 --context_lengths 1024 32768 \
    --max_new_tokens 64 --num_runs 1 --out "$out/bench_32k" 2>&1 | tail -12
timeout 60 python benchmark.py --random_weights --model Meta-Llama-3-8B --compile --strategies recent_global \
    --budgets 0.5 --batch_sizes 1 4 16 --max_new_tokens 64 --num_runs 1 --out "$out/bench_batch" 2>&1 | tail -8
ls -la "$out"
