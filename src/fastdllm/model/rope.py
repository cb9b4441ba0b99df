"""Rotary position embeddings: inverse frequencies (default, linear, Llama-3 scaling) and
cos/sin tables built once per model and indexed by position ids on every forward.

The sin table is stored *signed* (first half negated) so that rotating is one roll of the
feature halves: x * cos + roll(x) * signed_sin equals the reference x * cos + rotate_half(x) * sin
bit for bit (negation is exact), in four ops instead of seven."""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, matching transformers' definitions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(rope: RopeConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each (max_positions, head_dim) in float32."""
    inv_freq = inverse_frequencies(rope, head_dim)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (..., head_dim); cos/signed_sin broadcastable to x, already in x's dtype.
    roll by half swaps the halves: [x2, x1] * [-sin, sin] = rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
