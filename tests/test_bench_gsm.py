"""Smoke test of benchmarks/bench_gsm.py on tiny random checkpoints: every configuration runs,
the JSON has one row per configuration with its metrics, the markdown has the goals computed
from the numbers, the plot and the profile are written. (Accuracy is ~0 on random weights.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from fastdllm.tasks import generate_problems, write_jsonl

pytest.importorskip("matplotlib")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gsm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gsm", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main(--threads 1) sets it process-wide


def test_bench_gsm_smoke(bench, qwen2_ckpt, tmp_path):
    test_file = write_jsonl(generate_problems(4, seed=7), tmp_path / "test.jsonl")
    out = tmp_path / "res" / "gsm_bench"
    bench.main(["--ar-model", str(qwen2_ckpt), "--diffusion-model", str(qwen2_ckpt),
                "--test-file", str(test_file), "--limit", "4", "--batch-sizes", "1", "2",
                "--thresholds", "0.9", "1.0", "--max-new-tokens", "16", "--threads", "1",
                "--ablation", f"no-shift={qwen2_ckpt}:noshift",
                "--ablation", f"missing={tmp_path / 'not-there'}", "--out", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    configs = [(r["config"], r["batch"]) for r in rows]
    for b in (1, 2):
        for name in ("AR (fastdllm engine)", "AR (transformers generate)", "diffusion t=0.9",
                     "diffusion t=0.9, no sub-block cache", "diffusion t=1",
                     "diffusion t=1, no sub-block cache"):
            assert (name, b) in configs
    assert ("no-shift t=0.9", 2) in configs and ("missing t=0.9", 2) in configs
    assert (bench.LEFT_TO_RIGHT, 2) in configs
    assert len(rows) == 2 * 6 + 1 + 2
    by = {(r["config"], r["batch"]): r for r in rows}
    assert by[("missing t=0.9", 2)]["status"] == "not trained"
    assert by[("no-shift t=0.9", 2)]["token_shift"] is False
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["problems"] == 4 and 0.0 <= r["accuracy"] <= 1.0
        assert 0 < r["new_tokens"] <= 4 * 16 and r["tokens_per_s"] > 0
        assert r["speedup_vs_ar_engine"] > 0 and r["speedup_vs_transformers"] > 0
        if r["kind"] != "ar_transformers":
            assert r["tokens_per_forward"] > 0
    # greedy AR on the same weights: our engine and transformers write the same tokens (batch 1:
    # no padding, so no near-tie can flip between the two)
    ours, theirs = by[("AR (fastdllm engine)", 1)], by[("AR (transformers generate)", 1)]
    assert (ours["new_tokens"], ours["sample_output"]) == (theirs["new_tokens"], theirs["sample_output"])
    assert data["machine"]["torch_threads"] == 1 and data["args"]["limit"] == 4
    assert [g["batch"] for g in data["goals"]] == [1, 2] and all(g["measured"] for g in data["goals"])

    md = out.with_suffix(".md").read_text()
    assert "## Goals" in md and "## Batch 2" in md and "not trained" in md
    assert len(re.findall(r"\*\*(?:NOT )?MET\*\*", md)) == 3 * 2  # 3 goals at each batch size
    assert out.with_suffix(".png").stat().st_size > 1000

    bench.main(["--diffusion-model", str(qwen2_ckpt), "--test-file", str(test_file), "--limit", "3",
                "--max-new-tokens", "8", "--out", str(out), "--profile"])
    profile = (out.parent / "gsm_profile.txt").read_text()
    assert "cumulative" in profile and "generate_batch" in profile
