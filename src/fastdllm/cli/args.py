"""The flags every model command shares (--model, --device, decoding options), and loading the
model they name. Commands import this module; it imports no command."""

from __future__ import annotations

import argparse

from ..engine.selection import RULES

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (or Hugging Face hub id)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--mask-token-id", type=int, default=None, help="override the mask token id")
    p.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop token id (repeatable); default: the checkpoint's eos ids")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (no CUDA graphs / compiled static steps)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on the CPU, torch.compile the decode steps at start (a warm-up of about "
                        "15 s per shape, capped; then faster steps: for servers and long runs)")
    p.add_argument("--kv-cache-memory", type=_memory, default=None, metavar="BYTES",
                   help="size of the paged KV cache shared by all requests: bytes (4GiB, 512MiB, "
                        "1073741824) or a fraction of free memory (0.5); default: half the free "
                        "GPU memory, 1 GiB on the CPU (written only as used)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="never reuse the KV of blocks shared with earlier prompts (a system "
                        "prompt, earlier chat turns); prefix caching is exact and on by default")
    p.add_argument("--draft-model", default=None,
                   help="a block-diffusion model (same tokenizer) drafting for --model, which "
                        "verifies: --model's exact output, several tokens per forward "
                        "(default mode then: speculative)")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", choices=("diffusion", "ar", "speculative"), default=None,
                   help="default: diffusion (speculative with --draft-model; ar for a checkpoint never "
                        "adapted, with no bd_size or mask_token_id in its config.json, which "
                        "refuses diffusion); speculative without "
                        "--draft-model drafts with --model itself (self-speculative)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: 256")
    g.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's bd_size, else 32")
    g.add_argument("--sub-block-size", type=int, default=None, help="default: 8")
    g.add_argument("--threshold", type=float, default=None, help="confidence threshold in (0, 1], default 0.9")
    g.add_argument("--confidence", choices=("model", "sampler"), default=None,
                   help="with --temperature > 0 in diffusion mode, the probability the threshold reads: "
                        "the model's own (default: near-greedy as the temperature goes to 0) or the "
                        "sampling distribution's (the official sampler)")
    g.add_argument("--rule", choices=RULES, default=None,
                   help="parallel-decoding rule the threshold drives: left_anchored (default: the "
                        "run from the first mask while the confidence product stays >= it), "
                        "threshold (the official rule: every token above it plus the most "
                        "confident), entropy_bounded (EB-sampler: most confident first while the "
                        "entropy stays <= -ln of it)")
    g.add_argument("--confidence-temperature", type=float, default=None,
                   help="temperature of the confidences the rule reads (default: the checkpoint's "
                        "generation_config.json confidence_temperature, else 1.0 = as drawn)")
    g.add_argument("--no-sub-block-cache", action="store_true", help="recompute the full block every step")
    g.add_argument("--no-block-cache", action="store_true",
                   help="slow reference: recompute the whole sequence every step")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--draft-length", type=int, default=None,
                   help="speculative: tokens drafted per cycle, 1..block size (default: 8)")
    g.add_argument("--draft-steps", type=int, default=None,
                   help="speculative: draft forwards per cycle, 1 = one forward (default), more "
                        "refine the draft left to right")
    g.add_argument("--draft-cache", choices=("reuse", "block"), default=None,
                   help="speculative: reuse the draft's KV of the current block across cycles "
                        "(default), or re-encode the whole block every cycle")
    g.add_argument("--merged", action="store_true",
                   help="self-speculative: verify the last draft and draft the next in one forward")


def decode_overrides(args: argparse.Namespace) -> dict:
    return dict(
        mode=args.mode, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        sub_block_size=args.sub_block_size, threshold=args.threshold, rule=args.rule, confidence=args.confidence,
        confidence_temperature=args.confidence_temperature, sub_block_cache=False if args.no_sub_block_cache else None,
        block_cache=False if args.no_block_cache else None,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        draft_length=args.draft_length, draft_steps=args.draft_steps, draft_cache=args.draft_cache,
        merged=True if args.merged else None,
    )


def load_llm(args: argparse.Namespace):
    from ..llm import LLM

    return LLM.load(args.model, device=args.device, dtype=args.dtype, mask_token_id=args.mask_token_id,
                    stop_token_ids=args.stop_token_id, draft_model=args.draft_model,
                    enforce_eager=args.enforce_eager, cpu_compile=args.cpu_compile,
                    kv_cache_memory=args.kv_cache_memory, prefix_caching=not args.no_prefix_caching)


def _memory(text: str):
    from ..engine.params import parse_memory
    from ..errors import FastDLLMError

    try:
        return parse_memory(text)
    except FastDLLMError:
        raise argparse.ArgumentTypeError(
            f"--kv-cache-memory takes bytes (4GiB, 512MiB, 1073741824) or a fraction of free "
            f"memory (0.5), got {text!r}") from None
