"""The model runner: one engine step = one forward, one draw, one device-to-host transfer.

It owns the model, the KV cache and what a step needs prepared once (key positions, RoPE
tables, a scratch cache slot, static steps). `run(rows)` takes every running sequence's plan
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

from ..model.kv_cache import CacheAccess, KVCache, RowGroup
from ..model.transformer import Transformer
from . import logit_processing
from .attention import row_limits
from .params import RunnerConfig
from .sampling import draw, draw_entropy
from .selection import needs_entropy
from .sequence import ForwardPlan, Sequence
from .static_step import StaticSteps

Row = tuple[Sequence, ForwardPlan]


def to_host(tokens: torch.Tensor, conf: torch.Tensor, entropy: torch.Tensor | None = None
            ) -> tuple[list[int], list[float], list[float] | None]:
    """Tokens (R,), float32 confidences (R,) and, when given, float32 entropies (R,) -> host
    lists, in one transfer (all go as float64, which holds any token id and any float32 exactly)."""
    parts = (tokens, conf) if entropy is None else (tokens, conf, entropy)
    rows = torch.stack([x.to(torch.float64) for x in parts]).tolist()
    return [int(t) for t in rows[0]], rows[1], rows[2] if entropy is not None else None


class ModelRunner:
    def __init__(self, model: Transformer, *, max_slots: int, max_len: int, mask_token_id: int | None,
                 config: RunnerConfig):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = p.device, p.dtype
        self.mask_token_id = mask_token_id
        self.max_slots = max_slots
        # one scratch slot after the sequences' slots: padded places of a static step write
        # their KV there, so they never touch a sequence's cache
        self.cache = KVCache(cfg.num_layers, max_slots, max_len, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype, self.device, scratch_slots=1)
        self.scratch_slot = max_slots
        self.keys = torch.arange(max_len, device=self.device)  # key positions, for every mask
        # the mask goes to attention additive (0 / -inf in the model dtype), built once per step
        # for all layers: a boolean mask would be converted inside attention, once per layer
        self._see = torch.zeros((), dtype=self.dtype, device=self.device)
        self._hide = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        model.rope_tables(max_len)
        self.static = StaticSteps.for_runner(self) if StaticSteps.enabled(config, self.device) else None

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def warm_up(self, log=None) -> None:
        if self.static is not None:
            self.static.warm_up(log)

    def run(self, rows: list[Row]) -> tuple[list[int], list[float], list[float] | None,
                                            list[tuple[int, int]]]:
        """One forward for every row. Returns the drawn tokens, confidences and entropies (host
        lists; entropies only when a row's rule spends them, else None) and each row's span of
        them, in plan.logit_positions order."""
        spans, start = [], 0
        for _, plan in rows:
            spans.append((start, start + len(plan.logit_positions)))
            start = spans[-1][1]
        settings = [s.params for s, _ in rows]
        # static steps capture tokens and confidences only: a step that needs entropies is eager
        entropy_needed = any(p.diffusion and needs_entropy(p.rule) for p in settings)
        entropy = None
        eager = entropy_needed or logit_processing.needs_eager(rows)
        if self.static is not None and not eager and self.static.fits(rows):
            tokens, conf = self.static.run(rows)
        else:
            logits = self.forward_logits(rows)
            self._suppress_mask(logits, rows, spans)
            if eager:  # logit_bias, penalties, logprobs (logit_processing.py)
                logit_processing.process(logits, rows, spans)
                logit_processing.record_alternatives(logits, rows, spans)
            tokens, conf = draw(logits, spans, settings, [s.generator for s, _ in rows])
            if entropy_needed:
                entropy = draw_entropy(logits, spans, settings)
        toks, confs, ents = to_host(tokens, conf, entropy)
        return toks, confs, ents, spans

    def attention_mask(self, limits: torch.Tensor, key_len: int) -> torch.Tensor:
        """(n, 1, W, key_len) additive mask from per-query limits (n, W): key j is seen iff
        j < limit (the rule of engine/attention.py, `row_limits`)."""
        return torch.where(self.keys[:key_len] < limits[:, :, None], self._see, self._hide)[:, None]

    # ------------------------------------------------------------------ the eager step
    def forward_logits(self, rows: list[Row]) -> torch.Tensor:
        """Logits (R, vocab) of every row's logit positions, concatenated in row order. A row
        is anything with `tokens` (host list), `block` (1 = causal) and `slot`, with a plan
        that has start, end, key_len and logit_positions (the speculative engine's rows too)."""
        widths = [p.end - p.start for _, p in rows]
        if all(w == widths[0] for w in widths):
            return self._forward_uniform(rows, widths[0])
        # packed: rows ordered by width, so each width's rows are one contiguous range of tokens
        order = sorted(range(len(rows)), key=lambda r: widths[r])
        ids, pos, limits, token_slots, offsets = [], [], [], [], [0] * len(rows)
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
            token_slots += [seq.slot] * widths[r]
        logit_idx = [offsets[r] + x - plan.start for r, (_, plan) in enumerate(rows) for x in plan.logit_positions]
        group_slots = [[rows[r][0].slot for r in g] for g in groups]
        gather = [sl for sl in group_slots if not _contiguous(sl)]
        parts = [ids, pos, limits, token_slots, logit_idx, *gather]
        tensors = self._ship(parts)
        ids_t, pos_t, lim_t, slots_t, lidx_t = tensors[:5]
        gathered = iter(tensors[5:])
        row_groups = []
        for g, sl in zip(groups, group_slots):
            n, W = len(g), widths[g[0]]
            start = offsets[g[0]]
            key_len = max(rows[r][1].key_len for r in g)
            read = slice(sl[0], sl[0] + n) if _contiguous(sl) else next(gathered)
            mask = self.attention_mask(lim_t[start:start + n * W].view(n, W), key_len)
            row_groups.append(RowGroup(start, n, W, read, key_len, mask))
        T = len(ids)
        access = CacheAccess(self.cache, None, pos_t.view(1, T), 0, token_slots=slots_t.view(1, T),
                             groups=tuple(row_groups))
        return self.model(ids_t.view(1, T), pos_t.view(1, T), None, access,
                          logits_slice=lidx_t.view(1, -1)).flatten(0, 1)

    def _forward_uniform(self, rows: list[Row], W: int) -> torch.Tensor:
        """Rows of one width: an (n, W) batch."""
        n = len(rows)
        key_len = max(p.key_len for _, p in rows)
        slots = [s.slot for s, _ in rows]
        k_max = max(len(p.logit_positions) for _, p in rows)
        ids, pos, limits, logit_idx = [], [], [], []
        for seq, plan in rows:
            ids += seq.tokens[plan.start:plan.end]
            pos += range(plan.start, plan.end)
            limits += row_limits(plan.start, plan.end, seq.block)
            idx = [x - plan.start for x in plan.logit_positions]
            logit_idx += idx + [idx[-1]] * (k_max - len(idx))
        contiguous = _contiguous(slots)
        tensors = self._ship([ids, pos, limits, logit_idx] + ([] if contiguous else [slots]))
        ids_t, pos_t, lim_t, lidx_t = tensors[:4]
        read = slice(slots[0], slots[0] + n) if contiguous else tensors[4]
        mask = self.attention_mask(lim_t.view(n, W), key_len)
        access = CacheAccess(self.cache, read, pos_t.view(n, W), key_len)
        logits = self.model(ids_t.view(n, W), pos_t.view(n, W), mask, access,
                            logits_slice=lidx_t.view(n, k_max)).flatten(0, 1)
        if any(len(p.logit_positions) < k_max for _, p in rows):
            keep = [r * k_max + j for r, (_, p) in enumerate(rows) for j in range(len(p.logit_positions))]
            logits = logits[torch.tensor(keep, device=self.device)]
        return logits

    def _ship(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Host lists -> device tensors, as one tensor and one copy."""
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        return list(flat.to(self.device, non_blocking=True).split([len(x) for x in parts]))

    def _suppress_mask(self, logits: torch.Tensor, rows: list[Row], spans) -> None:
        """A drawn token is never [MASK] (diffusion rows only)."""
        if self.mask_token_id is None:
            return
        diffusion = [s.params.diffusion for s, _ in rows]
        if all(diffusion):
            logits[:, self.mask_token_id] = float("-inf")
        else:
            for (a, b), d in zip(spans, diffusion):
                if d:
                    logits[a:b, self.mask_token_id] = float("-inf")


def _contiguous(slots: list[int]) -> bool:
    return slots == list(range(slots[0], slots[0] + len(slots)))
