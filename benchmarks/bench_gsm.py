"""The shipped models on held-out word problems: accuracy and decoding speed, AR vs Fast-dLLM v2.

Reproduce (after `python scripts/build_shipped_models.py`), on the CPU in fp32:

    python benchmarks/bench_gsm.py                       # 500 problems, batch 1 and 8
    python benchmarks/bench_gsm.py --profile             # only: cProfile of diffusion t=0.9, batch 1

On the first `--limit` problems of the held-out test split, greedy, at each batch size:
- the AR base on our engine (mode="ar") and through transformers' `generate()` (same weights);
- the adapted model with block-diffusion decoding at each `--thresholds` value, with and
  without the sub-block cache, and its speedup against both AR baselines;
- the ablations (no complementary masks, no token shift) and the recipe they are taken from
  (micro batch 16) at threshold 0.9, largest batch only;
- a diagnostic, largest batch only: the adapted model decoding one token per step strictly left
  to right (sub-blocks of one token), which tells model error from parallel-decoding error.
- with `--baseline-src DIR` (the `src` of a worktree of an older commit): the AR engine and
  diffusion at `--baseline-thresholds` decoded by that code, in a subprocess, right after ours at
  each batch size, with a check that both produced the same output tokens;
- forwards per kind (prefill, full block, sub-block, commit, AR step) per answer, and the
  engine-step cost of 1 and S tokens on the adapted model, giving the bound
  tokens_per_forward * cost(1) / cost(S) next to the measured diffusion/AR ratio.
Writes `<out>.json`, `<out>.md` (tables + a "goals" section computed from the numbers) and
`<out>.png` (accuracy vs tokens/s).

Tokens are the output tokens up to and including the first stop token (what a user receives,
the same count for every backend); tokens/s = those tokens / wall seconds of the decode calls
(prompts are tokenized before timing); tokens per forward = tokens / forwards per sequence.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402
from plot import plot_accuracy_vs_speed  # noqa: E402

from fastdllm.atomic import atomic_write_text  # noqa: E402
from fastdllm.engine.params import RunnerConfig  # noqa: E402
from fastdllm.llm import DTYPES, LLM  # noqa: E402
from fastdllm.tasks import SHIPPED_SPLIT, format_prompt, make_splits, read_gsm8k_jsonl, score  # noqa: E402

WARMUP_PROBLEMS = 2
GOAL_THRESHOLD = 0.9
GOAL_ACCURACY_POINTS = 1.0  # diffusion accuracy >= AR accuracy - 1 point
GOAL_SPEEDUP_VS_AR = 2.5
GOAL_SPEEDUP_VS_TRANSFORMERS = 3.0
# issue 10 (the lean step): AR engine over transformers' generate, diffusion over the baseline code
GOAL_AR_VS_TRANSFORMERS = {1: 2.0, 8: 1.5}
GOAL_DIFFUSION_VS_BASELINE = 1.5
LEFT_TO_RIGHT = "adapted, left to right (sub-block 1, t=1)"
# the ablations of configs/shipped/adapt_no_*.yaml (scripts/build_shipped_models.py --stages ablations);
# docs/shipped_models.md says which recipe is each one's reference
DEFAULT_ABLATIONS = ["no AR loss=runs/shipped/adapt-no-ar/final",
                     "no-complementary=runs/shipped/adapt-no-complementary/final",
                     "no-token-shift=runs/shipped/adapt-no-shift/final:noshift"]
METRICS = ("problems", "correct", "accuracy", "new_tokens", "seconds", "tokens_per_s", "forward_calls",
           "tokens_per_forward", "forwards_per_answer", "stopped", "sample_output")  # what _metrics measures per configuration


# ---------------------------------------------------------------------- data
def load_problems(test_file: Path, limit: int) -> tuple[list[dict], str]:
    """The first `limit` problems and a sentence saying where they came from."""
    if test_file.is_file():
        return read_gsm8k_jsonl(test_file)[:limit], f"{test_file} (first {limit})"
    print(f"{test_file} is missing: regenerating the test split with make_splits{SHIPPED_SPLIT}",
          file=sys.stderr, flush=True)
    test = make_splits(*SHIPPED_SPLIT)[1]
    rows = [{"question": p.question, "answer": p.answer} for p in test[:limit]]
    return rows, f"regenerated with fastdllm.tasks.make_splits{SHIPPED_SPLIT} ({test_file} was missing)"


def chat_prompts(llm: LLM, problems: list[dict]) -> list[list[int]]:
    """Token ids of each question in the chat layout the models were trained on."""
    return [llm.encode_chat([{"role": "user", "content": format_prompt(p["question"])}])
            for p in problems]


# ---------------------------------------------------------------------- decoding
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(prompts: list[list[int]], batch: int) -> list[list[list[int]]]:
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


def _metrics(texts: list[str], outputs: list[list[int]], refs: list[str], seconds: float,
             forward_calls: int | None, stopped: int, kinds: dict[str, int] | None = None) -> dict:
    tokens = sum(len(o) for o in outputs)
    sc = score([t or "" for t in texts], refs)
    per_answer = (" ".join(f"{k}:{v / len(outputs):.2f}" for k, v in sorted(kinds.items()))
                  if kinds and outputs else None)
    return {"problems": sc["total"], "correct": sc["correct"], "accuracy": sc["accuracy"],
            "new_tokens": tokens, "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
            "forward_calls": forward_calls,
            "tokens_per_forward": round(tokens / forward_calls, 4) if forward_calls else None,
            "forwards_per_answer": per_answer, "kinds": kinds, "stopped": stopped,
            "sample_output": (texts[0] or "")[:300] if texts else "", "outputs": outputs}


def run_engine(llm: LLM, prompts: list[list[int]], refs: list[str], batch: int, *,
               max_new_tokens: int, desc: str = "", warmup: bool = True, **decode) -> dict:
    """Decode `prompts` in consecutive batches of `batch` on our engine; `decode` are
    DecodeConfig overrides (mode, threshold, sub_block_cache, token_shift)."""
    params = llm.decode_config(max_new_tokens=max_new_tokens, **decode)
    # allocate the KV cache for the longest prompt up front so no timed call re-allocates it
    llm.engine(batch, max(params.cache_len(len(p)) for p in prompts))
    if warmup:  # at the timed batch size, so the warm-up never swaps the engine for a smaller one
        for chunk in _batches(prompts[:WARMUP_PROBLEMS], batch):
            llm.generate_batch(chunk, config=params)
    device = next(llm.model.parameters()).device
    texts, outputs, seconds, calls, stopped, kinds = [], [], 0.0, 0, 0, {}
    with tqdm(total=len(prompts), desc=desc, unit="problem", leave=False) as bar:
        for chunk in _batches(prompts, batch):
            _sync(device)
            t0 = time.perf_counter()
            results = llm.generate_batch(chunk, config=params)
            _sync(device)
            seconds += time.perf_counter() - t0
            for r in results:
                texts.append(r.text)
                outputs.append(r.token_ids)
                calls += r.stats["forward_calls"]
                stopped += r.finish_reason == "stop"
                for k, v in r.stats["forwards_by_kind"].items():
                    kinds[k] = kinds.get(k, 0) + v
            bar.update(len(results))
    return _metrics(texts, outputs, refs, seconds, calls, stopped, kinds)


# the same measurement as run_engine, run by another checkout's code in a subprocess
_BASELINE = """
import json, sys, time, torch
from fastdllm.llm import LLM
a = json.load(sys.stdin)
if a["threads"]:
    torch.set_num_threads(a["threads"])
