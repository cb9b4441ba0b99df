"""Adaptation recipes and budgets, scored on word problems: accuracy of adapted checkpoints in the
decoding settings that separate model error from parallel-decoding error.

    python benchmarks/bench_adaptation.py --split val --model "w1 3M=runs/adapt-w1/final" ...
    python benchmarks/bench_adaptation.py --split test --limit 500 --model ...

For each `LABEL=DIR` model and each setting it decodes the first `--limit` problems greedily:
- `causal`: the model's own AR decoding (mode="ar", causal attention): what lossless
  self-speculative decoding reproduces, and the AR skill the AR loss keeps;
- `left-to-right`: block-diffusion attention, one token per step strictly left to right
  (sub-blocks of one token, threshold 1): the model's error without parallel decoding;
- `t=1.0`: the paper's accuracy setting (one token per step, the most confident);
- `t=0.9` (any `t=T`): parallel decoding with the official threshold rule
  (`rule="threshold"`); `la=T`: with the left-anchored rule (the engine's default).
The `val` split is the trainer's validation file (1,000 training problems held out from
training: decisions are taken here); `test` is the held-out test split (the published numbers).
Writes `<out>.json` and `<out>.md`; `--plot` adds accuracy against adaptation tokens for models
labelled `NAME@TOKENS` (e.g. `w1@0.5M`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from fastdllm.llm import DTYPES, LLM  # noqa: E402
from fastdllm.tasks import SHIPPED_SPLIT, format_prompt, make_splits, score  # noqa: E402

SETTINGS = {
    "causal": dict(mode="ar"),
    "left-to-right": dict(mode="diffusion", sub_block_size=1, threshold=1.0, rule="threshold"),
}


def decode_of(setting: str) -> dict:
    """The decoding options of a setting name: causal, left-to-right, t=T (official rule) or
    la=T (left-anchored). Raises ValueError on any other name."""
    if setting in SETTINGS:
        return SETTINGS[setting]
    rule, _, t = setting.partition("=")
    if rule not in ("t", "la") or not t:
        raise ValueError(f"unknown setting {setting!r}: use causal, left-to-right, t=T or la=T")
    return dict(mode="diffusion", threshold=float(t), rule="threshold" if rule == "t" else "left_anchored")


def load_split(split: str, val_file: Path, limit: int) -> list[dict]:
    """[{'prompt': user message, 'answer': reference}] of the first `limit` problems."""
    if split == "val":
        rows = [json.loads(line) for line in val_file.read_text().splitlines() if line.strip()]
        return [{"prompt": r["prompt"], "answer": r["response"]} for r in rows[:limit]]
    test = make_splits(*SHIPPED_SPLIT)[1][:limit]
    return [{"prompt": format_prompt(p.question), "answer": p.answer} for p in test]


def evaluate(llm: LLM, problems: list[dict], batch: int, max_new_tokens: int, desc: str,
             **decode) -> dict:
    prompts = [llm.encode_chat([{"role": "user", "content": p["prompt"]}]) for p in problems]
    params = llm.decode_config(max_new_tokens=max_new_tokens, **decode)
    texts, tokens, forwards, t0 = [], 0, 0, time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        for r in llm.generate_batch(prompts[start:start + batch], config=params):
            texts.append(r.text)
            tokens += len(r.token_ids)
            forwards += r.stats["forward_calls"]
    sc = score(texts, [p["answer"] for p in problems])
    return {"accuracy": sc["accuracy"], "correct": sc["correct"], "problems": sc["total"],
            "new_tokens": tokens, "forward_calls": forwards,
            "tokens_per_forward": round(tokens / max(forwards, 1), 4),
            "seconds": round(time.perf_counter() - t0, 2)}


def parse_model(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--model takes LABEL=DIR, got {text!r}")
    return label, Path(path)


def tokens_of(label: str) -> float | None:
    """Adaptation tokens from a 'NAME@0.5M' label (None without '@')."""
    m = re.search(r"@([0-9.]+)([kM]?)$", label)
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(2)]


def plot_curve(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdllm.atomic import atomic_write_png

    fig, ax = plt.subplots(figsize=(6.5, 4))
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        t = tokens_of(r["model"])
        if t is not None:
            curves.setdefault((r["model"].rsplit("@", 1)[0], r["setting"]), []).append((t, 100 * r["accuracy"]))
    for (name, setting), pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=f"{name}, {setting}")
    for r in rows:
        if r["model"].startswith("AR base") and r["setting"] == "causal":
            ax.axhline(100 * r["accuracy"], color="black", linestyle="--", label="AR base")
    ax.set_xlabel("adaptation tokens (millions)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_png(out, fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=parse_model, action="append", required=True, help="LABEL=DIR")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--val-file", type=Path, default=Path("runs/shipped/data/sft_val.jsonl"))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--settings", nargs="+", default=["causal", "left-to-right", "t=1.0", "t=0.9"],
                    help="causal, left-to-right, t=T (official rule) or la=T (left-anchored)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/results/adaptation"))
    ap.add_argument("--plot", action="store_true", help="also <out>.png: accuracy vs adaptation tokens")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an existing <out>.json (same split) that this run does not "
                         "measure again: a curve evaluated checkpoint by checkpoint as training goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_split(args.split, args.val_file, args.limit)
    rows, models = [], {}
    old = args.out.with_suffix(".json")
    if args.append and old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("split") != args.split:
            ap.error(f"{old} holds the {prev.get('split')} split; --append needs the same split")
        rows, models = prev["rows"], prev.get("models", {})
    for label, path in args.model:
        llm = LLM.load(path, device=args.device, dtype=args.dtype, prefix_caching=False)
        for setting in args.settings:
            try:
                decode = decode_of(setting)
            except ValueError as e:
                ap.error(str(e))
            if decode["mode"] == "diffusion" and llm.config.bd_size is None:
                continue  # an AR checkpoint (no block size): causal only
            r = evaluate(llm, problems, args.batch_size, args.max_new_tokens, f"{label} {setting}", **decode)
            rows = [x for x in rows if (x["model"], x["setting"]) != (label, setting)]
            rows.append({"model": label, "setting": setting, **r})
            print(f"{label:28s} {setting:14s} acc {100 * r['accuracy']:5.1f}%  "
                  f"tok/fwd {r['tokens_per_forward']:.2f}", flush=True)
    cols = ["model", "setting", "accuracy", "correct", "problems", "tokens_per_forward", "forward_calls"]
    notes = (f"{len(problems)} problems of the {args.split} split, greedy, max_new_tokens "
             f"{args.max_new_tokens}, batch {args.batch_size}, {args.dtype} on {args.device}.")
    write_results(args.out, f"Adaptation: accuracy on the {args.split} split", machine_info(args.device),
                  [("Accuracy", rows, cols)], {"split": args.split, "rows": rows,
                                               "models": {**models, **{lbl: str(p) for lbl, p in args.model}}},
                  notes)
    if args.plot:
        plot_curve(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
