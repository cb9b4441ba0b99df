"""Threshold parallel decoding (paper §3.3): which masked positions to unmask in one step.

Pure functions over tensors so they are tested on their own.
"""

from __future__ import annotations

import torch


def select_tokens(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions to unmask: every candidate whose confidence exceeds `threshold`, plus always
    the single most confident candidate (so every step makes progress).

    confidence: (n, K) float; candidates: (n, K) bool (masked positions allowed this step).
    Returns (n, K) bool; rows without candidates select nothing.
    """
    conf = confidence.masked_fill(~candidates, float("-inf"))
    selected = (conf > threshold) & candidates
    best = conf.argmax(dim=-1, keepdim=True)
    has_any = candidates.any(dim=-1, keepdim=True)
    selected.scatter_(1, best, has_any | selected.gather(1, best))
    return selected
