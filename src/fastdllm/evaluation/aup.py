"""Accuracy under parallelism (AUP): one number for an accuracy-vs-tokens-per-forward curve.

The definition is d3LLM's (Qian et al., "d3LLM", arXiv 2601.07568; the hao-ai-lab blog "AUP:
when Accuracy Meets Parallelism in Diffusion Language Models"). For points (rho_i, y_i) sorted
by parallelism rho (tokens per forward), accuracy y in percent:

    AUP = rho_1 * y_1 + 1/2 * sum_{i>=2} (rho_i - rho_{i-1}) * (y_i W(y_i) + y_{i-1} W(y_{i-1}))
    W(y) = min(exp(-alpha * (1 - y / y_max)), 1),   alpha = 3

where y_max is the highest accuracy reached on the task (by any method compared, e.g. the AR
base) and only points with y_i >= y_1 - 5 (five points below the least parallel point) count.
The first term is the rectangle from 0 to the least parallel point, unweighted; every later
trapezoid is weighted by how far its accuracies fall below y_max, so a fast but inaccurate
setting adds little. A curve that never loses accuracy scores its plain area under the curve.

Pure functions of the measured points, no model: the benchmarks (bench_rules, `fastdllm eval
--sweep`) measure the points and call `aup`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

ALPHA = 3.0  # d3LLM's penalty factor
MAX_DROP = 5.0  # points of accuracy below the least parallel point that still count


def weight(y: float, y_max: float, alpha: float = ALPHA) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1): 1 at or above y_max, e^-alpha at 0. With
    y_max = 0 every accuracy is 0 and there is nothing to penalise: 1."""
    if y_max <= 0:
        return 1.0
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup_points(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points AUP integrates: sorted by tokens per forward (then accuracy), keeping those
    within MAX_DROP points of the least parallel one."""
    pts = sorted((float(r), float(y)) for r, y in points)
    if not pts:
        return []
    floor = pts[0][1] - MAX_DROP
    return [p for p in pts if p[1] >= floor]


def aup(points: Iterable[tuple[float, float]], y_max: float | None = None,
        alpha: float = ALPHA) -> float:
    """AUP of (tokens per forward, accuracy in percent) points. `y_max`: the best accuracy on
    the task (default: the best of these points). Raises on no points or a non-positive
    tokens-per-forward."""
    pts = list(points)
    if not pts:
        raise ValueError("AUP needs at least one (tokens per forward, accuracy) point")
    if any(r <= 0 for r, _ in pts):
        raise ValueError(f"tokens per forward must be > 0, got {[r for r, _ in pts]}")
    if any(not 0 <= y <= 100 for _, y in pts):
        raise ValueError(f"accuracies are percentages in [0, 100], got {[y for _, y in pts]}")
    y_max = max(y for _, y in pts) if y_max is None else y_max
    kept = aup_points(pts)
    rho1, y1 = kept[0]
    total = rho1 * y1
    for (r0, y0), (r1, y1_) in zip(kept, kept[1:]):
        total += 0.5 * (r1 - r0) * (y1_ * weight(y1_, y_max, alpha) + y0 * weight(y0, y_max, alpha))
    return total
