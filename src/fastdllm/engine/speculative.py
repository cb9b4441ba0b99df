"""The speculative engine: block-diffusion drafts verified by a causal target, so every
sequence gets exactly the target's output (greedy: token for token; sampling: in distribution)
at several tokens per target forward.

Two models, two KV caches: the draft (a Fast-dLLM v2 block-diffusion model) keeps its
block-level cache of whole known blocks; the target keeps its causal cache. With one model
(`draft is target`, self-speculative) the same weights draft with block-diffusion attention and
verify with causal attention, each attention with its own cache. A `step()` runs one cycle for
every running sequence: the draft forwards (one, or `draft_steps` with refinement), then one
target forward that verifies them (speculation.py has the per-sequence state machine). Each
model's forwards go through its own `ModelRunner` (runner.py), as the plain engine's do: rows of
different widths share one forward, packed without padding, inputs shipped in one copy.

Same interface as `Engine` (add, abort, step -> `Step`, stream, room, running, stats, cache,
max_len), so the one driver loop (`LLM.stream`, the server's scheduler) drives either one. Requests in mode "ar" run here as
cycles without a draft (the server's per-request opt-out).
"""

from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import torch

from ..errors import FastDLLMError
from ..model.transformer import Transformer
from .block_manager import BlockManager
from .engine import EngineStats, Step, StepRecord, check_room
from .merged import MAX_MERGED_DRAFT, merged_apply, merged_forward, merged_room
from .params import DecodeConfig, RunnerConfig
from .runner import ModelRunner
from .speculation import Chunk, Speculation, Stage
from .speculation import draft_or_target_distribution as _distribution
from .verification import accept_greedy, accept_sampled


def check_pair(target: Transformer, draft: Transformer, mask_token_id: int | None) -> None:
    """The conditions under which the draft can propose tokens the target can verify."""
    t, d = target.config, draft.config
    if t.vocab_size != d.vocab_size:
        raise FastDLLMError(
            f"the draft model's vocabulary ({d.vocab_size} tokens) differs from the target's "
            f"({t.vocab_size}); speculative decoding needs both models on the same tokenizer",
            field="draft_model")
    if not t.token_shift:
        raise FastDLLMError(
            "the target predicts each position from its own output (token_shift false in its "
            "config.json), so it has no causal next-token mode to verify with; use a causal "
            "(AR) model or a model adapted with token shift as the target", field="model")
    if not d.token_shift:
        raise FastDLLMError(
            "the draft model was adapted without token shift; drafting reads the token at "
            "position i from the output at i - 1, so use a model adapted with token shift",
            field="draft_model")
    if mask_token_id is None:
        raise FastDLLMError(
            "the draft model has no mask token (no mask_token_id in config.json, no |<MASK>| "
            "in the tokenizer): it is not a block-diffusion model; pass a Fast-dLLM v2 model "
            "as the draft, or --mask-token-id", field="draft_model")


