"""Parallel-decoding rules (paper §3.3): which masked positions of the active sub-block to unmask
in one step. `DecodeConfig.rule` names one; the threshold is every rule's one knob.

- "threshold" (the official Fast-dLLM v2 rule): every candidate whose confidence exceeds the
  threshold, plus always the single most confident one.
- "left_anchored" (joint confidence; our default, measured in docs/design.md): the run of
  candidates starting at the first masked position, in position order, while the product of
  their confidences stays >= the threshold; always the first. The product of the marginals is
  what a parallel step bets on (Fast-dLLM v1's argument: the joint is close to it only when the
  marginals are confident), and anchoring at the left keeps each step a continuation of the
  decoded prefix.
- "entropy_bounded" (EB-sampler, Ben-Hamu et al. 2025, arXiv 2505.24857): candidates in order
  of confidence (the most confident first), the longest prefix of that order whose summed
  entropy minus its largest entropy stays <= -ln(threshold); always the most confident.

The rules run on the host, on the values the engine brought back in its one transfer per step
(no device work, no extra transfer); `select_tokens` / `select` apply them to tensors (row by
row) for callers holding tensors.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

RULES = ("threshold", "left_anchored", "entropy_bounded")


def as_float32(x: float) -> float:
    """x rounded to float32: confidences are float32, and comparing them with a threshold
    rounded the same way decides exactly as a float32 tensor comparison does."""
    return struct.unpack("f", struct.pack("f", x))[0]


def needs_entropy(rule: str) -> bool:
    """Whether `rule` spends the entropy of each drawn distribution (the runner then brings it
    back with the tokens and confidences, in the same transfer)."""
    return rule == "entropy_bounded"


def entropy_bound(threshold: float) -> float:
    """The entropy budget (nats) of one entropy-bounded step: -ln(threshold), the same budget
    the left-anchored rule gives the summed -ln(confidence) of the tokens it accepts (0.105 at
    0.9; threshold 1 accepts a second token only at zero entropy)."""
    return -math.log(threshold)


def select_positions(confidence: Sequence[float], candidates: Sequence[bool], threshold: float) -> list[int]:
    """The official rule. Indices to unmask, ascending: every candidate whose confidence exceeds
    `threshold`, plus always the most confident candidate (the first of equals), so every step
    makes progress. No candidate: nothing. `threshold` should already be float32-rounded
    (`as_float32`)."""
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


def left_anchored_positions(confidence: Sequence[float], candidates: Sequence[bool],
                            threshold: float) -> list[int]:
    """The left-anchored joint-confidence rule: walking the candidates in position order from the
    first, accept while the product of their confidences is >= `threshold`; the first candidate
    is always accepted. Positions that are not candidates (already decoded) count as certain:
    under this rule alone the masked positions of a sub-block are always a suffix, so this only
    matters when the rule meets a sub-block another rule started. `threshold` float32-rounded."""
    chosen, joint = [], 1.0
    for i, (c, ok) in enumerate(zip(confidence, candidates)):
        if not ok:
            continue
        joint *= c
        if chosen and joint < threshold:
            break
        chosen.append(i)
    return chosen


def entropy_bounded_positions(confidence: Sequence[float], entropy: Sequence[float],
                              candidates: Sequence[bool], threshold: float) -> list[int]:
    """The EB-sampler rule: the candidates sorted by confidence (most confident first; equal
    confidences keep position order), the longest prefix of that order whose entropies sum,
    minus the largest of them, to at most `entropy_bound(threshold)`. A single token costs
    nothing, so the most confident candidate is always accepted. Returns indices, ascending."""
    order = sorted((i for i, ok in enumerate(candidates) if ok), key=lambda i: -confidence[i])
    bound = entropy_bound(threshold)
    chosen, total, largest = [], 0.0, 0.0
    for i in order:
        total += entropy[i]
        largest = max(largest, entropy[i])
        if chosen and total - largest > bound:  # sum - max never falls as tokens join
            break
        chosen.append(i)
    return sorted(chosen)


def select_by_rule(rule: str, confidence: Sequence[float], candidates: Sequence[bool],
                   threshold: float, entropy: Sequence[float] | None = None) -> list[int]:
    """The indices `rule` (one of RULES) unmasks; `threshold` float32-rounded; `entropy` is
    needed by "entropy_bounded"."""
    if rule == "threshold":
        return select_positions(confidence, candidates, threshold)
    if rule == "left_anchored":
        return left_anchored_positions(confidence, candidates, threshold)
    if rule == "entropy_bounded":
        if entropy is None:
            raise ValueError("the entropy_bounded rule needs the entropy of each position")
        return entropy_bounded_positions(confidence, entropy, candidates, threshold)
    raise ValueError(f"unknown decoding rule {rule!r}; known: {RULES}")


def select(rule: str, confidence: torch.Tensor, candidates: torch.Tensor, threshold: float,
           entropy: torch.Tensor | None = None) -> torch.Tensor:
    """A rule on tensors: confidence (n, K) float, candidates (n, K) bool, entropy (n, K) or
    None. Returns (n, K) bool; rows without candidates select nothing."""
    t = as_float32(threshold)
    out = torch.zeros_like(candidates, dtype=torch.bool)
    ents = entropy.tolist() if entropy is not None else [None] * len(candidates)
    for row, (conf, cand, ent) in enumerate(zip(confidence.tolist(), candidates.tolist(), ents)):
        out[row, select_by_rule(rule, conf, cand, t, ent)] = True
    return out


def select_tokens(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official rule on tensors (see `select`)."""
    return select("threshold", confidence, candidates, threshold)


def select_left_anchored(confidence: torch.Tensor, candidates: torch.Tensor,
                         threshold: float) -> torch.Tensor:
    """The left-anchored rule on tensors (see `select`)."""
    return select("left_anchored", confidence, candidates, threshold)


def select_entropy_bounded(confidence: torch.Tensor, entropy: torch.Tensor, candidates: torch.Tensor,
                           threshold: float) -> torch.Tensor:
    """The entropy-bounded rule on tensors (see `select`)."""
    return select("entropy_bounded", confidence, candidates, threshold, entropy)
