"""The engine: a set of running sequences, one paged KV cache, and a `step()` that advances every
sequence by one forward and says what it made final in each (`Step`, one `Delta` a sequence).
`stream()` is the one driver loop that every front end decodes through: `LLM.stream` (and with
it `generate`, `generate_batch` and the chat CLI) and the server's scheduler.

Each sequence plans its own next forward (see `sequence.py`); the model runner turns all plans
of a step, whatever their phases and widths, into exactly one forward, one draw and one
device-to-host transfer (see `runner.py`). Each row has its own positions, block size and page
table (`pages.py` hands pages out, shares cached prefixes and preempts when the pool runs
short), and a sequence's decisions depend only on its own logits, so its greedy output
does not depend on what else is in the batch. Sequences can be added between steps (they join
at their own prefill) and leave as soon as they finish, which is what the server's scheduler
builds on.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import FastDLLMError
from ..model.transformer import Transformer
from .params import DecodeConfig, RunnerConfig
from .block_manager import BlockManager
from .pages import Pages
from .runner import ModelRunner, Row
from .sequence import Sequence


@dataclass(frozen=True)
class Delta:
    """What one step made final in one sequence: its tokens at [start, end), none on most
    refinement steps (final tokens never change, so they can be read at any later time)."""

    seq: Sequence
    start: int
    end: int
    finished: bool  # the sequence finished at this step or before it

    @property
    def token_ids(self) -> list[int]:
        return self.seq.tokens[self.start:self.end]


@dataclass(frozen=True)
class Step:
    """One engine step: a Delta for every sequence that was running, in the order they joined,
    and the model forwards it took (one; one per row only when a batched forward failed)."""

    deltas: tuple[Delta, ...]
    forward_calls: int

    def __iter__(self) -> Iterator[Delta]:
        return iter(self.deltas)


@dataclass
class EngineStats:
    forward_calls: int = 0
    steps: int = 0
    seconds: float = 0.0


def check_room(prompt_len: int, params: DecodeConfig, max_len: int, pool_positions: int) -> None:
    """A request must fit the engine's positions (prompt + max_new_tokens, rounded as its
    decoding needs) and, alone, the whole KV pool; checked before a sequence allocates
    anything. Shared by both engines."""
    needed = params.cache_len(prompt_len)
    if needed > max_len:
        raise FastDLLMError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"needs {needed} positions but the engine holds {max_len}",
            field="max_new_tokens")
    if needed > pool_positions:
        raise FastDLLMError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) needs "
            f"{needed} KV-cache positions but the whole KV cache holds {pool_positions}; lower "
            "max_new_tokens or give the cache more memory (kv_cache_memory)",
            field="max_new_tokens")


class StepRecord:
    """What a step remembers of its sequences before it runs, to report afterwards what it made
    final (the Step) and to count it in the engine's stats; shared by both engines."""

    def __init__(self, seqs: list, stats: EngineStats):
        self.t0 = time.perf_counter()
        self.seqs, self.stats = seqs, stats
        self.final_before = [s.final_len for s in seqs]
        self.calls_before = stats.forward_calls

    def finish(self) -> Step:
        self.stats.steps += 1
        self.stats.seconds += time.perf_counter() - self.t0
        deltas = tuple(Delta(s, start, max(start, s.final_len), s.finished)
                       for s, start in zip(self.seqs, self.final_before))
        return Step(deltas, self.stats.forward_calls - self.calls_before)


