"""Block noising and complementary masks (paper §3.2, "Block diffusion training" and
"Complementary masking").

Each block of B tokens draws its own noise level t ~ U(0, 1); its mask probability is
p = (1 - eps) * t + eps (eps keeps p > 0, as in LLaDA and the official Fast-dLLM v2 code), and
every loss-bearing token of the block is masked independently with probability p. Prompt and
padding tokens are never masked. The complementary twin masks exactly the loss-bearing tokens
the first view left visible, so every loss-bearing token is a prediction target in exactly one
of the two views; in the twin a token of the block is masked with probability 1 - p.

`noise: sub_block` (`sample_sub_block_mask`) draws the states decoding visits instead: per block
a current sub-block j and a level t; the sub-blocks before j are visible (decoded), j is masked
with probability p, the ones after it are fully masked (not reached yet). It has no complementary
twin (the twin of such a state, the past masked and the future visible, never occurs).
`noise: suffix` (`sample_suffix_mask`) draws the states the left-anchored rule visits: that rule
decodes a run from the first masked place of the sub-block, so every state is a block whose
tokens before a cut are visible and from the cut on masked; the cut is uniform over the block.

Randomness comes from an explicit `torch.Generator` seeded per packed row by `row_seed`, never
from the global RNG: the same row at the same point of the run gets the same noise on one
process or eight, and after a resume.
"""

from __future__ import annotations

import hashlib

import torch


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    return (1.0 - eps) * t + eps


def row_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for row `index` of a named stream ('train', 'val', 'epoch', ...)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_block_mask(loss_mask: torch.Tensor, block_size: int, eps: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise one row. loss_mask: (L,) bool, L a multiple of block_size.

    Returns (masked (L,) bool, p (L,) float: the mask probability of each token's block)."""
    (length,) = loss_mask.shape
    t = torch.rand(length // block_size, generator=generator)
    p = mask_probability(t, eps).repeat_interleave(block_size)  # (L,)
    u = torch.rand(length, generator=generator)
    return (u < p) & loss_mask, p


def sample_sub_block_mask(loss_mask: torch.Tensor, block_size: int, sub_block_size: int, eps: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise one row in decoding's shape (module docstring). Same returns as `sample_block_mask`."""
    (length,) = loss_mask.shape
    blocks = length // block_size
    t = torch.rand(blocks, generator=generator)
    current = torch.randint(block_size // sub_block_size, (blocks,), generator=generator)
    p = mask_probability(t, eps).repeat_interleave(block_size)
    u = torch.rand(length, generator=generator)
    sub = (torch.arange(length) % block_size) // sub_block_size  # each token's sub-block in its block
    j = current.repeat_interleave(block_size)
    masked = (sub > j) | ((sub == j) & (u < p))
    return masked & loss_mask, p


def sample_suffix_mask(loss_mask: torch.Tensor, block_size: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise one row as the left-anchored rule's states (module docstring): per block a cut
    uniform over its places, masked from the cut on. p: each block's masked fraction."""
    (length,) = loss_mask.shape
    blocks = length // block_size
    cut = torch.randint(block_size, (blocks,), generator=generator).repeat_interleave(block_size)
    masked = (torch.arange(length) % block_size) >= cut
    p = (block_size - cut).float() / block_size
    return masked & loss_mask, p


def complement(masked: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The twin's mask: the loss-bearing tokens the first view left visible."""
    return loss_mask & ~masked


def apply_mask(tokens: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