class SpeculativeEngine:
    def __init__(self, target: Transformer, draft: Transformer, *, max_slots: int, max_len: int,
                 num_pages: int, page_size: int, mask_token_id: int | None,
                 stop_token_ids: tuple[int, ...]):
        """Each model's KV cache is a pool of `num_pages` pages of `page_size` positions. A
        sequence takes all the pages it can need when it starts (its whole prompt +
        max_new_tokens, and the merged form's scratch groups), so a cycle never runs short and
        nothing is ever preempted; a sequence the pools cannot hold yet waits in the engine.
        No prefix caching here (docs/design.md, "Paged KV cache")."""
        check_pair(target, draft, mask_token_id)
        p = next(target.parameters())
        self.target, self.draft = target, draft
        self.device, self.dtype = p.device, p.dtype
        self.mask_token_id = mask_token_id
        self.stop_token_ids = stop_token_ids
        self._max_len = max_len
        self.max_slots = max_slots
        self.page_size = page_size
        eager = RunnerConfig(enforce_eager=True)
        # + the merged form's draft groups: their rope positions stay below max_len + K + 1
        self.target_runner = ModelRunner(target, num_pages=num_pages, page_size=page_size,
                                         max_len=max_len + MAX_MERGED_DRAFT + 1, max_slots=max_slots,
                                         mask_token_id=None, config=eager)
        self.draft_runner = ModelRunner(draft, num_pages=num_pages, page_size=page_size,
                                        max_len=max_len, max_slots=max_slots, mask_token_id=None,
                                        config=eager)
        self.cache, self.draft_cache = self.target_runner.cache, self.draft_runner.cache
        self.target_pages = BlockManager(num_pages, page_size, prefix_caching=False)
        self.draft_pages = BlockManager(num_pages, page_size, prefix_caching=False)
        self.running: list[Speculation] = []
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def max_len(self) -> int:
        return self._max_len

    def close(self) -> None:
        """Free both KV caches now (as `Engine.close`); the engine is unusable after."""
        self.running.clear()
        self.target_runner.close()
        self.draft_runner.close()
        self.cache = self.draft_cache = None

    @property
    def room(self) -> int:
        """Sequences that can be added now (free batch places while nobody waits for pages)."""
        if any(not s.target_table for s in self.running):
            return 0
        return self.max_slots - len(self.running)

    @property
    def waiting(self) -> int:
        """Admitted sequences waiting for KV pages."""
        return sum(1 for s in self.running if not s.target_table and not s.finished)

    def usage(self) -> dict:
        m = self.target_pages
        return {"pages_total": m.num_pages, "pages_used": m.used, "pages_free": m.available,
                "pages_cached": 0, "page_size": self.page_size,
                "usage": round(m.used / m.num_pages, 6), "prefix_caching": False,
                "prefix_queried_tokens": 0, "prefix_hit_tokens": 0, "preemptions": 0,
                "draft_pages_used": self.draft_pages.used}

    def stream(self) -> Iterator[Step]:
        """Step until no sequence is left running (sequences may join or leave between steps)."""
        while self.running:
            yield self.step()

    def add(self, prompt_ids: list[int], params: DecodeConfig, *,
            stop_token_ids: tuple[int, ...] | None = None) -> Speculation:
        if len(self.running) >= self.max_slots:
            raise FastDLLMError("the engine is full: every batch slot is in use")
        if params.diffusion:
            raise FastDLLMError("this engine decodes speculatively (the target's own output); "
                                "use mode speculative or ar", field="mode")
        if params.merged and self.draft is not self.target:
            raise FastDLLMError("the merged form verifies and drafts with the same weights in one "
                                "forward: it is self-speculative only (no separate draft model)",
                                field="merged")
        if params.merged and params.draft_length > MAX_MERGED_DRAFT:
            raise FastDLLMError(f"the merged form drafts at most {MAX_MERGED_DRAFT} tokens per "
                                f"cycle, got draft_length {params.draft_length}", field="draft_length")
        pool = (self.target_pages.num_pages - self._scratch_pages(params)) * self.page_size
        check_room(len(prompt_ids), params, self.max_len, pool)
        seq = Speculation(next(self._ids), prompt_ids, params, mask_token_id=self.mask_token_id,
                          stop_token_ids=self.stop_token_ids if stop_token_ids is None else stop_token_ids,
                          device=self.device)
        self.running.append(seq)
        return seq

    def _scratch_pages(self, params: DecodeConfig) -> int:
        return -(-merged_room(params.draft_length) // self.page_size) if params.merged else 0

    def _take_pages(self, seq: Speculation) -> bool:
        """All pages a sequence can need, in both pools, or none (it waits)."""
        p = self.page_size
        target = -(-seq.capacity // p) + self._scratch_pages(seq.params)
        draft = -(-seq.capacity // p) if seq.params.speculative and not seq.params.merged else 0
        if target > self.target_pages.available or draft > self.draft_pages.available:
            return False
        seq.target_table = self.target_pages.allocate(target)
        seq.draft_table = self.draft_pages.allocate(draft) or []
        seq.scratch = -(-seq.capacity // p) * p
        for runner, m in ((self.target_runner, self.target_pages), (self.draft_runner, self.draft_pages)):
            runner.cache.zero(m.take_fresh())
        return True

    def abort(self, seq: Speculation) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.target_pages.release(seq.target_table)
            self.draft_pages.release(seq.draft_table)
            seq.target_table, seq.draft_table = [], []

    @torch.inference_mode()
    def step(self) -> Step:
        """One draft + verify cycle for every running sequence; finished ones leave `running`.

        As in `Engine.step`, a failure that belongs to one sequence (starting its cycle, its
        chunk, drawing or accepting its tokens) ends that sequence alone: it leaves `running`
        with `seq.error` set, and its peers advance as if it had not been there. When a batched
        forward raises, its rows are retried one by one, so only the culprit fails."""
        seqs = list(self.running)
        record = StepRecord(seqs, self.stats)
        for seq in seqs:
            if not seq.target_table and not seq.finished and not self._take_pages(seq):
                break  # first come, first served
        active = []
        for seq in [s for s in seqs if not s.finished and s.target_table]:
            try:
                seq.begin_cycle()
                active.append(seq)
            except Exception as e:
                self._fail(seq, e)
        self._batch([s for s in active if s.params.merged], self._merged_forward, self._merged_apply)
        plain = [s for s in active if not s.params.merged]
        while drafting := [s for s in plain if s.stage is Stage.DRAFT and s.error is None]:
            self._batch(drafting, self._draft_forward, self._draft_apply)
        self._batch([s for s in plain if s.error is None], self._verify_forward, self._verify_apply)
        for seq in [s for s in self.running if s.finished]:
            self.abort(seq)
        return record.finish()

    def _batch(self, seqs: list[Speculation], forward, apply) -> None:
        """One forward for `seqs` (`forward(seqs)`: one output per sequence), then each
        sequence's own part (`apply(seq, output)`). A forward that raises is retried row by row
        (rerunning a chunk rewrites the same cache positions, so a retry is safe); a row that
        fails alone, or whose own part raises, is failed."""
        if not seqs:
            return
        try:
            groups = [(seqs, forward(seqs))]
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], e)
                return
            groups = []
            for seq in seqs:
                try:
                    groups.append(([seq], forward([seq])))
                except Exception as e:
                    self._fail(seq, e)
        for group, outputs in groups:
            for seq, out in zip(group, outputs):
                try:
                    apply(seq, out)
                except Exception as e:
                    self._fail(seq, e)

    def _fail(self, seq: Speculation, error: Exception) -> None:
        seq.error = error
        self.abort(seq)

    # ------------------------------------------------------------------ the forwards
    def _merged_forward(self, seqs: list[Speculation]) -> torch.Tensor:
        self.stats.forward_calls += 1
        return merged_forward(self.target, self.cache, self.page_size, seqs)

    def _merged_apply(self, seq: Speculation, logits: torch.Tensor) -> None:
        merged_apply(seq, logits, self.mask_token_id)

    def _draft_forward(self, seqs: list[Speculation]) -> list[tuple]:
        """Per sequence: (its logits, their argmax when the whole batch is greedy, its width)."""
        chunks = [s.draft_chunk() for s in seqs]
        self.stats.forward_calls += 1
        logits = self.draft_runner.forward_logits([(_Row(s.tokens, s.block, s.draft_table), c)
                                                   for s, c in zip(seqs, chunks)])
        logits[:, self.mask_token_id] = float("-inf")  # a draft is never [MASK]
        return [(lg, g, c.end - c.start) for (lg, g), c in zip(_split(logits, seqs, chunks), chunks)]

    def _draft_apply(self, seq: Speculation, out: tuple) -> None:
        logits, greedy, width = out
        if seq.params.greedy:
            seq.apply_draft(greedy if greedy is not None else logits.argmax(-1).tolist(), None, width)
        else:
            q = _distribution(logits, seq.params)
            seq.apply_draft(torch.multinomial(q, 1, generator=seq.generator)[:, 0].tolist(), q, width)

    def _verify_forward(self, seqs: list[Speculation]) -> list[tuple]:
        """Per sequence: (its k + 1 logits, their argmax when the whole batch is greedy)."""
        chunks = [s.verify_chunk() for s in seqs]
        self.stats.forward_calls += 1
        logits = self.target_runner.forward_logits([(_Row(s.tokens, 1, s.target_table), c)
                                                    for s, c in zip(seqs, chunks)])
        return _split(logits, seqs, chunks)

    def _verify_apply(self, seq: Speculation, out: tuple) -> None:
        logits, greedy = out
        draft = seq.tokens[seq.length:seq.length + seq.k]
        if seq.params.greedy:
            target = greedy if greedy is not None else logits.argmax(-1).tolist()
            seq.apply_verify(*accept_greedy(draft, target))
        else:
            p = _distribution(logits, seq.params)
            seq.apply_verify(*accept_sampled(torch.tensor(draft, device=p.device), seq.q, p,
                                             seq.generator))


def _split(logits: torch.Tensor, seqs: list[Speculation], chunks: list[Chunk]) -> list[tuple]:
    """A forward's packed logits (sum of logit positions, V) cut per sequence, with their argmax
    read in one device-to-host copy when every sequence is greedy."""
    greedy = logits.argmax(-1).tolist() if all(s.params.greedy for s in seqs) else None
    out, a = [], 0
    for chunk in chunks:
        b = a + len(chunk.logit_positions)
        out.append((logits[a:b], greedy[a:b] if greedy is not None else None))
        a = b
    return out


class _Row(NamedTuple):
    """What the runner reads of a row: the sequence's tokens, the attention's block size for
    this forward (1: causal, the target's verification) and the page table of that model's cache."""

    tokens: list[int]
    block: int
    pages: list[int]
