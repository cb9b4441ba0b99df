"""One request being decoded: its tokens, its place in the Fast-dLLM v2 state machine, its
statistics and (on request) its step trace.

The state machine (paper §3.3, official `generate()` semantics), one transition per forward:

    PREFILL  -- forward the prompt's whole blocks (block-causal) into the block cache;
                if the prompt fills its last block, the last logit draws the first new token
    REFINE   -- the active block = committed tokens' successor, filled with [MASK] up to B;
                for each sub-block of size S: forward (the full block, or only the sub-block
                against the block-local cache) and unmask every masked position of the
                sub-block whose confidence exceeds the threshold, plus the most confident one
                (the official rule; `DecodeConfig.rule` picks another, selection.py)
    COMMIT   -- the block has no mask left: one forward writes its exact KV into the block
                cache and its last logit draws the first token of the next block
    FINISHED -- a stop token with no mask before it, or max_new_tokens reached

AR mode uses the same machine with PREFILL (causal) and AR_STEP (one token per forward).
Committed KV is never recomputed; `block_cache=False` is the reference that recomputes the
whole sequence on every forward instead.

All control state (tokens, masked positions, lengths, stop detection) lives on the host as
Python lists: planning and advancing never touch the device, so a step's only device-to-host
transfer is the engine's (drawn tokens and confidences of the whole batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..rounding import round_down
from .params import DecodeConfig
from .selection import as_float32, select_by_rule


class Phase(Enum):
    PREFILL = "prefill"
    REFINE = "refine"
    COMMIT = "commit"
    AR_STEP = "ar_step"
    FINISHED = "finished"


class PlanKind(Enum):
    """Which forward a plan asks for; its value is what the step trace records."""

    PREFILL = "prefill"  # the prompt's whole blocks into the block cache
    FULL_BLOCK = "full_block"  # the active block (or, without block cache, the whole sequence)
    SUB_BLOCK = "sub_block"  # only the active sub-block, against the block-local cache
    COMMIT = "commit"  # the finished block's exact KV into the block cache
    AR_STEP = "ar_step"  # one AR token
    RECOMPUTE = "recompute"  # after preemption: the committed positions' KV, written again


@dataclass(frozen=True)
class ForwardPlan:
    """What one sequence needs from the next model forward: the tokens at absolute positions
    [start, end), how far into the cache its queries may look (`key_len`), and the absolute
    positions whose output logits it will read."""

    kind: PlanKind
    start: int
    end: int
    key_len: int
    logit_positions: tuple[int, ...]


def speed_fields(forward_calls: int, new_tokens: int, seconds: float) -> dict:
    """The speed figures every request reports (plain and speculative decoding alike)."""
    return {
        "forward_calls": forward_calls,
        "new_tokens": new_tokens,
        "tokens_per_forward": round(new_tokens / forward_calls, 4) if forward_calls else 0.0,
        "seconds": round(seconds, 6),
        "tokens_per_second": round(new_tokens / seconds, 3) if seconds else 0.0,
    }


@dataclass
class SequenceStats:
    forward_calls: int = 0
    new_tokens: int = 0
    steps: int = 0  # refinement forwards (diffusion) or decode forwards (AR)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    forwards_by_kind: dict[str, int] = field(default_factory=dict)  # prefill, full_block, ...

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_calls if self.forward_calls else 0.0

    def as_dict(self) -> dict:
        return {**speed_fields(self.forward_calls, self.new_tokens, self.seconds),
                "forwards_by_kind": dict(self.forwards_by_kind)}


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: DecodeConfig, *,
                 mask_token_id: int | None, stop_token_ids: tuple[int, ...], device: torch.device):
        self.id = seq_id
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.limit = self.prompt_len + params.max_new_tokens  # positions < limit may be generated
        self.block = params.block
        self.capacity = params.cache_len(self.prompt_len)
        self.mask_id = mask_token_id if mask_token_id is not None else 0
        self.stop_ids = frozenset(stop_token_ids)
        self.threshold = as_float32(params.threshold)
        self.tokens: list[int] = list(prompt_ids) + [self.mask_id] * (self.capacity - self.prompt_len)
        self.masked: list[bool] = [False] * self.capacity
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.phase = Phase.PREFILL
        self.committed = 0  # positions whose KV in the cache is exact
        self.length = self.prompt_len  # positions holding a token or a mask of the live block
        self.sub_block = 0
        self.block_fresh = False  # a full-block forward has filled the block-local cache
        self.end = None  # position after the last output token once finished
        self.finish_reason: str | None = None
        self.final_len = self.prompt_len  # tokens before this are final (safe to stream)
        self.stats = SequenceStats()
        self.trace: list[dict] | None = [] if params.trace else None
        self.pages: list[int] = []  # the page table: position p lives in pages[p // page_size]
        self.hashes: list[bytes] = []  # prefix-cache hash chain of its full committed pages
        self.cached = 0  # positions whose KV came from the prefix cache at admission
        self.resume_from: int | None = None  # preempted: KV below this is to be recomputed
        self.stash = None  # preempted mid-block: the block-local cache, restored on resumption
        # logprobs (params.logprobs not None): position -> the drawn token's confidence (its
        # probability under the distribution it was drawn from) and its k best alternatives;
        # `alternatives` is what the runner hands over for the current step's logit positions
        self.token_probs: dict[int, float] = {}
        self.token_alternatives: dict[int, list[tuple[int, float]]] = {}
        self.alternatives: list[list[tuple[int, float]]] | None = None
        # this step's drawn probabilities when the rule reads other confidences (logprobs only)
        self.drawn: list[float] | None = None
        self.error: Exception | None = None  # set by the engine when this sequence failed alone

    def begin(self) -> None:
        """A diffusion prompt shorter than one block has nothing to prefill (nor one whose
        prefill is all in the prefix cache and draws nothing): its tail starts the first
        decoding block directly."""
        if self.params.diffusion and self.committed == self.prefill_end() and not self._prefill_draws():
            self._enter_next_phase()

    # ------------------------------------------------------------------ planning
    def prefill_end(self) -> int:
        return round_down(self.prompt_len, self.block)  # AR (block 1): the whole prompt

    def shareable_prefix(self) -> int:
        """Prompt positions whose KV another sequence's prefill computed alike: the prefill's,
        less the last one when the prefill draws the first new token from its logit."""
        end = self.prefill_end()
        return end - 1 if self._prefill_draws() else end

    def _prefill_draws(self) -> bool:
        return not self.params.diffusion or self.prompt_len % self.block == 0

    def reuse_prefix(self, positions: int) -> None:
        """The KV of positions [0, positions) is already in this sequence's pages (a prefix
        cache hit): the prefill starts after it. Call before `begin`."""
        if positions > self.shareable_prefix():
            raise ValueError(f"a prefix of {positions} positions leaves nothing to prefill")
        self.committed = self.cached = positions

    def skipped_prefill_draw(self, vocab_size: int) -> None:
        """The whole prefill came from the prefix cache, so its forward never runs; but that
        forward draws a token (unused when the prompt does not fill its last block) and, when
        sampling, advances the sequence's generator: advance it alike (a draw of the same
        shape), so seeded output does not depend on what the cache held."""
        if self.generator is not None and not self.params.greedy and self.prefill_end() > 0:
            torch.multinomial(torch.ones(1, vocab_size, device=self.generator.device), 1,
                              generator=self.generator)

    def needed_positions(self) -> int:
        """Cache positions the next forward writes or reads (pages must cover them): its plan's
        key length (`_next_plan`), computed without building the plan (once per step per
        sequence, on the host), and after a preemption at least the committed positions."""
        if self.phase is Phase.PREFILL:
            n = self.prefill_end()
        elif self.phase is Phase.AR_STEP:
            n = self.length
        else:  # a block being refined or committed: its end
            n = self.committed + self.block
        return max(n, self.committed) if self.resume_from is not None else n

    def plan(self) -> ForwardPlan:
        if self.resume_from is not None:  # preempted: first the committed KV again
            a, b = self.resume_from, self.committed
            return ForwardPlan(PlanKind.RECOMPUTE, a, b, b, (b - 1,))
        return self._next_plan()

    def _next_plan(self) -> ForwardPlan:
        p = self.params
        if self.phase is Phase.PREFILL:
            end = self.prefill_end()
            return ForwardPlan(PlanKind.PREFILL, self.committed, end, end, (end - 1,))
        if self.phase is Phase.AR_STEP:
            pos = self.length - 1  # the last drawn token, whose KV is not cached yet
            start = pos if p.block_cache else 0
            return ForwardPlan(PlanKind.AR_STEP, start, pos + 1, pos + 1, (pos,))
        bs, be = self.committed, self.committed + self.block
        if self.phase is Phase.COMMIT:
            return ForwardPlan(PlanKind.COMMIT, bs if p.block_cache else 0, be, be, (be - 1,))
        a, b = self._active_range()
        shift = 1 if p.token_shift else 0
        # a block's first position is never masked when shifting (it holds the prompt tail or
        # the token drawn from the previous forward), so its logit, outside the chunk, is skipped
        logit_pos = tuple(i - shift for i in range(a, b) if i - shift >= bs)
        if not p.block_cache:
            return ForwardPlan(PlanKind.FULL_BLOCK, 0, be, be, logit_pos)
        first_masked = self.masked[a]
        if p.sub_block_cache and self.block_fresh and not first_masked:
            # only the sub-block is recomputed; the rest of the block is read (stale) from the
            # block-local cache. Position a is final here, so its own logit is never needed.
            logit_pos = tuple(x for x in logit_pos if x >= a)
            return ForwardPlan(PlanKind.SUB_BLOCK, a, b, be, logit_pos)
        return ForwardPlan(PlanKind.FULL_BLOCK, bs, be, be, logit_pos)

    def _active_range(self) -> tuple[int, int]:
        s = self.params.sub_block_size
        a = self.committed + self.sub_block * s
        return a, a + s

    # ------------------------------------------------------------------ transitions
    def advance(self, plan: ForwardPlan, tokens: list[int], conf: list[float],
                entropy: list[float] | None = None) -> None:
        """Apply one forward's drawn tokens and confidences (host lists of K), ordered like
        plan.logit_positions (each drawn token is for position logit_position + shift);
        `entropy` of the draws when the decoding rule spends it (selection.py)."""
        self.stats.forward_calls += 1
        kinds = self.stats.forwards_by_kind
        kinds[plan.kind.value] = kinds.get(plan.kind.value, 0) + 1
        if plan.kind is PlanKind.RECOMPUTE:
            self.resume_from = None  # the KV below `committed` is exact again; nothing is drawn
            return
        if plan.kind in (PlanKind.FULL_BLOCK, PlanKind.SUB_BLOCK):
            self._refine(plan, tokens, conf, entropy)
            return
        if plan.kind is PlanKind.AR_STEP:
            self.stats.steps += 1
        self._commit(plan, tokens, conf)

    def _commit(self, plan: ForwardPlan, tokens: list[int], conf: list[float]) -> None:
        """PREFILL, COMMIT and AR_STEP end alike: the KV below plan.end is now exact, and the
        forward's last logit draws the token after it (after a prefill only when the prompt
        fills its last block, which is always so in AR); then the next phase begins."""
        self.committed = plan.end
        if plan.kind is not PlanKind.PREFILL or self.prompt_len % self.block == 0:
            self._append_drawn(tokens[-1:], conf[-1:], plan.kind)
        if not self.finished:
            self._enter_next_phase()

    def _append_drawn(self, tokens, conf, kind: PlanKind) -> None:
        """A token drawn AR-style (after prefill/commit, or an AR step) at position `length`."""
        if not self.params.token_shift and self.params.diffusion:
            return  # without token shift the block's first position is decoded like the rest
        if self.length >= self.limit:
            self._finish("length")
            return
        pos = self.length
        self.tokens[pos] = tokens[0]
        self.length += 1
        self.stats.new_tokens += 1
        self._record(kind, [pos], tokens, conf)
        self._record_logprob(pos, conf[0], -1)
        if tokens[0] in self.stop_ids:
            self._finish("stop", end=pos + 1)
        else:
            self.final_len = self.length

    def _enter_next_phase(self) -> None:
        if not self.params.diffusion:
            if self.length >= self.limit:  # the prefill drew the only token asked for
                self._finish("length")
                return
            self.phase = Phase.AR_STEP
            return
        # a new block starts at `committed`: whatever is already there (prompt tail or the drawn
        # first token) stays, the rest becomes [MASK] up to the block end, never past `limit`.
        be = self.committed + self.block
        fill_from, fill_to = self.length, min(be, self.limit)
        if fill_from >= self.limit:
            self._finish("length")
            return
        self.masked[fill_from:fill_to] = [True] * (fill_to - fill_from)
        self.tokens[fill_from:be] = [self.mask_id] * (be - fill_from)
        self.length = be
        self.sub_block = 0
        self.block_fresh = False
        self.phase = Phase.REFINE
        self._skip_finished_sub_blocks()

    def _skip_finished_sub_blocks(self) -> None:
        n_sub = self.block // self.params.sub_block_size
        while self.sub_block < n_sub:
            a, b = self._active_range()
            if any(self.masked[a:b]):
                return
            self.sub_block += 1
        # every sub-block is decoded: commit (or stop if nothing after this block can be emitted)
        be = self.committed + self.block
        if be >= self.limit:
            self._finish("length")
        else:
            self.phase = Phase.COMMIT

    def _refine(self, plan: ForwardPlan, tokens: list[int], conf: list[float],
                entropy: list[float] | None) -> None:
        p = self.params
        self.stats.steps += 1
        if plan.kind is PlanKind.FULL_BLOCK:
            self.block_fresh = True
        shift = 1 if p.token_shift else 0
        targets = [x + shift for x in plan.logit_positions]
        chosen = select_by_rule(p.rule, conf, [self.masked[t] for t in targets], self.threshold, entropy)
        if not chosen:  # a bug, not bad input: fail loudly instead of looping forever
            raise RuntimeError(f"sequence {self.id}: a refinement step unmasked nothing "
                               f"(plan {plan}); please report this")
        for i in chosen:
            self.tokens[targets[i]] = tokens[i]
            self.masked[targets[i]] = False
            self._record_logprob(targets[i], conf[i], i)
        self.stats.new_tokens += len(chosen)
        if self.trace is not None:
            self._record(plan.kind, [targets[i] for i in chosen], [tokens[i] for i in chosen],
                         [conf[i] for i in chosen])
        self._check_stop_and_progress()
        if not self.finished:
            self._skip_finished_sub_blocks()

    def _check_stop_and_progress(self) -> None:
        """Advance `final_len` over the positions that became final (no mask before them); a
        stop token among them ends the sequence. Earlier final positions were checked before."""
        end = min(self.length, self.limit)
        pos = self.final_len
        while pos < end and not self.masked[pos]:
            if self.tokens[pos] in self.stop_ids:
                self._finish("stop", end=pos + 1)
                return
            pos += 1
        self.final_len = pos
        if self.final_len >= self.limit:
            self._finish("length")

    def _record_logprob(self, pos: int, conf: float, index: int) -> None:
        """Keep position `pos`'s draw (`index` into this step's logit positions) if asked to."""
        if self.params.logprobs is None:
            return
        self.token_probs[pos] = self.drawn[index] if self.drawn is not None else conf
        if self.alternatives is not None:
            self.token_alternatives[pos] = self.alternatives[index]

    def _finish(self, reason: str, end: int | None = None) -> None:
        self.phase = Phase.FINISHED
        self.finish_reason = reason
        self.end = end if end is not None else min(self.length, self.limit)
        self.final_len = self.end
        self.stats.new_tokens = self.end - self.prompt_len
        self.stats.seconds = time.perf_counter() - self.stats.started

    def _record(self, kind: PlanKind, positions: list[int], tokens, conf) -> None:
        if self.trace is None:
            return
        self.trace.append({
            "step": len(self.trace),
            "kind": kind.value,
            "positions": positions,
            "tokens": list(tokens),
            "confidences": [round(c, 6) for c in conf],
        })

    # ------------------------------------------------------------------ results
    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def suppress_mask(self) -> bool:
        """Whether a token drawn for this row may never be [MASK] (diffusion rows)."""
        return self.params.diffusion

    def output_ids(self) -> list[int]:
        end = self.end if self.end is not None else self.final_len
        return self.tokens[self.prompt_len:end]

    def final_ids(self) -> list[int]:
        """Generated tokens that can no longer change (for streaming)."""
        return self.tokens[self.prompt_len:self.final_len]
