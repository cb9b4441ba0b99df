"""Rebuild the shipped models from scratch, with fixed seeds:

    python scripts/build_shipped_models.py                 # every stage
    python scripts/build_shipped_models.py --stages adapt export

Stages (each reads what the previous wrote under runs/shipped/):

1. data       word problems: 200k train (seed 1), 2k test (seed 2), disjoint; GSM8K-style JSONL
              plus the chat-formatted prompt/response files the trainer reads
2. tokenizer  byte-level BPE trained on the training text (digits split one by one)
3. pretrain   the AR base, from scratch          (configs/shipped/pretrain.yaml)
4. adapt      Fast-dLLM v2 adaptation of the exported AR base (models/fastdllm-wp-ar, exported
              first if missing), 25% budget, with the weighted AR loss (configs/shipped/adapt.yaml)
5. certainty  certainty distillation of the adapted model's bf16 export (runs/shipped/adapted-bf16,
              written first): the states the left-anchored rule visits, confident mistakes
              penalised (configs/shipped/certainty.yaml; configs/certainty/ holds the val sweep)
6. ablations  the same recipe without the AR loss / without complementary masks / without
              token shift
7. export     bf16 copies with model cards into models/fastdllm-wp-ar and models/fastdllm-wp-diffusion
              (the diffusion model is the certainty fine-tune, or the adaptation if it is absent)
              (after `benchmarks/bench_gsm.py`, `python scripts/model_cards.py` refreshes the cards' results)

Training runs on CUDA when available (bf16), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("runs/shipped")
STAGES = ("data", "tokenizer", "pretrain", "adapt", "certainty", "ablations", "export")
N_VAL = 1_000  # of the training problems, held out as the trainer's validation split
CONFIGS = {
    "pretrain": "configs/shipped/pretrain.yaml",
    "adapt": "configs/shipped/adapt.yaml",
    "certainty": "configs/shipped/certainty.yaml",
    "adapt-no-ar": "configs/shipped/adapt_no_ar.yaml",
    "adapt-no-complementary": "configs/shipped/adapt_no_complementary.yaml",
    "adapt-no-shift": "configs/shipped/adapt_no_shift.yaml",
}
# in order: the certainty fine-tune, when it exists, replaces the adaptation's export
EXPORTS = {"pretrain": "models/fastdllm-wp-ar", "adapt": "models/fastdllm-wp-diffusion",
           "certainty": "models/fastdllm-wp-diffusion"}


def _write_jsonl(records: list[dict], path: Path) -> None:
    from fastdllm.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def stage_data() -> None:
    from fastdllm.tasks import SHIPPED_SPLIT, format_prompt, make_splits, write_jsonl

    out = WORK / "data"
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(*SHIPPED_SPLIT)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    sft = [{"prompt": format_prompt(p.question), "response": p.answer} for p in train]
    random.Random(0).shuffle(sft)
    _write_jsonl(sft[N_VAL:], out / "sft_train.jsonl")
    _write_jsonl(sft[:N_VAL], out / "sft_val.jsonl")
    print(f"data: {len(train)} train ({len(sft) - N_VAL} sft + {N_VAL} val), {len(test)} test -> {out}")


def stage_tokenizer() -> None:
    from fastdllm.tasks import read_gsm8k_jsonl
    from fastdllm.tokenizer_build import train_tokenizer

    rows = read_gsm8k_jsonl(WORK / "data" / "train.jsonl")
    train_tokenizer((r["question"] + "\n" + r["answer"] for r in rows), WORK / "tokenizer")
    print(f"tokenizer -> {WORK / 'tokenizer'}")


def stage_train(name: str) -> None:
    from fastdllm.training import run_training

    out = run_training(CONFIGS[name], resume=(WORK / name / "checkpoints").is_dir())
    print(f"{name}: final model -> {out}")


ADAPTED_BF16 = WORK / "adapted-bf16"  # the certainty fine-tunes start from it


def stage_export(runs: list[str] | None = None, to: Path | None = None) -> None:
    import torch

    from fastdllm.model.checkpoint import load_model, load_tokenizer, read_json, save_checkpoint

    for run, dest in EXPORTS.items():
        if runs is not None and run not in runs:
            continue
        src = WORK / run / "final"
        if runs is None and run == "certainty" and not src.is_dir():
            continue
        model = load_model(src, "cpu", torch.float32)
        gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else None
        official = model.config.model_type == "Fast_dLLM_Qwen"
        extra = {}
        summary = src / "training_summary.json"
        if run == "certainty":  # the card tells both runs: the adaptation's summary stays beside it
            extra["training_summary.json"] = (WORK / "adapt" / "final" / "training_summary.json").read_text()
            extra["certainty_summary.json"] = summary.read_text()
        elif summary.is_file():
            extra["training_summary.json"] = summary.read_text()
        save_checkpoint(to or ROOT / dest, model, tokenizer=load_tokenizer(src), official_layout=official,
                        generation_config=gen, extra_files=extra, dtype=torch.bfloat16)
        print(f"export: {src} -> {to or dest} (bf16)")
    if runs is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from model_cards import write_cards

        write_cards()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    for stage in STAGES:
        if stage not in args.stages:
            continue
        if stage == "data":
            stage_data()
        elif stage == "tokenizer":
            stage_tokenizer()
        elif stage == "pretrain":
            stage_train("pretrain")
        elif stage == "adapt":
            if not (ROOT / EXPORTS["pretrain"] / "model.safetensors").is_file():
                stage_export(["pretrain"])  # the adaptation starts from the shipped AR base
            stage_train("adapt")
        elif stage == "certainty":
            stage_export(["adapt"], to=ADAPTED_BF16)  # the fine-tune starts from the bf16 export
            stage_train("certainty")
        elif stage == "ablations":
            stage_train("adapt-no-ar")
            stage_train("adapt-no-complementary")
            stage_train("adapt-no-shift")
        elif stage == "export":
            stage_export()


if __name__ == "__main__":
    main()
