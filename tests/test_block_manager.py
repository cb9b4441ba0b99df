"""The page allocator and prefix cache (engine/block_manager.py) under random admit / grow /
finish / cancel sequences: every page is always in exactly one state, a page in use is never
evicted or handed out twice, cached chains are found again, refcounts return to zero."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdllm.engine.block_manager import NULL_PAGE, BlockManager, page_hashes

P = 4

ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "cancel"]),
                         st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, pages=st.integers(1, 12), vocab=st.integers(1, 3))
def test_random_admit_grow_finish_cancel(ops, pages, vocab):
    m = BlockManager(pages, P)
    live: dict[int, dict] = {}  # id -> {"tokens", "pages", "hashes"}
    owner: dict[int, int] = {}  # page -> how many live sequences list it
    next_id = 0
    for op, r in ops:
        if op == "admit":
            tokens = [(r >> i) % vocab for i in range(3 * P)]  # small vocab: chains repeat
            full = len(tokens) // P
            hashes = page_hashes(tokens, P, "block4", full)
            hit = m.lookup(hashes)
            assert all(m.refcount(p) >= 1 for p in hit)
            more = m.allocate(1 + r % 2)
            if more is None:
                m.release(hit)
                m.check()
                continue
            table = hit + more
            assert NULL_PAGE not in table and len(set(table)) == len(table)
            for p in more:  # a fresh page was not in any live table
                assert owner.get(p, 0) == 0
            live[next_id] = {"tokens": tokens, "pages": table, "hashes": hashes}
            next_id += 1
        elif live:
            sid = sorted(live)[r % len(live)]
            seq = live[sid]
            if op == "grow":
                more = m.allocate(1)
                if more is not None:
                    assert owner.get(more[0], 0) == 0
                    seq["pages"] += more
            else:
                if op == "finish":  # its full committed pages enter the cache
                    for page, h in zip(seq["pages"], seq["hashes"]):
                        m.register(page, h)
                for p in seq["pages"]:
                    owner[p] -= 1
                m.release(seq["pages"])
                del live[sid]
                m.check()
                continue
        owner.clear()
        for s in live.values():
            for p in s["pages"]:
                owner[p] = owner.get(p, 0) + 1
        for p, n in owner.items():
            assert m.refcount(p) == n  # a page's refcount is the number of tables listing it
        m.check()
    for s in live.values():
        m.release(s["pages"])
    m.check()
    assert m.used == 0 and all(m.refcount(p) == 0 for p in range(pages + 1))


def test_a_cached_chain_is_found_again_and_evicted_least_recently_used():
    m = BlockManager(3, P)
    a, b = [1] * 8, [2] * 8
    ha, hb = page_hashes(a, P, "block4", 2), page_hashes(b, P, "block4", 2)
    pa = m.allocate(2)
    for p, h in zip(pa, ha):
        assert m.register(p, h)
    m.release(pa)
    assert m.available == 3 and m.cached == 2
    assert m.lookup(ha) == pa  # both pages found, in order
    m.release(pa)
    assert m.lookup(hb) == []
    # a miss of 3 pages evicts the idle cached ones, oldest first
    pb = m.allocate(3)
    assert set(pb) == {1, 2, 3} and m.cached == 0 and m.stats.evicted_pages == 2
    assert m.allocate(1) is None  # nothing left, and nothing in use was taken


def test_hash_chain_depends_on_every_earlier_token_and_the_kind():
    t = list(range(12))
    base = page_hashes(t, P, "block4", 3)
    assert page_hashes(t, P, "block4", 1, parent=base[1], first=2) == base[2:]  # incremental
    u = list(t)
    u[1] = 99  # a change in page 0 changes every later page's hash
    assert all(x != y for x, y in zip(base, page_hashes(u, P, "block4", 3)))
    assert all(x != y for x, y in zip(base, page_hashes(t, P, "block1", 3)))  # causal != block


def test_no_prefix_caching_registers_and_finds_nothing():
    m = BlockManager(2, P, prefix_caching=False)
    p = m.allocate(1)
    h = page_hashes([0] * P, P, "block4", 1)
    assert not m.register(p[0], h[0])
    m.release(p)
    assert m.lookup(h) == [] and m.cached == 0


def test_releasing_a_page_twice_is_a_bug():
    m = BlockManager(2, P)
    p = m.allocate(1)
    m.release(p)
    with pytest.raises(RuntimeError, match="released more often than taken"):
        m.release(p)
