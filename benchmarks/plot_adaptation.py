"""Validation losses against adaptation tokens, from training runs' metrics.jsonl files: the
block-diffusion loss and the causal next-token (AR) loss of the same held-out rows.

    python benchmarks/plot_adaptation.py --run w0=docs/results/adaptation/metrics_w0.jsonl ... \\
        --tokens-per-step 2048 --out docs/results/adaptation/val_losses

Writes `<out>.png` and `<out>.md` (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

from fastdllm.atomic import atomic_write_png, atomic_write_text  # noqa: E402


def read_vals(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=metrics.jsonl")
    ap.add_argument("--tokens-per-step", type=int, required=True, help="global rows x seq_len")
    ap.add_argument("--base-ar-loss", type=float, default=None, help="the AR base's val_ar_loss")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = []
    for spec in args.run:
        label, _, path = spec.partition("=")
        vals = [r for r in read_vals(Path(path)) if r["step"] > 0]
        x = [r["step"] * args.tokens_per_step / 1e6 for r in vals]
        a.plot(x, [r["val_loss"] for r in vals], marker="o", label=label)
        b.plot(x, [r["val_ar_loss"] for r in vals], marker="o", label=label)
        for r, t in zip(vals, x):
            rows.append({"run": label, "tokens_M": round(t, 2), "val_diffusion_loss": round(r["val_loss"], 4),
                         "val_ar_loss": round(r["val_ar_loss"], 5)})
    if args.base_ar_loss is not None:
        b.axhline(args.base_ar_loss, color="black", linestyle="--", label="AR base")
    a.set(xlabel="adaptation tokens (millions)", ylabel="validation diffusion loss", yscale="log")
    b.set(xlabel="adaptation tokens (millions)", ylabel="validation causal next-token loss", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    atomic_write_png(args.out.with_suffix(".png"), fig, dpi=110)
    atomic_write_text(args.out.with_suffix(".md"), "# Validation losses against adaptation tokens\n\n"
                      + markdown_table(rows, ["run", "tokens_M", "val_diffusion_loss", "val_ar_loss"]) + "\n")


if __name__ == "__main__":
    main()
