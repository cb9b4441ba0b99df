"""`fastdllm generate`: decode one prompt (text, chat turn or token ids) and print the answer."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import FastDLLMError
from .args import add_decode_args, add_model_args, decode_overrides, load_llm


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="decode one prompt (diffusion or AR)")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated (no tokenizer needed)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template as a user turn")
    add_decode_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--trace", action="store_true", help="include the step trace in --json output")
    g.add_argument("--visualize", metavar="OUT.html", help="write an HTML replay of the decoding")
    g.set_defaults(func=cmd_generate)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise FastDLLMError(f"--prompt-ids must be comma-separated integers, got {text!r}",
                            field="prompt_ids") from None


def cmd_generate(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    opts = dict(decode_overrides(args), trace=bool(args.visualize or args.trace) or None)
    if args.prompt_ids is not None:
        result = llm.generate(_parse_ids(args.prompt_ids), **opts)
    elif args.chat:
        result = llm.generate(messages=[{"role": "user", "content": args.prompt}], **opts)
    else:
        result = llm.generate(args.prompt, **opts)
    if args.visualize:
        from ..visualize import write_html

        write_html(args.visualize, llm, result)
    if args.json:
        out = result.as_dict()
        if not args.trace:
            out.pop("trace", None)
        out["seconds"] = out.pop("seconds")
        print(json.dumps(out))
    else:
        print(result.text if result.text is not None else result.token_ids)
        s = result.stats
        extra = (f", {s['tokens_per_cycle']:.2f} tokens/cycle ({s['target_forwards']} target + "
                 f"{s['draft_forwards']} draft forwards)" if "cycles" in s else "")
        print(f"[{s['mode']}] {s['new_tokens']} tokens, {s['forward_calls']} forwards{extra}, "
              f"{s['tokens_per_forward']:.2f} tokens/forward, {s['tokens_per_second']:.1f} tokens/s, "
              f"{s['seconds']:.3f}s, finish: {result.finish_reason}", file=sys.stderr)
    return 0
