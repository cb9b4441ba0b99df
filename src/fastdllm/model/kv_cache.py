"""The KV cache: one preallocated buffer per layer, written in place.

Layout per layer: (slots, kv_heads, max_len, head_dim). A *slot* holds one sequence. Writing
new keys at given positions is an in-place `index_put`; reading the first `key_len` positions of
a set of contiguous slots is a view. Fast-dLLM v2's two caches are both this buffer:

- block-level cache: positions below a sequence's committed length hold exact KV of finished
  blocks; they are only ever written by the forward that commits the block;
- sub-block cache: the active block's positions hold the KV of the last full-block forward;
  a sub-block step overwrites only the sub-block's positions and reads the rest (stale) as is.

The attention mask decides what each query may see, so nothing is ever copied or concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class CacheAccess:
    """How one forward uses the cache: which slots (`rows`), where to write the new tokens' KV
    (`positions`, (n, T)), and how many leading positions to attend over.

    `rows` is a slice when the batch's slots are contiguous (the common case: reads are views);
    a long tensor otherwise (a step where only some sequences run a forward of this width), in
    which case reads gather just the first `key_len` positions of those slots."""

    cache: KVCache
    rows: slice | torch.Tensor
    positions: torch.Tensor  # (n, T) long
    key_len: int

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (n, kv_heads, T, head_dim). Returns keys/values (n, kv_heads, key_len, head_dim)."""
        kl, vl = self.cache.k[layer], self.cache.v[layer]
        if isinstance(self.rows, slice):
            kl, vl = kl[self.rows], vl[self.rows]
            row_idx = torch.arange(k.shape[0], device=k.device)[:, None]
        else:
            row_idx = self.rows[:, None]
        # advanced indices split by a slice put their dims first: target is (n, T, kv_heads, hd)
        kl[row_idx, :, self.positions] = k.transpose(1, 2)
        vl[row_idx, :, self.positions] = v.transpose(1, 2)
        if isinstance(self.rows, slice):
            return kl[:, :, : self.key_len], vl[:, :, : self.key_len]
        return kl[self.rows, :, : self.key_len], vl[self.rows, :, : self.key_len]
