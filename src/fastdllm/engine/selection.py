"""Threshold parallel decoding (paper §3.3): which masked positions to unmask in one step.

The rule runs on the host, on the confidences the engine brought back in its one transfer per
step; `select_tokens` applies the same rule to tensors (row by row) for callers holding them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch


def as_float32(x: float) -> float:
    """x rounded to float32: confidences are float32, and comparing them with a threshold
    rounded the same way decides exactly as a float32 tensor comparison does."""
    return struct.unpack("f", struct.pack("f", x))[0]


def select_positions(confidence: Sequence[float], candidates: Sequence[bool], threshold: float) -> list[int]:
    """Indices to unmask, ascending: every candidate whose confidence exceeds `threshold`, plus
    always the most confident candidate (the first of equals), so every step makes progress.
    No candidate: nothing. `threshold` should already be float32-rounded (`as_float32`)."""
    chosen, best, best_conf = [], -1, float("-inf")
    for i, (c, ok) in enumerate(zip(confidence, candidates)):
        if not ok:
            continue
        if c > threshold:
            chosen.append(i)
        if best < 0 or c > best_conf:
            best, best_conf = i, c
    if best >= 0 and best not in chosen:
        chosen.append(best)
        chosen.sort()
    return chosen


def select_tokens(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The same rule on tensors: confidence (n, K) float; candidates (n, K) bool.
    Returns (n, K) bool; rows without candidates select nothing."""
    t = as_float32(threshold)
    out = torch.zeros_like(candidates, dtype=torch.bool)
    for row, (conf, cand) in enumerate(zip(confidence.tolist(), candidates.tolist())):
        out[row, select_positions(conf, cand, t)] = True
    return out