llm = LLM.load(a["model"], device=a["device"], dtype=a["dtype"])
params = llm.decode_config(max_new_tokens=a["max_new_tokens"], **a["decode"])
prompts, b = a["prompts"], a["batch"]
llm.engine(b, max(params.cache_len(len(p)) for p in prompts))
for i in range(0, min(len(prompts), a["warmup"]), b):
    llm.generate_batch(prompts[i:i + b][: a["warmup"]], config=params)
seconds, outputs, calls = 0.0, [], 0
for i in range(0, len(prompts), b):
    t0 = time.perf_counter()
    results = llm.generate_batch(prompts[i:i + b], config=params)
    seconds += time.perf_counter() - t0
    outputs += [r.token_ids for r in results]
    calls += sum(r.stats["forward_calls"] for r in results)
json.dump({"seconds": seconds, "outputs": outputs, "forward_calls": calls}, sys.stdout)
"""


def run_baseline(src: Path, model: Path, llm: LLM, prompts: list[list[int]], refs: list[str], batch: int, *,
                 max_new_tokens: int, args, **decode) -> dict:
    """run_engine's measurement with the code under `src` (a worktree's src of another commit)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    payload = {"model": str(model), "device": args.device, "dtype": args.dtype, "prompts": prompts,
               "batch": batch, "max_new_tokens": max_new_tokens, "decode": decode,
               "threads": torch.get_num_threads(), "warmup": WARMUP_PROBLEMS}
    out = subprocess.run([sys.executable, "-c", _BASELINE], input=json.dumps(payload), env=env,
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    outputs = res["outputs"]
    texts = [llm.decode(o) for o in outputs]
    stopped = sum(bool(o) and o[-1] in set(llm.special.stop_token_ids) for o in outputs)
    return _metrics(texts, outputs, refs, res["seconds"], res["forward_calls"], stopped)


def _until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


@torch.inference_mode()
def run_hf(model, decode_text, prompts: list[list[int]], refs: list[str], batch: int, *,
           max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int, desc: str = "") -> dict:
    """transformers' greedy `generate()`, left-padded batches with an attention mask."""
    device = next(model.parameters()).device
    stops = set(stop_ids)

    def generate(chunk: list[list[int]]) -> tuple[list[list[int]], float]:
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=list(stop_ids), pad_token_id=pad_id)
        _sync(device)
        seconds = time.perf_counter() - t0
        return [_until_stop(row, stops) for row in out[:, width:].tolist()], seconds

    for chunk in _batches(prompts[:WARMUP_PROBLEMS], batch):
        generate(chunk)
    texts, outputs, seconds = [], [], 0.0
    with tqdm(total=len(prompts), desc=desc, unit="problem", leave=False) as bar:
        for chunk in _batches(prompts, batch):
            new, secs = generate(chunk)
            seconds += secs
            outputs += new
            texts += [decode_text(o) for o in new]
            bar.update(len(new))
    stopped = sum(bool(o) and o[-1] in stops for o in outputs)
    return _metrics(texts, outputs, refs, seconds, None, stopped)