class Engine:
    def __init__(self, model: Transformer, *, max_slots: int, max_len: int, num_pages: int,
                 page_size: int, mask_token_id: int | None, stop_token_ids: tuple[int, ...],
                 runner: RunnerConfig | None = None, prefix_caching: bool = True):
        """`max_slots` sequences at most; positions up to `max_len` per sequence; a KV pool of
        `num_pages` pages of `page_size` positions shared by all of them."""
        self.runner = ModelRunner(model, num_pages=num_pages, page_size=page_size, max_len=max_len,
                                  max_slots=max_slots, mask_token_id=mask_token_id,
                                  config=runner or RunnerConfig())
        # on the CPU, uniform steps read a contiguous copy of their rows' KV rather than gathering
        # pages in every layer (kv_cache.BatchMirror; docs/design.md, "Attention over page tables")
        self.runner.use_mirror = self.runner.device.type == "cpu"
        self.model = model
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.cache = self.runner.cache
        self.pages = Pages(self.runner, BlockManager(num_pages, page_size,
                                                     prefix_caching=prefix_caching))
        self.mask_token_id = mask_token_id
        self.stop_token_ids = stop_token_ids
        self.max_slots = max_slots
        self.running: list[Sequence] = []  # admitted and unfinished, in the order they joined
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def warm_up(self, log=None) -> None:
        """Capture/compile the static steps now (CUDA graphs on the GPU), within the time cap."""
        self.runner.warm_up(log)

    def close(self) -> None:
        """Free the graphs and the KV cache now, not when the garbage collector runs (the runner
        and its static steps refer to each other); the engine is unusable after."""
        self.running.clear()
        self.runner.close()
        self.cache = None

    @property
    def room(self) -> int:
        """Sequences that can be added now: free batch places while every admitted sequence
        holds its pages (a sequence waiting for pages is served before any new one)."""
        if self.pages.waiting(self.running):
            return 0
        return self.max_slots - len(self.running)

    @property
    def waiting(self) -> int:
        """Admitted sequences waiting for KV pages (new or preempted)."""
        return len(self.pages.waiting(self.running))

    def usage(self) -> dict:
        """The KV pool's pages (used, free, cached) and the prefix cache's counts."""
        return self.pages.usage()

    def add(self, prompt_ids: list[int], params: DecodeConfig, *,
            stop_token_ids: tuple[int, ...] | None = None) -> Sequence:
        """Admit a sequence. It takes its pages (reusing the longest cached prefix) before its
        first forward; while the pool has too few free pages it waits inside the engine."""
        if len(self.running) >= self.max_slots:
            raise FastDLLMError("the engine is full: every batch slot is in use")
        if params.speculative:
            raise FastDLLMError("speculative decoding needs the speculative engine "
                                "(fastdllm.engine.speculative); this engine decodes one model",
                                field="mode")
        if params.diffusion and self.mask_token_id is None:
            raise FastDLLMError(
                "diffusion decoding needs a mask token, and this checkpoint has none "
                "(no mask_token_id in config.json, no |<MASK>| in the tokenizer): give its id, "
                "decode autoregressively, or adapt the model with `fastdllm train`",
                field="mode", fixes=[("mask_token_id", None), ("mode", "ar")])
        check_room(len(prompt_ids), params, self.max_len, self.pages.positions)
        seq = Sequence(next(self._ids), prompt_ids, params, mask_token_id=self.mask_token_id,
                       stop_token_ids=self.stop_token_ids if stop_token_ids is None else stop_token_ids,
                       device=self.device)
        self.running.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.pages.release(seq)

    def stream(self) -> Iterator[Step]:
        """Step until no sequence is left running. Sequences may join (`add`) or leave
        (`abort`) between steps: `LLM.stream` adds its prompts first, the server's scheduler
        admits requests as slots free up."""
        while self.running:
            yield self.step()

    @torch.inference_mode()
    def step(self) -> Step:
        """One forward for every running sequence that holds its pages, whatever their phases;
        finished sequences leave `running`.

        Before the forward, every sequence takes the pages its forward needs; when the pool runs
        short, the most recently admitted sequence is preempted (its pages given back, its KV
        recomputed when it resumes) and waiting sequences resume or start as pages free up
        (`Pages.schedule`).

        A failure that belongs to one sequence (planning it, sampling its row, advancing it)
        ends that sequence alone: it leaves `running` with `seq.error` set (its Delta says so),
        and the sequences batched with it advance as if it had not been there. When the batched
        forward raises, its rows are retried one by one, so only the culprit fails (a step is
        then one forward per row: only after a failure)."""
        seqs = list(self.running)
        record = StepRecord(seqs, self.stats)
        rows: list[Row] = []
        for seq in self.pages.schedule(self.running, self._fail):
            if not seq.finished:
                try:
                    rows.append((seq, seq.plan()))
                except Exception as e:
                    self._fail(seq, e)
        for group, (tokens, conf, entropy, spans) in self._draw(rows):
            for (seq, plan), (a, b) in zip(group, spans):
                try:
                    seq.advance(plan, tokens[a:b], conf[a:b],
                                none_or(entropy, a, b))
                except Exception as e:
                    self._fail(seq, e)
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self.pages.release(seq)
        for seq in self.running:
            self.pages.share(seq)
        return record.finish()

    def _draw(self, rows: list[Row]) -> list:
        """[(rows, (tokens, conf, entropy, spans))]: the step's one forward and draw, or, when it raises,
        each row's own (rerunning a plan rewrites the same cache positions, so a retry is safe);
        a row that fails alone is failed."""
        if not rows:
            return []
        try:
            return [(rows, self._run(rows))]
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0][0], e)
                return []
        out = []
        for row in rows:
            try:
                out.append(([row], self._run([row])))
            except Exception as e:
                self._fail(row[0], e)
        return out

    def _run(self, rows: list[Row]):
        self.stats.forward_calls += 1
        return self.runner.run(rows)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.error = error
        self.abort(seq)


def none_or(values: list | None, a: int, b: int) -> list | None:
    return None if values is None else values[a:b]
