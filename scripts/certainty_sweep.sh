#!/usr/bin/env bash
# Certainty distillation on the validation split (issue 22): fine-tune the adapted model (the
# adaptation's bf16 export, runs/shipped/adapted-bf16, written by
# `python scripts/build_shipped_models.py --stages certainty`) with each config under
# configs/certainty/ (one thread each, ~6-20 minutes apiece on a 2-core CPU), then decode the
# validation split with every fine-tune, the adapted model and the AR base side by side: the
# left-anchored frontier and AUP per model in docs/results/certainty_val.{json,md,png}. Runs
# that finished already are not trained again.
#   bash scripts/certainty_sweep.sh                       # every config
#   bash scripts/certainty_sweep.sh control wrong1        # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(ls configs/certainty | sed 's/\.yaml$//'))
models=(--model "adapted=runs/shipped/adapted-bf16")
for name in "${names[@]}"; do
    [ -f "runs/certainty/$name/final/model.safetensors" ] \
        || python -m fastdllm.training --config "configs/certainty/$name.yaml"
    models+=(--model "$name=runs/certainty/$name/final")
done
python benchmarks/bench_rules.py "${models[@]}" --ar-base models/fastdllm-wp-ar --split val --limit 300 \
    --sweep left_anchored=1.0,0.95,0.9,0.8 --batch-size 64 --threads 1 --out docs/results/certainty_val
