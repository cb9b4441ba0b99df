#!/usr/bin/env bash
# The GPU checks of the speed and lossless-mode work, in one go, when a CUDA GPU is lent:
#   1. tests/test_cuda.py: CUDA graphs equal eager token for token, bf16 engine paths
#   2. benchmarks/bench_engine.py --device cuda: step cost with graphs vs eager and the matmul
#      floor, the 0.5B shape's 1-token bf16 forward, diffusion vs AR on the same engine
#   3. benchmarks/bench_speculative.py --device cuda: the shipped pair and the 0.5B shape's
#      forward latencies on the GPU
# Results go to OUT_DIR (default runs/gpu_checks) as JSON + markdown; copy the ones to publish
# into docs/results/.  Usage, from the repository root:  bash scripts/gpu_checks.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/gpu_checks}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
python benchmarks/bench_engine.py --device cuda --out "$OUT/engine_bench" 2>&1 | tail -n 5
python benchmarks/bench_speculative.py --device cuda --limit 40 --out "$OUT/speculative_bench_cuda" 2>&1 | tail -n 5
