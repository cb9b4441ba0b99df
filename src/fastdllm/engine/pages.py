"""Which sequence holds which pages, step by step: growth, preemption, resumption and prefix
sharing for the engine (engine.py), on top of the page allocator (block_manager.py).

Before each forward (`schedule`), in the order sequences joined:
1. every sequence holding pages takes the pages its next forward writes or reads; when the pool
   is short, the most recently admitted holder is preempted: its pages go back (those holding
   committed, shareable KV stay cached, so its resumption often finds them again), its host state
   (tokens, phase, masks) stays, and the KV of its active block is stashed when a sub-block
   step will read it (the stale block-local cache cannot be recomputed; everything below the
   committed length can, exactly);
2. then waiting sequences (preempted or new, in the order they joined) take their pages while
   the pool has room for them plus a page of headroom per holder (so a resumption does not
   preempt someone at the next step, and so on, thrashing): a new one reuses the longest cached prefix of its prompt and
   prefills the rest; a preempted one reuses what is still cached and recomputes the rest of
   its committed KV in one forward (PlanKind.RECOMPUTE), then continues where it stopped.
After each step (`share`), a sequence's pages that are full and committed enter the prefix cache.

Preemption never changes a token: recomputed KV is what the block-level cache held, and the
stash restores the block-local cache bit for bit (tests/test_engine_paged.py).
"""

from __future__ import annotations

from .block_manager import BlockManager, page_hashes
from .sequence import Phase, Sequence


class Pages:
    def __init__(self, runner, manager: BlockManager):
        self.runner, self.manager = runner, manager
        self.page_size = manager.page_size
        self.preemptions = 0
        self.stashes = 0  # preemptions that saved a block-local cache

    @property
    def positions(self) -> int:
        """The whole pool, in positions (one request alone may use at most this)."""
        return self.manager.num_pages * self.page_size

    def usage(self) -> dict:
        return self.manager.usage(self.preemptions)

    @staticmethod
    def waiting(running: list[Sequence]) -> list[Sequence]:
        return [s for s in running if not s.pages and not s.finished]

    # ------------------------------------------------------------------ before a step
    def schedule(self, running: list[Sequence], fail) -> list[Sequence]:
        """Give every sequence that can run this step the pages it needs; returns those, in the
        order they joined. `fail(seq, error)` ends a sequence that can never run."""
        holders = [s for s in running if s.pages and not s.finished]
        i = 0
        while i < len(holders):
            seq = holders[i]
            need = self._pages_for(seq.needed_positions()) - len(seq.pages)
            while need > 0 and not self._grow(seq, need):
                victim = holders.pop()  # the most recently admitted holder
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                i += 1
        waiting = self.waiting(running)
        for seq in waiting:
            # a page of headroom per holder, so a start does not preempt someone at once
            if not self._start(seq, reserve=len(holders)):
                break  # first come, first served: nobody overtakes the oldest waiting sequence
            holders.append(seq)
        self.runner.cache.zero(self.manager.take_fresh())
        if not holders and waiting:  # cannot happen: add() checks the pool size
            seq = waiting[0]  # nothing started, so the oldest waiting one could not
            fail(seq, RuntimeError(f"sequence {seq.id} cannot get its pages from an empty pool; "
                                   "please report this"))
        return sorted(holders, key=lambda s: s.id)

    def _pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def _grow(self, seq: Sequence, n: int) -> bool:
        pages = self.manager.allocate(n)
        if pages is None:
            return False
        seq.pages += pages
        return True

    def _start(self, seq: Sequence, reserve: int = 0) -> bool:
        """Pages for a waiting sequence: the cached prefix, then fresh pages for the rest of its
        next forward. False (nothing taken) when the pool cannot give them now."""
        resumed = seq.resume_from is not None
        limit = seq.committed if resumed else seq.shareable_prefix()
        hashes = self._chain(seq, limit // self.page_size) if self._shares(seq) else []
        hit = self.manager.lookup(hashes)
        cached = len(hit) * self.page_size
        # a new sequence's first forwards: its prefill, and for diffusion the block after it
        need = (seq.needed_positions() if resumed else
                seq.prefill_end() + (seq.block if seq.params.diffusion else 0))
        more = max(0, self._pages_for(need) - len(hit))
        if more + reserve > self.manager.available:
            self.manager.release(hit)
            return False
        seq.pages, seq.hashes = hit + self.manager.allocate(more), hashes[:len(hit)]
        if resumed:
            seq.resume_from = cached if cached < seq.committed else None
            if seq.stash is not None:
                self.runner.restore(seq.pages, seq.committed, seq.stash)
                seq.stash = None
        else:
            self.manager.stats.queried_tokens += seq.prompt_len
            self.manager.stats.hit_tokens += cached
            seq.reuse_prefix(cached)
            seq.begin()
            if seq.phase is not Phase.PREFILL:
                seq.skipped_prefill_draw(self.runner.model.config.vocab_size)
        return True

    # ------------------------------------------------------------------ giving pages back
    def preempt(self, seq: Sequence) -> None:
        """Take a sequence's pages; it keeps its state and waits to resume."""
        if seq.phase is Phase.REFINE and seq.block_fresh and seq.params.sub_block_cache:
            seq.stash = self.runner.save(seq.pages, seq.committed, seq.committed + seq.block)
            self.stashes += 1
        self.manager.release(seq.pages)
        seq.pages, seq.hashes = [], []
        seq.resume_from = 0
        self.preemptions += 1

    def release(self, seq: Sequence) -> None:
        """A sequence leaves (finished, cancelled, failed): its pages go back."""
        if seq.pages:
            self.manager.release(seq.pages)
        seq.pages, seq.hashes, seq.stash = [], [], None

    # ------------------------------------------------------------------ prefix sharing
    def _shares(self, seq: Sequence) -> bool:
        """Whether this sequence's pages can be shared: the block-level cache is on (the
        reference without it rewrites every position each step) and every page ends on a block
        boundary (a page's KV then depends only on the tokens up to its end)."""
        return (self.manager.prefix_caching and seq.params.block_cache
                and self.page_size % seq.block == 0)

    def _chain(self, seq: Sequence, count: int, first: int = 0) -> list[bytes]:
        parent = seq.hashes[first - 1] if first else None
        return page_hashes(seq.tokens, self.page_size, f"block{seq.block}", count - first,
                           parent=parent, first=first)

    def share(self, seq: Sequence) -> None:
        """After a step: the sequence's full pages below its committed length enter the cache."""
        full = min(seq.committed // self.page_size, len(seq.pages))
        if full <= len(seq.hashes) or seq.resume_from is not None or not self._shares(seq):
            return
        if full > len(seq.hashes):
            new = self._chain(seq, full, first=len(seq.hashes))
            for i, h in enumerate(new, start=len(seq.hashes)):
                self.manager.register(seq.pages[i], h)
            seq.hashes += new
