"""The KV cache: one preallocated buffer per layer, written in place.

Layout per layer: (slots, kv_heads, max_len, head_dim). A *slot* holds one sequence. Writing
new keys at given (slot, position) pairs is an in-place `index_put`; reading the first
`key_len` positions of a set of contiguous slots is a view. Fast-dLLM v2's two caches are both
this buffer:

- block-level cache: positions below a sequence's committed length hold exact KV of finished
  blocks; they are only ever written by the forward that commits the block;
- sub-block cache: the active block's positions hold the KV of the last full-block forward;
  a sub-block step overwrites only the sub-block's positions and reads the rest (stale) as is.

The attention mask decides what each query may see, so nothing is ever copied or concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, scratch_slots: int = 0):
        """`scratch_slots` extra slots after the `slots` sequence slots, for writes that must land
        somewhere harmless (the padded places of a static decode step)."""
        shape = (num_layers, slots + scratch_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class RowGroup:
    """Rows of one width in a step that packs rows of different widths into one (1, T) chunk:
    their tokens are the contiguous packed range [start, start + rows * width), row after row.
    Per-token work (norms, projections, MLP) runs once over the whole chunk; attention runs per
    group, each row reading its own slot, so no query is padded and nothing is gathered."""

    start: int
    rows: int  # n
    width: int  # W
    slots: slice | torch.Tensor  # the slot each row reads
    key_len: int
    mask: torch.Tensor  # (n, 1, W, key_len), bool or additive


@dataclass
class CacheAccess:
    """How one forward uses the cache: where the chunk's tokens write their KV (`positions`,
    shaped like the chunk, in the slot of their row or in `token_slots` when given), which slots
    the query rows read (`rows`) and how many leading positions they attend over (`key_len`).
    A packed step of several widths gives `groups` instead (then `rows`/`key_len` are unused and
    the forward's mask is ignored: each group carries its own).

    `rows` is a slice when the batch's slots are contiguous (the common case: reads are views);
    a long tensor otherwise, in which case reads gather just the first `key_len` positions of
    those slots."""

    cache: KVCache
    rows: slice | torch.Tensor | None
    positions: torch.Tensor  # (N, T) long
    key_len: int
    token_slots: torch.Tensor | None = None  # (N, T) long; default: row i writes to slot rows[i]
    groups: tuple[RowGroup, ...] | None = None
    _write_slots: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.token_slots is not None:
            self._write_slots = self.token_slots
        elif isinstance(self.rows, slice):
            self._write_slots = torch.arange(self.rows.start or 0, self.rows.stop,
                                             device=self.positions.device)[:, None]
        else:
            self._write_slots = self.rows[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, T, kv_heads, head_dim), token-major, written at (slot, position)."""
        kl, vl = self.cache.layers[layer]
        # advanced indices split by a slice put their dims first: target is (N, T, kv_heads, hd)
        kl[self._write_slots, :, self.positions] = k
        vl[self._write_slots, :, self.positions] = v

    def read(self, layer: int, rows: slice | torch.Tensor, key_len: int):
        """Keys/values (n, kv_heads, key_len, head_dim) of the slots `rows`."""
        kl, vl = self.cache.layers[layer]
        if isinstance(rows, slice):
            return kl[rows, :, :key_len], vl[rows, :, :key_len]
        return kl[:, :, :key_len].index_select(0, rows), vl[:, :, :key_len].index_select(0, rows)
