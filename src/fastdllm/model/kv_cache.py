"""The KV cache: a pool of fixed-size pages per layer, written in place (PagedAttention layout).

Layout per layer: (pages, page_size, kv_heads, head_dim), token-major, as flash-attn's and
FlashInfer's paged kernels take it. A sequence's positions live in the pages its page table
lists (engine/block_manager.py hands them out): position p is token p % P of page table[p // P].
Page 0 is the null page: padded writes land there and padded table entries point there.

Fast-dLLM v2's two caches are both this pool:
- block-level cache: positions below a sequence's committed length hold exact KV of finished
  blocks; only the forward that commits a block writes them, and once a page is full and
  committed other sequences may share it (prefix caching);
- sub-block cache: the active block's positions hold the KV of the last full-block forward;
  a sub-block step overwrites only the sub-block's positions and reads the rest (stale) as is.

Attention reads each row's pages through its table with per-row key limits
(model/paged_attention.py), so nothing is ever concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str, *, positions: int):
        """`num_pages` usable pages plus the null page; `positions`: the longest sequence
        (the RoPE tables the forward reads are that long). The memory is allocated but not
        written: a page is zeroed when it is first handed out (`zero`), so a large budget costs
        only what is used."""
        shape = (num_layers, num_pages + 1, page_size, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.positions = positions
        self.zero([0])
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once

    @classmethod
    def regions(cls, num_layers: int, sequences: int, length: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str, page_size: int = 16) -> "KVCache":
        """A pool cut into `sequences` fixed regions of `length` positions (each sequence's pages
        consecutive), for code that drives the model directly (tests, micro-benchmarks): see
        `region_access`. The engine hands pages out as sequences grow instead."""
        per = -(-length // page_size)
        cache = cls(num_layers, sequences * per, page_size, kv_heads, head_dim, dtype, device,
                    positions=length)
        cache.zero(list(range(1, sequences * per + 1)))
        cache.per_region = per
        return cache

    def region_access(self, rows: slice | torch.Tensor, positions: torch.Tensor,
                      key_len: int) -> "CacheAccess":
        """Regions `rows` (a slice or indices) write at `positions` (N, T) and read key_len keys."""
        per, P = self.per_region, self.page_size
        idx = torch.arange(self.num_pages // per)[rows] if isinstance(rows, slice) else rows.cpu()
        tables = 1 + idx[:, None] * per + torch.arange(per)[None]  # (n, per)
        pos = positions.cpu()
        write = tables.gather(1, (pos // P).expand(tables.shape[0], -1)) * P + pos % P
        dev = self.k.device
        return CacheAccess(self, tables[:, :-(-key_len // P)].to(dev), write.to(dev), key_len)

    def kv_of(self, layer: int, pages: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (kv_heads, length, head_dim) of positions [0, length) of the sequence
        whose page table is `pages` (for tests and inspection)."""
        idx = torch.tensor(pages[:-(-length // self.page_size)], device=self.k.device)
        k, v = (x[layer].index_select(0, idx).flatten(0, 1)[:length].transpose(0, 1)
                for x in (self.k, self.v))
        return k, v

    def region_pages(self, region: int) -> list[int]:
        """The pages of region `region` of a `regions` pool."""
        return list(range(1 + region * self.per_region, 1 + (region + 1) * self.per_region))

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def zero(self, pages: list[int]) -> None:
        if pages:
            idx = torch.tensor(pages, device=self.k.device)
            self.k.index_fill_(1, idx, 0)
            self.v.index_fill_(1, idx, 0)


class BatchMirror:
    """A contiguous copy, per layer (rows, cap * page_size, kv_heads, head_dim), of the KV of one
    batch's rows, kept exact by writing every forward's new KV to it as well: its reads are
    views, as the slot-per-sequence cache's were, instead of a gather of every row's pages in
    every layer (on the CPU that copy costs as much as the attention itself at batch 8). The
    runner keeps one while the same rows, holding the same pages, run uniform steps, and
    rebuilds it (one gather for all layers) when they change."""

    def __init__(self, cache: "KVCache", rows: tuple, tables: list[list[int]], cap: int,
                 store: tuple[torch.Tensor, torch.Tensor]):
        """`store`: two flat buffers of at least layers x rows x cap pages, reused from copy to
        copy (fresh memory for every copy would page-fault its whole size each time)."""
        self.rows, self.cap = rows, cap
        self.tables = [list(t) for t in tables]  # each row's pages the copy was taken from
        flat = torch.tensor([p for t in tables for p in t + [0] * (cap - len(t))], device=cache.k.device)
        n, L = len(tables), cache.k.shape[0]
        page = cache.k.shape[2:]  # (P, kv_heads, hd)
        size = L * n * cap * page.numel()
        out_k = store[0][:size].view(L, n * cap, *page)
        out_v = store[1][:size].view(L, n * cap, *page)
        torch.index_select(cache.k, 1, flat, out=out_k)
        torch.index_select(cache.v, 1, flat, out=out_v)
        # (layers, rows * cap, P, kv_heads, hd) -> (layers, rows, cap * P, kv_heads, hd)
        self.k = out_k.view(L, n, cap * page[0], *page[1:])
        self.v = out_v.view(L, n, cap * page[0], *page[1:])

    def serves(self, rows: tuple, pages: list[list[int]], needed: int) -> bool:
        """Whether this copy is exact for these rows now: the same rows in the same order, each
        still holding the pages it was copied from (pages are only ever appended while a
        sequence runs; new ones are filled by the writes the copy also receives), and room."""
        return (rows == self.rows and needed <= self.cap
                and all(p[:len(t)] == t for p, t in zip(pages, self.tables)))


@dataclass
class RowGroup:
    """Rows of one width in a step that packs rows of different widths into one (1, T) chunk:
    their tokens are the contiguous packed range [start, start + rows * width), row after row.
    Per-token work (norms, projections, MLP) runs once over the whole chunk; attention runs per
    group, each row reading its own pages, so no query is padded."""

    start: int
    rows: int  # n
    width: int  # W
    tables: slice | torch.Tensor  # the page table each row reads (n, pages), or one row's run
    key_len: int
    mask: torch.Tensor  # (n, 1, W, key_len), bool or additive


@dataclass
class CacheAccess:
    """How one forward uses the cache: where the chunk's tokens write their KV (`write`: flat
    token indices page * P + offset, shaped like the chunk), the page tables the query rows read
    (`tables`) and how many leading positions of them they attend over (`key_len`). A packed step
    of several widths gives `groups` instead (then `tables`/`key_len` are unused and the
    forward's mask is ignored: each group carries its own).

    `tables` is a slice of page ids for a single row whose pages are consecutive (the read is a
    view), else a long tensor (n, pages) padded with the null page (the read gathers pages)."""

    cache: KVCache
    tables: slice | torch.Tensor | None
    write: torch.Tensor  # (N, T) long
    key_len: int
    groups: tuple[RowGroup, ...] | None = None
    # the rows read their contiguous copy instead of their pages (`tables` is None then), and
    # the chunk's KV goes there too, at `mirror_write` (N, T): row * cap * P + position
    mirror: BatchMirror | None = None
    mirror_write: torch.Tensor | None = None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, T, kv_heads, head_dim), token-major."""
        kl, vl = self.cache.layers[layer]
        kl.view(-1, *kl.shape[2:])[self.write] = k
        vl.view(-1, *vl.shape[2:])[self.write] = v
        if self.mirror is not None:
            mk, mv = self.mirror.k[layer], self.mirror.v[layer]
            mk.view(-1, *mk.shape[2:])[self.mirror_write] = k
            mv.view(-1, *mv.shape[2:])[self.mirror_write] = v

    def read(self, layer: int, tables: slice | torch.Tensor | None, key_len: int):
        """Keys/values (n, kv_heads, key_len, head_dim) of the rows' first key_len positions."""
        if self.mirror is not None:
            return (self.mirror.k[layer][:, :key_len].transpose(1, 2),
                    self.mirror.v[layer][:, :key_len].transpose(1, 2))
        kl, vl = self.cache.layers[layer]
        if isinstance(tables, slice):
            k, v = kl[tables], vl[tables]
            n = 1
        else:
            n = tables.shape[0]
            flat = tables.reshape(-1)
            k, v = kl.index_select(0, flat), vl.index_select(0, flat)
        k = k.view(n, -1, *kl.shape[2:])[:, :key_len]
        v = v.view(n, -1, *vl.shape[2:])[:, :key_len]
        return k.transpose(1, 2), v.transpose(1, 2)
