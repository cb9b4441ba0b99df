"""Speculative decoding on the shipped problems: the AR target's exact output at several tokens
per cycle, against plain AR and block-diffusion decoding, side by side in one run.

Rerun in one command (e.g. after the diffusion model is retrained), on the CPU in fp32:

    OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py            # 100 problems, batch 1 and 8
    python benchmarks/bench_speculative.py --limit 500 --draft-model DIR
    python benchmarks/bench_speculative.py --device cuda --out docs/results/speculative_bench_cuda

At each batch size, on the first `--limit` held-out problems, greedy:
- two-model: the AR base (`--target`) alone, and verifying drafts of the adapted model
  (`--draft-model`) at draft lengths `--draft-lengths`, one draft forward per cycle, plus
  refined drafts (`--refine-steps` forwards) at each draft length in `--refine-lengths`, and
  the whole block re-encoded every cycle (`draft_cache="block"`) at `--block-cache-lengths`;
- the adapted model decoding diffusion at its default (threshold 0.9);
- self-speculative (the adapted model alone): its own causal decoding (mode ar), speculative
  with block-diffusion drafts (k = 8) and the merged form (k = 4, 8), whose output is that
  causal decoding's;
and, once, forward latencies of a larger random-weights model in the official layout (the
Qwen2.5-0.5B shape in bf16, whose CPU forward is bound by reading the weights), with the
speedup they imply at this run's acceptance; and for batches above 1, the speedup that the
measured costs of a cycle's two forwards allow (forward_estimate_vs_ar).

Configurations run round robin over each batch of problems (see `run_interleaved`), so the
ratios hold on a loaded machine. Identity: a speculative row's outputs must equal, token for token, the AR outputs of its target
in the same run (100% greedy). Tokens are output tokens up to and including the first stop
token; tokens/s = tokens / wall seconds of the decode calls; forwards are model calls per
sequence (target and draft counted apart); a cycle is one draft + verify round.
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gsm import _sync, chat_prompts, load_problems  # noqa: E402
from common import machine_info, write_results  # noqa: E402

from fastdllm.engine.attention import attention_limits, limit_mask  # noqa: E402
from fastdllm.model.kv_cache import KVCache  # noqa: E402
from fastdllm.llm import LLM  # noqa: E402
from fastdllm.model.transformer import Transformer  # noqa: E402
from fastdllm.tasks import score  # noqa: E402

WARMUP = 2
COLUMNS = ["batch", "config", "accuracy_%", "identical_%", "tokens_per_cycle", "tokens_per_forward",
           "target_forwards", "draft_forwards", "draft_width", "tokens_per_s", "speedup_vs_ar"]


def run_interleaved(configs: list[tuple[str, LLM, dict]], prompts: list[list[int]], batch: int,
                    max_new_tokens: int) -> dict[str, dict]:
    """Decode `prompts` in consecutive batches with every configuration, round robin: each batch
    of prompts goes through all configurations back to back, so a change of background load
    hits every configuration alike and the ratios stay comparable on a shared machine."""
    prepared = []
    for name, llm, decode in configs:
        params = llm.decode_config(max_new_tokens=max_new_tokens, **decode)
        llm.engine(batch, max(params.cache_len(len(p)) for p in prompts), params.block,
                   speculative=params.speculative)
        llm.generate_batch(prompts[:min(batch, WARMUP)], config=params)  # warm-up
        prepared.append((name, llm, params))
    acc = {name: {"outputs": [], "texts": [], "seconds": 0.0, "forward_calls": 0, "target_forwards": 0,
                  "draft_forwards": 0, "draft_positions": 0, "cycles": 0} for name, _, _ in configs}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        for name, llm, params in prepared:
            a = acc[name]
            t0 = time.perf_counter()
            results = llm.generate_batch(chunk, config=params)
            a["seconds"] += time.perf_counter() - t0
            for r in results:
                a["outputs"].append(r.token_ids)
                a["texts"].append(r.text or "")
                st = r.stats
                a["forward_calls"] += st["forward_calls"]
                a["target_forwards"] += st.get("target_forwards", st["forward_calls"])
                a["draft_forwards"] += st.get("draft_forwards", 0)
                a["draft_positions"] += st.get("draft_positions", 0)
                a["cycles"] += st.get("cycles", st["forward_calls"])
        print(f"  batch {batch}: {min(i + batch, len(prompts))}/{len(prompts)} problems", flush=True)
    return acc


def _summary(a: dict, refs: list[str]) -> dict:
    tokens = sum(len(o) for o in a["outputs"])
    return {"accuracy": score(a["texts"], refs)["accuracy"], "new_tokens": tokens,
            "seconds": round(a["seconds"], 4), "tokens_per_s": round(tokens / a["seconds"], 2),
            "forward_calls": a["forward_calls"], "target_forwards": a["target_forwards"],
            "draft_forwards": a["draft_forwards"], "cycles": a["cycles"],
            "draft_width": round(a["draft_positions"] / a["draft_forwards"], 2) if a["draft_forwards"] else None,
            "tokens_per_cycle": round(tokens / a["cycles"], 3),
            "tokens_per_forward": round(tokens / a["forward_calls"], 3)}


def benchmark(args, problems: list[dict]) -> list[dict]:
    refs = [p["answer"] for p in problems]
    pair = LLM.load(args.target, device=args.device, draft_model=args.draft_model)
    adapted = LLM.load(args.draft_model, device=args.device)
    prompts = chat_prompts(pair, problems)
    AR, OWN = "AR target", "adapted model, causal (mode ar)"
    # (name, model, decoding, the AR row whose outputs it must reproduce)
    configs = [(AR, pair, dict(mode="ar"), None),
               ("diffusion t=0.9 (adapted model)", adapted, dict(mode="diffusion", threshold=0.9), None)]
    configs += [(f"speculative k={k}", pair, dict(mode="speculative", draft_length=k), AR)
                for k in args.draft_lengths]
    configs += [(f"speculative k={k}, block draft cache", pair,
                 dict(mode="speculative", draft_length=k, draft_cache="block"), AR)
                for k in args.block_cache_lengths]
    configs += [(f"speculative k={k}, {args.refine_steps} draft forwards", pair,
                 dict(mode="speculative", draft_length=k, draft_steps=args.refine_steps), AR)
                for k in args.refine_lengths]
    configs += [(OWN, adapted, dict(mode="ar"), None),
                ("self-speculative k=8", adapted, dict(mode="speculative", draft_length=8), OWN)]
    configs += [(f"self-speculative merged k={k}", adapted,
                 dict(mode="speculative", merged=True, draft_length=k), OWN) for k in args.merged_lengths]
    rows = []
    for b in args.batch_sizes:
        acc = run_interleaved([(n, m, d) for n, m, d, _ in configs], prompts, b, args.max_new_tokens)
        ar_speed = _summary(acc[AR], refs)["tokens_per_s"]
        for name, _, _, reference in configs:
            m = _summary(acc[name], refs)
            same = None
            if reference is not None:
                pairs = zip(acc[name]["outputs"], acc[reference]["outputs"])
                same = round(100 * sum(o == r for o, r in pairs) / len(prompts), 1)
            row = {"batch": b, "config": name, **m, "accuracy_%": round(100 * m["accuracy"], 1),
                   "identical_%": same, "speedup_vs_ar": round(m["tokens_per_s"] / ar_speed, 3),
                   "target_forwards": round(m["target_forwards"] / len(prompts), 2),  # per problem
                   "draft_forwards": round(m["draft_forwards"] / len(prompts), 2)}
            rows.append(row)
            print(f"b={b} {name}: acc {row['accuracy_%']}%, identical {row['identical_%']}, "
                  f"{row['tokens_per_cycle']} tok/cycle, {row['tokens_per_s']} tok/s "
                  f"({row['speedup_vs_ar']}x AR)", flush=True)
    return rows


# ---------------------------------------------------------------------- a memory-bound model
LARGE_SHAPE = "qwen2.5-0.5b"  # bench_engine.SHAPES: Qwen2.5-0.5B's published shape, official layout


@torch.inference_mode()
def forward_latencies(widths: list[int], repeats: int, context: int, model: Transformer | None = None,
                      rows: int = 1, device: str = "cpu") -> dict:
    """Median seconds of one forward of `rows` rows of `width` tokens each after `context`
    cached tokens; by default for a random model in the official layout (config.json as
    published: Fast_dLLM_Qwen, bd_size)."""
    if model is None:
        from bench_engine import build

        model = build(LARGE_SHAPE, device, torch.bfloat16)
    cfg = model.config
    p = next(model.parameters())
    dtype, dev = p.dtype, p.device
    cache = KVCache.regions(cfg.num_layers, rows, context + 2 * max(widths), cfg.num_kv_heads,
                            cfg.head_dim, dtype, dev)
    out = {"parameters": model.num_parameters(), "dtype": str(dtype).replace("torch.", ""),
           "context": context, "rows": rows}
    for w in widths:
        pos = torch.arange(context, context + w, device=dev)[None].expand(rows, -1)
        mask = limit_mask(attention_limits(pos, torch.ones(rows, 1, dtype=torch.long, device=dev)), context + w)
        ids = torch.randint(0, cfg.vocab_size, (rows, w), device=dev)
        times = []
        for _ in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            model(ids, pos, mask, cache.region_access(slice(0, rows), pos, context + w), logits_slice=slice(-1, None))
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[f"width_{w}"] = sorted(times[1:])[len(times[1:]) // 2]
    return out


def batch_bounds(pair: LLM, rows: list[dict], widths: list[int], context: int = 128) -> list[dict]:
    """For each batched speculative row, the speedup over AR its forwards alone allow:
    tokens_per_cycle x cost(AR step of b rows) / (cost(b rows of the mean draft width) +
    cost(b rows of k + 1)), with forward costs of the shipped models measured here at full
    batch (the decode's tail, where rows have finished, is not modelled). On a compute-bound
    CPU a forward's cost grows with its tokens, which is what caps batched speculation."""
    out = []
    for r in rows:
        if not r["config"].startswith("speculative k=") or "draft forwards" in r["config"] or r["batch"] == 1:
            continue
        b, k = r["batch"], int(r["config"].split("=")[1].split(",")[0])
        dw = r["draft_width"]
        need = sorted({1, k + 1, int(dw), int(dw) + 1} | set(widths))
        lat_t = forward_latencies(need, 9, context, pair.model, rows=b)
        lat_d = forward_latencies(need, 9, context, pair.draft.model, rows=b)  # on the models' device
        cycle = latency_at(lat_d, dw) + lat_t[f"width_{k + 1}"]
        out.append({"batch": b, "config": r["config"], "tokens_per_cycle": r["tokens_per_cycle"],
                    "draft_width": dw, "ar_step_ms": round(1000 * lat_t["width_1"], 3),
                    "draft_forward_ms": round(1000 * latency_at(lat_d, dw), 3),
                    "verify_forward_ms": round(1000 * lat_t[f"width_{k + 1}"], 3),
                    "forward_estimate_vs_ar": round(r["tokens_per_cycle"] * lat_t["width_1"] / cycle, 3),
                    "measured_vs_ar": r["speedup_vs_ar"]})
    return out


def latency_at(lat: dict, width: float) -> float:
    """Forward latency at `width` tokens, interpolated linearly between the measured widths."""
    ws = sorted(int(key.split("_")[1]) for key in lat if key.startswith("width_"))
    lo = max((w for w in ws if w <= width), default=ws[0])
    hi = min((w for w in ws if w >= width), default=ws[-1])
    if hi == lo:
        return lat[f"width_{lo}"]
    f = (width - lo) / (hi - lo)
    return (1 - f) * lat[f"width_{lo}"] + f * lat[f"width_{hi}"]


def projections(lat: dict, rows: list[dict], block: int) -> list[dict]:
    """Tokens/s the large model would reach at batch 1, from its forward latencies and this
    run's tokens per cycle: a cycle costs one draft forward (of the row's measured mean draft
    width) plus one verify forward (width k + 1)."""
    t_ar = lat["width_1"]
    out = []
    for r in rows:
        if r["batch"] != 1 or not r["config"].startswith("speculative k=") or "draft forwards" in r["config"]:
            continue
        k = int(r["config"].split("=")[1].split(",")[0])
        t_cycle = latency_at(lat, r["draft_width"]) + lat[f"width_{k + 1}"]
        out.append({"config": r["config"], "tokens_per_cycle": r["tokens_per_cycle"],
                    "draft_width": r["draft_width"],
                    "cycle_seconds": round(t_cycle, 5), "ar_forward_seconds": round(t_ar, 5),
                    "projected_speedup_vs_ar": round(r["tokens_per_cycle"] * t_ar / t_cycle, 2)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, default=Path("models/fastdllm-wp-ar"))
    ap.add_argument("--draft-model", type=Path, default=Path("models/fastdllm-wp-diffusion"))
    ap.add_argument("--test-file", type=Path, default=Path("runs/shipped/data/test.jsonl"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--draft-lengths", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--refine-lengths", type=int, nargs="*", default=[8, 16])
    ap.add_argument("--block-cache-lengths", type=int, nargs="*", default=[8],
                    help="draft lengths also run with draft_cache block (the whole block re-encoded)")
    ap.add_argument("--refine-steps", type=int, default=2)
    ap.add_argument("--merged-lengths", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-large", action="store_true", help="skip the large random model")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (models in fp32 on the CPU, bf16 on a GPU)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/speculative_bench"))
    args = ap.parse_args(argv)
    problems, source = load_problems(args.test_file, args.limit)
    machine = machine_info(args.device)
    machine["load_average_1_5_15_min"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = benchmark(args, problems)
    sections = [("Shipped pair, greedy", rows, COLUMNS)]
    payload = {"problems": source, "max_new_tokens": args.max_new_tokens, "rows": rows}
    if any(b > 1 for b in args.batch_sizes):
        pair = LLM.load(args.target, device=args.device, draft_model=args.draft_model)
        bounds = batch_bounds(pair, rows, [8, 16])
        payload["batch_bounds"] = bounds
        sections.append(("Batched rows: the speedup the cost of a cycle's two forwards allows (shipped "
                         "models, full batch, context 128)", bounds, ["batch", "config", "tokens_per_cycle", "draft_width",
                                                  "ar_step_ms", "draft_forward_ms", "verify_forward_ms",
                                                  "forward_estimate_vs_ar", "measured_vs_ar"]))
    if not args.no_large:
        block = 32  # the large model's bd_size (official layout)
        widths = sorted({1, 8, 16, 24, block, 2 * block} | {k + 1 for k in args.draft_lengths})
        lat = forward_latencies(widths, repeats=5, context=256, device=args.device)
        proj = projections(lat, rows, block)
        payload["large_model"] = {"latencies": lat, "projections": proj}
        lat_rows = [{"width": w, "seconds": round(lat[f"width_{w}"], 5),
                     "x_width_1": round(lat[f"width_{w}"] / lat["width_1"], 2)} for w in widths]
        sections += [(f"Large random model ({LARGE_SHAPE} shape, {lat['parameters'] / 1e6:.0f}M parameters, "
                      f"{lat['dtype']}, official layout): forward latency at context 256", lat_rows,
                      ["width", "seconds", "x_width_1"]),
                     ("Projected batch-1 speedup of the large model at this run's acceptance",
                      proj, ["config", "tokens_per_cycle", "draft_width", "cycle_seconds", "ar_forward_seconds",
                             "projected_speedup_vs_ar"])]
    machine["load_average_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    where = "fp32, CPU" if args.device == "cpu" else f"bf16, {args.device}"
    notes = (f"{source}; greedy, max_new_tokens {args.max_new_tokens}, {where}. "
             "`identical_%`: outputs equal token for token to the AR decoding of the row's target "
             "in this run (the AR base for two-model rows; the adapted model's own causal "
             "decoding for self-speculative rows). target/draft forwards are per problem. "
             "Rerun: `OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py`.")
    write_results(args.out, "Speculative decoding: block-diffusion drafts, AR verification", machine,
                  sections, payload, notes)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
