"""scripts/scale_gpu.sh (the scale question's GPU size, issue 22) run here as its --dry-run: the
same pretrain -> adapt -> evaluate pipeline of scripts/scale_curve.py at the smallest size and a
tiny budget on the CPU, so the script a lent GPU runs cannot rot between the sessions that run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)


def test_scale_gpu_dry_run_trains_evaluates_and_keeps_rows(tmp_path):
    proc = _run("bash", "scripts/scale_gpu.sh", "--dry-run", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("pretrain", "adapt"):
        assert (tmp_path / "runs/0.7M" / stage / "final/model.safetensors").is_file()
    result = json.loads((tmp_path / "scale_curve_val.json").read_text())
    [row] = result["rows"]
    assert (row["size"], row["budget"], row["examples"], row["problems"]) == ("0.7M", 0.0005, 280, 3)
    assert row["params"] == 745632  # the 0.7M shape of scripts/scale_curve.py, tied embeddings
    for setting in ("causal", "left-to-right", "la=1.0", "la=0.9"):
        assert 0.0 <= row[f"{setting} acc"] <= 1.0
    assert row["gap la=0.9 (points)"] == round(100 * (row["ar_base"] - row["la=0.9 acc"]), 1)
    assert (tmp_path / "scale_curve_val.png").stat().st_size > 0
    assert "| 0.7M | 745632 | 0.0005 |" in (tmp_path / "scale_curve_val.md").read_text()

    # a second call finds the row measured and keeps it as it is (the curve grows as runs end)
    proc = _run(sys.executable, "scripts/scale_curve.py", "--sizes", "0.7M", "--budget", "0.0005",
                "--examples", "280", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                "--results", str(tmp_path / "scale_curve_val"), "--limit", "3", "--stages", "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "scale_curve_val.json").read_text())["rows"] == [row]


def test_shipped_models_stand_only_for_the_full_recipe(tmp_path):
    proc = _run(sys.executable, "scripts/scale_curve.py", "--shipped", "2.8M", "--budget", "0.5",
                "--out", str(tmp_path), "--stages", "eval")
    assert proc.returncode == 2
    assert "--shipped needs --budget 1 and --examples 199000" in proc.stderr
