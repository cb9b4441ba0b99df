"""`python -m fastdllm.training --config FILE [--resume]`: the training entry point without the
CLI, e.g. for `accelerate launch --num_processes 8 -m fastdllm.training --config FILE`."""

from __future__ import annotations

import argparse
import sys

from ..errors import FastDLLMError
from .trainer import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdllm.training", description=__doc__)
    parser.add_argument("--config", required=True, help="training YAML file")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    try:
        print(run_training(args.config, resume=args.resume))
    except FastDLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
