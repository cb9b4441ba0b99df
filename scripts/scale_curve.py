"""The scale question: the shipped recipe (AR pretraining from scratch, then Fast-dLLM v2
adaptation with the weighted AR loss) at several model sizes, same data, same relative budgets.

    python scripts/scale_curve.py --sizes 0.7M 1.4M --out runs/scale_full --stages train
    python scripts/scale_curve.py --sizes 0.7M 1.4M 2.8M --shipped 2.8M --out runs/scale_full --stages eval
    bash scripts/scale_gpu.sh                    # the 19M size on a lent GPU (~10 minutes)

Each size is the shipped configs (configs/shipped/pretrain.yaml, adapt.yaml) with only the model
width changed (6 layers at every size, head_dim 64 except the smallest) and every budget scaled
by `--budget` (pretraining tokens, adaptation tokens, warmup steps and the checkpoint cadence;
the adaptation stays 25% of the pretraining budget). The data are the first `--examples`
shipped training examples (default: all of them, as the shipped models), the same for every
size (tokenized once into a shared cache). The adaptation starts from the size's own final AR
checkpoint (fp32; the shipped adaptation started from the bf16 export of its AR base).
`--shipped SIZE` lets the shipped models stand for that size: at budget 1 and every example
they are this recipe at 2.8M (configs/shipped), so the CPU need not train it again.

`eval` decodes the first `--limit` problems of the validation split (`sft_val.jsonl`, never
test) with the AR base (causal) and the adapted model (left-anchored t=1.0, the default
left-anchored t=0.9, left to right) and writes the gaps to `<results>.json/.md/.png`. Rows of
earlier calls (other sizes, budgets, machines) stay in the results, keyed by size, budget and
examples, so the curve grows as runs end.
"""

from __future__ import annotations

import argparse
import json
import math
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
    # the GPU size (scripts/scale_gpu.sh): ~19M parameters, too slow for the shared CPU
    "19M": dict(hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64, intermediate_size=1536),
}
SHIPPED = (ROOT / "models/fastdllm-wp-ar", ROOT / "models/fastdllm-wp-diffusion")
ALL_EXAMPLES = 199_000  # lines of the shipped sft_train.jsonl
SETTINGS = ["causal", "la=1.0", "la=0.9", "left-to-right"]


