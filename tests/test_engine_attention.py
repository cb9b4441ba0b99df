"""The decoding attention rule (`attention_limits` + `limit_mask`) against brute-force causal
and block-causal definitions, for rows at different positions and block sizes."""

from __future__ import annotations

import torch

from fastdllm.engine.attention import attention_limits, limit_mask


def brute_force(positions: list[int], block: int, key_len: int) -> torch.Tensor:
    """(T, key_len): causal when block == 1, else block-causal (own block both ways, earlier
    blocks fully)."""
    out = torch.zeros(len(positions), key_len, dtype=torch.bool)
    for i, p in enumerate(positions):
        for j in range(key_len):
            out[i, j] = j <= p if block == 1 else j // block <= p // block
    return out


def test_limits_match_brute_force_for_mixed_rows():
    rows = [  # (first position, width, block size)
        (0, 8, 1), (5, 1, 1), (0, 16, 8), (8, 8, 8), (12, 4, 8), (3, 5, 4), (32, 32, 32), (40, 8, 32),
    ]
    key_len = 72
    for width in sorted({w for _, w, _ in rows}):
        group = [r for r in rows if r[1] == width]
        positions = torch.tensor([[s + t for t in range(width)] for s, _, _ in group])
        blocks = torch.tensor([[b] for _, _, b in group])
        mask = limit_mask(attention_limits(positions, blocks), key_len)
        assert mask.shape == (len(group), 1, width, key_len) and mask.dtype == torch.bool
        for i, (s, w, b) in enumerate(group):
            expected = brute_force(list(range(s, s + w)), b, key_len)
            assert torch.equal(mask[i, 0], expected), (s, w, b)


def test_block_size_one_is_exactly_causal():
    positions = torch.arange(10)[None]
    assert torch.equal(attention_limits(positions, torch.tensor([[1]])), positions + 1)
    mask = limit_mask(attention_limits(positions, torch.tensor([[1]])), 10)[0, 0]
    assert torch.equal(mask, torch.ones(10, 10, dtype=torch.bool).tril())


def test_last_position_of_a_block_sees_the_same_keys_in_both_patterns():
    positions = torch.arange(16)[None]
    causal = limit_mask(attention_limits(positions, torch.tensor([[1]])), 16)[0, 0]
    block = limit_mask(attention_limits(positions, torch.tensor([[8]])), 16)[0, 0]
    assert torch.equal(causal[[7, 15]], block[[7, 15]])
    assert not torch.equal(causal[:7], block[:7])  # earlier positions see their whole block
