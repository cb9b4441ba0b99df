"""Accuracy against decoding speed, one marker per benchmark configuration (bench_gsm.py).

Colour says what decodes (our AR, transformers' generate, diffusion with or without the
sub-block cache, an ablation, the left-to-right diagnostic); the marker shape says the batch
size. Diffusion points carry their threshold and are joined per (batch, cache) series, so the
speed/accuracy trade-off of the threshold reads as a curve.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fastdllm.atomic import atomic_write_bytes

COLORS = {"ar_engine": "black", "ar_engine_compiled": "tab:olive", "ar_transformers": "tab:gray",
          "diffusion": "tab:blue", "diffusion_compiled": "tab:cyan", "diffusion_official": "tab:pink",
          "diffusion_official_compiled": "tab:brown", "diffusion_no_sub_cache": "tab:orange",
          "ablation": "tab:red", "diagnostic": "tab:purple"}
LABELS = {"ar_engine": "AR base (fastdllm engine)",
          "ar_engine_compiled": "AR base (fastdllm engine, compiled)",
          "ar_transformers": "AR base (transformers generate)",
          "diffusion": "diffusion, sub-block cache",
          "diffusion_compiled": "diffusion, compiled",
          "diffusion_official": "diffusion, official rule",
          "diffusion_official_compiled": "diffusion, official rule, compiled",
          "diffusion_no_sub_cache": "diffusion, no sub-block cache",
          "ablation": "ablation (t=0.9)",
          "diagnostic": "adapted, left to right"}
MARKERS = ("o", "s", "^", "D", "v", "P")


def series(row: dict) -> str:
    if row["kind"] == "diffusion" and not row["sub_block_cache"]:
        return "diffusion_no_sub_cache"
    return row["kind"]


def plot_accuracy_vs_speed(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Write the PNG atomically (temp file in the same folder, then rename). Rows that did not
    run (status other than "ok") are left out."""
    rows = [r for r in rows if r["status"] == "ok" and r["tokens_per_s"] > 0]
    batches = sorted({r["batch"] for r in rows})
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(batches)}
    # a Figure with its own Agg canvas: no pyplot global state, no display backend needed
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        s = series(r)
        ax.scatter(r["tokens_per_s"], 100 * r["accuracy"], c=COLORS[s], marker=marker[r["batch"]],
                   s=45, zorder=3)
        if r["kind"].startswith("diffusion"):
            label = f"{r['threshold']:g}"
        elif r["kind"] == "ablation":
            label = r["config"].split(" t=")[0]
        elif r["kind"] == "diagnostic":
            label = "L2R"
        else:
            label = {"ar_engine": "AR", "ar_engine_compiled": "AR c", "ar_transformers": "HF"}[r["kind"]]
        ax.annotate(label, (r["tokens_per_s"], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color=COLORS[s])
    for b in batches:
        for s in ("diffusion", "diffusion_no_sub_cache"):
            pts = sorted((r["threshold"], r["tokens_per_s"], 100 * r["accuracy"])
                         for r in rows if r["batch"] == b and series(r) == s)
            if len(pts) > 1:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], color=COLORS[s], lw=0.8,
                        alpha=0.5, ls="-" if b == batches[0] else "--", zorder=2)
    if rows:  # a window of at least 10 points, so equal accuracies do not zoom in on noise
        acc = [100 * r["accuracy"] for r in rows]
        mid = (min(acc) + max(acc)) / 2
        half = max((max(acc) - min(acc)) / 2 + 3, 5)
        ax.set_ylim(max(0, mid - half) - 1, min(100, mid + half) + 1)
    ax.set_xscale("log")
    ax.set_xlabel("tokens / s (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy vs decoding speed (labels: diffusion threshold)")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=COLORS[s], marker="o", ls="", label=LABELS[s])
               for s in COLORS if any(series(r) == s for r in rows)]
    handles += [Line2D([], [], color="dimgray", marker=marker[b], ls="", label=f"batch {b}")
                for b in batches]
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    return atomic_write_bytes(path, png.getvalue())
