"""Verifying a draft against the target model: the speculative-sampling acceptance rule
(Leviathan et al. 2023; Chen et al. 2023), pure functions over one sequence's tensors.

A draft d_1..d_k was drawn from the draft distributions q_1..q_k; one causal forward of the
target gives p_1..p_{k+1} (p_i conditioned on the prefix and d_1..d_{i-1}). Going left to right,
d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from the residual norm(max(0, p_i - q_i)) and the cycle ends; if every d_i is kept, one
more token is drawn from p_{k+1}. Each emitted token is then distributed exactly as the target's
own sample. Greedy decoding is the special case where p and q are one-hot at their argmax: d_i is
kept iff it equals the target's argmax, and the target's argmax is the extra token.

The rule needs q_i to be the distribution d_i was actually drawn from, conditioned on nothing
the target has not seen before position i; the drafter guarantees it (speculation.py).
"""

from __future__ import annotations

from typing import Sequence

import torch


def accept_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> tuple[int, int]:
    """draft (k,), target_argmax (k + 1,), host lists. Returns (accepted drafts, the target's
    next token)."""
    n = next((i for i, (d, t) in enumerate(zip(draft, target_argmax)) if d != t), len(draft))
    return n, int(target_argmax[n])


def accept_sampled(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """draft (k,) drawn from q (k, V); p (k + 1, V) the target's distributions (float32, each
    row sums to 1). Returns (accepted drafts, the token emitted after them)."""
    k = draft.shape[0]
    if k == 0:
        return 0, _draw(p[0], generator)
    idx = torch.arange(k, device=draft.device)
    p_d, q_d = p[idx, draft], q[idx, draft]
    u = torch.rand(k, generator=generator, device=draft.device)
    # accept iff u < p/q, written without a division (q_d > 0: d was drawn from q)
    rejected = (u * q_d >= p_d).int()
    if not bool(rejected.any()):
        return k, _draw(p[k], generator)
    n = int(rejected.argmax())
    residual = (p[n] - q[n]).clamp_min(0.0)
    total = residual.sum()
    # residual mass 0 means p == q on this row, and then a rejection has probability 0; guard
    # against float round-off all the same
    return n, _draw(residual / total if float(total) > 0 else p[n], generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
