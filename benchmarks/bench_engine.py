"""Engine micro-benchmark on random models of realistic and tiny shape.

1. Cost of one forward of 1, S and B tokens against a warm cache of `--context` tokens
   (the three forward widths of AR steps, sub-block steps and full-block steps).
2. AR vs block-diffusion decoding speed (tokens/s, tokens per forward) on the same engine.
   Random weights are not confident, so at threshold 0.9 diffusion unmasks ~1 token per step;
   the `threshold=1e-6` rows show the mechanism's upper bound (every masked position of the
   sub-block unmasked per step). Speed on trained models is measured in bench_gsm.py.

    python benchmarks/bench_engine.py                      # CPU, both shapes
    python benchmarks/bench_engine.py --device cuda --models qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

from fastdllm.engine.attention import attention_limits, limit_mask  # noqa: E402
from fastdllm.llm import LLM  # noqa: E402
from fastdllm.model.checkpoint import SpecialTokens  # noqa: E402
from fastdllm.model.config import ModelConfig  # noqa: E402
from fastdllm.model.kv_cache import CacheAccess, KVCache  # noqa: E402
from fastdllm.model.transformer import Transformer  # noqa: E402

SHAPES = {
    # Qwen2.5-0.5B-Instruct's published shape
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=6,
                 num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
}


def build(shape: str, device: str, dtype: torch.dtype) -> Transformer:
    cfg = ModelConfig(**SHAPES[shape], qkv_bias=True, max_position_embeddings=4096, model_type="qwen2")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def forward_cost(model: Transformer, width: int, context: int, block: int, device: str, reps: int) -> float:
    """Median ms of one forward of `width` tokens at positions [context, context + width)."""
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, context + block, cfg.num_kv_heads, cfg.head_dim,
                    next(model.parameters()).dtype, device)
    ids = torch.randint(0, cfg.vocab_size, (1, width), device=device)
    pos = torch.arange(context, context + width, device=device)[None]
    key_len = context + block
    mask = limit_mask(attention_limits(pos, torch.tensor([[block]], device=device)), key_len)
    access = CacheAccess(cache, slice(0, 1), pos, key_len)
    times = []
    for i in range(reps + 3):
        _sync(device)
        t = time.perf_counter()
        model(ids, pos, mask, access, logits_slice=slice(width - 1, width) if width == 1 else None)
        _sync(device)
        if i >= 3:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def decode_speed(model: Transformer, device: str, prompt_len: int, new_tokens: int, runs: int) -> list[dict]:
    llm = LLM(model, None, Path("."), SpecialTokens(mask_token_id=model.config.vocab_size - 1, stop_token_ids=()))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size - 1, (prompt_len,), generator=g).tolist()
    settings = [
        ("AR", dict(mode="ar")),
        ("diffusion t=0.9", dict(threshold=0.9)),
        ("diffusion t=0.9, no sub-block cache", dict(threshold=0.9, sub_block_cache=False)),
        ("diffusion t=1e-6 (upper bound)", dict(threshold=1e-6)),
        ("diffusion t=1e-6, no sub-block cache", dict(threshold=1e-6, sub_block_cache=False)),
    ]
    rows = []
    for name, kw in settings:
        llm.generate(prompt, max_new_tokens=min(new_tokens, 32), **kw)  # warm-up
        res = []
        for _ in range(runs):
            _sync(device)
            res.append(llm.generate(prompt, max_new_tokens=new_tokens, **kw))
            _sync(device)
        best = min(res, key=lambda r: r.stats["seconds"])
        rows.append({"setting": name, "new_tokens": best.stats["new_tokens"],
                     "forward_calls": best.stats["forward_calls"],
                     "tokens_per_forward": best.stats["tokens_per_forward"],
                     "tokens_per_s": best.stats["tokens_per_second"], "seconds": best.stats["seconds"]})
    ar = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / ar, 3) if ar else 0.0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b"], choices=list(SHAPES))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--sub-block-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default="docs/results/engine_bench")
    args = ap.parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]

    cost_rows, speed_rows = [], []
    for shape in args.models:
        model = build(shape, args.device, dtype)
        n_params = model.num_parameters()
        for width in (1, args.sub_block_size, args.block_size):
            ms = forward_cost(model, width, args.context, args.block_size, args.device, args.reps)
            cost_rows.append({"model": shape, "params_M": round(n_params / 1e6, 1), "width": width,
                              "context": args.context, "ms_per_forward": round(ms, 3),
                              "ms_per_token": round(ms / width, 3)})
            print(cost_rows[-1], flush=True)
        new_tokens = args.new_tokens if shape == "tiny" or args.device != "cpu" else min(args.new_tokens, 64)
        for r in decode_speed(model, args.device, args.prompt_len, new_tokens, args.runs):
            speed_rows.append({"model": shape, **r})
            print(speed_rows[-1], flush=True)
        del model

    machine = machine_info(args.device)
    machine["dtype"] = str(dtype).replace("torch.", "")
    out = Path(args.out)
    if args.device != "cpu":
        out = out.with_name(out.name + "_" + args.device.replace(":", ""))
    write_results(
        out, "Engine benchmark (random weights)", machine,
        [("Cost of one forward against a warm cache", cost_rows,
          ["model", "params_M", "width", "context", "ms_per_forward", "ms_per_token"]),
         ("AR vs diffusion decoding on the same engine", speed_rows,
          ["model", "setting", "new_tokens", "forward_calls", "tokens_per_forward", "tokens_per_s",
           "speedup_vs_ar"])],
        {"forward_cost": cost_rows, "decode": speed_rows, "args": vars(args)},
        notes=("Random weights: at threshold 0.9 diffusion unmasks about one token per step, so it is "
               "slower than AR; the threshold 1e-6 rows show the mechanism's upper bound. Ratios are "
               "measured side by side in one run; absolute times hold only for this machine."),
    )
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
