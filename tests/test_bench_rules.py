"""Smoke test of benchmarks/bench_rules.py on a tiny random checkpoint: every rule x threshold and
the left-to-right ceiling run on a val file, the JSON/markdown/plot are written, and the
dominance table follows its definition. (Accuracy is ~0 on random weights.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rules.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rules", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main(--threads 1) sets it process-wide


def test_bench_rules_smoke(bench, qwen2_ckpt, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Tom has {i} apples. How many?",
                                       "response": f"Apples: {i}\n#### {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "res" / "rules"
    bench.main(["--model", f"tiny={qwen2_ckpt}", "--val-file", str(val), "--limit", "3",
                "--sweep", "threshold=0.9,0.5", "left_anchored=0.9", "entropy_bounded=0.7",
                "--left-to-right", "--max-new-tokens", "12", "--batch-size", "2", "--threads", "1",
                "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    got = [(r["rule"], r["threshold"]) for r in data["rows"]]
    assert got == [("threshold", 0.9), ("threshold", 0.5), ("left_anchored", 0.9),
                   ("entropy_bounded", 0.7), ("left-to-right", 1.0)]
    for r in data["rows"]:
        assert r["problems"] == 3 and 0 < r["new_tokens"] <= 36 and r["tokens_per_forward"] > 0
    left_to_right = data["rows"][-1]
    assert left_to_right["tokens_per_forward"] <= 1.0  # one token per forward (plus the prefill)
    md = out.with_suffix(".md").read_text()
    assert "| tiny | left_anchored | 0.9 |" in md and "dominated" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    assert data["split"] == "val" and data["machine"]["torch_threads"] == 1
    assert [a["curve"] for a in data["aup"]] == ["threshold", "left_anchored", "entropy_bounded",
                                                 "Pareto front (all settings)"]
    assert "AUP" in md


def test_bench_rules_lossless_points(bench, qwen2_ckpt, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Ann has {i} pens.", "response": f"#### {i}"}) + "\n"
                           for i in range(2)))
    out = tmp_path / "rules"
    bench.main(["--model", f"tiny={qwen2_ckpt}", "--val-file", str(val), "--limit", "2",
                "--sweep", "left_anchored=0.9", "--lossless", "--ar-base", str(qwen2_ckpt),
                "--max-new-tokens", "8", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    rules = [r["rule"] for r in data["rows"]]
    assert rules == ["AR base", "left_anchored", "self-speculative k=8", "merged k=4",
                     "speculative (AR base target) k=8"]
    for r in data["rows"]:
        assert r["tokens_per_forward"] > 0


def test_aup_table_uses_the_runs_best_accuracy(bench):
    from fastdllm.evaluation.aup import aup

    def row(model, rule, acc, tpf):
        return dict(model=model, rule=rule, threshold=0.9, accuracy=acc, tokens_per_forward=tpf)

    rows = [row("AR base", "AR base", 0.90, 1.0), row("m", "left_anchored", 0.80, 2.0),
            row("m", "left_anchored", 0.78, 2.5), row("m", "merged k=4", 0.88, 1.5)]
    table = {a["curve"]: a for a in bench.aup_table(rows)}
    assert table["left_anchored"]["AUP"] == round(aup([(2.0, 80), (2.5, 78)], y_max=90), 2)
    # the front keeps the merged point and both rule points (none beats another on both axes)
    assert table["Pareto front (all settings)"]["points"] == 3
    assert table["left_anchored"]["y_max"] == 90


def test_dominance_follows_its_definition(bench):
    def row(rule, t, acc, tpf, model="m"):
        return dict(model=model, rule=rule, threshold=t, accuracy=acc, tokens_per_forward=tpf)

    rows = [row("threshold", 0.9, 0.50, 2.7), row("threshold", 0.7, 0.40, 3.0),
            row("left_anchored", 0.9, 0.57, 2.6),   # more accurate but slower: dominates nothing
            row("left_anchored", 0.7, 0.48, 3.0),   # dominates t=0.7 (same speed, more accurate)
            row("entropy_bounded", 0.9, 0.50, 2.7),  # equal: not a domination
            row("left_anchored", 0.5, 0.99, 9.0, model="other"),  # another model's point
            row("left-to-right", 1.0, 0.90, 1.0)]
    dom = bench.dominating(rows)
    assert [(d["official"], d["dominated by"]) for d in dom] == [("t=0.7", "left_anchored t=0.7")]
    assert dom[0]["accuracy gain (points)"] == 8.0
