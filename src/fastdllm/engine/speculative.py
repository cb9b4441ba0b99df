"""The speculative engine: block-diffusion drafts verified by a causal target, so every
sequence gets exactly the target's output (greedy: token for token; sampling: in distribution)
at several tokens per target forward.

Two models, two KV caches: the draft (a Fast-dLLM v2 block-diffusion model) keeps its
block-level cache of whole known blocks; the target keeps its causal cache. With one model
(`draft is target`, self-speculative) the same weights draft with block-diffusion attention and
verify with causal attention, each attention with its own cache. A `step()` runs one cycle for
every running sequence: the draft forwards (one, or `draft_steps` with refinement), then one
target forward that verifies them (speculation.py has the per-sequence state machine). Each
model's forwards go through its own `ModelRunner` (runner.py), as the plain engine's do: a static
step (a CUDA graph on the GPU) when the rows fit one of its widths (verify_widths, draft_widths),
else rows of different widths share one forward, packed without padding. Acceptance is decided on
the device for the whole batch, and each forward reads back once (verification.py).

Same interface as `Engine` (add, abort, step -> `Step`, stream, room, running, stats, cache,
max_len), so the one driver loop (`LLM.stream`, the server's scheduler) drives either one. Requests in mode "ar" run here as
cycles without a draft (the server's per-request opt-out).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
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
from .static_step import buckets
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


def verify_widths(block: int) -> tuple[int, ...]:
    """Static-step widths of the target's forwards: after the prompt a verify forward is k + 1
    wide (the last accepted token and k drafts): k = 0 (mode "ar", the last token), then k + 1
    for k = 4, 8, 16 .. the block (the default draft length 8 runs unpadded; shorter drafts near
    a block's end pad up to the next)."""
    return (1, *(1 + b for b in buckets(block, first=4)))


def draft_widths(block: int) -> tuple[int, ...]:
    """Static-step widths of the draft's forwards: the tokens accepted since its last forward
    and k [MASK]s (at most 2 draft_length + 1), a whole block ("block" cache, or the first
    forward in a block), or a block and what was accepted before it: powers of two from 8 up to
    two blocks. Few widths: every width is a graph per batch and key bucket to capture."""
    return tuple(buckets(2 * block, first=min(8, 2 * block)))


class SpeculativeEngine:
    def __init__(self, target: Transformer, draft: Transformer, *, max_slots: int, max_len: int,
                 num_pages: int, page_size: int, mask_token_id: int | None,
                 stop_token_ids: tuple[int, ...], runner: RunnerConfig | None = None):
        """Each model's KV cache is a pool of `num_pages` pages of `page_size` positions. A
        sequence takes all the pages it can need when it starts (its whole prompt +
        max_new_tokens, and the merged form's scratch groups), so a cycle never runs short and
        nothing is ever preempted; a sequence the pools cannot hold yet waits in the engine.
        No prefix caching here (docs/design.md, "Paged KV cache"). `runner`: how the two models'
        forwards run (static steps, CUDA graphs), as the plain engine's; each model gets the
        widths its forwards take (verify_widths, draft_widths; a forward no width holds, such
        as the first cycle's prompt, runs eagerly)."""
        check_pair(target, draft, mask_token_id)
        p = next(target.parameters())
        self.target, self.draft = target, draft
        self.device, self.dtype = p.device, p.dtype
        self.mask_token_id = mask_token_id
        self.stop_token_ids = stop_token_ids
        self._max_len = max_len
        self.max_slots = max_slots
        self.page_size = page_size
        runner = runner or RunnerConfig()
        # the two runners share the warm-up cap: it bounds the engine's start, not each model's
        half = runner.warmup_seconds / 2
        # + the merged form's draft groups: their rope positions stay below max_len + K + 1;
        # a verify forward draws every place, a draft forward at most a block's drafts
        self.target_runner = ModelRunner(
            target, num_pages=num_pages, page_size=page_size, max_len=max_len + MAX_MERGED_DRAFT + 1,
            max_slots=max_slots, mask_token_id=None, picks=page_size + 1,
            config=replace(runner, widths=verify_widths(page_size), warmup_seconds=half))
        self.draft_runner = ModelRunner(
            draft, num_pages=num_pages, page_size=page_size, max_len=max_len, max_slots=max_slots,
            mask_token_id=mask_token_id, picks=page_size,
            config=replace(runner, widths=draft_widths(page_size), warmup_seconds=half))
        self.cache, self.draft_cache = self.target_runner.cache, self.draft_runner.cache
        self.target_pages = BlockManager(num_pages, page_size, prefix_caching=False)
        self.draft_pages = BlockManager(num_pages, page_size, prefix_caching=False)
        self.running: list[Speculation] = []
        self.stats = EngineStats()
        self._ids = itertools.count()

    def warm_up(self, log=None) -> None:
        """Capture/compile both models' static steps now (CUDA graphs on the GPU), within the
        time cap, as `Engine.warm_up`."""
        self.target_runner.warm_up(log)
        self.draft_runner.warm_up(log)

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
        """The target's pool (this engine shares no prefixes and never preempts), and the
        draft pool's pages in use."""
        return {**self.target_pages.usage(), "draft_pages_used": self.draft_pages.used}

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
        self._batch([s for s in active if s.params.merged], self._merged_forward, merged_apply)
        plain = [s for s in active if not s.params.merged]
        while drafting := [s for s in plain if s.stage is Stage.DRAFT and s.error is None]:
            self._batch(drafting, self._draft_forward, _draft_apply)
        self._batch([s for s in plain if s.error is None], self._verify_forward, _verify_apply)
        for seq in [s for s in self.running if s.finished]:
            self.abort(seq)
        return record.finish()

    def _batch(self, seqs: list[Speculation], forward, apply) -> None:
        """One forward for `seqs` (`forward(seqs)`: one output per sequence, decided for the
        whole batch on the device and read back once), then each sequence's own part
        (`apply(seq, output)`). A forward that raises is retried row by row (rerunning a chunk
        rewrites the same cache positions, so a retry is safe); a row that fails alone, or whose
        own part raises, is failed."""
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

    # ------------------------------------------------------------------ the two forwards
    # Each forward runs as a static step when its rows fit one (runner.forward_greedy), decides
    # on the device for the whole batch, and reads back once: the drafted tokens, or every
    # row's (accepted, next token).
    def _merged_forward(self, seqs: list[Speculation]) -> list[tuple]:
        self.stats.forward_calls += 1
        return merged_forward(self.target, self.cache, self.page_size, self.mask_token_id, seqs)

    def _draft_forward(self, seqs: list[Speculation]) -> list[tuple]:
        """Per sequence: (its drafted tokens, their distributions when sampling, its width)."""
        chunks = [s.draft_chunk() for s in seqs]
        greedy, logits = self.draft_runner.forward_greedy(  # [MASK] suppressed: a draft never is
            [(_Row(s.tokens, s.block, s.draft_table, True), c) for s, c in zip(seqs, chunks)],
            logits=not all(s.params.greedy for s in seqs))  # only sampled rows read them
        self.stats.forward_calls += 1
        spans = _spans(chunks)
        qs = [None if s.params.greedy else _distribution(logits[a:b], s.params)
              for s, (a, b) in zip(seqs, spans)]
        if any(q is not None for q in qs):
            greedy = torch.cat([greedy[a:b] if q is None else
                                torch.multinomial(q, 1, generator=s.generator)[:, 0]
                                for s, q, (a, b) in zip(seqs, qs, spans)])
        drafted = greedy.tolist()  # the one transfer of this forward
        return [(drafted[a:b], q, chunk.end - chunk.start)
                for chunk, q, (a, b) in zip(chunks, qs, spans)]

    def _verify_forward(self, seqs: list[Speculation]) -> list[tuple[int, int]]:
        """Per sequence: (drafts accepted, the token after them)."""
        chunks = [s.verify_chunk() for s in seqs]
        target, logits = self.target_runner.forward_greedy(
            [(_Row(s.tokens, 1, s.target_table, False), c) for s, c in zip(seqs, chunks)],
            logits=not all(s.params.greedy for s in seqs))  # only sampled rows read them
        self.stats.forward_calls += 1
        spans = _spans(chunks)  # row i: k_i + 1 places
        accepted, nxt = self._accept_greedy(seqs, spans, target)
        if not all(s.params.greedy for s in seqs):
            rows = [(accepted[i], nxt[i]) if s.params.greedy else
                    accept_sampled(torch.tensor(s.tokens[s.length:s.length + s.k], device=logits.device),
                                   s.q, _distribution(logits[a:b], s.params), s.generator)
                    for i, (s, (a, b)) in enumerate(zip(seqs, spans))]
            accepted, nxt = (torch.stack(x) for x in zip(*rows))
        outcome = torch.stack([accepted, nxt]).tolist()  # the one transfer of this forward
        return list(zip(*outcome))

    def _accept_greedy(self, seqs: list[Speculation], spans: list[tuple[int, int]],
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's greedy outcome in one pass (sampled rows get one too, unused): the
        drafts and the places of the target's tokens, padded to the longest draft, go to the
        device in one copy."""
        k = max(s.k for s in seqs)
        drafts, places, lengths = [], [], []
        for s, (a, _) in zip(seqs, spans):
            drafts += s.tokens[s.length:s.length + s.k] + [0] * (k - s.k)
            places += [a + min(j, s.k) for j in range(k + 1)]
            lengths.append(s.k)
        flat = torch.tensor(drafts + places + lengths, dtype=torch.long).to(target.device, non_blocking=True)
        n = len(seqs)
        drafts_t, places_t, lengths_t = flat.split([n * k, n * (k + 1), n])
        return accept_greedy(drafts_t.view(n, k), target[places_t].view(n, k + 1), lengths_t)


def _draft_apply(seq: Speculation, out: tuple) -> None:
    seq.apply_draft(*out)


def _verify_apply(seq: Speculation, out: tuple[int, int]) -> None:
    seq.apply_verify(*out)


def _spans(chunks: list[Chunk]) -> list[tuple[int, int]]:
    """Each row's range of a forward's logit positions."""
    spans, a = [], 0
    for c in chunks:
        spans.append((a, a + len(c.logit_positions)))
        a = spans[-1][1]
    return spans


class _Row(NamedTuple):
    """What the runner reads of a row: the sequence's tokens, the attention's block size for
    this forward (1: causal, the target's verification), the page table of that model's cache,
    and whether [MASK] is suppressed in its logits."""

    tokens: list[int]
    block: int
    pages: list[int]
    suppress_mask: bool  # drawn tokens are never [MASK] (the draft's forwards)
