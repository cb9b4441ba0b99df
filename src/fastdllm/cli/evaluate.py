"""`fastdllm eval`: accuracy (95% CI) and decoding speed on a GSM8K-format JSONL file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import add_decode_args, add_model_args, decode_overrides, load_llm
from ..errors import FastDLLMError


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="accuracy and speed on a GSM8K-format JSONL file")
    add_model_args(e)
    g = e.add_argument_group("evaluation")
    g.add_argument("--data", required=True, type=Path,
                   help="JSONL file, one {'question', 'answer'} object per line (answer ends with '#### N')")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N problems (default: all)")
    g.add_argument("--num-fewshot", type=int, default=0,
                   help="K: the file's first K rows become chat exemplars and are not scored (default: 0)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    g.add_argument("--compare-ar", action="store_true",
                   help="also run the same problems in AR mode (on --ar-model if given) side by side")
    g.add_argument("--ar-model", default=None, help="the AR base for --compare-ar (default: --model in AR mode)")
    g.add_argument("--sweep", type=_thresholds, default=(), metavar="T1,T2,...",
                   help="more thresholds, one run each: the accuracy vs tokens-per-forward frontier "
                        "and its AUP (with --json, also OUT.png)")
    g.add_argument("--json", metavar="OUT.json", type=Path, default=None,
                   help="write the full result (and OUT.md, the markdown summary)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_decode_args(e)
    e.set_defaults(func=cmd_eval)


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes thresholds like 0.95,0.9,0.8, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--sweep thresholds must be in (0, 1], got {text!r}")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..evaluation.gsm8k_eval import EvalConfig, evaluate
    from ..evaluation.report import markdown_summary
    from ..llm import LLM

    if args.ar_model and not args.compare_ar:
        raise FastDLLMError("--ar-model is only used with --compare-ar; add --compare-ar", field="ar_model")
    try:
        cfg = EvalConfig(args.data, limit=args.limit, num_fewshot=args.num_fewshot,
                         batch_size=args.batch_size, progress=not args.no_progress)
    except FastDLLMError as e:
        flag = f"--{e.field.replace('_', '-')}: " if e.field else ""
        raise FastDLLMError(f"{flag}{e}", field=e.field) from None
    # no prefix caching: the report counts forwards (tokens per forward), and a sweep decodes the
    # same prompts once per setting, so cached prefills would drop forwards from later settings
    args.no_prefix_caching = True
    llm = load_llm(args)
    ar_llm = LLM.load(args.ar_model, device=args.device, dtype=args.dtype) if args.ar_model else None
    device = str(next(llm.model.parameters()).device)
    result = evaluate(llm, cfg, model=args.model, ar_llm=ar_llm, ar_model=args.ar_model,
                      compare_ar=args.compare_ar, device=device, sweep=args.sweep,
                      **decode_overrides(args))
    summary = markdown_summary(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.json.with_suffix(".md"), summary)
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}", file=sys.stderr)
        if "frontier" in result:
            from ..evaluation.report import plot_frontier

            plot_frontier(result, args.json.with_suffix(".png"))
    print(summary)
    return 0
