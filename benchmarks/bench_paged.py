"""The paged KV cache with prefix caching (issue 19) against the slot-per-sequence cache it replaced.

Reproduce (CPU, fp32, one torch thread; the static engine is a worktree of 5bb25e8):

    git worktree add --detach /tmp/fastdllm-static 5bb25e8
    OMP_NUM_THREADS=1 python benchmarks/bench_paged.py --baseline-src /tmp/fastdllm-static/src
    python benchmarks/bench_paged.py --smoke --out /tmp/paged_smoke      # < 30 s, for tests

While the working tree is being edited, measure a frozen commit of the paged engine instead:
`git worktree add --detach /tmp/fastdllm-paged HEAD`, then run the first command with
`PYTHONPATH=/tmp/fastdllm-paged/src` in front and `--paged-src /tmp/fastdllm-paged/src` (the
report's machine line names the commit measured, `paged_src`).

Four measurements, each against the issue's goal (computed from this run's numbers):

a) Concurrency under one KV budget (`--budget-slots` static slots of `--long-context` positions).
   Static: each sequence holds one slot of the served context (what the server of 5bb25e8 asks
   `new_engine` for: `max_model_len`, by default the model's context); the budget over the slot's
   bytes (measured on the static engine built by the baseline code) is how many run at once.
   Paged: the issue's length mix (prompts uniform in 50-2,000 tokens, answers 50-500, stop
   tokens off so every answer has its drawn length) through the engine with
   `kv_cache_memory=budget` and `max_slots` = all requests, two ways: (1) "reserved" admission,
   a request joins only while the pages of every admitted request's whole length
   (prompt + answer) fit the pool, so no preemption can happen: the peak and the steady-state
   mean of sequences holding pages at once; (2) the engine's own admission (every request added
   at once: a sequence starts when its prefill's pages are free, the pool preempts as sequences
   grow): the peak before the first preemption, the mean, the preemptions. Memory per request
   is the KV bytes held per running sequence at the peak. A random-weights model (the test
   suite's tiny Qwen2) with a 32,768-position context, the context of the issue's
   Qwen2.5-7B example: the shipped models' 1,024 positions cannot hold the mix, and counting
   pages does not need trained weights (the counts do not depend on the model's width).
b) 32 requests sharing a 1,000-token system prompt (chat template, distinct user questions):
   request 1 alone, then requests 2-32 one at a time ("sequential") and all at once ("burst"):
   prefill forwards, prompt positions prefilled (computed, not served from the cache) and time
   to first token (from `add` to the step that makes its first output token final), prefix
   caching on vs off, taking turns repetition by repetition. The shipped diffusion model's
   weights in a copy whose config.json says 2,048 positions (its own is 1,024: too short for a
   1,000-token prefix plus a question and an answer; RoPE has no scaling tied to that number),
   so the prefill costs are the shipped model's.
c) A 5-turn chat on the shipped diffusion model (its own context): each turn's prompt is the
   chat template over every earlier question and answer plus the new question; per turn the
   positions prefilled with prefix caching on and off, the tokens new to the turn (past the
   longest common prefix with the previous turn's prompt + answer) and the bound "new tokens
   plus the partial block before them"; time to first token per turn (on/off taking turns).
d) Decode tokens/s at batch 1, 8 and 32 streams, the static engine (`--baseline-src`) against
   the paged one, both in worker subprocesses of the same code that take turns repetition by
   repetition and batch by batch within one (distinct word problems each repetition, so no
   prompt repeats; `--decode-prompts` prompts per repetition, in batches), on the shipped
   diffusion model (default decoding) and the shipped AR model; decode tokens/s counts the
   tokens made final after the prefill step over the time after it; same output tokens checked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from common import machine_info, markdown_table  # noqa: E402

from fastdllm.atomic import atomic_write_text  # noqa: E402
from fastdllm.llm import LLM  # noqa: E402
from fastdllm.model.kv_cache import KVCache  # noqa: E402
from fastdllm.rounding import round_down  # noqa: E402
from fastdllm.tasks import format_prompt, generate_problems  # noqa: E402

GOAL_CONCURRENCY = 4.0
GOAL_TTFT = 5.0
GOAL_DECODE_PCT = 5.0  # paged decode tokens/s within 5% of static at batch 1 and 8
GOAL_DECODE_BATCHES = (1, 8)


# ---------------------------------------------------------------------- workers (d, a's static slot)
# One engine's code in a subprocess (PYTHONPATH = its src), driven by JSON lines: the static
# engine of 5bb25e8 and the paged engine of the working tree run the same measurement.
_WORKER = r"""
import inspect, json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from fastdllm.llm import LLM
llms = {}
def reply(x):
    sys.stdout.write(json.dumps(x) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    a = json.loads(line)
    if a["op"] == "load":
        paged = "kv_cache_memory" in inspect.signature(LLM.load).parameters
        llms[a["name"]] = LLM.load(a["model"], **(a.get("paged_kwargs", {}) if paged else {}))
        reply({"paged": paged})
    elif a["op"] == "slot":  # the static engine's slot for the served context
        llm = llms[a["name"]]
        e = llm.new_engine(a["slots"], a["context"], a["block"], context=a["context"])
        reply({"max_len": e.max_len, "nbytes": e.cache.nbytes, "shape": list(e.cache.k.shape)})
        del e
    elif a["op"] == "decode":  # a["prompts"] in consecutive batches of a["batch"]
        llm = llms[a["name"]]
        params = llm.decode_config(**a["decode"])
        prompts, b = a["prompts"], a["batch"]
        engine = llm.engine(b, max(params.cache_len(len(p)) for p in prompts), params.block)
        res = {"total_s": 0.0, "decode_s": 0.0, "tokens": 0, "decode_tokens": 0, "steps": 0, "outputs": []}
        for i in range(0, len(prompts), b):
            t0 = time.perf_counter()
            seqs = [engine.add(p, params) for p in prompts[i:i + b]]
            engine.step()  # the prefill step (every prompt of the batch prefills in it)
            t1 = time.perf_counter()
            first = sum(s.final_len - s.prompt_len for s in seqs)
            steps = 1
            while engine.running:
                engine.step()
                steps += 1
            t2 = time.perf_counter()
            outputs = [s.tokens[s.prompt_len:s.end] for s in seqs]
            n = sum(map(len, outputs))
            res["total_s"] += t2 - t0
            res["decode_s"] += t2 - t1
            res["tokens"] += n
            res["decode_tokens"] += n - first
            res["steps"] += steps
            res["outputs"] += outputs
        res["usage"] = engine.pages.usage() if hasattr(engine, "pages") else None
        reply(res)
"""


class Worker:
    def __init__(self, src: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(threads)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.src = src

    def __call__(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker on {self.src} died (rc {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------- helpers
def _median(xs):
    return statistics.median(xs) if xs else None


def _r(x, n=3):
    return None if x is None else round(x, n)


def _ratio(a, b):
    return None if not a or not b else round(a / b, 3)


def _first_token(engine, seqs, t0: dict, ttft: dict) -> None:
    """Step once; note the time at which each of `seqs` has its first final output token."""
    engine.step()
    now = time.perf_counter()
    for s in seqs:
        if s.id not in ttft and (s.final_len > s.prompt_len or s.finished):
            ttft[s.id] = now - t0[s.id]


def long_context_checkpoint(root: Path, context: int) -> Path:
    """The test suite's tiny random Qwen2 (2 layers, 2 KV heads, head_dim 16) with a mask token,
    told it has `context` positions (default RoPE: nothing depends on that number)."""
    from fixtures import make_checkpoint, special_token_ids, update_config

    path = make_checkpoint(root / f"random-{context}", "qwen2", mask_token_id=special_token_ids()["mask"])
    update_config(path, max_position_embeddings=context)
    return path


def with_context(model: Path, root: Path, context: int) -> Path:
    """A copy of `model` whose config.json says `context` positions (same weights)."""
    dst = root / f"{model.name}-{context}"
    if not dst.exists():
        shutil.copytree(model, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["max_position_embeddings"] = context
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def bytes_per_position(llm: LLM) -> int:
    cfg = llm.config
    dtype = next(llm.model.parameters()).dtype
    return KVCache.bytes_per_page(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, dtype)


# ---------------------------------------------------------------------- a) concurrency
def concurrency(args, ckpt: Path, baseline: Worker | None) -> tuple[list[dict], dict]:
    C, P = args.long_context, 32
    rng = random.Random(args.seed)
    lo_p, hi_p = args.prompt_range
    lo_a, hi_a = args.answer_range
    mix = [(rng.randint(lo_p, hi_p), rng.randint(lo_a, hi_a)) for _ in range(args.mix_requests)]
    probe = LLM.load(ckpt)
    per_pos = bytes_per_position(probe)
    vocab = probe.config.vocab_size
    slot_positions = C
    static_info = None
    if baseline is not None:  # the slot the static engine really allocates for this context
        baseline(op="load", name="long", model=str(ckpt))
        static_info = baseline(op="slot", name="long", slots=1, context=C, block=P)
        slot_positions = static_info["max_len"]
    slot_bytes = slot_positions * per_pos
    budget = args.budget_slots * slot_bytes
    del probe
    llm = LLM.load(ckpt, kv_cache_memory=budget)
    params = llm.decode_config(threshold=args.mix_threshold)
    prompts = [[rng.randrange(4, 300) for _ in range(p)] for p, _ in mix]
    page_bytes = P * per_pos

    def run(policy: str) -> dict:
        engine = llm.new_engine(len(mix), C, P, context=C)
        total = engine.pages.usage()["pages_total"]
        queue = list(range(len(mix)))
        reserved: dict = {}
        timeline = []
        t0 = time.perf_counter()
        if policy == "engine":
            for i in queue:
                engine.add(prompts[i], llm.decode_config(params, max_new_tokens=mix[i][1]), stop_token_ids=())
            queue = []
        while engine.running or queue:
            if policy == "reserved":
                for s in [s for s in reserved if s not in engine.running]:
                    del reserved[s]
                while queue:
                    i = queue[0]
                    p = llm.decode_config(params, max_new_tokens=mix[i][1])
                    need = -(-p.cache_len(mix[i][0]) // P)
                    if sum(reserved.values()) + need > total:
                        break
                    reserved[engine.add(prompts[i], p, stop_token_ids=())] = need
                    queue.pop(0)
            engine.step()
            u = engine.pages.usage()
            holders = sum(1 for s in engine.running if s.pages)
            timeline.append((holders, u["pages_used"], u["preemptions"], bool(queue),
                             sum(1 for s in engine.running if not s.pages)))
            if len(timeline) >= args.mix_steps:
                break
        seconds = time.perf_counter() - t0
        before = [t for t in timeline if t[2] == 0]
        peak = max(before or timeline, key=lambda t: t[0])
        steady = [t[0] for t in timeline if t[3]] or [t[0] for t in timeline]
        if policy == "engine":  # steady state: while someone waits for pages
            steady = [t[0] for t in timeline if t[4]] or [t[0] for t in timeline]
        return {"policy": policy, "pages_total": total, "steps": len(timeline),
                "seconds": round(seconds, 1),
                "peak_running": peak[0], "pages_used_at_peak": peak[1],
                "peak_pages_used": max(t[1] for t in timeline),
                "mean_running": round(statistics.mean(steady), 1),
                "preemptions": timeline[-1][2],
                "kv_bytes_per_request": round(peak[1] * page_bytes / max(1, peak[0]))}

    rows_paged = [run("reserved"), run("engine")]
    static_slots = budget // slot_bytes
    mean_req = statistics.mean(round_up(p + a, P) for p, a in mix)
    reserved = rows_paged[0]["peak_running"]
    longest = max(round_up(p + a, P) for p, a in mix)
    served = [(slot_positions, "static (5bb25e8)" if static_info else "static (computed)",
               f"one slot of the served context, {slot_positions} positions (the model's)"),
              (1 << (longest - 1).bit_length(), "static (computed)",
               f"served context cut to {1 << (longest - 1).bit_length()} (smallest power of two holding "
               "the longest request)"),
              (longest, "static (computed)", f"oracle: slot = the mix's longest request ({longest})")]
    rows = []
    for positions, engine, admission in served:
        n = budget // (positions * per_pos)
        rows.append({"engine": engine, "admission": admission, "concurrent": n, "mean_concurrent": n,
                     "peak_pages_used": None, "preemptions": 0,
                     "kv_MiB_per_request": round(positions * per_pos / 2**20, 3),
                     "vs_static": _ratio(n, static_slots), "paged_reserved_vs_this": _ratio(reserved, n)})
    for r in rows_paged:
        name = ("reserved: whole request's pages" if r["policy"] == "reserved"
                else "engine's own (prefill pages; preempts)")
        rows.append({"engine": "paged", "admission": name,
                     "concurrent": r["peak_running"], "mean_concurrent": r["mean_running"],
                     "peak_pages_used": f"{r['peak_pages_used']}/{r['pages_total']}",
                     "preemptions": r["preemptions"],
                     "kv_MiB_per_request": round(r["kv_bytes_per_request"] / 2**20, 3),
                     "vs_static": _ratio(r["peak_running"], static_slots), "paged_reserved_vs_this": None})
    info = {"context": C, "budget_bytes": budget, "budget_slots": args.budget_slots,
            "bytes_per_position": per_pos, "slot_positions": slot_positions,
            "static_engine": static_info, "requests": len(mix),
            "prompt_range": [lo_p, hi_p], "answer_range": [lo_a, hi_a],
            "mean_request_positions": round(mean_req, 1),
            "mean_request_MiB": round(mean_req * per_pos / 2**20, 3),
            "paged_runs": rows_paged, "threshold": args.mix_threshold,
            "vocab": vocab}
    return rows, info


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------- b) shared system prompt
def system_prompt_text(llm: LLM, tokens: int) -> str:
    """A system message of about `tokens` tokens (word-problem solutions, one after another)."""
    problems = generate_problems(400, seed=123)
    text, i = "You are a careful math tutor. Worked examples follow.\n", 0
    while len(llm.encode(text)) < tokens:
        p = problems[i % len(problems)]
        text += f"Q: {p.question}\nA: {p.answer}\n"
        i += 1
    ids = llm.encode(text)[:tokens]
    return llm.decode(ids)


def shared_prefix(args, model: Path) -> tuple[list[dict], dict]:
    llms = {on: LLM.load(model, prefix_caching=on) for on in (True, False)}
    llm = llms[True]
    sys_text = system_prompt_text(llm, args.system_tokens)
    questions = [format_prompt(p.question) for p in generate_problems(args.shared_requests, seed=77)]
    prompts = [llm.encode_chat([{"role": "system", "content": sys_text}, {"role": "user", "content": q}])
               for q in questions]
    shared = min(len(os.path.commonprefix([prompts[0], p])) for p in prompts[1:])
    params = llm.decode_config(max_new_tokens=args.shared_answer)
    context = llm.context_length
    needed = max(params.cache_len(len(p)) for p in prompts)

    def sequential(on: bool) -> list[dict]:
        engine = llms[on].new_engine(len(prompts), needed, params.block, context=context)
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            seq = engine.add(p, params)
            ttft = {}
            while seq.id not in ttft:
                _first_token(engine, [seq], {seq.id: t0}, ttft)
            out.append({"ttft": ttft[seq.id], "prefill_forwards": seq.stats.forwards_by_kind.get("prefill", 0),
                        "prefilled": seq.prefill_end() - seq.cached, "cached": seq.cached,
                        "computed": seq.prompt_len - seq.cached})
            engine.abort(seq)  # its pages stay cached (released, not dropped)
        return out

    def burst(on: bool) -> list[dict]:
        engine = llms[on].new_engine(len(prompts), needed, params.block, context=context)
        t0, ttft = {}, {}
        first = engine.add(prompts[0], params)
        t0[first.id] = time.perf_counter()
        while first.id not in ttft:
            _first_token(engine, [first], t0, ttft)
        engine.abort(first)
        seqs = []
        for p in prompts[1:]:
            s = engine.add(p, params)
            t0[s.id] = time.perf_counter()
            seqs.append(s)
        while any(s.id not in ttft for s in seqs):
            _first_token(engine, seqs, t0, ttft)
        out = [{"ttft": ttft[first.id], "prefill_forwards": first.stats.forwards_by_kind.get("prefill", 0),
                "prefilled": first.prefill_end() - first.cached,
                "cached": first.cached}]
        for s in seqs:
            out.append({"ttft": ttft[s.id], "prefill_forwards": s.stats.forwards_by_kind.get("prefill", 0),
                        "prefilled": s.prefill_end() - s.cached, "cached": s.cached,
                        "computed": s.prompt_len - s.cached})
            engine.abort(s)
        return out

    runs = {(kind, on): [] for kind in ("sequential", "burst") for on in (True, False)}
    for rep in range(args.reps_shared + 1):  # the first repetition warms up and is not counted
        order = (True, False) if rep % 2 == 0 else (False, True)
        for kind, fn in (("sequential", sequential), ("burst", burst)):
            for on in order:
                res = fn(on)
                if rep:
                    runs[(kind, on)].append(res)
    rows = []
    for kind in ("sequential", "burst"):
        med = {}
        for on in (True, False):
            reps = runs[(kind, on)]
            last = reps[-1]
            ttft_rest = _median([statistics.median(r["ttft"] for r in rep[1:]) for rep in reps])
            ttft_first = _median([rep[0]["ttft"] for rep in reps])
            med[on] = ttft_rest
            rows.append({"arrival": kind, "prefix_caching": "on" if on else "off",
                         "ttft_ms_request_1": _r(1e3 * ttft_first, 1),
                         "ttft_ms_requests_2_32": _r(1e3 * ttft_rest, 1),
                         "prefill_forwards_2_32": sum(r["prefill_forwards"] for r in last[1:]),
                         "positions_prefilled_2_32": sum(r["prefilled"] for r in last[1:]),
                         "cached_positions_2_32": sum(r["cached"] for r in last[1:]),
                         "prompt_positions_computed_2_32": sum(r["computed"] for r in last[1:])})
        rows[-2]["ttft_speedup"] = _ratio(med[False], med[True])
        rows[-1]["ttft_speedup"] = 1.0
    info = {"requests": len(prompts), "system_prompt_tokens": args.system_tokens,
            "shared_prefix_tokens": shared, "prompt_tokens": [len(p) for p in prompts],
            "model": str(model), "context": context, "answer_tokens": args.shared_answer,
            "reps": args.reps_shared,
            "runs": {f"{k}_{'on' if on else 'off'}": v for (k, on), v in runs.items()}}
    return rows, info


# ---------------------------------------------------------------------- c) multi-turn chat
def chat(args, model: Path) -> tuple[list[dict], dict]:
    llms = {on: LLM.load(model, prefix_caching=on) for on in (True, False)}
    questions = [format_prompt(p.question) for p in generate_problems(args.turns, seed=5)]
    params = llms[True].decode_config(max_new_tokens=args.chat_answer)
    context = llms[True].context_length

    def conversation(on: bool) -> list[dict]:
        llm = llms[on]
        engine = llm.new_engine(1, context, params.block, context=context)
        messages, out, previous = [], [], None
        for q in questions:
            messages.append({"role": "user", "content": q})
            prompt = llm.encode_chat(messages)
            t0 = time.perf_counter()
            seq = engine.add(prompt, params)
            ttft = {}
            while engine.running:
                if seq.id not in ttft:
                    _first_token(engine, [seq], {seq.id: t0}, ttft)
                else:
                    engine.step()
            answer = seq.tokens[seq.prompt_len:seq.end]
            lcp = len(os.path.commonprefix([prompt, previous])) if previous else 0
            out.append({"prompt_tokens": len(prompt), "new_tokens": len(prompt) - lcp,
                        "reusable": lcp, "prefill_end": seq.prefill_end(), "cached": seq.cached,
                        "prefilled": seq.prefill_end() - seq.cached,
                        "computed": len(prompt) - seq.cached,
                        "bound": len(prompt) - round_down(lcp, params.block),
                        "prefill_forwards": seq.stats.forwards_by_kind.get("prefill", 0),
                        "ttft": ttft[seq.id], "answer": answer})
            previous = prompt + answer
            messages.append({"role": "assistant", "content": llm.decode(answer)})
        return out

    runs = {True: [], False: []}
    for rep in range(args.reps_chat + 1):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            res = conversation(on)
            if rep:
                runs[on].append(res)
    on_run, off_run = runs[True][-1], runs[False][-1]
    rows = []
    for t in range(args.turns):
        a, b = on_run[t], off_run[t]
        ttft_on = _median([r[t]["ttft"] for r in runs[True]])
        ttft_off = _median([r[t]["ttft"] for r in runs[False]])
        rows.append({"turn": t + 1, "prompt_tokens": a["prompt_tokens"], "new_tokens": a["new_tokens"],
                     "bound_new_plus_partial_block": a["bound"],
                     "cached_on": a["cached"], "computed_on": a["computed"], "computed_off": b["computed"],
                     "prefilled_on": a["prefilled"], "prefilled_off": b["prefilled"],
                     "within_bound": a["computed"] <= a["bound"] if t else None,
                     "ttft_ms_on": _r(1e3 * ttft_on, 1), "ttft_ms_off": _r(1e3 * ttft_off, 1),
                     "ttft_speedup": _ratio(ttft_off, ttft_on),
                     "same_answer": a["answer"] == b["answer"]})
    info = {"model": str(model), "turns": args.turns, "answer_tokens": args.chat_answer,
            "reps": args.reps_chat, "block": params.block,
            "answers_on": [r["answer"] for r in on_run]}
    return rows, info


# ---------------------------------------------------------------------- d) decode tokens/s
def decode_speed(args, static: Worker, paged: Worker) -> tuple[list[dict], dict]:
    models = {"diffusion": (args.diffusion_model, {}), "ar": (args.ar_model, {"mode": "ar"})}
    for w in (static, paged):
        for name, (path, _) in models.items():
            w(op="load", name=name, model=str(path))
    probe = LLM.load(args.diffusion_model)
    rows, raw = [], {}
    seed = 1000
    for name, (path, decode) in models.items():
        for b in args.batch_sizes:
            res = {"static": [], "paged": []}
            same = True
            for rep in range(args.reps_decode + 1):  # rep 0 warms up (and builds each engine)
                seed += 1
                prompts = [probe.encode_chat([{"role": "user", "content": format_prompt(p.question)}])
                           for p in generate_problems(max(b, args.decode_prompts), seed=seed)]
                out = {"static": None, "paged": None}
                for k, i in enumerate(range(0, len(prompts), b)):  # the engines take turns chunk by chunk
                    order = (("static", static), ("paged", paged))
                    for label, w in (order if (rep + k) % 2 == 0 else order[::-1]):
                        r = w(op="decode", name=name, prompts=prompts[i:i + b], batch=b,
                              decode={"max_new_tokens": args.decode_tokens, **decode})
                        if out[label] is None:
                            out[label] = r
                        else:
                            for key in ("total_s", "decode_s", "tokens", "decode_tokens", "steps", "outputs"):
                                out[label][key] += r[key]
                            out[label]["usage"] = r["usage"]
                same &= out["static"]["outputs"] == out["paged"]["outputs"]
                if rep:
                    for label in res:
                        r = out[label]
                        res[label].append({k: r[k] for k in ("total_s", "decode_s", "tokens", "decode_tokens",
                                                            "steps", "usage")})
            med = {}
            for label, reps in res.items():
                med[label] = {
                    "decode_tps": _median([r["decode_tokens"] / r["decode_s"] for r in reps]),
                    "e2e_tps": _median([r["tokens"] / r["total_s"] for r in reps]),
                    "tokens": _median([r["tokens"] for r in reps]),
                    "steps": _median([r["steps"] for r in reps])}
            pair = [_ratio(p["decode_tokens"] / p["decode_s"], s["decode_tokens"] / s["decode_s"])
                    for p, s in zip(res["paged"], res["static"])]
            ratio = _ratio(med["paged"]["decode_tps"], med["static"]["decode_tps"])
            rows.append({"model": name, "batch": b,
                         "static_decode_tok_s": _r(med["static"]["decode_tps"], 1),
                         "paged_decode_tok_s": _r(med["paged"]["decode_tps"], 1),
                         "paged_vs_static": ratio,
                         "median_rep_ratio": _r(_median(pair)),
                         "static_e2e_tok_s": _r(med["static"]["e2e_tps"], 1),
                         "paged_e2e_tok_s": _r(med["paged"]["e2e_tps"], 1),
                         "e2e_ratio": _ratio(med["paged"]["e2e_tps"], med["static"]["e2e_tps"]),
                         "tokens_per_rep": med["paged"]["tokens"], "steps": med["paged"]["steps"],
                         "same_tokens": same})
            raw[f"{name}_b{b}"] = res
    return rows, {"reps": args.reps_decode, "max_new_tokens": args.decode_tokens, "raw": raw}


# ---------------------------------------------------------------------- goals and report
def goals(sections: dict) -> list[dict]:
    out = []
    if "concurrency" in sections:
        rows = sections["concurrency"][0]
        r = next(x for x in rows if x["admission"].startswith("reserved"))
        out.append({"goal": f">= {GOAL_CONCURRENCY:g}x concurrent requests at the same KV memory",
                    "measured": f"{r['concurrent']} vs {rows[0]['concurrent']} "
                                f"({r['vs_static']}x, no preemption)",
                    "met": r["vs_static"] is not None and r["vs_static"] >= GOAL_CONCURRENCY})
    if "shared_prefix" in sections:
        for r in sections["shared_prefix"][0]:
            if r["prefix_caching"] == "on":
                out.append({"goal": f">= {GOAL_TTFT:g}x faster TTFT, requests 2-32 ({r['arrival']})",
                            "measured": f"{r['ttft_speedup']}x ({r['ttft_ms_requests_2_32']} ms on)",
                            "met": r["ttft_speedup"] is not None and r["ttft_speedup"] >= GOAL_TTFT})
    if "chat" in sections:
        rows = sections["chat"][0][1:]
        ok = all(r["within_bound"] for r in rows)
        out.append({"goal": "a chat turn prefills only its new tokens plus the partial block before them",
                    "measured": "prompt positions computed (not from the cache) vs the bound: " + ", ".join(
                        f"turn {r['turn']}: {r['computed_on']} {'<=' if r['within_bound'] else '>'} "
                        f"{r['bound_new_plus_partial_block']}" for r in rows),
                    "met": ok})
    if "decode" in sections:
        for r in sections["decode"][0]:
            if r["batch"] in GOAL_DECODE_BATCHES:
                ratio = r["median_rep_ratio"]
                out.append({"goal": f"decode tokens/s within {GOAL_DECODE_PCT:g}% of static, "
                                    f"{r['model']} batch {r['batch']}",
                            "measured": f"{ratio}x, median of paired repetitions ({r['paged_decode_tok_s']} vs "
                                        f"{r['static_decode_tok_s']} tok/s, ratio of medians {r['paged_vs_static']}x)",
                            "met": ratio is not None and ratio >= 1 - GOAL_DECODE_PCT / 100})
    return out


COLUMNS = {
    "concurrency": ["engine", "admission", "concurrent", "mean_concurrent", "peak_pages_used", "preemptions",
                    "kv_MiB_per_request", "vs_static", "paged_reserved_vs_this"],
    "shared_prefix": ["arrival", "prefix_caching", "ttft_ms_request_1", "ttft_ms_requests_2_32", "ttft_speedup",
                      "prefill_forwards_2_32", "positions_prefilled_2_32", "cached_positions_2_32",
                      "prompt_positions_computed_2_32"],
    "chat": ["turn", "prompt_tokens", "new_tokens", "bound_new_plus_partial_block", "cached_on", "computed_on",
             "computed_off", "prefilled_on", "prefilled_off", "within_bound", "ttft_ms_on", "ttft_ms_off", "ttft_speedup",
             "same_answer"],
    "decode": ["model", "batch", "static_decode_tok_s", "paged_decode_tok_s", "paged_vs_static", "median_rep_ratio",
               "static_e2e_tok_s", "paged_e2e_tok_s", "e2e_ratio", "tokens_per_rep", "steps", "same_tokens"],
}


def headings(info: dict) -> dict:
    out = {}
    if "concurrency" in info:
        c = info["concurrency"]
        out["concurrency"] = (
            f"a) Concurrent requests under one KV budget ({c['budget_bytes'] / 2**20:.0f} MiB = "
            f"{c['budget_slots']} static slots of {c['slot_positions']} positions; {c['requests']} requests, "
            f"prompts {c['prompt_range'][0]}-{c['prompt_range'][1]}, answers {c['answer_range'][0]}-"
            f"{c['answer_range'][1]}, mean {c['mean_request_positions']:.0f} positions)")
    if "shared_prefix" in info:
        s = info["shared_prefix"]
        out["shared_prefix"] = (f"b) {s['requests']} requests sharing a {s['shared_prefix_tokens']}-token prefix "
                                f"(system prompt of {s['system_prompt_tokens']} tokens + template): time to first "
                                f"token, prefill (median of {s['reps']} repetitions, on/off taking turns)")
    if "chat" in info:
        out["chat"] = (f"c) A {info['chat']['turns']}-turn chat: positions prefilled per turn "
                       f"(TTFT median of {info['chat']['reps']} repetitions)")
    if "decode" in info:
        out["decode"] = (f"d) Decode tokens/s, static (5bb25e8) vs paged (median of {info['decode']['reps']} "
                         "repetitions, taking turns)")
    return out


def write_report(out: Path, machine: dict, command: str, sections: dict, info: dict, gs: list[dict],
                 args) -> None:
    payload = {"machine": machine, "command": command, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                for k, v in vars(args).items()},
               "goals": gs, **{k: {"rows": rows, **info[k]} for k, (rows, _) in sections.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    md = ["# Paged KV cache with prefix caching vs the slot-per-sequence cache (issue 19)", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
          f"Regenerate: `{command}`", "", NOTES, "", "## Goals", ""]
    for g in gs:
        md.append(f"- {g['goal']}: {g['measured']} {'**MET**' if g['met'] else '**NOT MET**'}")
    md.append("")
    heads = headings(info)
    for key, (rows, _) in sections.items():
        md += [f"## {heads[key]}", "", markdown_table(rows, COLUMNS[key]), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md))


NOTES = (
    "How each row is measured is in the docstring of `benchmarks/bench_paged.py`. In short: "
    "(a) the static engine holds one slot of the served context per sequence (the server of 5bb25e8 asks "
    "for `max_model_len`, by default the model's context), so the budget over one slot's bytes is its "
    "concurrency; the paged rows run the issue's length mix through the engine on a random-weights model "
    "with a 32,768-position context (the issue's Qwen2.5-7B example; the shipped models have 1,024), "
    "'reserved' admitting a request only while every admitted request's whole length fits the pool (no "
    "preemption possible), 'engine's own' adding every request at once; `concurrent` is the peak number of "
    "sequences holding pages at once (for the engine's own admission: before its first preemption), "
    "`mean_concurrent` the mean while requests were waiting; KV MiB per request is the pool's used pages "
    "per running sequence at the peak. (b) and (c) count prompt positions prefilled (computed by a "
    "prefill forward, not served from the prefix cache; a diffusion prefill covers the prompt's whole "
    "blocks, its tail is decoded with the first block) and time to first token (from `add` to the step "
    "that makes the first output token final). (b) runs the shipped diffusion weights with a 2,048-position "
    "config (a 1,000-token prefix does not fit its 1,024 with a question and an answer). (d) runs both "
    "engines' code in worker subprocesses that take turns, distinct prompts each repetition; decode "
    "tokens/s excludes the prefill step. Ratios are measured side by side in one run; absolute times hold "
    "only for this machine (2 cores shared with other jobs).")


def _revision(src: Path) -> str:
    """The commit the paged engine's code was measured at (+ "dirty" when its src had edits)."""
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted edits" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffusion-model", type=Path, default=REPO / "models" / "fastdllm-wp-diffusion")
    ap.add_argument("--ar-model", type=Path, default=REPO / "models" / "fastdllm-wp-ar")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="src of a worktree of 5bb25e8 (the static engine); without it (a)'s static slot is "
                         "computed (slot = context) and (d) is skipped")
    ap.add_argument("--paged-src", type=Path, default=REPO / "src",
                    help="src of the paged engine for (d)'s worker (run the script with the same PYTHONPATH "
                         "so that (a)-(c) import it too)")
    ap.add_argument("--sections", nargs="+", default=["concurrency", "shared_prefix", "chat", "decode"])
    ap.add_argument("--long-context", type=int, default=32768)
    ap.add_argument("--budget-slots", type=int, default=4)
    ap.add_argument("--mix-requests", type=int, default=200)
    ap.add_argument("--mix-steps", type=int, default=10**9, help="stop a mix run after this many steps")
    ap.add_argument("--mix-threshold", type=float, default=1e-6,
                    help="random weights: unmask a whole sub-block per step (fewer steps, same pages)")
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[50, 2000])
    ap.add_argument("--answer-range", type=int, nargs=2, default=[50, 500])
    ap.add_argument("--shared-requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--shared-context", type=int, default=2048)
    ap.add_argument("--shared-answer", type=int, default=64)
    ap.add_argument("--reps-shared", type=int, default=3)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--chat-answer", type=int, default=96)
    ap.add_argument("--reps-chat", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--reps-decode", type=int, default=9)
    ap.add_argument("--decode-prompts", type=int, default=16,
                    help="prompts per repetition (in batches of the batch size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (< 30 s), for the test suite")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "paged_bench")
    args = ap.parse_args(argv)
    if args.smoke:
        args.long_context, args.budget_slots, args.mix_requests, args.mix_steps = 4096, 2, 24, 40
        args.prompt_range, args.answer_range = [20, 400], [20, 100]
        args.shared_requests, args.system_tokens, args.shared_answer, args.reps_shared = 4, 200, 8, 1
        args.turns, args.chat_answer, args.reps_chat = 2, 16, 1
        args.batch_sizes, args.decode_tokens, args.reps_decode, args.decode_prompts = [1, 2], 16, 1, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    revision = _revision(args.paged_src)
    given = list(argv if argv is not None else sys.argv[1:])
    if args.baseline_src:
        given = [("<worktree of 5bb25e8>/src" if a == str(args.baseline_src) else a) for a in given]
    prefix = "OMP_NUM_THREADS=1"
    if args.paged_src != REPO / "src":  # a frozen worktree of the paged commit, imported in-process too
        given = [("<worktree of the paged commit>/src" if a == str(args.paged_src) else a) for a in given]
        prefix = "PYTHONPATH=<worktree of the paged commit>/src " + prefix
    command = " ".join([prefix, "python benchmarks/bench_paged.py", *given])
    sections, info = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_paged_"))
    static = Worker(args.baseline_src, args.threads) if args.baseline_src else None
    try:
        t0 = time.perf_counter()
        if "concurrency" in args.sections:
            rows, info["concurrency"] = concurrency(args, long_context_checkpoint(tmp, args.long_context), static)
            sections["concurrency"] = (rows, None)
            print(f"a) {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if "shared_prefix" in args.sections:
            model = with_context(args.diffusion_model, tmp, args.shared_context)
            rows, info["shared_prefix"] = shared_prefix(args, model)
            sections["shared_prefix"] = (rows, None)
            print(f"b) {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if "chat" in args.sections:
            rows, info["chat"] = chat(args, args.diffusion_model)
            sections["chat"] = (rows, None)
            print(f"c) {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if "decode" in args.sections and static is not None:
            paged = Worker(args.paged_src, args.threads)
            try:
                rows, info["decode"] = decode_speed(args, static, paged)
            finally:
                paged.close()
            sections["decode"] = (rows, None)
            print(f"d) {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if static is not None:
            static.close()
        shutil.rmtree(tmp, ignore_errors=True)
    gs = goals(sections)
    machine = {**machine_info("cpu"), "dtype": "float32", "paged_src": revision}
    write_report(args.out, machine, command, sections, info, gs, args)
    return {"goals": gs, **{k: rows for k, (rows, _) in sections.items()}}


if __name__ == "__main__":
    main()