def scaled_configs(size: str, budget: float, out: Path, train_file: Path, val_file: Path,
                   precision: str, workers: int) -> tuple[Path, Path]:
    pre = yaml.safe_load((ROOT / "configs/shipped/pretrain.yaml").read_text())
    ada = yaml.safe_load((ROOT / "configs/shipped/adapt.yaml").read_text())
    run = out / size
    pre["model"].update(SIZES[size])
    pre["tokenizer"] = "models/fastdllm-wp-ar"
    pre["output_dir"] = str(run / "pretrain")
    ada["base_model"] = str(run / "pretrain" / "final")
    ada["output_dir"] = str(run / "adapt")
    for cfg in (pre, ada):
        cfg["data"].update(train_file=str(train_file), val_file=str(val_file), cache_dir=str(out / "cache"),
                           num_workers=workers)
        t, o = cfg["train"], cfg["optimizer"]
        t["precision"] = precision
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


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def count_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def evaluate_sizes(models: dict[str, tuple[Path, Path]], budget: float, examples: int, val_file: Path,
                   limit: int, batch: int, device: str, out: Path) -> None:
    from bench_adaptation import decode_of, evaluate, load_split
    from common import machine_info, write_results
    from fastdllm.llm import LLM

    problems = load_split("val", val_file, limit)
    old = out.with_suffix(".json")
    mine = {"budget": budget, "examples": examples, "problems": len(problems)}
    # rows of earlier calls stay (other sizes, budgets, machines); a row is measured once
    rows = json.loads(old.read_text())["rows"] if old.is_file() else []
    machine = machine_info(device)
    for size, (ar_dir, dllm_dir) in models.items():
        if any(all(r.get(k) == v for k, v in {**mine, "size": size}.items()) for r in rows):
            continue
        load = dict(device=device, dtype="float32", prefix_caching=False)  # no cache hits across settings
        base = evaluate(LLM.load(ar_dir, **load), problems, batch, 128, f"{size} AR", mode="ar")
        dllm = LLM.load(dllm_dir, **load)
        res = {}
        for s in SETTINGS:
            res[s] = evaluate(dllm, problems, batch, 128, f"{size} {s}", **decode_of(s))
        row = {"size": size, **mine, "params": count_params(dllm_dir),
               "ar_base": base["accuracy"],
               **{f"{s} acc": res[s]["accuracy"] for s in SETTINGS},
               "la=0.9 tok/fwd": res["la=0.9"]["tokens_per_forward"],
               "gap la=1.0 (points)": round(100 * (base["accuracy"] - res["la=1.0"]["accuracy"]), 1),
               "gap la=0.9 (points)": round(100 * (base["accuracy"] - res["la=0.9"]["accuracy"]), 1),
               "ar_dir": _shown(ar_dir), "dllm_dir": _shown(dllm_dir), "device": device,
               "machine": machine.get("gpu", machine["cpu"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: (-r.get("budget", 0), r["params"]))
    cols = ["size", "params", "budget", "examples", "problems", "ar_base", "causal acc",
            "left-to-right acc", "la=1.0 acc", "la=0.9 acc", "la=0.9 tok/fwd", "gap la=1.0 (points)",
            "gap la=0.9 (points)", "device"]
    notes = ("Validation split (sft_val.jsonl, first `problems`), greedy, batch "
             f"{batch}, fp32, prefix caching off. gap = AR base (causal) - adapted. budget = fraction "
             "of the shipped token budgets (pretraining 12M row tokens, adaptation 3M); examples = "
             "first N shipped training examples. Rows with dllm_dir models/... are the shipped "
             "models, which are this recipe at 2.8M, budget 1, every example.")
    write_results(out, "Scale curve: the adaptation gap against model size (validation split)",
                  machine, [("Gap against size", rows, cols)],
                  {"split": "val", "rows": rows, "command": " ".join(sys.argv)}, notes)
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], out: Path) -> None:
    """Left: accuracies against parameters at the largest budget; right: the gaps at every budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdllm.atomic import atomic_write_png

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    acc, gap = fig.subplots(1, 2)
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    top = sorted((r for r in rows if r["budget"] == budgets[0]), key=lambda r: r["params"])
    xs = [r["params"] / 1e6 for r in top]
    acc.plot(xs, [100 * r["ar_base"] for r in top], "k--", marker="s", label="AR base (causal)")
    acc.plot(xs, [100 * r["la=1.0 acc"] for r in top], marker="o", label="adapted, left-anchored t=1.0")
    acc.plot(xs, [100 * r["la=0.9 acc"] for r in top], marker="o", label="adapted, default (t=0.9)")
    for r, x in zip(top, xs):
        acc.annotate(f"{r['la=0.9 tok/fwd']:.2f} tok/fwd", (x, 100 * r["la=0.9 acc"]),
                     textcoords="offset points", xytext=(4, -10), fontsize=7)
    acc.set_title(f"accuracy, budget {budgets[0]:g}", fontsize=9)
    acc.set_ylabel("validation accuracy (%)")
    for b, style in zip(budgets, ["-", ":", "-.", "--"]):
        sel = sorted((r for r in rows if r["budget"] == b), key=lambda r: r["params"])
        bx = [r["params"] / 1e6 for r in sel]
        gap.plot(bx, [r["gap la=0.9 (points)"] for r in sel], style, color="C1", marker="o",
                 label=f"default t=0.9, budget {b:g}")
        gap.plot(bx, [r["gap la=1.0 (points)"] for r in sel], style, color="C0", marker="o",
                 label=f"t=1.0, budget {b:g}")
    gap.set_title("gap to the AR base", fontsize=9)
    gap.set_ylabel("AR base - adapted (points)")
    ticks = sorted({r["params"] / 1e6 for r in rows})
    for ax in (acc, gap):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{x:.2f}" for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("parameters (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    atomic_write_png(out, fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1.0, help="fraction of the shipped token budgets")
    ap.add_argument("--sizes", nargs="+", default=["0.7M", "1.4M", "2.8M"], choices=list(SIZES))
    ap.add_argument("--shipped", choices=list(SIZES),
                    help="the shipped models stand for this size (only at budget 1 and every example)")
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--data", type=Path, default=ROOT / "runs/shipped/data",
                    help="sft_train.jsonl and sft_val.jsonl (scripts/build_shipped_models.py --stages data)")
    ap.add_argument("--examples", type=int, default=ALL_EXAMPLES, help="first N shipped training examples")
    ap.add_argument("--stages", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    ap.add_argument("--device", default="cpu", help="where training (via accelerate) and decoding run")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training precision")
    ap.add_argument("--workers", type=int, default=0, help="tokenizer processes (data.num_workers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--results", type=Path, default=Path("docs/results/scale_curve_val"))
    args = ap.parse_args()
    if args.shipped and (args.budget != 1.0 or args.examples != ALL_EXAMPLES):
        ap.error(f"--shipped needs --budget 1 and --examples {ALL_EXAMPLES}: the shipped models were "
                 "trained at the full budgets on every example")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if "train" in args.stages:
        train_file = out / f"sft_train_{args.examples}.jsonl"
        if not train_file.is_file():
            lines = (args.data / "sft_train.jsonl").read_text().splitlines(keepends=True)
            train_file.write_text("".join(lines[:args.examples]))
        # smallest first: a curve with two points beats none
        for size in (s for s in args.sizes if s != args.shipped):
            for config in scaled_configs(size, args.budget, out, train_file, args.data / "sft_val.jsonl",
                                         args.precision, args.workers):
                train(config, args.threads)
    if "eval" in args.stages:
        import torch

        torch.set_num_threads(args.threads)
        models = {s: SHIPPED if s == args.shipped else (out / s / "pretrain" / "final", out / s / "adapt" / "final")
                  for s in args.sizes}
        evaluate_sizes(models, args.budget, args.examples, args.data / "sft_val.jsonl", args.limit,
                       args.batch_size, args.device, args.results)


if __name__ == "__main__":
    main()
