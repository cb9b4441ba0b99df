"""Parallel-decoding rules on the accuracy vs tokens-per-forward plane (engine/selection.py).

    python benchmarks/bench_rules.py --model "w3=runs/adapt/fastdllm-wp-diffusion-w3" \\
        --split val --limit 300 --batch-size 64 --threads 1

For each `LABEL=DIR` model, each rule and each of its thresholds it decodes the first `--limit`
problems of the split greedily (block 32, sub-block 8, both caches, as shipped) and records the
accuracy and the tokens per forward (generated tokens / forwards each sequence took part in).
Decisions are taken on `--split val` (1,000 training problems held out from training); `test`
is for confirming a decision, never for making one. `--left-to-right` adds the model's error
without parallel decoding (sub-blocks of one token, threshold 1) as the ceiling a rule can reach.

`--lossless` adds the model's lossless modes as points on the same plane (self-speculative,
k = 8, and its merged form, k = 4: both give the model's own causal output); `--ar-base DIR`
adds the AR base (causal, 1 token per forward) and, with `--lossless`, speculative decoding of
the AR base drafted by the model (the AR base's exact output).

One number per curve: AUP, accuracy under parallelism (d3LLM's definition, evaluation/aup.py),
of each rule's thresholds and of each model's Pareto front over every point it has (rules and
lossless modes), with y_max the best accuracy of the run (the AR base's when it is the best).

Writes `<out>.json`, `<out>.md` (the table, the AUPs, and for every official point the
alternative points that dominate it: at least its accuracy at no fewer tokens per forward) and
`<out>.png` (the plane, one curve per model and rule, lossless modes as stars).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adaptation import evaluate, load_split, parse_model  # noqa: E402
from common import machine_info, write_results  # noqa: E402

from fastdllm.engine.selection import RULES  # noqa: E402
from fastdllm.evaluation.aup import aup  # noqa: E402
from fastdllm.llm import DTYPES, LLM  # noqa: E402

DEFAULT_SWEEP = ["threshold=0.9,0.8,0.7,0.5", "left_anchored=0.95,0.9,0.8,0.7",
                 "entropy_bounded=0.95,0.9,0.8,0.7"]
OFFICIAL = "threshold"
# lossless modes: (label, decode settings); they reproduce the model's causal output
LOSSLESS = [("self-speculative k=8", dict(mode="speculative", draft_length=8)),
            ("merged k=4", dict(mode="speculative", merged=True, draft_length=4))]
CURVE_RULES = RULES  # rows whose thresholds make a curve; every other row is a single point


def parse_sweep(text: str) -> tuple[str, list[float]]:
    rule, sep, values = text.partition("=")
    if not sep or rule not in RULES:
        raise argparse.ArgumentTypeError(f"--sweep takes RULE=T1,T2,... with RULE one of {RULES}, got {text!r}")
    try:
        thresholds = [float(v) for v in values.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be numbers, got {values!r}") from None
    if not thresholds:
        raise argparse.ArgumentTypeError(f"no thresholds in {text!r}")
    return rule, thresholds


def dominating(rows: list[dict]) -> list[dict]:
    """For every official-rule point of a model: the alternative points of the same model with
    at least its accuracy and at least its tokens per forward (at least one of them strictly)."""
    out = []
    for r in rows:
        if r["rule"] != OFFICIAL:
            continue
        for o in rows:
            if o["model"] != r["model"] or o["rule"] in (OFFICIAL, "left-to-right"):
                continue
            ge = o["accuracy"] >= r["accuracy"] and o["tokens_per_forward"] >= r["tokens_per_forward"]
            strict = o["accuracy"] > r["accuracy"] or o["tokens_per_forward"] > r["tokens_per_forward"]
            if ge and strict:
                out.append({"model": r["model"], "official": f"t={r['threshold']}",
                            "official accuracy": r["accuracy"], "official tok/fwd": r["tokens_per_forward"],
                            "dominated by": f"{o['rule']} t={o['threshold']}",
                            "accuracy": o["accuracy"], "tok/fwd": o["tokens_per_forward"],
                            "accuracy gain (points)": round(100 * (o["accuracy"] - r["accuracy"]), 1)})
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (at least the accuracy at no fewer tokens
    per forward, one of them strictly), sorted by tokens per forward."""
    return sorted(p for p in points
                  if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))


def aup_table(rows: list[dict]) -> list[dict]:
    """AUP of every model's curve per rule and of its Pareto front over all its points, with
    y_max the best accuracy of the run (in percent)."""
    y_max = 100 * max(r["accuracy"] for r in rows)
    out = []
    for m in dict.fromkeys(r["model"] for r in rows if r["rule"] != "AR base"):
        mine = [r for r in rows if r["model"] == m]
        for rule in CURVE_RULES:
            pts = [(r["tokens_per_forward"], 100 * r["accuracy"]) for r in mine if r["rule"] == rule]
            if pts:
                out.append({"model": m, "curve": rule, "points": len(pts),
                            "AUP": round(aup(pts, y_max=y_max), 2), "y_max": round(y_max, 2)})
        front = pareto_front([(r["tokens_per_forward"], 100 * r["accuracy"]) for r in mine])
        out.append({"model": m, "curve": "Pareto front (all settings)", "points": len(front),
                    "AUP": round(aup(front, y_max=y_max), 2), "y_max": round(y_max, 2)})
    return out