# ---------------------------------------------------------------------- reporting
def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_ar_engine / speedup_vs_transformers for every row, at the same batch size."""
    base = {(r["kind"], r["batch"]): r["tokens_per_s"] for r in rows
            if r["kind"] in ("ar_engine", "ar_engine_compiled", "ar_transformers") and r["status"] == "ok"}
    for r in rows:
        for kind, key in (("ar_engine", "speedup_vs_ar_engine"),
                          ("ar_engine_compiled", "speedup_vs_ar_compiled"),
                          ("ar_transformers", "speedup_vs_transformers")):
            ref = base.get((kind, r["batch"]))
            ok = r["status"] == "ok" and ref
            r[key] = round(r["tokens_per_s"] / ref, 3) if ok else None


def _find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if r["status"] == "ok" and all(
                r[k] is not None and abs(r[k] - v) < 1e-9 if isinstance(v, float) else r[k] == v
                for k, v in match.items()):
            return r
    return None


def goals(rows: list[dict], batch_sizes: list[int]) -> list[dict]:
    """The issue's goals at threshold 0.9 with the sub-block cache, per batch size, from the
    measured rows (None where a configuration was not run)."""
    out = []
    for b in batch_sizes:
        ar = _find(rows, kind="ar_engine", batch=b)
        hf = _find(rows, kind="ar_transformers", batch=b)
        dif = _find(rows, kind="diffusion", batch=b, threshold=GOAL_THRESHOLD, sub_block_cache=True)
        g = {"batch": b, "measured": dif is not None and ar is not None}
        if g["measured"]:
            gap = 100 * (ar["accuracy"] - dif["accuracy"])
            g.update(accuracy_ar=ar["accuracy"], accuracy_diffusion=dif["accuracy"],
                     accuracy_gap_points=round(gap, 2), accuracy_met=gap <= GOAL_ACCURACY_POINTS,
                     tokens_per_s=dif["tokens_per_s"], tokens_per_s_ar=ar["tokens_per_s"],
                     speedup_vs_ar_engine=dif["speedup_vs_ar_engine"],
                     speed_vs_ar_met=dif["speedup_vs_ar_engine"] >= GOAL_SPEEDUP_VS_AR)
            if hf is not None:
                g.update(tokens_per_s_transformers=hf["tokens_per_s"],
                         speedup_vs_transformers=dif["speedup_vs_transformers"],
                         speed_vs_transformers_met=dif["speedup_vs_transformers"]
                         >= GOAL_SPEEDUP_VS_TRANSFORMERS)
        out.append(g)
    return out


def goals_markdown(gs: list[dict]) -> str:
    def verdict(ok: bool) -> str:
        return "**MET**" if ok else "**NOT MET**"

    lines = ["## Goals", "",
             f"Diffusion at threshold {GOAL_THRESHOLD} with the sub-block cache, against the AR base "
             "at the same batch size (computed from this run's numbers):", ""]
    for g in gs:
        b = g["batch"]
        if not g["measured"]:
            lines.append(f"- batch {b}: not measured (no AR row or no threshold {GOAL_THRESHOLD} "
                         "row with the sub-block cache in this run)")
            continue
        lines.append(
            f"- batch {b}, accuracy within {GOAL_ACCURACY_POINTS:g} point of the AR base: "
            f"{100 * g['accuracy_diffusion']:.1f}% vs {100 * g['accuracy_ar']:.1f}% "
            f"(gap {g['accuracy_gap_points']:+.1f} points) {verdict(g['accuracy_met'])}")
        lines.append(
            f"- batch {b}, tokens/s >= {GOAL_SPEEDUP_VS_AR:g}x our AR: {g['tokens_per_s']:.1f} vs "
            f"{g['tokens_per_s_ar']:.1f} ({g['speedup_vs_ar_engine']:.2f}x) {verdict(g['speed_vs_ar_met'])}")
        if "speedup_vs_transformers" in g:
            lines.append(
                f"- batch {b}, tokens/s >= {GOAL_SPEEDUP_VS_TRANSFORMERS:g}x transformers' generate: "
                f"{g['tokens_per_s']:.1f} vs {g['tokens_per_s_transformers']:.1f} "
                f"({g['speedup_vs_transformers']:.2f}x) {verdict(g['speed_vs_transformers_met'])}")
        else:
            lines.append(f"- batch {b}, tokens/s vs transformers' generate: not measured")
    return "\n".join(lines)


def lean_goals_markdown(rows: list[dict], batch_sizes: list[int]) -> str:
    """Issue 10's goals, from this run's numbers."""
    lines = ["## Lean-step goals", ""]
    for b in batch_sizes:
        goal = GOAL_AR_VS_TRANSFORMERS.get(b)
        for kind, what in (("ar_engine", "AR engine"), ("ar_engine_compiled", "AR engine, compiled")):
            ar = _find(rows, kind=kind, batch=b)
            if ar and ar.get("speedup_vs_transformers") and goal:
                ok = ar["speedup_vs_transformers"] >= goal
                lines.append(f"- batch {b}, {what} >= {goal:g}x transformers' generate: "
                             f"{ar['speedup_vs_transformers']:.2f}x {'**reached**' if ok else '**not reached**'}")
        base = _find(rows, kind="baseline", batch=b, threshold=GOAL_THRESHOLD)
        for prefix, what in (("", ""), ("compiled_", ", compiled")):
            if base and base.get(f"{prefix}ours_over_baseline"):
                x = base[f"{prefix}ours_over_baseline"]
                lines.append(f"- batch {b}, diffusion t={GOAL_THRESHOLD:g} (official rule{what}) >= "
                             f"{GOAL_DIFFUSION_VS_BASELINE:g}x the baseline engine: {x:.2f}x, same tokens: "
                             f"{base[f'{prefix}same_tokens']} "
                             f"{'**reached**' if x >= GOAL_DIFFUSION_VS_BASELINE else '**not reached**'}")
        for kind, what, ref in (("diffusion", "", "speedup_vs_ar_engine"),
                                ("diffusion_compiled", ", compiled", "speedup_vs_ar_compiled")):
            dif = _find(rows, kind=kind, batch=b, threshold=GOAL_THRESHOLD, sub_block_cache=True)
            if dif and dif.get("bound_vs_ar") is not None and dif.get(ref) is not None:
                lines.append(f"- batch {b}, diffusion t={GOAL_THRESHOLD:g}{what} over our AR{what}: "
                             f"{dif[ref]:.2f}x measured, bound tokens_per_forward x cost(1)/cost(S) = "
                             f"{dif['bound_vs_ar']:.2f}x")
    return "\n".join(lines)


def _md_row(r: dict) -> dict:
    out = {k: ("–" if v is None else v) for k, v in r.items()}
    out["accuracy_%"] = "–" if r["status"] != "ok" else round(100 * r["accuracy"], 1)
    return out


# ---------------------------------------------------------------------- main
def parse_ablation(spec: str) -> tuple[str, Path, bool]:
    """NAME=DIR or NAME=DIR:noshift -> (name, dir, token_shift)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--ablation takes NAME=DIR[:noshift], got {spec!r}")
    shift = not rest.endswith(":noshift")
    return name, Path(rest.removesuffix(":noshift")), shift


