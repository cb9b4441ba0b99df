"""The `fastdllm` command: generate, chat, serve, train, eval.

Every user error (FastDLLMError) is printed as one line on stderr with exit status 2; a
traceback means a bug in fastdllm.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FastDLLMError
from . import chat, evaluate, generate, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, train, chat, serve, evaluate):  # each keeps its heavy imports inside its command
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FastDLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
