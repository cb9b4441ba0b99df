"""Diffusion training step throughput: today's step against each exact speed-up alone and all
together, side by side in one run, on the shipped data and the shipped AR base.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --examples 400

Variants (training/objective.py StepLayout, data.packing): `reference` is the paper's layout
([x_t ; x_0] per view, every block, dense 2L x 2L mask, next-fit packing); `shared_clean`
([x_t ; x_t' ; x_0] per row); `skip_untargeted` (no noisy block, row-tail block or logit without
a target); `block_sparse` (tile attention over only the keys each block may see);
`first_fit` (first-fit-decreasing packing); `all` (the three exact layout savings: the trainer's
default); `all+first_fit`. Each variant trains a fresh copy of the model on the same packed
rows (the trainer's shuffled row order, same noise seeds) with AdamW, with the AR term (diffusion.ar_loss_weight) off and at 1.
A step's time covers building the batch, forward, backward and the optimizer step. Variants
take turns, micro-batch by micro-batch, so machine load falls on all alike; the first
micro-batch's loss per variant checks exactness on real data (the packing variants see other
rows, so their loss is not comparable). Data tokens: tokens of examples (prompt, response and
block padding), not row-tail padding, as the trainer's tokens_per_s counts them.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from fastdllm.training.base_model import initial_model  # noqa: E402
from fastdllm.training.config import DataConfig, DiffusionConfig, LoopConfig, TrainConfig  # noqa: E402
from fastdllm.training.dataset import RowOrder, build_datasets  # noqa: E402
from fastdllm.training.loss import target_loss_sum  # noqa: E402
from fastdllm.training.noise import row_seed  # noqa: E402
from fastdllm.training.objective import StepLayout, ar_batch, diffusion_batch  # noqa: E402

VARIANTS = {  # name: (layout, packing)
    "reference": (StepLayout(), "next_fit"),
    "shared_clean": (StepLayout(shared_clean=True), "next_fit"),
    "skip_untargeted": (StepLayout(skip_untargeted=True), "next_fit"),
    "block_sparse": (StepLayout(attention="block_sparse"), "next_fit"),
    "first_fit": (StepLayout(), "first_fit"),
    "all": (StepLayout(True, True, "block_sparse"), "next_fit"),
    "all+first_fit": (StepLayout(True, True, "block_sparse"), "first_fit"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("runs/shipped/data/sft_train.jsonl"))
    ap.add_argument("--base", type=Path, default=Path("models/fastdllm-wp-ar"))
    ap.add_argument("--examples", type=int, default=400, help="first N records of --data")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="micro-batches per variant and AR setting")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/training_bench"))
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    data = work / "train.jsonl"
    with open(args.data) as src:
        data.write_text("".join(itertools.islice(src, args.examples)))
    diffusion = DiffusionConfig(block_size=32)  # the shipped recipe: complementary, token shift, clean
    rows_of, model = {}, None
    for packing in ("next_fit", "first_fit"):
        cfg = TrainConfig(data=DataConfig(train_file=str(data), seq_len=args.seq_len, too_long="error",
                                          packing=packing),
                          output_dir=str(work / "run"), train=LoopConfig(max_steps=1), base_model=str(args.base),
                          diffusion=diffusion)
        base, tokenizer, _ = initial_model(cfg)
        model = model or base
        rows_of[packing] = build_datasets(cfg, tokenizer, base.config.mask_token_id)[0]
    mask_id = model.config.mask_token_id
    orders = {k: RowOrder(len(v), 0) for k, v in rows_of.items()}  # the trainer's shuffled order
    runs = {}  # (variant, ar) -> state
    for name, ar in itertools.product(args.variants, (0.0, 1.0)):
        m = copy.deepcopy(model).train()
        runs[(name, ar)] = dict(model=m, opt=torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=False),
                                seconds=0.0, data_tokens=0, row_tokens=0, computed=0, first_loss=None)
    for step in range(args.steps):
        for (name, ar), run in runs.items():
            layout, packing = VARIANTS[name]
            packed = rows_of[packing]
            idx = [orders[packing](step * args.micro_batch + i) for i in range(args.micro_batch)]
            start = time.perf_counter()
            rows = packed.select(idx)
            batch = diffusion_batch(rows, [row_seed(0, "train", g) for g in idx], diffusion, mask_id,
                                    torch.device("cpu"), layout)
            m = run["model"]
            logits = m(batch.input_ids, batch.positions, batch.attn_mask, logits_slice=batch.logits_index)
            loss = target_loss_sum(logits, batch.targets, batch.weights) / batch.denominator
            if ar:
                ab = ar_batch(rows, torch.device("cpu"), use_flex=False)
                ar_loss = target_loss_sum(m(ab.input_ids, ab.positions, ab.attn_mask), ab.targets) / ab.denominator
                loss = loss + ar * ar_loss
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            run["seconds"] += time.perf_counter() - start
            run["data_tokens"] += batch.data_tokens
            run["row_tokens"] += rows.tokens.numel()
            run["computed"] += batch.input_ids.numel()
            if run["first_loss"] is None:
                run["first_loss"] = float(loss.detach())
        print(f"step {step + 1}/{args.steps}", flush=True)
    results = []
    for ar in (0.0, 1.0):
        ref = runs.get(("reference", ar))
        for name in args.variants:
            run = runs[(name, ar)]
            tps = run["data_tokens"] / run["seconds"]
            results.append({
                "variant": name, "ar_loss_weight": ar, "data_tokens_per_s": round(tps, 1),
                "speedup": round(tps / (ref["data_tokens"] / ref["seconds"]), 3) if ref else None,
                "s_per_micro_batch": round(run["seconds"] / args.steps, 3),
                "computed_tokens_per_data_token": round(run["computed"] / run["data_tokens"], 3),
                "data_share_of_rows": round(run["data_tokens"] / run["row_tokens"], 4),
                "first_loss": f"{run['first_loss']:.6f}",  # a string: the table shows every digit
            })
            print(results[-1], flush=True)
    cols = ["variant", "ar_loss_weight", "data_tokens_per_s", "speedup", "s_per_micro_batch",
            "computed_tokens_per_data_token", "data_share_of_rows", "first_loss"]
    packed = rows_of["next_fit"]
    notes = (f"First {args.examples} records of {args.data} ({len(packed)} rows next-fit, "
             f"{len(rows_of['first_fit'])} first-fit), base {args.base}, seq_len {args.seq_len}, "
             f"micro batch {args.micro_batch} rows (x2 complementary views), {args.steps} micro-batches "
             "per variant, fp32, one thread (OMP_NUM_THREADS=1). The machine was shared with other "
             "jobs: absolute rates are loaded-machine figures; the speedups are measured side by side "
             "(variants interleaved micro-batch by micro-batch). first_loss is the first micro-batch's "
             "loss (diffusion + AR term): equal across variants on the same rows.")
    write_results(args.out, "Diffusion training step: data tokens/s by layout", machine_info("cpu"),
                  [("Throughput", results, cols)],
                  {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, notes)


if __name__ == "__main__":
    main()
