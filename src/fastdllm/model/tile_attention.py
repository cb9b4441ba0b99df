"""Block-sparse attention by tiles: each tile of consecutive queries attends only to its own
list of keys (paper §3.2 training layout, where the 2L x 2L or 3L x 3L mask is mostly empty).

The caller splits the T queries of a row into tiles of `tile` tokens whose queries all may see
the same keys, and gives per tile the key indices (padded to the longest list, padding marked
invalid). Keys and values are gathered per tile and one batched SDPA runs over (tiles x K)
instead of (T x T): the cost follows the allowed pairs, not the square. With grouped-query
attention the query heads sharing a key head are stacked along the tile's query axis, so the
gathered keys are never repeated per head. Equal to dense SDPA with the mask that allows
exactly those keys (tests/test_training_layout.py), up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TileKeys:
    key_index: torch.Tensor  # (n, tiles, K) long: key positions each tile may see (padded)
    key_valid: torch.Tensor  # (n, tiles, K) bool: False on the padding of shorter lists
    tile: int  # queries per tile; T = tiles * tile


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: TileKeys) -> torch.Tensor:
    """q (n, heads, T, hd), k and v (n, kv_heads, T, hd) -> (n, heads, T, hd)."""
    n, heads, length, hd = q.shape
    kv_heads = k.shape[1]
    group, tiles, width = heads // kv_heads, length // keys.tile, keys.key_index.shape[-1]
    index = keys.key_index.reshape(n, 1, tiles * width, 1).expand(n, kv_heads, tiles * width, hd)
    k_tiles = k.gather(2, index).view(n, kv_heads, tiles, width, hd)
    v_tiles = v.gather(2, index).view(n, kv_heads, tiles, width, hd)
    # (n, kv_heads, tiles, group * tile, hd): the query heads of one key head, tile by tile
    q_tiles = (q.reshape(n, kv_heads, group, tiles, keys.tile, hd).transpose(2, 3)
               .reshape(n, kv_heads, tiles, group * keys.tile, hd))
    out = F.scaled_dot_product_attention(q_tiles, k_tiles, v_tiles,
                                         attn_mask=keys.key_valid[:, None, :, None, :])
    return (out.view(n, kv_heads, tiles, group, keys.tile, hd).transpose(2, 3)
            .reshape(n, heads, length, hd))
