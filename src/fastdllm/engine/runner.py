"""The model runner: one engine step = one forward, one draw, one device-to-host transfer.

It owns the model, the KV cache and what a step needs prepared once (key positions, RoPE
tables, the paged KV pool, static steps). `run(rows)` takes every running sequence's plan
and, whatever the mix of phases (prefill, full block, sub-block, commit, AR step):

1. builds the step's inputs on the host as Python lists and ships them in one tensor;
2. runs one forward: rows of equal width as an (n, W) batch; rows of different widths packed
   into one (1, T) chunk, ordered by width, whose attention runs per group of equal width
   (`kv_cache.RowGroup`), so no token is padded (docs/design.md, "One forward per step", says
   why packing beat padding on the CPU);
3. draws every needed position's token and confidence (and, when a row's decoding rule spends
   it, the entropy of the distribution drawn from: selection.py);
4. brings tokens and confidences (and entropies) of the whole batch back in one transfer.

A *static step* (`static_step.py`) replaces 2-3 when the step fits a captured shape: CUDA
graphs on the GPU; on the CPU it runs eagerly (tests) or compiled when asked.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import BatchMirror, CacheAccess, KVCache, RowGroup
from .block_manager import NULL_PAGE
from ..model.transformer import Transformer
from . import logit_processing
from .attention import row_limits
from .params import DecodeConfig, RunnerConfig
from .sampling import calibrate, draw, draw_entropy
from .selection import needs_entropy
from .sequence import ForwardPlan, PlanKind, Sequence
from .static_step import StaticSteps

Row = tuple[Sequence, ForwardPlan]
# pages of room a batch's contiguous copy keeps past what its rows read, so it is not retaken
# every time a row grows a page (kv_cache.BatchMirror)
MIRROR_HEADROOM_PAGES = 2
GREEDY = DecodeConfig()


def to_host(tokens: torch.Tensor, conf: torch.Tensor, entropy: torch.Tensor | None = None
            ) -> tuple[list[int], list[float], list[float] | None]:
    """Tokens (R,), float32 confidences (R,) and, when given, float32 entropies (R,) -> host
    lists, in one transfer (all go as float64, which holds any token id and any float32 exactly)."""
    parts = (tokens, conf) if entropy is None else (tokens, conf, entropy)
    rows = torch.stack([x.to(torch.float64) for x in parts]).tolist()
    return [int(t) for t in rows[0]], rows[1], rows[2] if entropy is not None else None


class ModelRunner:
    def __init__(self, model: Transformer, *, num_pages: int, page_size: int, max_len: int,
                 max_slots: int, mask_token_id: int | None, config: RunnerConfig,
                 picks: int | None = None):
        """A pool of `num_pages` pages of `page_size` positions; sequences up to `max_len`
        positions; at most `max_slots` sequences in a step (the static steps' batch buckets);
        `picks`: the most places a static step draws per row (None: the plain engine's rule,
        static_step.py)."""
        cfg = model.config
        p = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = p.device, p.dtype
        self.mask_token_id = mask_token_id
        self.max_slots = max_slots
        self.page_size = page_size
        self._max_len = max_len
        self.cache = KVCache(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype, self.device, positions=max_len)
        self.keys = torch.arange(max_len, device=self.device)  # key positions, for every mask
        # the mask goes to attention additive (0 / -inf in the model dtype), built once per step
        # for all layers: a boolean mask would be converted inside attention, once per layer
        self._see = torch.zeros((), dtype=self.dtype, device=self.device)
        self._hide = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        # the tables this runner's static steps read: the model replaces its own tables when a
        # later engine asks for longer ones, while a graph captured now keeps reading these
        self.rope = model.rope_tables(max_len)
        self.static = (StaticSteps.for_runner(self, picks) if StaticSteps.enabled(config, self.device)
                       else None)
        # an observer of every eager step: probe(rows, logits (R, V), spans), called before the
        # sequences advance (their state is the one the logits were computed in). For
        # measurements (benchmarks/bench_calibration.py); None in serving
        self.probe = None
        # the plain engine's uniform steps read a contiguous copy of their rows' KV on the CPU
        # (kv_cache.BatchMirror; measured in docs/design.md); off by default: set by the Engine
        self.use_mirror = False
        self.mirror: BatchMirror | None = None
        self._mirror_store = (torch.empty(0, dtype=self.dtype, device=self.device),) * 2

    # ------------------------------------------------------------------ pages
    def write_index(self, pages: list[int], start: int, end: int) -> list[int]:
        """Flat pool indices (page * P + offset) of positions [start, end) of a sequence."""
        P = self.page_size
        return [pages[x // P] * P + x % P for x in range(start, end)]

    def table(self, pages: list[int], key_len: int, width: int) -> list[int]:
        """The first pages a row reads for `key_len` keys, padded with the null page to `width`."""
        n = -(-key_len // self.page_size)
        return pages[:n] + [NULL_PAGE] * (width - n)

    def save(self, pages: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of positions [start, end)'s KV in every layer (a preempted block-local cache)."""
        idx = torch.tensor(self.write_index(pages, start, end), device=self.device)
        k, v = self.cache.k, self.cache.v
        return (k.view(k.shape[0], -1, *k.shape[3:]).index_select(1, idx).clone(),
                v.view(v.shape[0], -1, *v.shape[3:]).index_select(1, idx).clone())

    def restore(self, pages: list[int], start: int, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.mirror = None  # written past the contiguous copy
        idx = torch.tensor(self.write_index(pages, start, start + saved[0].shape[1]), device=self.device)
        for pool, data in zip((self.cache.k, self.cache.v), saved):
            pool.view(pool.shape[0], -1, *pool.shape[3:])[:, idx] = data

    def pages_for(self, key_len: int) -> int:
        return -(-key_len // self.page_size)

    @property
    def max_len(self) -> int:
        return self._max_len

    def warm_up(self, log=None) -> None:
        if self.static is not None:
            self.static.warm_up(log)

    def close(self) -> None:
        """Free the static steps (graphs) and the KV cache now; the runner is unusable after."""
        self.mirror, self._mirror_store = None, ()
        if self.static is not None:
            self.static.close()
        self.static = self.cache = None

    def run(self, rows: list[Row]) -> tuple[list[int], list[float], list[float] | None,
                                            list[tuple[int, int]]]:
        """One forward for every row. Returns the drawn tokens, confidences and entropies (host
        lists; entropies only when a row's rule spends them, else None) and each row's span of
        them, in plan.logit_positions order."""
        spans, start = [], 0
        for _, plan in rows:
            spans.append((start, start + len(plan.logit_positions)))
            start = spans[-1][1]
        # a recomputing row (after preemption) draws nothing it keeps: greedy, so a sampled
        # sequence's generator advances exactly as it would have without the preemption
        settings = [GREEDY if p.kind is PlanKind.RECOMPUTE else s.params for s, p in rows]
        generators = [None if p.kind is PlanKind.RECOMPUTE else s.generator for s, p in rows]
        entropy_needed = any(p.diffusion and needs_entropy(p.rule) for p in settings)
        calibrated = any(p.calibrated for p in settings)
        entropy = None
        eager = logit_processing.needs_eager(rows)  # logit_bias, penalties, logprobs
        if self.static is not None and not eager and self.static.fits(rows):
            # the static step gives greedy draws and, when asked, the logits: sampled rows and
            # entropies are drawn from those here, each row with its own generator, as the eager
            # step does
            sampled = not all(p.greedy for p in settings)
            tokens, conf, logits = self.static.run(
                rows, logits=sampled or entropy_needed or calibrated or self.probe is not None)
            if sampled:
                tokens, conf = draw(logits, spans, settings, generators)
            if entropy_needed:
                entropy = draw_entropy(logits, spans, settings)
        else:
            logits = self.forward_logits(rows)
            self._suppress_mask(logits, rows, spans)
            if eager:  # logit_bias, penalties, logprobs (logit_processing.py)
                logit_processing.process(logits, rows, spans)
                logit_processing.record_alternatives(logits, rows, spans)
            tokens, conf = draw(logits, spans, settings, generators)
            if eager:  # logprobs report the drawing distribution, whatever the rule reads
                logit_processing.record_drawn(conf, rows, spans)
            if entropy_needed:
                entropy = draw_entropy(logits, spans, settings)
        if calibrated:  # the rule reads temperature-scaled confidences (calibration.py)
            conf = calibrate(logits, tokens, conf, spans, settings)
        if self.probe is not None:
            self.probe(rows, logits, spans)
        toks, confs, ents = to_host(tokens, conf, entropy)
        return toks, confs, ents, spans

    def forward_greedy(self, rows: list[Row], logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy tokens (R,) and logits (R, V) of every row's logit positions, in row order,
        [MASK] suppressed on rows whose `suppress_mask` is set; nothing is read back, for a caller
        that decides on the device (the speculative engine). A static step when the rows fit one
        (a CUDA graph on the GPU; its logits copied out only when `logits`), else the eager
        forward."""
        if self.static is not None and self.static.fits(rows):
            tokens, _, out = self.static.run(rows, logits=logits)
            return tokens, out
        logits = self.forward_logits(rows)
        spans, start = [], 0
        for _, plan in rows:
            spans.append((start, start + len(plan.logit_positions)))
            start = spans[-1][1]
        self._suppress_mask(logits, rows, spans)
        # the static step's greedy draw (max of the softmax), so both paths pick alike
        return torch.softmax(logits.float(), dim=-1).max(dim=-1)[1], logits

    def attention_mask(self, limits: torch.Tensor, key_len: int) -> torch.Tensor:
        """(n, 1, W, key_len) additive mask from per-query limits (n, W): key j is seen iff
        j < limit (the rule of engine/attention.py, `row_limits`)."""
        return torch.where(self.keys[:key_len] < limits[:, :, None], self._see, self._hide)[:, None]

    # ------------------------------------------------------------------ the eager step
    def forward_logits(self, rows: list[Row]) -> torch.Tensor:
        """Logits (R, vocab) of every row's logit positions, concatenated in row order. A row
        is anything with `tokens` (host list), `block` (1 = causal) and `pages`, with a plan
        that has start, end, key_len and logit_positions (the speculative engine's rows too)."""
        widths = [p.end - p.start for _, p in rows]
        if all(w == widths[0] for w in widths):
            return self._forward_uniform(rows, widths[0])
        # packed: rows ordered by width, so each width's rows are one contiguous range of tokens;
        # its writes skip the uniform steps' contiguous copy, which is then dropped
        self.mirror = None
        order = sorted(range(len(rows)), key=lambda r: widths[r])
        ids, pos, limits, writes, offsets = [], [], [], [], [0] * len(rows)
        groups: list[list[int]] = []  # row indices per width
        for r in order:
            seq, plan = rows[r]
            if not groups or widths[groups[-1][0]] != widths[r]:
                groups.append([])
            groups[-1].append(r)
            offsets[r] = len(ids)
            ids += seq.tokens[plan.start:plan.end]
            pos += range(plan.start, plan.end)
            limits += row_limits(plan.start, plan.end, seq.block)
            writes += self.write_index(seq.pages, plan.start, plan.end)
        logit_idx = [offsets[r] + x - plan.start for r, (_, plan) in enumerate(rows) for x in plan.logit_positions]
        group_keys = [max(rows[r][1].key_len for r in g) for g in groups]
        group_tables = [self._tables([rows[r] for r in g], k) for g, k in zip(groups, group_keys)]
        gather = [t for t in group_tables if not isinstance(t, slice)]
        parts = [ids, pos, limits, writes, logit_idx, *[sum(t, []) for t in gather]]
        tensors = self._ship(parts)
        ids_t, pos_t, lim_t, writes_t, lidx_t = tensors[:5]
        gathered = iter(tensors[5:])
        row_groups = []
        for g, key_len, tab in zip(groups, group_keys, group_tables):
            n, W = len(g), widths[g[0]]
            start = offsets[g[0]]
            read = tab if isinstance(tab, slice) else next(gathered).view(n, -1)
            mask = self.attention_mask(lim_t[start:start + n * W].view(n, W), key_len)
            row_groups.append(RowGroup(start, n, W, read, key_len, mask))
        T = len(ids)
        access = CacheAccess(self.cache, None, writes_t.view(1, T), 0, groups=tuple(row_groups))
        return self.model(ids_t.view(1, T), pos_t.view(1, T), None, access,
                          logits_slice=lidx_t.view(1, -1)).flatten(0, 1)

    def _forward_uniform(self, rows: list[Row], W: int) -> torch.Tensor:
        """Rows of one width: an (n, W) batch."""
        n = len(rows)
        key_len = max(p.key_len for _, p in rows)
        k_max = max(len(p.logit_positions) for _, p in rows)
        ids, pos, limits, writes, logit_idx = [], [], [], [], []
        for seq, plan in rows:
            ids += seq.tokens[plan.start:plan.end]
            pos += range(plan.start, plan.end)
            limits += row_limits(plan.start, plan.end, seq.block)
            writes += self.write_index(seq.pages, plan.start, plan.end)
            idx = [x - plan.start for x in plan.logit_positions]
            logit_idx += idx + [idx[-1]] * (k_max - len(idx))
        view = self._view(rows, key_len)
        mirror = self._mirror_for(rows, key_len) if view is None else None
        self.mirror = mirror
        if mirror is not None:  # the rows read their contiguous copy, which takes the writes too
            span = mirror.cap * self.page_size
            extra = [r * span + x for r, (_, plan) in enumerate(rows) for x in range(plan.start, plan.end)]
        else:
            extra = sum(self._padded_tables(rows, key_len), []) if view is None else None
        tensors = self._ship([ids, pos, limits, writes, logit_idx] + ([extra] if extra is not None else []))
        ids_t, pos_t, lim_t, writes_t, lidx_t = tensors[:5]
        mask = self.attention_mask(lim_t.view(n, W), key_len)
        if mirror is not None:
            access = CacheAccess(self.cache, None, writes_t.view(n, W), key_len, mirror=mirror,
                                 mirror_write=tensors[5].view(n, W))
        else:
            read = tensors[5].view(n, -1) if extra is not None else view
            access = CacheAccess(self.cache, read, writes_t.view(n, W), key_len)
        logits = self.model(ids_t.view(n, W), pos_t.view(n, W), mask, access,
                            logits_slice=lidx_t.view(n, k_max)).flatten(0, 1)
        if any(len(p.logit_positions) < k_max for _, p in rows):
            keep = [r * k_max + j for r, (_, p) in enumerate(rows) for j in range(len(p.logit_positions))]
            logits = logits[torch.tensor(keep, device=self.device)]
        return logits

    def _mirror_for(self, rows: list, key_len: int) -> BatchMirror | None:
        """The contiguous copy these rows read (kv_cache.BatchMirror), kept from the last
        uniform step when it is still exact for them, else taken now; None where the runner
        keeps none (off, or on a device that reads pages in place)."""
        if not self.use_mirror:
            return None
        key = tuple(s.id for s, _ in rows)
        pages = [s.pages for s, _ in rows]
        needed = self.pages_for(key_len)
        m = self.mirror
        if m is not None and m.serves(key, pages, needed):
            return m
        self.mirror = None
        cap = needed + MIRROR_HEADROOM_PAGES
        c = self.cache
        size = c.k.shape[0] * len(rows) * cap * c.k[0, 0].numel()
        if self._mirror_store[0].numel() < size:  # grown by half again, so it is rarely regrown
            self._mirror_store = tuple(torch.empty(size * 3 // 2, dtype=c.k.dtype, device=c.k.device)
                                       for _ in range(2))
        return BatchMirror(c, key, [p[:cap] for p in pages], cap, self._mirror_store)

    def _view(self, rows: list, key_len: int) -> slice | None:
        """One row whose pages below `key_len` are consecutive: those pages as a slice (the read
        is a view); None otherwise."""
        if len(rows) != 1:
            return None
        width = self.pages_for(key_len)
        pages = rows[0][0].pages[:width]
        return slice(pages[0], pages[0] + width) if len(pages) == width and _consecutive(pages) else None

    def _tables(self, rows: list, key_len: int) -> slice | list[list[int]]:
        """What the rows read for `key_len` keys: `_view`'s slice when there is one, else each
        row's table padded to the same width (the read gathers)."""
        view = self._view(rows, key_len)
        return view if view is not None else self._padded_tables(rows, key_len)

    def _padded_tables(self, rows: list, key_len: int) -> list[list[int]]:
        width = self.pages_for(key_len)
        return [self.table(s.pages, p.key_len, width) for s, p in rows]

    def _ship(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Host lists -> device tensors, as one tensor and one copy."""
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        return list(flat.to(self.device, non_blocking=True).split([len(x) for x in parts]))

    def _suppress_mask(self, logits: torch.Tensor, rows: list[Row], spans) -> None:
        """A drawn token is never [MASK] (rows whose `suppress_mask` is set: diffusion rows)."""
        if self.mask_token_id is None:
            return
        diffusion = [s.suppress_mask for s, _ in rows]
        if all(diffusion):
            logits[:, self.mask_token_id] = float("-inf")
        else:
            for (a, b), d in zip(spans, diffusion):
                if d:
                    logits[a:b, self.mask_token_id] = float("-inf")


def _consecutive(pages: list[int]) -> bool:
    return pages == list(range(pages[0], pages[0] + len(pages)))
