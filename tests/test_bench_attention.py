"""Smoke test of benchmarks/bench_attention.py: the three attention implementations agree (the
script checks gathered pages and flex against each other before timing) and the results files
are written with their machine line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def test_smoke_writes_results(tmp_path):
    out = tmp_path / "attn"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--no-flex", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    (row,) = data["rows"]
    assert row["slots_us"] > 0 and row["gather_us"] > 0 and data["machine"]["device"] == "cpu"
    assert "| shape | batch |" in out.with_suffix(".md").read_text()
