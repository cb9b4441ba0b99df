"""Attention patterns for decoding, as one rule: the query at position p may see key j iff
j < limit(p), where

- causal (AR):             limit(p) = p + 1
- block-causal (diffusion): limit(p) = (p // B + 1) * B   (its own block bidirectionally,
                                                           every earlier block)

The rule depends only on positions, so a batch whose rows sit at different positions, use
different block sizes or different modes gets its mask from one vectorised comparison.
"""

from __future__ import annotations

import torch


def attention_limits(positions: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """positions (n, T); block_sizes (n, 1), 1 for causal rows (B = 1 is exactly causal)."""
    return (positions // block_sizes + 1) * block_sizes


def limit_mask(limits: torch.Tensor, key_len: int) -> torch.Tensor:
    """(n, 1, T, key_len) bool mask from per-query limits (n, T)."""
    keys = torch.arange(key_len, device=limits.device)
    return (keys[None, None, :] < limits[:, :, None])[:, None]


def row_limits(start: int, end: int, block: int) -> list[int]:
    """The same rule on the host, for one row's queries at positions [start, end) (block 1 =
    causal): the engine builds each step's limits as Python ints and ships them once."""
    return [(p // block + 1) * block for p in range(start, end)]
