"""Attention over page tables: the candidate implementations side by side (issue 19, point 3).

Per layer, a decode step's attention reads each row's pages and hides keys past each query's
limit. Measured here, on one layer's shapes, interleaved (each repetition times every variant
once, in turn), medians:

- slots:   the engine before paging: every row's keys a contiguous slot, read as a view
           (no gather), SDPA with the additive limit mask (what paging must not lose to);
- gather:  the paged cache as the engine reads it on the CPU: index_select of the rows' pages,
           then the same SDPA and mask (model/kv_cache.py, `CacheAccess.read`);
- flex:    torch's flex_attention (compiled with inductor) over the gathered pages, with a
           BlockMask from the same per-row limits instead of a dense mask.

    python benchmarks/bench_attention.py                  # CPU, fp32
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16

Writes docs/results/attention_bench{,_cuda}.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

SHAPES = {  # (query heads, kv heads, head_dim)
    "shipped": (3, 1, 64),
    "qwen2.5-0.5b": (14, 2, 64),
    "qwen2.5-1.5b": (12, 2, 128),
}
PAGE = 32
NOTES = ("slots: contiguous per-row KV read as a view (the engine before paging); gather: the "
         "rows' pages gathered (the paged engine's CPU read); flex: flex_attention, compiled, "
         "with a BlockMask from the per-row limits over the gathered pages. Ratios > 1 are slower. "
         "Interleaved repetitions, medians.")


def setup(shape, n, W, K, device, dtype):
    H, KV, hd = SHAPES[shape]
    pages_per_row = K // PAGE
    pool_pages = 4 * n * pages_per_row + 1
    k_pool = torch.randn(pool_pages, PAGE, KV, hd, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    # rows' pages scattered through the pool, as after many admissions
    perm = torch.randperm(pool_pages - 1)[: n * pages_per_row] + 1
    tables = perm.view(n, pages_per_row).to(device)
    slots_k = torch.randn(n, KV, K, hd, device=device, dtype=dtype)
    slots_v = torch.randn_like(slots_k)
    q = torch.randn(n, H, W, hd, device=device, dtype=dtype)
    # diffusion-style limits: every query of a row sees its row's whole length (rows differ)
    lengths = torch.tensor([K - (i * 7) % PAGE for i in range(n)], device=device)
    limits = lengths[:, None].expand(n, W)
    keys = torch.arange(K, device=device)
    mask = torch.where(keys < limits[:, :, None], 0.0, float("-inf")).to(dtype)[:, None]
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, tables=tables, slots=(slots_k, slots_v),
                mask=mask, lengths=lengths, K=K, KV=KV, H=H)


def slots(d):
    return F.scaled_dot_product_attention(d["q"], *d["slots"], attn_mask=d["mask"],
                                          enable_gqa=d["H"] != d["KV"])


def _gather(d):
    n = d["tables"].shape[0]
    flat = d["tables"].reshape(-1)
    k = d["k_pool"].index_select(0, flat).view(n, -1, d["KV"], d["k_pool"].shape[-1]).transpose(1, 2)
    v = d["v_pool"].index_select(0, flat).view(n, -1, d["KV"], d["v_pool"].shape[-1]).transpose(1, 2)
    return k, v


def gather(d):
    k, v = _gather(d)
    return F.scaled_dot_product_attention(d["q"], k, v, attn_mask=d["mask"],
                                          enable_gqa=d["H"] != d["KV"])


_FLEX = None


def flex(d):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    lengths = d["lengths"]

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    n, _, W, _ = d["q"].shape
    block = create_block_mask(mask_mod, n, None, W, d["K"], device=str(d["q"].device))
    k, v = _gather(d)
    return _FLEX(d["q"], k, v, block_mask=block, enable_gqa=d["H"] != d["KV"])


def measure(fns, d, repeats, sync):
    for fn in fns.values():  # warm-up (compiles flex)
        fn(d)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn(d)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention (no compiler)")
    ap.add_argument("--smoke", action="store_true", help="one tiny shape, a few repeats (tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.smoke:
        grid = [("shipped", 1, 8, 64)]
    elif dev.type == "cuda":
        grid = [(s, n, W, K) for s in ("qwen2.5-0.5b", "qwen2.5-1.5b") for n in (1, 8, 32)
                for W in (1, 8, 32) for K in (512, 2048, 8192)]
    else:
        grid = [(s, n, W, K) for s in ("shipped", "qwen2.5-0.5b") for n in (1, 8)
                for W in (1, 8, 32) for K in (256, 1024)]
    fns = {"slots": slots, "gather": gather}
    if not args.no_flex:
        fns["flex"] = flex
    rows = []
    for shape, n, W, K in grid:
        global _FLEX
        _FLEX = None  # one compile per shape: dynamo guards would recompile anyway
        d = setup(shape, n, W, K, dev, dtype)
        ref = gather(d)
        out = {name: fn(d) for name, fn in fns.items()}
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name in ("gather", "flex"):
            if name in out:  # same keys and values as slots only for gather/flex (pool vs slots differ)
                torch.testing.assert_close(out[name].float(), ref.float(), atol=tol, rtol=tol)
        us = measure(fns, d, 3 if args.smoke else args.repeats, sync)
        row = {"shape": shape, "batch": n, "queries": W, "keys": K,
               **{f"{k}_us": round(v, 1) for k, v in us.items()}}
        row["gather_vs_slots"] = round(us["gather"] / us["slots"], 3)
        if "flex" in us:
            row["flex_vs_gather"] = round(us["flex"] / us["gather"], 3)
        rows.append(row)
        print(row, flush=True)
    stem = Path(args.out) if args.out else (Path(__file__).resolve().parents[1] / "docs" / "results" / (
        "attention_bench_cuda" if dev.type == "cuda" else "attention_bench"))
    cols = ["shape", "batch", "queries", "keys", "slots_us", "gather_us"] + (
        ["flex_us"] if not args.no_flex else []) + ["gather_vs_slots"] + (
        ["flex_vs_gather"] if not args.no_flex else [])
    command = "python benchmarks/bench_attention.py" + (
        f" --device {args.device} --dtype {args.dtype}" if dev.type == "cuda" else "")
    if not args.smoke or args.out:
        write_results(stem, "Attention over page tables, one layer (median microseconds)",
                      machine_info(args.device), [("Per layer", rows, cols)],
                      {"dtype": args.dtype, "page_size": PAGE, "rows": rows},
                      notes=f"Regenerate: `{command}`. " + NOTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
