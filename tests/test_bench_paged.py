"""Smoke test of benchmarks/bench_paged.py (issue 19's benchmark) at its `--smoke` sizes: every
section runs, the JSON holds each section's rows, the markdown has the goals computed from the
numbers. The static engine's worker runs the working tree's own src here (the real run points
`--baseline-src` at a worktree of 5bb25e8), which exercises the subprocess plumbing."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_paged.py"
MODELS = REPO / "models"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_paged", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets it process-wide


@pytest.mark.skipif(not (MODELS / "fastdllm-wp-diffusion").is_dir(), reason="shipped models missing")
def test_bench_paged_smoke(bench, tmp_path):
    out = tmp_path / "res" / "paged_bench"
    bench.main(["--smoke", "--baseline-src", str(REPO / "src"), "--out", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["machine"]["torch_threads"] == 1 and data["args"]["smoke"]
    conc = data["concurrency"]["rows"]
    assert conc[0]["engine"].startswith("static") and conc[0]["concurrent"] == 2  # --budget-slots 2
    reserved = next(r for r in conc if r["admission"].startswith("reserved"))
    assert reserved["preemptions"] == 0 and reserved["concurrent"] > conc[0]["concurrent"]
    shared = {(r["arrival"], r["prefix_caching"]): r for r in data["shared_prefix"]["rows"]}
    for arrival in ("sequential", "burst"):
        on, off = shared[(arrival, "on")], shared[(arrival, "off")]
        assert on["cached_positions_2_32"] > 0 and off["cached_positions_2_32"] == 0
        assert on["positions_prefilled_2_32"] < off["positions_prefilled_2_32"]
    chat = data["chat"]["rows"]
    assert [r["turn"] for r in chat] == [1, 2] and all(r["same_answer"] for r in chat)
    assert chat[1]["cached_on"] > 0 and chat[1]["within_bound"]
    decode = data["decode"]["rows"]
    assert {(r["model"], r["batch"]) for r in decode} == {(m, b) for m in ("diffusion", "ar") for b in (1, 2)}
    assert all(r["same_tokens"] and r["paged_decode_tok_s"] > 0 for r in decode)

    md = out.with_suffix(".md").read_text()
    assert "## Goals" in md and "<worktree of 5bb25e8>/src" in md
    # concurrency, TTFT x 2 arrivals, chat, decode at batch 1 for both models
    assert len(re.findall(r"\*\*(?:NOT )?MET\*\*", md)) == 1 + 2 + 1 + 2
