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
class Packing:
    """How the tokens of a step that packs rows of different widths, (1, T) in the forward,
    map onto n query rows of the widest row's width W for attention (each row reads its own
    slot of the cache). Per-token work (norms, projections, MLP) runs on the T real tokens only;
    attention runs on (n, W) with the spare query places filled by copies whose output is
    never read back."""

    rows: int  # n
    width: int  # W
    gather: torch.Tensor  # (n * W,) packed index of each query place
    scatter: torch.Tensor  # (T,) query place of each packed token


@dataclass
class CacheAccess:
    """How one forward uses the cache: which slots its n query rows read (`rows`), where the
    chunk's tokens write their KV (`positions`, shaped like the chunk, in the slot of their row
    or in `token_slots` when given), and how many leading positions to attend over.

    `rows` is a slice when the batch's slots are contiguous (the common case: reads are views);
    a long tensor otherwise, in which case reads gather just the first `key_len` positions of
    those slots."""

    cache: KVCache
    rows: slice | torch.Tensor
    positions: torch.Tensor  # (N, T) long
    key_len: int
    token_slots: torch.Tensor | None = None  # (N, T) long; default: row i writes to slot rows[i]
    packing: Packing | None = None
    _write_slots: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.token_slots is not None:
            self._write_slots = self.token_slots
        elif isinstance(self.rows, slice):
            self._write_slots = torch.arange(self.rows.start or 0, self.rows.stop,
                                             device=self.positions.device)[:, None]
        else:
            self._write_slots = self.rows[:, None]

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (N, T, kv_heads, head_dim), token-major. Returns keys/values
        (n, kv_heads, key_len, head_dim) of the query rows' slots."""
        kl, vl = self.cache.layers[layer]
        # advanced indices split by a slice put their dims first: target is (N, T, kv_heads, hd)
        kl[self._write_slots, :, self.positions] = k
        vl[self._write_slots, :, self.positions] = v
        if isinstance(self.rows, slice):
            return kl[self.rows, :, : self.key_len], vl[self.rows, :, : self.key_len]
        return (kl[:, :, : self.key_len].index_select(0, self.rows),
                vl[:, :, : self.key_len].index_select(0, self.rows))

    def query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """(N, T, heads, hd) chunk -> (n, W, heads, hd) query rows."""
        p = self.packing
        if p is None:
            return q
        return q.reshape(-1, *q.shape[2:]).index_select(0, p.gather).view(p.rows, p.width, *q.shape[2:])

    def token_rows(self, out: torch.Tensor, N: int, T: int) -> torch.Tensor:
        """(n, W, D) attention output -> (N, T, D) chunk tokens."""
        if self.packing is None:
            return out
        return out.reshape(-1, out.shape[-1]).index_select(0, self.packing.scatter).view(N, T, -1)
