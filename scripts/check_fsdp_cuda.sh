#!/usr/bin/env bash
# GPU check of sharded training (FSDP2 over NCCL) with bf16 and gradient checkpointing: needs
# >= 2 CUDA GPUs and ../shared (the stories260K Llama). Runs, from the repository root:
#   1. one process, fp32, global batch 4   2. two GPUs, fsdp + bf16 + gradient checkpointing
#   3. the same two-GPU run killed after its step-2 checkpoint and resumed
# and prints the losses side by side; the resumed run must equal the uninterrupted one exactly,
# the bf16 run must track the fp32 one closely (bf16 rounding, not equality). Exact on CPU;
# here to 1e-5, as GPU kernels may reduce in a different order after a restart.
# Without a GPU it runs the same over gloo on the CPU (tests/test_training_fsdp.py does).
#   bash scripts/check_fsdp_cuda.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/check_fsdp_cuda}
BASE=${BASE:-../shared/models/stories260K}
rm -rf "$OUT" && mkdir -p "$OUT"
python - "$OUT" "$BASE" <<'PY'
import json, sys, yaml
out, base = sys.argv[1], sys.argv[2]
chats = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}] for a in range(8) for b in range(4)]
with open(f"{out}/chats.jsonl", "w") as f:
    f.writelines(json.dumps({"text": m[0]["content"] + " " + m[1]["content"]}) + "\n" for m in chats)
for name, micro, extra in (("single", 2, {}), ("fsdp", 1, {"fsdp": True, "precision": "bf16",
                                                          "gradient_checkpointing": True})):
    cfg = {"base_model": base, "output_dir": f"{out}/{name}",
           "data": {"train_file": f"{out}/chats.jsonl", "seq_len": 64, "val_fraction": 0.2},
           "diffusion": {"block_size": 16}, "optimizer": {"lr": 2e-3, "warmup_steps": 1},
           "train": {"micro_batch_size": micro, "grad_accum_steps": 2, "max_steps": 6,
                     "log_interval": 1, "eval_interval": 2, "save_interval": 2,
                     "keep_last_k": 3, **extra}}  # the resume below starts from step 2 of 2, 4, 6
    yaml.safe_dump(cfg, open(f"{out}/{name}.yaml", "w"))
PY
python -m fastdllm.training --config "$OUT/single.yaml"
torchrun --nproc_per_node 2 -m fastdllm.training --config "$OUT/fsdp.yaml"
cp -r "$OUT/fsdp" "$OUT/uninterrupted"
rm -rf "$OUT/fsdp/checkpoints/step-000006" "$OUT/fsdp/checkpoints/step-000004" "$OUT/fsdp/final"
torchrun --nproc_per_node 2 -m fastdllm.training --config "$OUT/fsdp.yaml" --resume
python - "$OUT" <<'PY'
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
def losses(run):
    return [r["loss"] for r in map(json.loads, open(f"{out}/{run}/metrics.jsonl")) if "loss" in r]
a, b, c = losses("single"), losses("uninterrupted"), losses("fsdp")
print("step  fp32 1-GPU  bf16 FSDP 2-GPU  resumed")
for i, row in enumerate(zip(a, b, c), 1):
    print(i, *(f"{x:.6f}" for x in row))
wa, wb = load_file(f"{out}/uninterrupted/final/model.safetensors"), load_file(f"{out}/fsdp/final/model.safetensors")
gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
same = all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(b, c)) and len(b) == len(c)
print("resumed vs uninterrupted: max weight gap", gap, "losses equal to 1e-5:", same)
sys.exit(0 if same and gap < 1e-5 else 1)
PY
