"""Engine micro-benchmark on random models of realistic and tiny shape.

1. Cost of one engine step of 1, S and B tokens against a warm cache of `--context` tokens
   (the three forward widths of AR steps, sub-block steps and full-block steps: inputs built,
   one forward, draw, one transfer), next to the pure matrix-product floor of the same shapes
   (the fused q/k/v, o, gate/up, down products of every layer and the lm_head, nothing else):
   overhead = 1 - floor / step.
2. AR vs block-diffusion decoding speed (tokens/s, tokens per forward, forwards per kind) on
   the same engine, with the bound tokens_per_forward * cost(1) / cost(S) next to the
   measured diffusion/AR ratio.
   Random weights are not confident, so at threshold 0.9 diffusion unmasks ~1 token per step;
   the `threshold=1e-6` rows show the mechanism's upper bound (every masked position of the
   sub-block unmasked per step). Speed on trained models is measured in bench_gsm.py.

    python benchmarks/bench_engine.py                      # CPU, both shapes
    python benchmarks/bench_engine.py --device cuda --models qwen2.5-0.5b

The qwen2.5-0.5b shape is built in the official Fast_dLLM_Qwen layout (bd_size 32) and in
bf16 by default (`--big-dtype`): on the CPU its forward is memory-bound, the regime where a
forward's cost barely grows with its width.
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

import torch.nn.functional as F  # noqa: E402

from fastdllm.engine.params import DecodeConfig, RunnerConfig  # noqa: E402
from fastdllm.engine.sequence import ForwardPlan, PlanKind  # noqa: E402
from fastdllm.llm import LLM  # noqa: E402
from fastdllm.model.checkpoint import SpecialTokens  # noqa: E402
from fastdllm.model.config import ModelConfig  # noqa: E402
from fastdllm.model.transformer import Transformer  # noqa: E402

SHAPES = {
    # Qwen2.5-0.5B-Instruct's published shape
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=6,
                 num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
}


SHIPPED_AR = Path(__file__).resolve().parents[1] / "models" / "fastdllm-wp-ar"


def build(shape: str, device: str, dtype: torch.dtype) -> Transformer:
    if shape == "shipped-ar":  # the shipped AR model's real weights (step costs only)
        return LLM.load(SHIPPED_AR, device=device).model.to(dtype).eval()
    official = shape != "tiny"  # the published Fast_dLLM_v2 layout: Qwen2 weights + bd_size
    cfg = ModelConfig(**SHAPES[shape], qkv_bias=True, max_position_embeddings=4096,
                      model_type="Fast_dLLM_Qwen" if official else "qwen2", bd_size=32 if official else None,
                      mask_token_id=SHAPES[shape]["vocab_size"] - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, device: str, reps: int) -> float:
    return _interleaved_ms({"fn": fn}, device, reps)["fn"]


def _llm(model: Transformer, runner: RunnerConfig | None = None) -> LLM:
    return LLM(model, None, Path("."), SpecialTokens(mask_token_id=model.config.vocab_size - 1, stop_token_ids=()),
               runner=runner or RunnerConfig())


@torch.inference_mode()
def _interleaved_ms(fns: dict, device: str, reps: int) -> dict:
    """Median ms of each callable, the callables taking turns rep by rep (so drift in the
    machine's background load hits all of them alike)."""
    times = {k: [] for k in fns}
    for i in range(reps + 3):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i >= 3:
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def step_fn(llm: LLM, width: int, context: int, block: int, draws: int | None = None):
    """One engine step whose one row is `width` tokens at [context, context + width) (prompt of
    `context` tokens in the cache), drawing the logits of its first `draws` places (all by
    default), as a callable; and a callable that ends the row."""
    engine = llm.engine(1, context + block)
    seq = engine.add(list(range(3, 3 + context)), DecodeConfig(max_new_tokens=block, block_size=block))
    engine.pages.schedule(engine.running, engine._fail)  # its pages: the prompt and one block
    plan = ForwardPlan(PlanKind.FULL_BLOCK, context, context + width, context + block,
                       tuple(range(context, context + (draws or width))))
    return (lambda: engine.runner.run([(seq, plan)])), (lambda: engine.abort(seq))


@torch.inference_mode()
def step_cost(llm: LLM, width: int, context: int, block: int, device: str, reps: int) -> float:
    """Median ms of `step_fn`'s step."""
    step, end = step_fn(llm, width, context, block)
    ms = _median_ms(step, device, reps)
    end()
    return ms


MIXES = {  # rows of a step by width: diffusion at batch 8 (3 full blocks / commits, 5 sub-blocks),
           # and AR rows beside diffusion rows
    "8 rows: 3x32 + 5x8": (32, 32, 32, 8, 8, 8, 8, 8),
    "8 rows: 4x32 + 4x1": (32, 32, 32, 32, 1, 1, 1, 1),
    "8 rows: 8x8": (8,) * 8,
}


@torch.inference_mode()
def mixed_step_cost(model: Transformer, widths: tuple[int, ...], context: int, block: int, device: str,
                    reps: int) -> dict:
    """Median ms of one step whose rows have the given widths, three ways: packed into one
    forward (the engine's eager step), padded to the widest width (the static step's layout,
    run eagerly), and one forward per width (what the engine did before)."""
    out = {}
    for name, runner in (("packed", RunnerConfig(enforce_eager=True)),
                         ("padded", RunnerConfig(cpu_static="eager", widths=(1, 8, block)))):
        llm = _llm(model, runner)
        engine = llm.engine(len(widths), context + block)
        rows = []
        for w in widths:
            seq = engine.add(list(range(3, 3 + context)), DecodeConfig(max_new_tokens=block, block_size=block))
            # a full-block row draws one sub-block (8 places), as in decoding
            rows.append((seq, ForwardPlan(PlanKind.FULL_BLOCK, context, context + w, context + block,
                                          tuple(range(context, context + min(w, 8))))))
        engine.pages.schedule(engine.running, engine._fail)  # their pages: prompt and one block
        out[name] = _median_ms(lambda: engine.runner.run(rows), device, reps)
        if name == "packed":
            groups = {}
            for r in rows:
                groups.setdefault(r[1].end - r[1].start, []).append(r)
            out["per_width"] = _median_ms(lambda: [engine.runner.run(g) for g in groups.values()], device, reps)
    return out


def matmul_floor(model: Transformer, width: int, device: str):
    """The same forward's matrix products alone, at the same shapes, as a callable."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    x = torch.randn(width, cfg.hidden_size, device=device, dtype=dtype)
    a = torch.randn(width, cfg.num_heads * cfg.head_dim, device=device, dtype=dtype)
    m = torch.randn(width, cfg.intermediate_size, device=device, dtype=dtype)

    @torch.inference_mode()
    def products():
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            F.linear(x, at.qkv_proj.weight, at.qkv_proj.bias)
            F.linear(a, at.o_proj.weight, at.o_proj.bias)
            F.linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
            F.linear(m, mlp.down_proj.weight, mlp.down_proj.bias)
        F.linear(x, model.lm_head.weight)

    return products


def decode_speed(model: Transformer, device: str, prompt_len: int, new_tokens: int, runs: int,
                 settings: list[tuple[str, dict]]) -> list[dict]:
    llm = _llm(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size - 1, (prompt_len,), generator=g).tolist()
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
                     "forwards_by_kind": " ".join(f"{k}:{v}" for k, v in
                                                  sorted(best.stats["forwards_by_kind"].items())),
                     "tokens_per_s": best.stats["tokens_per_second"], "seconds": best.stats["seconds"]})
    ar = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_ar"] = round(r["tokens_per_s"] / ar, 3) if ar else 0.0
    return rows


# the official rule (every masked token above the threshold): on random weights its t=1e-6 rows
# unmask whole sub-blocks, which is what shows the mechanism's upper bound (the left-anchored
# default multiplies confidences of ~1/vocab and would stop at one token)
SETTINGS = [
    ("AR", dict(mode="ar")),
    ("diffusion t=0.9", dict(threshold=0.9, rule="threshold")),
    ("diffusion t=0.9, no sub-block cache", dict(threshold=0.9, sub_block_cache=False, rule="threshold")),
    ("diffusion t=1e-6 (upper bound)", dict(threshold=1e-6, rule="threshold")),
    ("diffusion t=1e-6, no sub-block cache", dict(threshold=1e-6, sub_block_cache=False, rule="threshold")),
]
# the 0.5B shape on a CPU: AR and the mechanism's upper bound only (t=0.9 on random weights is
# one token per forward, i.e. slower than AR by construction, and takes minutes)
BIG_SETTINGS = [SETTINGS[0], SETTINGS[3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="tiny model; default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--big-dtype", default="bfloat16", help="the 0.5B shape (default bfloat16)")
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b"],
                    choices=list(SHAPES) + ["shipped-ar"])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--sub-block-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cpu-compile", action="store_true",
                    help="CPU: also the step compiled by torch.compile (cpu_static compile), next to a "
                         "second floor measurement; the 0.5B shape is skipped (compiling it takes minutes)")
    ap.add_argument("--out", default="docs/results/engine_bench")
    args = ap.parse_args()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    dtype = dtypes[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]

    cost_rows, speed_rows, mixed_rows = [], [], []
    for shape in args.models:
        mdtype = dtype if shape in ("tiny", "shipped-ar") else dtypes[args.big_dtype]
        model = build(shape, args.device, mdtype)
        n_params = model.num_parameters()
        big = shape == "qwen2.5-0.5b" and args.device == "cpu"
        reps = max(3, args.reps // 3) if big else args.reps
        costs = {}
        for width in (1, args.sub_block_size, args.block_size):
            # the eager step, the matrix-product floor and (GPU) the graph or (CPU, --cpu-compile)
            # the compiled step, taking turns rep by rep
            fns = {"eager": step_fn(_llm(model, RunnerConfig(enforce_eager=True)), width, args.context,
                                    args.block_size)[0],
                   "floor": matmul_floor(model, width, args.device)}
            one_shape = dict(widths=(width,), max_batch=1)  # a shape of this width drawing every place
            if args.device.startswith("cuda"):
                fns["graph"] = step_fn(_llm(model, RunnerConfig(**one_shape)), width, args.context,
                                       args.block_size)[0]
            elif args.cpu_compile and not big:
                fns["compiled"] = step_fn(_llm(model, RunnerConfig(cpu_static="compile", **one_shape)),
                                          width, args.context, args.block_size)[0]
            # each step takes turns with its own floor measurement, two callables at a time: a third
            # in the rotation (another copy of the weights) would evict the step's from the caches
            t = {}
            for name in [k for k in fns if k != "floor"]:
                pair = _interleaved_ms({name: fns[name], "floor": fns["floor"]}, args.device, reps)
                t[name], t[f"floor_{name}"] = pair[name], pair["floor"]
            ms, floor = t["eager"], t["floor_eager"]
            costs[width] = ms
            extra = {}
            if "graph" in t:
                extra["graph_ms_per_step"] = round(t["graph"], 3)
            if "compiled" in t:
                extra.update(compiled_ms_per_step=round(t["compiled"], 3),
                             compiled_floor_ms=round(t["floor_compiled"], 3),
                             compiled_overhead_pct=round(100 * (1 - t["floor_compiled"] / t["compiled"]), 1))
            cost_rows.append({"model": shape, "dtype": str(mdtype).replace("torch.", ""),
                              "params_M": round(n_params / 1e6, 1), "width": width,
                              "context": args.context, "ms_per_step": round(ms, 3),
                              "ms_per_token": round(ms / width, 3), "matmul_floor_ms": round(floor, 3),
                              "overhead_%": round(100 * (1 - floor / ms), 1), **extra})
            print(cost_rows[-1], flush=True)
        if shape == "shipped-ar":  # step costs only: decoding speed is bench_gsm's job
            del model
            continue
        if not big:
            for mix, widths in MIXES.items():
                m = mixed_step_cost(model, widths, args.context, args.block_size, args.device, reps)
                mixed_rows.append({"model": shape, "rows": mix, "tokens": sum(widths),
                                   **{f"{k}_ms": round(v, 3) for k, v in m.items()}})
                print(mixed_rows[-1], flush=True)
        new_tokens = min(args.new_tokens, 32) if big else args.new_tokens
        rows = decode_speed(model, args.device, args.prompt_len, new_tokens, 1 if big else args.runs,
                            BIG_SETTINGS if big else SETTINGS)
        for r in rows:
            # a diffusion forward is S or B wide; the AR forward is 1 wide
            r["bound_tpf_x_cost1_over_costS"] = round(
                r["tokens_per_forward"] * costs[1] / costs[args.sub_block_size], 3)
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
        [("Cost of one engine step against a warm cache, and the matrix-product floor", cost_rows,
          ["model", "dtype", "params_M", "width", "context", "ms_per_step", "ms_per_token",
           "matmul_floor_ms", "overhead_%"] + (["graph_ms_per_step"] if args.device != "cpu" else [])
          + (["compiled_ms_per_step", "compiled_floor_ms", "compiled_overhead_pct"]
             if args.cpu_compile and args.device == "cpu" else [])),
         ("One step over rows of different widths: packed, padded, or one forward per width",
          mixed_rows, ["model", "rows", "tokens", "packed_ms", "padded_ms", "per_width_ms"]),
         ("AR vs diffusion decoding on the same engine", speed_rows,
          ["model", "setting", "new_tokens", "forward_calls", "tokens_per_forward", "forwards_by_kind",
           "tokens_per_s", "speedup_vs_ar", "bound_tpf_x_cost1_over_costS"])],
        {"step_cost": cost_rows, "mixed_step": mixed_rows, "decode": speed_rows, "args": vars(args)},
        notes=("Random weights: at threshold 0.9 diffusion unmasks about one token per step, so it is "
               "slower than AR; the threshold 1e-6 rows show the mechanism's upper bound. "
               "`bound_tpf_x_cost1_over_costS` = tokens per forward x cost(1) / cost(S): the diffusion/AR "
               "ratio a decoder would reach if every diffusion forward cost an S-token step; compare it "
               "with `speedup_vs_ar`. `ms_per_step` is the eager engine step (`--enforce-eager`); on a "
               "GPU `graph_ms_per_step` is the same step replayed from its CUDA graph, and decoding "
               "runs with graphs; on a CPU with `--cpu-compile`, `compiled_ms_per_step` is the step "
               "compiled by torch.compile (frozen weights). Each step and the matrix-product floor "
               "(`matmul_floor_ms`, `compiled_floor_ms`) are timed taking turns rep by rep, one step "
               "kind at a time, and the overhead is 1 - floor / step. The shipped-ar rows use the "
               "shipped AR model's weights. Ratios are "
               "measured side by side in one run; absolute times hold only for this machine."),
    )
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
