"""The page allocator of the paged KV cache, and the prefix cache over it (host state only).

The KV pool (model/kv_cache.py) is a set of fixed-size pages; a sequence holds a *page table*,
the list of pages its positions 0, P, 2P, ... live in. Pages are taken as a sequence grows and
given back when it finishes, is cancelled or is preempted, so memory follows the positions in
use, not the longest request that might come (nano-vllm's block manager, vLLM's PagedAttention).

Prefix caching (paper §3.3's block-level cache, shared between requests). Attention is
block-causal across blocks, so the KV of a committed page depends only on the token ids up to
its end (when the page ends on a block boundary), the model, and the attention pattern (the
block size: B = 1 is causal AR KV, which differs from block-diffusion KV of the same tokens).
A full committed page is therefore named by a hash chain: h_i = H(h_{i-1}, tokens of page i),
rooted in the attention kind. A new sequence reuses the longest chain already in the pool;
pages nobody holds stay cached until the pool needs them, evicted least recently used.

Every page is in exactly one of three states, and the property test walks them at random
(tests/test_block_manager.py):
- free: in `_free`, holds nothing;
- held: refcount >= 1 (one per sequence whose table lists it); may also be cached (hashed);
- cached and idle: refcount 0, hashed, in `_idle` (LRU order); reusable by a hit, evictable.
Page 0 is the null page: never handed out, the target of padded writes and table padding.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from dataclasses import dataclass

NULL_PAGE = 0


def page_hashes(tokens: list[int], page_size: int, kind: str, count: int,
                parent: bytes | None = None, first: int = 0) -> list[bytes]:
    """The hash chain of pages first .. first + count - 1 of `tokens` (each a full page), whose
    attention kind is `kind` (e.g. "block32": the block size and whatever else changes the KV).
    `parent` is the hash of page first - 1 (None: the chain's root). blake2b, so a client cannot
    craft two prompts whose pages collide."""
    out = []
    h = parent if parent is not None else hashlib.blake2b(kind.encode(), digest_size=16).digest()
    for i in range(first, first + count):
        page = array("q", tokens[i * page_size:(i + 1) * page_size]).tobytes()
        h = hashlib.blake2b(h + page, digest_size=16).digest()
        out.append(h)
    return out


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt positions looked up
    hit_tokens: int = 0  # of which served from the cache
    evicted_pages: int = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        """`num_pages` usable pages (the pool holds one more: the null page)."""
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.prefix_caching = prefix_caching
        self._free = list(range(1, num_pages + 1))  # a heap: lowest pages first (touched memory stays compact)
        self._ref = [0] * (num_pages + 1)
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0, oldest first
        self._touched = [False] * (num_pages + 1)
        self._fresh: list[int] = []  # pages handed out for the first time since `take_fresh`
        self.stats = PrefixStats()

    # ------------------------------------------------------------------ counts
    @property
    def available(self) -> int:
        """Pages that can be handed out now (free, or cached and idle: evictable)."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Pages held by at least one sequence."""
        return self.num_pages - self.available

    @property
    def cached(self) -> int:
        return len(self._hash_of)

    def usage(self, preemptions: int = 0) -> dict:
        """The pool as /health and /metrics report it."""
        return {"pages_total": self.num_pages, "pages_used": self.used, "pages_free": self.available,
                "pages_cached": self.cached, "page_size": self.page_size,
                "usage": round(self.used / self.num_pages, 6), "prefix_caching": self.prefix_caching,
                "prefix_queried_tokens": self.stats.queried_tokens,
                "prefix_hit_tokens": self.stats.hit_tokens, "preemptions": preemptions}

    # ------------------------------------------------------------------ taking and giving back
    def allocate(self, n: int) -> list[int] | None:
        """n pages for one sequence (refcount 1 each), evicting idle cached pages, least
        recently used first, when no free page is left; None (nothing taken) if n are not there."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = heapq.heappop(self._free)
            else:
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.stats.evicted_pages += 1
            self._ref[page] = 1
            if not self._touched[page]:
                self._touched[page] = True
                self._fresh.append(page)
            out.append(page)
        return out

    def take_fresh(self) -> list[int]:
        """Pages handed out for the first time since the last call: their memory was never
        written, so the pool zeroes them before a forward reads them (a masked key still
        multiplies its value by 0, and 0 * NaN is NaN)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def release(self, pages: list[int]) -> None:
        """A sequence gives its pages back (finished, cancelled or preempted)."""
        for page in pages:
            if self._ref[page] <= 0:
                raise RuntimeError(f"page {page} released more often than taken; please report this")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None  # most recently used at the end
                else:
                    heapq.heappush(self._free, page)

    # ------------------------------------------------------------------ the prefix cache
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The pages of the longest cached prefix of this chain, each now held once more (the
        caller lists them in its table). Counts the hit; the caller counts the query."""
        out = []
        if not self.prefix_caching:
            return out
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._ref[page] == 0:
                del self._idle[page]
            self._ref[page] += 1
            out.append(page)
        return out

    def register(self, page: int, h: bytes) -> bool:
        """A held page now holds the exact KV of the chain `h`: later sequences may reuse it.
        False (nothing changes) when prefix caching is off or another page already holds `h`."""
        if not self.prefix_caching or h in self._page_of or page in self._hash_of:
            return False
        self._hash_of[page] = h
        self._page_of[h] = page
        return True

    def refcount(self, page: int) -> int:
        return self._ref[page]

    def check(self) -> None:
        """Every page in exactly one state (tests call this after every operation)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is free twice"
        assert NULL_PAGE not in free and NULL_PAGE not in self._idle
        for page in range(1, self.num_pages + 1):
            states = [page in free, page in self._idle, self._ref[page] > 0]
            assert sum(states) == 1, f"page {page} is in {states} (free, idle, held)"
            if page in self._idle:
                assert page in self._hash_of
        assert all(self._page_of[h] == p for p, h in self._hash_of.items())
