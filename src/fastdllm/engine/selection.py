"""Parallel-decoding rules (paper §3.3): which masked positions of the active sub-block to unmask
in one step. `DecodeConfig.rule` names one; the threshold is every rule's one knob.

- "threshold" (the official Fast-dLLM v2 rule): every candidate whose confidence exceeds the
  threshold, plus always the single most confident one.
- "left_anchored" (joint confidence; our default, measured in docs/design.md): the run of candidates starting at the first masked
  position, in position order, while the product of their confidences stays >= the threshold;
  always the first. The product of the marginals is what a parallel step bets on (Fast-dLLM
  v1's argument: the joint is close to it only when the marginals are confident), and anchoring
  at the left keeps each step a continuation of the decoded prefix, as a left-to-right reader
  would accept it.
- "entropy_bounded" (EB-sampler, Ben-Hamu et al. 2025, arXiv 2505.24857): candidates in order
  of confidence (the most confident first), the longest prefix of that order whose summed
  entropy minus its largest entropy stays <= -ln(threshold); always the most confident.

All three are pure tensor functions over a batch of rows (no host transfer, no per-row loop),
tested on their own in tests/test_selection.py.
"""

from __future__ import annotations

import math

import torch

RULES = ("threshold", "left_anchored", "entropy_bounded")


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


def select_left_anchored(confidence: torch.Tensor, candidates: torch.Tensor,
                         threshold: float) -> torch.Tensor:
    """The left-anchored joint-confidence rule: walking the candidates in position order from the
    first, accept while the product of their confidences is >= `threshold`; the first candidate
    is always accepted. Positions that are not candidates (already decoded) count as certain
    (factor 1): under this rule alone the masked positions of a sub-block are always a suffix,
    so this only matters when the rule meets a sub-block another rule started.

    confidence: (n, K) float in [0, 1]; candidates: (n, K) bool. Returns (n, K) bool.
    """
    factors = torch.where(candidates, confidence, torch.ones_like(confidence))
    # the product only falls along the row, so `>= threshold` holds on a prefix of candidates
    joint = torch.cumprod(factors.float(), dim=-1)
    selected = candidates & (joint >= threshold)
    first = candidates & (candidates.long().cumsum(dim=-1) == 1)
    return selected | first


def entropy_bound(threshold: float) -> float:
    """The entropy budget (nats) of one entropy-bounded step: -ln(threshold), the same budget
    the left-anchored rule gives the summed -ln(confidence) of the tokens it accepts (0.105 at
    0.9; threshold 1 accepts a second token only at zero entropy)."""
    return -math.log(threshold)


def select_entropy_bounded(confidence: torch.Tensor, entropy: torch.Tensor, candidates: torch.Tensor,
                           threshold: float) -> torch.Tensor:
    """The EB-sampler rule: sort the candidates by confidence (most confident first; equal
    confidences keep position order), accept the longest prefix of that order whose entropies
    sum, minus the largest of them, to at most `entropy_bound(threshold)`. A single token costs
    nothing, so the most confident candidate is always accepted.

    confidence, entropy: (n, K) float (entropy in nats of each position's distribution);
    candidates: (n, K) bool. Returns (n, K) bool.
    """
    conf = confidence.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    ent = entropy.float().masked_fill(~candidates, 0.0).gather(-1, order)
    cost = ent.cumsum(dim=-1) - ent.cummax(dim=-1).values  # never falls along the row
    accepted = (cost <= entropy_bound(threshold)) & candidates.gather(-1, order)
    return torch.zeros_like(candidates).scatter(-1, order, accepted)


def select(rule: str, confidence: torch.Tensor, candidates: torch.Tensor, threshold: float,
           entropy: torch.Tensor | None = None) -> torch.Tensor:
    """The positions `rule` unmasks (one of RULES); `entropy` is needed by "entropy_bounded"."""
    if rule == "threshold":
        return select_tokens(confidence, candidates, threshold)
    if rule == "left_anchored":
        return select_left_anchored(confidence, candidates, threshold)
    if rule == "entropy_bounded":
        if entropy is None:
            raise ValueError("the entropy_bounded rule needs the entropy of each position")
        return select_entropy_bounded(confidence, entropy, candidates, threshold)
    raise ValueError(f"unknown decoding rule {rule!r}; known: {RULES}")


def needs_entropy(rule: str) -> bool:
    return rule == "entropy_bounded"
