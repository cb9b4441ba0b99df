"""Shared benchmark plumbing: machine description and writing JSON + a markdown table."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

from fastdllm.atomic import atomic_write_text


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(out_stem: Path, title: str, machine: dict, sections: list[tuple[str, list[dict], list[str]]],
                  payload: dict, notes: str = "") -> None:
    """Write `<stem>.json` (everything) and `<stem>.md` (tables with the machine they ran on)."""
    atomic_write_text(out_stem.with_suffix(".json"), json.dumps({"machine": machine, **payload}, indent=2) + "\n")
    md = [f"# {title}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if notes:
        md += [notes, ""]
    for heading, rows, cols in sections:
        md += [f"## {heading}", "", markdown_table(rows, cols), ""]
    atomic_write_text(out_stem.with_suffix(".md"), "\n".join(md))