def _load(path: Path, args) -> LLM:
    if not path.is_dir():
        sys.exit(f"error: model directory {path} does not exist; build the shipped models with "
                 "`python scripts/build_shipped_models.py` or pass --ar-model / --diffusion-model")
    return LLM.load(path, device=args.device, dtype=args.dtype)


def _row(config: str, kind: str, model: Path, batch: int, threshold=None, sub_block_cache=None,
         token_shift=None, status: str = "ok", **metrics) -> dict:
    return {"config": config, "kind": kind, "model": str(model), "batch": batch,
            "threshold": threshold, "sub_block_cache": sub_block_cache, "token_shift": token_shift,
            "status": status, **dict.fromkeys(METRICS), **metrics}


def _log(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['config']} (batch {row['batch']}): {row['status']} ({row['model']})", flush=True)
        return
    tpf = row["tokens_per_forward"]
    print(f"{row['config']} (batch {row['batch']}): accuracy {100 * row['accuracy']:.1f}%, "
          f"{row['tokens_per_s']:.1f} tokens/s" + (f", {tpf:.2f} tokens/forward" if tpf else ""),
          flush=True)


def benchmark(args, problems: list[dict]) -> list[dict]:
    refs = [p["answer"] for p in problems]
    ar = _load(args.ar_model, args)
    prompts = chat_prompts(ar, problems)
    from transformers import AutoModelForCausalLM

    # the same weights in the same dtype on the same device as our engine's AR model
    hf = AutoModelForCausalLM.from_pretrained(str(args.ar_model), dtype=DTYPES[args.dtype])
    hf = hf.to(next(ar.model.parameters()).device).eval()
    stop_ids = ar.special.stop_token_ids
    pad_id = ar.tokenizer.pad_token_id if ar.tokenizer.pad_token_id is not None else stop_ids[0]
    dif = _load(args.diffusion_model, args)
    dif_prompts = chat_prompts(dif, problems)
    common = dict(max_new_tokens=args.max_new_tokens)
    compiled = dif_compiled = None
    if args.compiled:  # both models again, with compiled static steps (RunnerConfig.cpu_static)
        compiled = _load(args.ar_model, args)
        compiled.runner = RunnerConfig(cpu_static="compile", widths=(1,), warmup_seconds=args.compile_cap)
        dif_compiled = _load(args.diffusion_model, args)
        d = dif_compiled.decode_config(mode="diffusion")
        dif_compiled.runner = RunnerConfig(cpu_static="compile", widths=(d.sub_block_size, d.block_size),
                                           warmup_seconds=args.compile_cap)

    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        _log(row)

    # one batch size at a time, and within it the problems in `--interleave` chunks, every
    # configuration decoding chunk k before any decodes chunk k + 1: configurations compared with
    # each other are measured close together in time (background load drifts over a long run)
    n_chunks = max(1, min(args.interleave, len(problems) // max(args.batch_sizes)))
    edges = [round(k * len(problems) / n_chunks) for k in range(n_chunks + 1)]
    for b in args.batch_sizes:
        configs = [("AR (fastdllm engine)", ("ar_engine", args.ar_model, b),
                    lambda c, b=b: run_engine(ar, prompts[c], refs[c], b, mode="ar", **common)),
                   ("AR (transformers generate)", ("ar_transformers", args.ar_model, b),
                    lambda c, b=b: run_hf(hf, ar.decode, prompts[c], refs[c], b, stop_ids=stop_ids,
                                          pad_id=pad_id, **common))]
        if compiled is not None:
            for name, llm, ps in (("AR", compiled, prompts), ("diffusion", dif_compiled, dif_prompts)):
                t0 = time.perf_counter()  # compile every static shape before anything is timed
                llm.engine(b, max(llm.decode_config(**common).cache_len(len(p)) for p in ps))
                print(f"compiled {name} engine for batch {b}: {time.perf_counter() - t0:.0f} s of warm-up",
                      flush=True)
            configs.insert(1, ("AR (fastdllm engine, compiled)", ("ar_engine_compiled", args.ar_model, b),
                               lambda c, b=b: run_engine(compiled, prompts[c], refs[c], b, mode="ar", **common)))
        for t in args.thresholds:
            for cache in (True, False):
                name = f"diffusion t={t:g}" + ("" if cache else ", no sub-block cache")
                configs.append((name, ("diffusion", args.diffusion_model, b, t, cache, True),
                                lambda c, b=b, t=t, cache=cache: run_engine(
                                    dif, dif_prompts[c], refs[c], b, mode="diffusion", threshold=t,
                                    sub_block_cache=cache, **common)))
            if compiled is not None and t == GOAL_THRESHOLD:
                configs.append((f"diffusion t={t:g}, compiled",
                                ("diffusion_compiled", args.diffusion_model, b, t, True, True),
                                lambda c, b=b, t=t: run_engine(dif_compiled, dif_prompts[c], refs[c], b,
                                                               mode="diffusion", threshold=t, **common)))
        if args.baseline_src:
            configs.append(("AR (baseline engine)", ("baseline", args.ar_model, b),
                            lambda c, b=b: run_baseline(args.baseline_src, args.ar_model, ar, prompts[c],
                                                        refs[c], b, mode="ar", args=args, **common)))
            for t in args.baseline_thresholds:
                # the baseline code knows only the official rule: ours decodes with it too, so the
                # two must give the same tokens
                for llm, kind, what in ((dif, "diffusion_official", ""),
                                        (dif_compiled, "diffusion_official_compiled", ", compiled")):
                    if llm is not None:
                        configs.append((f"diffusion t={t:g}, official rule{what}",
                                        (kind, args.diffusion_model, b, t, True, True),
                                        lambda c, b=b, t=t, llm=llm: run_engine(
                                            llm, dif_prompts[c], refs[c], b, mode="diffusion", threshold=t,
                                            rule="threshold", **common)))
                configs.append((f"diffusion t={t:g} (baseline engine)",
                                ("baseline", args.diffusion_model, b, t, True, True),
                                lambda c, b=b, t=t: run_baseline(
                                    args.baseline_src, args.diffusion_model, dif, dif_prompts[c], refs[c],
                                    b, mode="diffusion", threshold=t, args=args, **common)))
        parts: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        with tqdm(total=n_chunks * len(configs), desc=f"batch {b}", unit="run", leave=False) as bar:
            for k in range(n_chunks):
                chunk = slice(edges[k], edges[k + 1])
                for name, _, run in configs:
                    parts[name].append(run(chunk))
                    bar.update(1)
        merged = {name: _row(name, *spec, **merge_metrics(parts[name])) for name, spec, _ in configs}
        for name, row in merged.items():
            if name.endswith("(baseline engine)"):
                if name.startswith("AR"):
                    ours, ours_compiled = "AR (fastdllm engine)", "AR (fastdllm engine, compiled)"
                else:
                    ours = name.replace(" (baseline engine)", ", official rule")
                    ours_compiled = ours + ", compiled"
                _compare(row, merged.get(ours), merged.get(ours_compiled))
            add(row)
    b = max(args.batch_sizes)
    if args.skip_diagnostics:
        add_speedups(rows)
        return rows
    # separates the model from the decoder: one token per step, strictly left to right (sub-blocks
    # of one token), so parallel unmasking and confidence order play no part
    add(_row(LEFT_TO_RIGHT, "diagnostic", args.diffusion_model, b, 1.0, True, True, **run_engine(
        dif, dif_prompts, refs, b, mode="diffusion", threshold=1.0, sub_block_size=1,
        desc=f"{LEFT_TO_RIGHT} b={b}", **common)))
    for name, path, shift in args.ablation:
        config = f"{name} t={GOAL_THRESHOLD:g}"
        if not path.is_dir():
            add(_row(config, "ablation", path, b, GOAL_THRESHOLD, True, shift, status="not trained"))
            continue
        llm = LLM.load(path, device=args.device, dtype=args.dtype)
        add(_row(config, "ablation", path, b, GOAL_THRESHOLD, True, shift, **run_engine(
            llm, chat_prompts(llm, problems), refs, b, mode="diffusion", threshold=GOAL_THRESHOLD,
            token_shift=shift, desc=f"{config} b={b}", **common)))
        del llm
    add_speedups(rows)
    return rows


def merge_metrics(parts: list[dict]) -> dict:
    """One configuration's metrics over the chunks it decoded."""
    out = dict(parts[0])
    for key in ("problems", "correct", "new_tokens", "stopped"):
        out[key] = sum(p[key] for p in parts)
    out["seconds"] = round(sum(p["seconds"] for p in parts), 4)
    out["outputs"] = [o for p in parts for o in p["outputs"]]
    out["accuracy"] = out["correct"] / out["problems"] if out["problems"] else 0.0
    out["tokens_per_s"] = round(out["new_tokens"] / out["seconds"], 3) if out["seconds"] else 0.0
    if parts[0]["forward_calls"] is not None:
        out["forward_calls"] = sum(p["forward_calls"] for p in parts)
        out["tokens_per_forward"] = round(out["new_tokens"] / out["forward_calls"], 4)
    kinds: dict[str, int] = {}
    for p in parts:
        for k, v in (p.get("kinds") or {}).items():
            kinds[k] = kinds.get(k, 0) + v
    out["kinds"] = kinds
    out["forwards_per_answer"] = (" ".join(f"{k}:{v / out['problems']:.2f}" for k, v in sorted(kinds.items()))
                                  if kinds else None)
    return out


def _compare(base: dict, ours: dict | None, ours_compiled: dict | None = None) -> dict:
    """Our rows' speed (eager, compiled) over the baseline's, and whether each decoded the
    baseline's tokens."""
    for row, prefix in ((ours, ""), (ours_compiled, "compiled_")):
        if row is not None:
            base[f"{prefix}ours_over_baseline"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            base[f"{prefix}same_tokens"] = row["outputs"] == base["outputs"]
    return base


def step_bound(llm: LLM, sub_block: int, block: int, device: str, compiled: bool = False) -> dict:
    """Engine-step cost (ms) of 1 and S tokens on this model at a 256-token context (and of
    the same steps compiled, for the compiled rows' bound)."""
    from bench_engine import step_cost

    def costs(prefix: str) -> dict:
        llm._engine = None  # a fresh engine under llm.runner
        return {f"{prefix}cost_1_ms": round(step_cost(llm, 1, 256, block, device, 30), 4),
                f"{prefix}cost_S_ms": round(step_cost(llm, sub_block, 256, block, device, 30), 4)}

    out = {"S": sub_block, **costs("")}
    if compiled:
        llm.runner = RunnerConfig(cpu_static="compile", widths=(1, sub_block), max_batch=1)
        out.update(costs("compiled_"))
    llm._engine = None
    return out


def add_bounds(rows: list[dict], cost: dict) -> None:
    """bound = tokens_per_forward * cost(1) / cost(S) for each diffusion row (what its speedup
    over AR would be if every forward cost an S-token step and nothing else cost time); the
    compiled rows' bound uses the compiled steps' costs."""
    for r in rows:
        if (r["kind"].startswith("diffusion") or r["kind"] in ("ablation", "diagnostic")) and r["status"] == "ok":
            prefix = "compiled_" if r["kind"].endswith("_compiled") and "compiled_cost_1_ms" in cost else ""
            r["bound_vs_ar"] = round(r["tokens_per_forward"] * cost[f"{prefix}cost_1_ms"]
                                     / cost[f"{prefix}cost_S_ms"], 3)


def profile(args, problems: list[dict]) -> Path:
    """cProfile of diffusion t=0.9, sub-block cache, batch 1, on 20 problems."""
    llm = _load(args.diffusion_model, args)
    problems = problems[:20]
    prompts, refs = chat_prompts(llm, problems), [p["answer"] for p in problems]
    decode = dict(mode="diffusion", threshold=GOAL_THRESHOLD, max_new_tokens=args.max_new_tokens)
    run_engine(llm, prompts[:WARMUP_PROBLEMS], refs[:WARMUP_PROBLEMS], 1, desc="warm-up", warmup=False,
               **decode)
    prof = cProfile.Profile()
    prof.enable()
    m = run_engine(llm, prompts, refs, 1, desc="profile", warmup=False, **decode)
    prof.disable()
    text = io.StringIO()
    text.write(f"cProfile: {args.diffusion_model}, diffusion t={GOAL_THRESHOLD}, sub-block cache, "
               f"batch 1, {len(prompts)} problems, max_new_tokens {args.max_new_tokens}, "
               f"device {args.device}, torch threads {torch.get_num_threads()}\n"
               f"under the profiler: {m['tokens_per_s']} tokens/s, {m['tokens_per_forward']} tokens/forward "
               "(profiling overhead slows Python-heavy code more than the matmuls)\n\n")
    for key, n in (("cumulative", 40), ("tottime", 25)):
        text.write(f"=== top {n} by {key} time ===\n")
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(key).print_stats(n)
    path = args.profile_out or args.out.with_name("gsm_profile.txt")
    return atomic_write_text(path, text.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ar-model", type=Path, default=Path("models/fastdllm-wp-ar"))
    ap.add_argument("--diffusion-model", type=Path, default=Path("models/fastdllm-wp-diffusion"))
    ap.add_argument("--ablation", type=parse_ablation, action="append", default=None,
                    metavar="NAME=DIR[:noshift]",
                    help="repeatable; default: " + ", ".join(DEFAULT_ABLATIONS))
    ap.add_argument("--test-file", type=Path, default=Path("runs/shipped/data/test.jsonl"))
    ap.add_argument("--limit", type=int, default=500, help="first N problems of the test file")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="src dir of another checkout (e.g. a `git worktree` of an older commit) whose "
                         "engine is timed side by side with ours")
    ap.add_argument("--baseline-thresholds", type=float, nargs="+", default=[GOAL_THRESHOLD])
    ap.add_argument("--interleave", type=int, default=4,
                    help="decode the problems in this many chunks, every configuration chunk by chunk")
    ap.add_argument("--skip-diagnostics", action="store_true",
                    help="no left-to-right diagnostic and no ablations")
    ap.add_argument("--compiled", action="store_true",
                    help="add the AR engine with torch.compile'd static steps (cpu_static compile)")
    ap.add_argument("--compile-cap", type=float, default=600.0,
                    help="seconds the compiled engine may spend compiling its shapes per batch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/gsm_bench"),
                    help="output stem: writes <out>.json, <out>.md, <out>.png")
    ap.add_argument("--profile", action="store_true",
                    help="only profile diffusion t=0.9, batch 1, 20 problems (no benchmark)")
    ap.add_argument("--profile-out", type=Path, default=None,
                    help="default: gsm_profile.txt next to --out")
    args = ap.parse_args(argv)
    if args.ablation is None:
        args.ablation = [parse_ablation(s) for s in DEFAULT_ABLATIONS]
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    problems, source = load_problems(args.test_file, args.limit)
    if args.profile:
        print(f"wrote {profile(args, problems)}")
        return

    rows = benchmark(args, problems)
    dif = _load(args.diffusion_model, args)
    cost = step_bound(dif, 8, dif.default_block_size, args.device, compiled=args.compiled)
    add_bounds(rows, cost)
    gs = goals(rows, args.batch_sizes)
    machine = machine_info(args.device)
    machine["dtype"] = args.dtype
    cols = ["config", "accuracy_%", "correct", "new_tokens", "seconds", "tokens_per_s",
            "tokens_per_forward", "speedup_vs_ar_engine", "speedup_vs_ar_compiled", "bound_vs_ar",
            "speedup_vs_transformers", "ours_over_baseline", "same_tokens", "compiled_ours_over_baseline",
            "compiled_same_tokens", "forwards_per_answer", "stopped"]
    extra = ("ablation", "diagnostic")
    sections = [(f"Batch {b}", [_md_row(r) for r in rows if r["batch"] == b and r["kind"] not in extra],
                 cols) for b in args.batch_sizes]
    sections.append((f"Ablations at the same adaptation budget, and the left-to-right diagnostic "
                     f"(batch {max(args.batch_sizes)})",
                     [_md_row(r) for r in rows if r["kind"] in extra],
                     ["config", "status", "model", "token_shift", "threshold", "accuracy_%",
                      "tokens_per_s", "tokens_per_forward", "speedup_vs_ar_engine"]))
    notes = (f"{len(problems)} held-out problems: {source}. Greedy, max_new_tokens "
             f"{args.max_new_tokens}, {WARMUP_PROBLEMS}-problem warm-up per configuration. "
             "Tokens: output tokens up to and including the first stop token; tokens/s: those / wall "
             "seconds of the decode calls (prompt encoding excluded); tokens per forward: per "
             "sequence; `stopped`: outputs that ended with a stop token (the rest hit "
             "max_new_tokens). Speedups are against the AR base at the same batch size. "
             f"`bound_vs_ar` = tokens_per_forward x cost(1) / cost(S) with the adapted model's engine-step "
             f"costs measured in this run (cost(1) {cost['cost_1_ms']} ms, cost(S={cost['S']}) "
             f"{cost['cost_S_ms']} ms"
             + (f"; compiled rows: the compiled steps' cost(1) {cost['compiled_cost_1_ms']} ms, cost(S) "
                f"{cost['compiled_cost_S_ms']} ms" if "compiled_cost_1_ms" in cost else "")
             + "); `speedup_vs_ar_compiled`: over the compiled AR engine; `ours_over_baseline`: this "
             "engine's tokens/s over the baseline code's (`--baseline-src`) at the same configuration "
             "and batch (diffusion: ours with the official rule, the only one the baseline has), "
             "`same_tokens`: both decoded identical outputs; `compiled_*`: the same for our engine "
             "with compiled static steps (`--compiled`).\n\n"
             + goals_markdown(gs) + "\n\n" + lean_goals_markdown(rows, args.batch_sizes))
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args_json["ablation"] = [[n, str(p), s] for n, p, s in args.ablation]
    for r in rows:
        r.pop("outputs", None)
        r.pop("kinds", None)
    write_results(args.out, "Word problems: accuracy and speed of the shipped models", machine, sections,
                  {"args": args_json, "test_source": source, "goals": gs, "step_cost": cost, "rows": rows},
                  notes=notes)
    png = plot_accuracy_vs_speed([r for r in rows if r["kind"] != "baseline"], args.out.with_suffix(".png"))
    print(goals_markdown(gs))
    print(lean_goals_markdown(rows, args.batch_sizes))
    print(f"wrote {args.out}.json, {args.out}.md and {png}")


if __name__ == "__main__":
    main()
