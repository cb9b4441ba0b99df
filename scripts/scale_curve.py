"""The scale question: the shipped recipe (AR pretraining from scratch, then Fast-dLLM v2
adaptation with the weighted AR loss) at several model sizes, same data, same relative budgets.

    python scripts/scale_curve.py --budget 0.125 --out runs/scale          # train every size
    python scripts/scale_curve.py --budget 0.125 --out runs/scale --stages eval --limit 300

Each size is the shipped configs (configs/shipped/pretrain.yaml, adapt.yaml) with only the model
width changed (6 layers at every size, head_dim 64 except the smallest) and every budget scaled
by `--budget` (pretraining tokens, adaptation tokens, warmup steps and the checkpoint cadence;
the adaptation stays 25% of the pretraining budget). The data are the first `--examples`
shipped training examples, the same for every size (tokenized once into a shared cache).
The adaptation starts from the size's own final AR checkpoint (fp32; the shipped adaptation
started from the bf16 export of its AR base).

`eval` decodes the first `--limit` problems of the validation split (`sft_val.jsonl`, never
test) with the AR base (causal) and the adapted model (left-anchored t=1.0, the default
left-anchored t=0.9, left to right) and writes the gaps to `<results>.json/.md/.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name -> model section overrides (hidden, heads, kv heads, head_dim, MLP); 6 layers each
SIZES = {
    "0.7M": dict(hidden_size=96, num_heads=3, num_kv_heads=1, head_dim=32, intermediate_size=288),
    "1.4M": dict(hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64, intermediate_size=416),
    "2.8M": dict(hidden_size=192, num_heads=3, num_kv_heads=1, head_dim=64, intermediate_size=576),
}
SETTINGS = ["causal", "la=1.0", "la=0.9", "left-to-right"]


def scaled_configs(size: str, budget: float, out: Path, train_file: Path) -> tuple[Path, Path]:
    pre = yaml.safe_load((ROOT / "configs/shipped/pretrain.yaml").read_text())
    ada = yaml.safe_load((ROOT / "configs/shipped/adapt.yaml").read_text())
    run = out / size
    pre["model"].update(SIZES[size])
    pre["tokenizer"] = "models/fastdllm-wp-ar"
    pre["output_dir"] = str(run / "pretrain")
    ada["base_model"] = str(run / "pretrain" / "final")
    ada["output_dir"] = str(run / "adapt")
    for cfg in (pre, ada):
        cfg["data"].update(train_file=str(train_file), cache_dir=str(out / "cache"), num_workers=0)
        t, o = cfg["train"], cfg["optimizer"]
        t["max_tokens"] = int(t["max_tokens"] * budget)
        o["warmup_steps"] = max(5, round(o["warmup_steps"] * budget))
        t["eval_interval"] = 0  # validation at the start and the end only
        t["save_interval"] = max(25, round(t["save_interval"] * budget))
    paths = (run / "pretrain.yaml", run / "adapt.yaml")
    run.mkdir(parents=True, exist_ok=True)
    for cfg, p in zip((pre, ada), paths):
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def train(config: Path, threads: int) -> None:
    cfg = yaml.safe_load(config.read_text())
    run_dir = ROOT / cfg["output_dir"]
    if (run_dir / "final" / "model.safetensors").is_file():
        print(f"{config}: finished already", flush=True)
        return
    cmd = [sys.executable, "-m", "fastdllm.training", "--config", str(config)]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def count_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def evaluate_sizes(models: dict[str, tuple[Path, Path]], limit: int, batch: int, out: Path,
                   note: str) -> None:
    import torch

    from bench_adaptation import evaluate, load_split
    from common import machine_info, write_results
    from fastdllm.llm import LLM

    problems = load_split("val", ROOT / "runs/shipped/data/sft_val.jsonl", limit)
    old = out.with_suffix(".json")
    # sizes measured by an earlier call on the same problems are kept (the curve grows as runs end)
    done = {r["size"]: r for r in json.loads(old.read_text())["rows"]} if old.is_file() else {}
    rows = []
    for size, (ar_dir, dllm_dir) in models.items():
        if size in done and done[size].get("problems") == len(problems):
            rows.append(done[size])
            continue
        ar = LLM.load(ar_dir, device="cpu", dtype="float32")
        base = evaluate(ar, problems, batch, 128, f"{size} AR", mode="ar")
        dllm = LLM.load(dllm_dir, device="cpu", dtype="float32")
        res = {}
        for s in SETTINGS:
            if s == "causal":
                decode = dict(mode="ar")
            elif s == "left-to-right":
                decode = dict(mode="diffusion", sub_block_size=1, threshold=1.0, rule="threshold")
            else:
                decode = dict(mode="diffusion", threshold=float(s[3:]), rule="left_anchored")
            res[s] = evaluate(dllm, problems, batch, 128, f"{size} {s}", **decode)
        row = {"size": size, "params": count_params(dllm_dir), "problems": len(problems),
               "ar_base": base["accuracy"],
               **{f"{s} acc": res[s]["accuracy"] for s in SETTINGS},
               "la=0.9 tok/fwd": res["la=0.9"]["tokens_per_forward"],
               "gap la=1.0 (points)": round(100 * (base["accuracy"] - res["la=1.0"]["accuracy"]), 1),
               "gap la=0.9 (points)": round(100 * (base["accuracy"] - res["la=0.9"]["accuracy"]), 1),
               "ar_dir": str(ar_dir), "dllm_dir": str(dllm_dir)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["size", "params", "ar_base", "causal acc", "left-to-right acc", "la=1.0 acc", "la=0.9 acc",
            "la=0.9 tok/fwd", "gap la=1.0 (points)", "gap la=0.9 (points)"]
    notes = (f"{len(problems)} problems of the validation split (sft_val.jsonl), greedy, batch {batch}, "
             f"fp32 on the CPU. gap = AR base (causal) - adapted. {note}")
    write_results(out, "Scale curve: the adaptation gap against model size (validation split)",
                  machine_info("cpu"), [("Gap against size", rows, cols)],
                  {"split": "val", "rows": rows, "command": " ".join(sys.argv)}, notes)
    plot(rows, out.with_suffix(".png"))
    torch.set_num_threads(torch.get_num_threads())


def plot(rows: list[dict], out: Path) -> None:

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdllm.atomic import atomic_write_png

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["params"] / 1e6 for r in rows]
    ax.plot(xs, [100 * r["ar_base"] for r in rows], "k--", marker="s", label="AR base (causal)")
    ax.plot(xs, [100 * r["la=1.0 acc"] for r in rows], marker="o", label="adapted, left-anchored t=1.0")
    ax.plot(xs, [100 * r["la=0.9 acc"] for r in rows], marker="o", label="adapted, default (left-anchored t=0.9)")
    for r, x in zip(rows, xs):
        ax.annotate(f"{r['la=0.9 tok/fwd']:.2f} tok/fwd", (x, 100 * r["la=0.9 acc"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_png(out, fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="fraction of the shipped token budgets")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--examples", type=int, default=30_000, help="first N shipped training examples")
    ap.add_argument("--stages", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--results", type=Path, default=Path("docs/results/scale_curve_val"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / f"sft_train_{args.examples}.jsonl"
    if not train_file.is_file():
        lines = (ROOT / "runs/shipped/data/sft_train.jsonl").read_text().splitlines(keepends=True)
        train_file.write_text("".join(lines[:args.examples]))
    configs = {s: scaled_configs(s, args.budget, out, train_file) for s in args.sizes}
    if "train" in args.stages:
        for size in args.sizes:  # smallest first: a curve with two points beats none
            for config in configs[size]:
                train(config, args.threads)
    if "eval" in args.stages:
        import torch

        torch.set_num_threads(args.threads)
        models = {s: (out / s / "pretrain" / "final", out / s / "adapt" / "final") for s in args.sizes}
        note = (f"Budgets: {args.budget:g} x the shipped ones (pretraining {int(12e6 * args.budget):,} "
                f"tokens, adaptation {int(3e6 * args.budget):,}), first {args.examples:,} training examples.")
        evaluate_sizes(models, args.limit, args.batch_size, args.results, note)


if __name__ == "__main__":
    main()
