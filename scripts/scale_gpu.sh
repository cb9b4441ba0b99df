#!/usr/bin/env bash
# The scale question's GPU size (issue 22) in one command: the shipped recipe at ~19M parameters
# (scripts/scale_curve.py, size 19M: 6 layers, width 512), full budgets, every training example:
# AR pretraining (12M row tokens), Fast-dLLM v2 adaptation (3M), both in bf16 autocast, then the
# validation-split gaps (300 problems, fp32 decoding) merged into docs/results/scale_curve_val.*.
# Sized for ~10 minutes of one H100/H200; nothing is downloaded (the word problems are generated).
# When $OUT is set (the device machine), the results and both final checkpoints are copied there.
#   bash scripts/scale_gpu.sh                  # on the GPU machine
#   bash scripts/scale_gpu.sh --dry-run DIR    # the same pipeline on the CPU, tiny (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--dry-run" ]; then
    dir="${2:?--dry-run needs a directory}"
    mkdir -p "$dir/data"
    # a few hundred generated problems in the shipped format (sft_train / sft_val)
    python - "$dir/data" <<'EOF'
import json, sys
from pathlib import Path
from fastdllm.tasks import format_prompt, make_splits
train, _ = make_splits(300, 0, 7, 8)
rows = [json.dumps({"prompt": format_prompt(p.question), "response": p.answer}) + "\n" for p in train]
Path(sys.argv[1], "sft_val.jsonl").write_text("".join(rows[:20]))
Path(sys.argv[1], "sft_train.jsonl").write_text("".join(rows[20:]))
EOF
    exec python scripts/scale_curve.py --sizes 0.7M --budget 0.0005 --examples 280 --device cpu \
        --data "$dir/data" --out "$dir/runs" --results "$dir/scale_curve_val" --limit 3 --batch-size 4
fi

[ -f runs/shipped/data/sft_val.jsonl ] || python scripts/build_shipped_models.py --stages data
python scripts/scale_curve.py --sizes 19M --budget 1 --device cuda --precision bf16 --workers 8 \
    --threads 8 --out runs/scale_gpu --limit 300 --batch-size 64
if [ -n "${OUT:-}" ]; then
    cp docs/results/scale_curve_val.* "$OUT"/
    for stage in pretrain adapt; do
        cp -r "runs/scale_gpu/19M/$stage/final" "$OUT/19M-$stage"
    done
fi
