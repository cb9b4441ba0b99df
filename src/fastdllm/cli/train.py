"""`fastdllm train` (and its alias `adapt`): train or adapt a model from a YAML config."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    for name, help_text in (("train", "train a model from a YAML config (objective: diffusion | ar)"),
                            ("adapt", "alias of train: adapt an AR checkpoint with the Fast-dLLM v2 recipe")):
        t = subparsers.add_parser(name, help=help_text)
        t.add_argument("--config", required=True, help="YAML config file")
        t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import run_training

    out = run_training(args.config, resume=args.resume)
    print(f"model written to {out}")
    return 0
