"""The model runner: one engine step = one forward, one draw, one device-to-host transfer.

It owns the model, the KV cache and what a step needs prepared once (key positions, RoPE
tables, a scratch cache slot, static steps). `run(rows)` takes every running sequence's plan
and, whatever the mix of phases (prefill, full block, sub-block, commit, AR step):

1. builds the step's inputs on the host as Python lists and ships them in one tensor;
2. runs one forward: rows of equal width as an (n, W) batch; rows of different widths packed
   into one (1, T) chunk whose attention is laid out per row (`kv_cache.Packing`), so per-token
   work is spent on real tokens only (docs/design.md, "One forward per step", says why packing
   beat padding on the CPU);
3. draws every needed position's token and confidence;
4. brings tokens and confidences of the whole batch back in one transfer.

A *static step* (`static_step.py`) replaces 2-3 when the step fits a captured shape: CUDA
graphs on the GPU; on the CPU it runs eagerly (tests) or compiled when asked.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import CacheAccess, KVCache, Packing
from ..model.transformer import Transformer
from .params import RunnerConfig
from .sampling import draw
from .sequence import ForwardPlan, Sequence
from .static_step import StaticSteps

Row = tuple[Sequence, ForwardPlan]


def to_host(tokens: torch.Tensor, conf: torch.Tensor) -> tuple[list[int], list[float]]:
    """Tokens (R,) and float32 confidences (R,) -> host lists, in one transfer (both go as
    float64, which holds any token id and any float32 exactly)."""
    both = torch.stack((tokens.to(torch.float64), conf.to(torch.float64))).tolist()
    return [int(t) for t in both[0]], both[1]


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

    def run(self, rows: list[Row]) -> tuple[list[int], list[float], list[tuple[int, int]]]:
        """One forward for every row. Returns the drawn tokens and confidences (host lists) and
        each row's span of them, in plan.logit_positions order."""
        spans, start = [], 0
        for _, plan in rows:
            spans.append((start, start + len(plan.logit_positions)))
            start = spans[-1][1]
        if self.static is not None and self.static.fits(rows):
            tokens, conf = self.static.run(rows)
        else:
            logits = self._forward(rows)
            self._suppress_mask(logits, rows, spans)
            tokens, conf = draw(logits, spans, [s.params for s, _ in rows], [s.generator for s, _ in rows])
        toks, confs = to_host(tokens, conf)
        return toks, confs, spans

    def attention_mask(self, limits: torch.Tensor, key_len: int) -> torch.Tensor:
        """(n, 1, W, key_len) additive mask from per-query limits (n, W): key j is seen iff
        j < limit (the rule of engine/attention.py)."""
        return torch.where(self.keys[:key_len] < limits[:, :, None], self._see, self._hide)[:, None]

    # ------------------------------------------------------------------ the eager step
    def _forward(self, rows: list[Row]) -> torch.Tensor:
        """Logits (R, vocab) of every row's logit positions, concatenated in row order."""
        n = len(rows)
        widths = [p.end - p.start for _, p in rows]
        W = max(widths)
        uniform = all(w == W for w in widths)
        key_len = max(p.key_len for _, p in rows)
        slots = [s.slot for s, _ in rows]
        contiguous = slots == list(range(slots[0], slots[0] + n))
        ids, pos, limits, logit_idx, token_slots, gather, scatter = [], [], [], [], [], [], []
        offset = 0
        k_max = max(len(p.logit_positions) for _, p in rows)
        for r, ((seq, plan), w) in enumerate(zip(rows, widths)):
            block = seq.block
            ids += seq.tokens[plan.start:plan.end]
            row_pos = range(plan.start, plan.end)
            pos += row_pos
            # the attention rule (engine/attention.py): query p sees keys j < limit(p)
            row_limits = [(q // block + 1) * block for q in row_pos]
            limits += row_limits + [row_limits[-1]] * (W - w)  # spare query places: any row
            if uniform:
                idx = [x - plan.start for x in plan.logit_positions]
                logit_idx += idx + [idx[-1]] * (k_max - len(idx))
            else:
                logit_idx += [offset + x - plan.start for x in plan.logit_positions]
                token_slots += [seq.slot] * w
                gather += list(range(offset, offset + w)) + [offset] * (W - w)
                scatter += range(r * W, r * W + w)
            offset += w
        parts = [ids, pos, limits, logit_idx, token_slots, gather, scatter, [] if contiguous else slots]
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        ids_t, pos_t, lim_t, lidx_t, slots_t, gather_t, scatter_t, rows_t = \
            flat.to(self.device, non_blocking=True).split([len(x) for x in parts])
        mask = self.attention_mask(lim_t.view(n, W), key_len)
        read_rows = slice(slots[0], slots[0] + n) if contiguous else rows_t
        shape = (n, W) if uniform else (1, offset)
        packing = None if uniform else Packing(n, W, gather_t, scatter_t)
        access = CacheAccess(self.cache, read_rows, pos_t.view(shape), key_len,
                             token_slots=None if uniform else slots_t.view(shape), packing=packing)
        logits = self.model(ids_t.view(shape), pos_t.view(shape), mask, access,
                            logits_slice=lidx_t.view(n, k_max) if uniform else lidx_t.view(1, -1))
        logits = logits.flatten(0, 1)
        if uniform and any(len(p.logit_positions) < k_max for _, p in rows):
            keep = [r * k_max + j for r, (_, p) in enumerate(rows) for j in range(len(p.logit_positions))]
            logits = logits[torch.tensor(keep, device=self.device)]
        return logits

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
