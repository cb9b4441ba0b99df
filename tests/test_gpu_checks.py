"""scripts/gpu_checks.sh, the GPU verification of issue 20, run here as its --dry-run: every row
on the CPU at the tiny shape (static steps run eagerly, no compile), so the script cannot rot
between the GPU sessions that run it for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {"test_cuda", "replay_equals_eager", "rope_growth", "sampled_row_share", "speculative_graphed",
        "device_binding", "step_ms_tiny_1tok", "step_ms_tiny_32tok", "load_peak_1.5b",
        "train_compile_flex", "train_fsdp2_1gpu"}


def test_gpu_checks_dry_run_runs_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--dry-run", "--out", str(tmp_path / "checks")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "checks.json").read_text())["rows"]
    assert {r["row"] for r in rows} == ROWS
    for r in rows:
        assert r["status"].startswith("dry-run") and not r["status"].endswith(("fail", "error")), r
    by_name = {r["row"]: r for r in rows}
    assert "tests collected" in by_name["test_cuda"]["value"]
    assert by_name["rope_growth"]["value"] == "tokens equal: True"
    assert "equal to AR: True" in by_name["speculative_graphed"]["value"]
    assert (tmp_path / "checks.md").read_text().startswith("# GPU checks (issue 20)")
