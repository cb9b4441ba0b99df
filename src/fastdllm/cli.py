"""The `fastdllm` command: generate, chat, serve, train.

Every user error (FastDLLMError) is printed as one line on stderr with exit status 2; a
traceback means a bug in fastdllm.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FastDLLMError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (or Hugging Face hub id)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--mask-token-id", type=int, default=None, help="override the mask token id")
    p.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop token id (repeatable); default: the checkpoint's eos ids")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (no CUDA graphs / compiled static steps)")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", choices=("diffusion", "ar"), default=None, help="default: diffusion")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: 256")
    g.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's bd_size, else 32")
    g.add_argument("--sub-block-size", type=int, default=None, help="default: 8")
    g.add_argument("--threshold", type=float, default=None, help="confidence threshold in (0, 1], default 0.9")
    g.add_argument("--no-sub-block-cache", action="store_true", help="recompute the full block every step")
    g.add_argument("--no-block-cache", action="store_true",
                   help="slow reference: recompute the whole sequence every step")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)


def decode_overrides(args: argparse.Namespace) -> dict:
    return dict(
        mode=args.mode, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        sub_block_size=args.sub_block_size, threshold=args.threshold,
        sub_block_cache=False if args.no_sub_block_cache else None,
        block_cache=False if args.no_block_cache else None,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )


def load_llm(args: argparse.Namespace):
    from .llm import LLM

    return LLM.load(args.model, device=args.device, dtype=args.dtype, mask_token_id=args.mask_token_id,
                    stop_token_ids=args.stop_token_id, enforce_eager=args.enforce_eager)


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
        from .visualize import write_html

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
        print(f"[{s['mode']}] {s['new_tokens']} tokens, {s['forward_calls']} forwards, "
              f"{s['tokens_per_forward']:.2f} tokens/forward, {s['tokens_per_second']:.1f} tokens/s, "
              f"{s['seconds']:.3f}s, finish: {result.finish_reason}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import run_training

    out = run_training(args.config, resume=args.resume)
    print(f"model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode one prompt (diffusion or AR)")
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

    for name, help_text in (("train", "train a model from a YAML config (objective: diffusion | ar)"),
                            ("adapt", "alias of train: adapt an AR checkpoint with the Fast-dLLM v2 recipe")):
        t = sub.add_parser(name, help=help_text)
        t.add_argument("--config", required=True, help="YAML config file")
        t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        t.set_defaults(func=cmd_train)

    from . import chat_cli, serve_cli  # each keeps its heavy imports inside its command

    chat_cli.add_parser(sub)
    serve_cli.add_parser(sub)
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
