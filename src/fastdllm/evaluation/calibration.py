"""Calibration of the confidences a parallel-decoding rule reads: reliability diagram, expected
calibration error (ECE) and temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks"), fitted by maximum likelihood.

A rule trusts a confidence c to mean "right with probability c". The reliability diagram bins
the confidences and sets each bin's mean confidence beside the share of its tokens that were
right; ECE is the count-weighted mean gap. Temperature scaling divides the logits by one
scalar T > 0 fitted to minimise the negative log-likelihood of the right tokens: it moves the
confidences without changing any argmax (the token drawn greedily). The fitted T goes to the
checkpoint's generation_config.json as "confidence_temperature" (DecodeConfig reads it).
Pure functions of tensors; benchmarks/bench_calibration.py gathers the data.
"""

from __future__ import annotations

import math

import torch


def reliability(conf: torch.Tensor, correct: torch.Tensor, bins: int = 20) -> list[dict]:
    """Equal-width bins over [0, 1] (the last one closed): per non-empty bin its range, count,
    mean confidence and accuracy. conf float (N,), correct bool (N,)."""
    conf = conf.double()
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                        "confidence": float(conf[sel].mean()), "accuracy": float(correct[sel].double().mean())})
    return out


def ece(conf: torch.Tensor, correct: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error: sum over bins of (count / N) * |accuracy - mean confidence|."""
    n = conf.numel()
    if n == 0:
        raise ValueError("ECE of no confidences")
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(conf, correct, bins))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax(logits (N, V) / T)."""
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lo: float = 0.05, hi: float = 20.0,
                    iters: int = 80) -> float:
    """The T minimising `nll(logits, labels, T)`: golden-section search over log T in [lo, hi]
    (the NLL of temperature scaling is unimodal in T)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)