def plot_plane(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastdllm.atomic import atomic_write_png

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {"threshold": "tab:blue", "left_anchored": "tab:green", "entropy_bounded": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for m, style in zip(models, styles * len(models)):
        for rule in RULES:
            pts = sorted((r["tokens_per_forward"], 100 * r["accuracy"], r["threshold"])
                         for r in rows if r["model"] == m and r["rule"] == rule)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colors[rule],
                    label=f"{m}, {rule}" + (" (official)" if rule == OFFICIAL else ""))
            for x, y, t in pts:
                ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        for r in rows:
            if r["model"] == m and r["rule"] not in RULES and r["rule"] != "left-to-right":
                ax.plot(r["tokens_per_forward"], 100 * r["accuracy"], marker="*", markersize=11,
                        linestyle="none", label=m if m == r["rule"] else f"{m}, {r['rule']} (lossless)")
        for r in rows:
            if r["model"] == m and r["rule"] == "left-to-right":
                ax.axhline(100 * r["accuracy"], color="gray", linestyle=style, linewidth=1,
                           label=f"{m}, left to right (1 token/forward)")
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_png(out, fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=parse_model, action="append", required=True, help="LABEL=DIR")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--val-file", type=Path, default=Path("runs/shipped/data/sft_val.jsonl"))
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--sweep", type=parse_sweep, nargs="+", default=None,
                    help=f"RULE=T1,T2,... (default: {' '.join(DEFAULT_SWEEP)})")
    ap.add_argument("--left-to-right", action="store_true",
                    help="also decode left to right (one token per forward): the ceiling")
    ap.add_argument("--lossless", action="store_true",
                    help="also the lossless modes (self-speculative, merged; speculative with --ar-base)")
    ap.add_argument("--ar-base", type=Path, default=None,
                    help="the AR base: its causal accuracy (and the speculative point with --lossless)")
    ap.add_argument("--confidence-temperature", type=float, default=None,
                    help="temperature of the confidences every rule reads (default: each checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: docs/results/rules_<split>")
    args = ap.parse_args(argv)
    sweep = args.sweep or [parse_sweep(s) for s in DEFAULT_SWEEP]
    out = args.out or Path(f"docs/results/rules_{args.split}")
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_split(args.split, args.val_file, args.limit)
    rows = []
    if args.ar_base is not None:
        ar = LLM.load(args.ar_base, device=args.device, dtype=args.dtype, prefix_caching=False)
        r = evaluate(ar, problems, args.batch_size, args.max_new_tokens, "AR base", mode="ar")
        rows.append({"model": "AR base", "rule": "AR base", "threshold": 1.0, **r})
        print(f"AR base causal acc {100 * r['accuracy']:5.1f}%", flush=True)
    for label, path in args.model:
        # no prefix caching: every setting decodes the same prompts, and a prefill served from
        # the cache would drop its forward from tokens per forward (not what a rule changes)
        llm = LLM.load(path, device=args.device, dtype=args.dtype, prefix_caching=False)
        ct = {} if args.confidence_temperature is None else {"confidence_temperature": args.confidence_temperature}
        runs = [(rule, t, dict(mode="diffusion", rule=rule, threshold=t, **ct)) for rule, ts in sweep for t in ts]
        if args.left_to_right:
            runs.append(("left-to-right", 1.0, dict(mode="diffusion", sub_block_size=1, threshold=1.0)))
        if args.lossless:
            runs += [(name, 1.0, decode) for name, decode in LOSSLESS]
        for rule, t, decode in runs:
            r = evaluate(llm, problems, args.batch_size, args.max_new_tokens, f"{label} {rule} {t}",
                         **decode)
            rows.append({"model": label, "rule": rule, "threshold": t, **r})
            print(f"{label:20s} {rule:16s} t={t:<5g} acc {100 * r['accuracy']:5.1f}%  "
                  f"tok/fwd {r['tokens_per_forward']:.2f}  {r['seconds']:.0f}s", flush=True)
        if args.lossless and args.ar_base is not None:
            spec = LLM.load(args.ar_base, device=args.device, dtype=args.dtype, draft_model=path)
            name = "speculative (AR base target) k=8"
            r = evaluate(spec, problems, args.batch_size, args.max_new_tokens, f"{label} {name}",
                         mode="speculative", draft_length=8)
            rows.append({"model": label, "rule": name, "threshold": 1.0, **r})
            print(f"{label:20s} {name} acc {100 * r['accuracy']:5.1f}%  tok/fwd "
                  f"{r['tokens_per_forward']:.2f}", flush=True)
    cols = ["model", "rule", "threshold", "accuracy", "correct", "problems", "tokens_per_forward",
            "forward_calls", "new_tokens"]
    aups = aup_table(rows)
    dom = dominating(rows)
    dom_cols = ["model", "official", "official accuracy", "official tok/fwd", "dominated by",
                "accuracy", "tok/fwd", "accuracy gain (points)"]
    notes = (f"{len(problems)} problems of the {args.split} split, greedy, block 32 / sub-block 8 "
             f"(the checkpoint's), both caches, max_new_tokens {args.max_new_tokens}, batch "
             f"{args.batch_size}, {args.dtype} on {args.device}, confidence temperature "
             f"{args.confidence_temperature or 'of the checkpoint'}. tokens/forward = generated tokens / "
             "forwards each sequence took part in (a batched call counts for every row in it).")
    sections = [("Accuracy vs tokens per forward", rows, cols),
                ("AUP (accuracy under parallelism, d3LLM; y_max = the run's best accuracy)", aups,
                 ["model", "curve", "points", "AUP", "y_max"])]
    sections.append(("Official points dominated by an alternative", dom, dom_cols) if dom
                    else ("Official points dominated by an alternative (none)", [], dom_cols))
    write_results(out, f"Parallel-decoding rules on the {args.split} split", machine_info(args.device),
                  sections, {"split": args.split, "rows": rows, "aup": aups, "dominated": dom,
                             "models": {lbl: str(p) for lbl, p in args.model}}, notes)
    plot_plane(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
