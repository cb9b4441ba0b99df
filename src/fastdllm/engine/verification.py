"""Verifying a draft against the target model: the speculative-sampling acceptance rule
(Leviathan et al. 2023; Chen et al. 2023), pure functions over device tensors.

A draft d_1..d_k was drawn from the draft distributions q_1..q_k; one causal forward of the
target gives p_1..p_{k+1} (p_i conditioned on the prefix and d_1..d_{i-1}). Going left to right,
d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is
drawn from the residual norm(max(0, p_i - q_i)) and the cycle ends; if every d_i is kept, one
more token is drawn from p_{k+1}. Each emitted token is then distributed exactly as the target's
own sample. Greedy decoding is the special case where p and q are one-hot at their argmax: d_i is
kept iff it equals the target's argmax, and the target's argmax is the extra token.

The rule needs q_i to be the distribution d_i was actually drawn from, conditioned on nothing
the target has not seen before position i; the drafter guarantees it (speculation.py).

Nothing here reads a value back to the host: greedy acceptance is one pass over the whole
batch, a sampled row's acceptance and draw stay on the device, and the engine brings every row's
outcome back in one transfer per forward (speculative.py).
"""

from __future__ import annotations

import torch


def accept_greedy(draft: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance for a batch. draft (n, k): row i's drafts in its first lengths[i]
    columns (the rest is padding); target (n, k + 1): the target's argmax at those positions
    and one more. Returns (accepted drafts (n,), the target's next token (n,)): the longest
    prefix of each row's drafts the target agrees with, and the target's token after it."""
    k = draft.shape[1]
    cols = torch.arange(k, device=draft.device)
    agree = (draft == target[:, :k]) & (cols < lengths[:, None])  # (n, k)
    accepted = agree.long().cumprod(dim=1).sum(dim=1)  # leading agreements
    return accepted, target.gather(1, accepted[:, None])[:, 0]


def accept_sampled(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled row. draft (k,) drawn from q (k, V); p (k + 1, V) the target's distributions
    (float32, each row sums to 1). Returns (accepted drafts, the token emitted after them), 0-d
    tensors on the device. The generator draws k uniforms, then one token: per row, since each
    request has its own generator (a seed reproduces its output in any batch)."""
    k = draft.shape[0]
    if k == 0:
        return torch.zeros((), dtype=torch.long, device=p.device), _draw(p[:1], generator)
    idx = torch.arange(k, device=draft.device)
    p_d, q_d = p[idx, draft], q[idx, draft]
    u = torch.rand(k, generator=generator, device=draft.device)
    # accept iff u < p/q, written without a division (q_d > 0: d was drawn from q)
    rejected = u * q_d >= p_d
    n = torch.where(rejected.any(), rejected.int().argmax(), k)  # the first rejection, or k
    p_n = p.index_select(0, n.view(1))  # (1, V)
    residual = (p_n - q.index_select(0, n.clamp_max(k - 1).view(1))).clamp_min(0.0)
    total = residual.sum()
    # every draft kept: draw from p_{k+1}; residual mass 0 means p == q on this row, and then a
    # rejection has probability 0: guard against float round-off all the same
    keep_p = (n == k) | ~(total > 0)
    return n, _draw(torch.where(keep_p, p_n, residual / total), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (1, V) -> a 0-d token."""
    return torch.multinomial(probs, 1, generator=generator).view(())
