#!/usr/bin/env bash
# The GPU verification of issue 20 in one command, at most ~8 minutes on one H100/H200: the CUDA
# tests, graph replay == eager, RoPE growth after capture, the static-step share with one
# sampled row, the speculative forms, 0.5B/1.5B-shaped bf16 step times against the weight-read
# floor, the load peak of a 1.5B-shaped checkpoint, and a compiled flex / FSDP2 training smoke.
# Models are built from configs with random weights (nothing is downloaded). Prints a summary
# table and writes docs/results/gpu_checks.json and .md; exits non-zero if a row fails.
# The rows are described in benchmarks/gpu_checks.py.
#   bash scripts/gpu_checks.sh                      # on the GPU machine, from anywhere
#   bash scripts/gpu_checks.sh --dry-run --out DIR/stem   # every row on the CPU, tiny (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_checks.py "$@"
