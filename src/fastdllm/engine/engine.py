"""The engine: a set of running sequences, one KV cache, and a `step()` that advances every
sequence by one forward and says what it made final in each (`Step`, one `Delta` a sequence).
`stream()` is the one driver loop that every front end decodes through: `LLM.stream` (and with
it `generate`, `generate_batch` and the chat CLI) and the server's scheduler.

Each sequence plans its own next forward (see `sequence.py`); plans of the same width are
batched into one model call, each row at its own positions, with its own block size and its
own slot of the cache. A sequence's decisions depend only on its own logits, so its greedy
output does not depend on what else is in the batch. Sequences can be added between steps
(they join at their own prefill) and leave as soon as they finish, which is what the server's
scheduler builds on.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import FastDLLMError
from ..model.kv_cache import CacheAccess, KVCache
from ..model.transformer import Transformer
from .attention import attention_limits, limit_mask
from .params import DecodeConfig
from .sampling import draw_entropy, sample_batch
from .selection import needs_entropy
from .sequence import ForwardPlan, Sequence


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
        return self.seq.tokens[self.start:self.end].tolist()


@dataclass(frozen=True)
class Step:
    """One engine step: a Delta for every sequence that was running, in the order they joined,
    and the model forwards it took (one per group of plans of equal width)."""

    deltas: tuple[Delta, ...]
    forward_calls: int

    def __iter__(self) -> Iterator[Delta]:
        return iter(self.deltas)


@dataclass
class EngineStats:
    forward_calls: int = 0
    steps: int = 0
    seconds: float = 0.0


class Engine:
    def __init__(self, model: Transformer, *, max_slots: int, max_len: int,
                 mask_token_id: int | None, stop_token_ids: tuple[int, ...]):
        cfg = model.config
        p = next(model.parameters())
        self.model = model
        self.device, self.dtype = p.device, p.dtype
        self.mask_token_id = mask_token_id
        self.stop_token_ids = stop_token_ids
        self.cache = KVCache(cfg.num_layers, max_slots, max_len, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype, self.device)
        self._free_slots = list(range(max_slots))
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def room(self) -> int:
        """Sequences that can be added now (free slots)."""
        return len(self._free_slots)

    def add(self, prompt_ids: list[int], params: DecodeConfig, *,
            stop_token_ids: tuple[int, ...] | None = None) -> Sequence:
        if not self._free_slots:
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
        needed = params.cache_len(len(prompt_ids))
        if needed > self.max_len:  # checked before the sequence allocates its buffers
            raise FastDLLMError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"needs {needed} positions but the engine holds {self.max_len}",
                field="max_new_tokens")
        seq = Sequence(next(self._ids), prompt_ids, params, mask_token_id=self.mask_token_id,
                       stop_token_ids=self.stop_token_ids if stop_token_ids is None else stop_token_ids,
                       device=self.device)
        seq.slot = self._free_slots.pop(0)
        try:
            seq.begin()
        except BaseException:
            self._release(seq)  # a sequence that never started gives its slot back
            raise
        self.running.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self._free_slots.append(seq.slot)
        self._free_slots.sort()

    def stream(self) -> Iterator[Step]:
        """Step until no sequence is left running. Sequences may join (`add`) or leave
        (`abort`) between steps: `LLM.stream` adds its prompts first, the server's scheduler
        admits requests as slots free up."""
        while self.running:
            yield self.step()

    @torch.inference_mode()
    def step(self) -> Step:
        """One forward for every running sequence (batched by width); finished sequences leave
        `running`.

        A failure that belongs to one sequence (planning it, sampling its row, advancing it)
        ends that sequence alone: it leaves `running` with `seq.error` set (its Delta says so),
        and the sequences batched with it advance as if it had not been there. When a batched
        forward raises, its members are retried one by one, so only the culprit fails."""
        t0 = time.perf_counter()
        seqs = list(self.running)
        final_before = [s.final_len for s in seqs]
        calls_before = self.stats.forward_calls
        groups: dict[int, list[tuple[Sequence, ForwardPlan]]] = defaultdict(list)
        for seq in seqs:
            if not seq.finished:
                try:
                    plan = seq.plan()
                except Exception as e:
                    self._fail(seq, e)
                    continue
                groups[plan.end - plan.start].append((seq, plan))
        for width, members in groups.items():
            for group, (tokens, conf, entropy) in self._draw(width, members):
                for i, (seq, plan) in enumerate(group):
                    k = len(plan.logit_positions)
                    try:
                        seq.advance(plan, tokens[i, :k], conf[i, :k],
                                    None if entropy is None else entropy[i, :k])
                    except Exception as e:
                        self._fail(seq, e)
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self._release(seq)
        self.stats.steps += 1
        self.stats.seconds += time.perf_counter() - t0
        deltas = tuple(Delta(s, start, max(start, s.final_len), s.finished)
                       for s, start in zip(seqs, final_before))
        return Step(deltas, self.stats.forward_calls - calls_before)

    def _draw(self, width: int, members: list[tuple[Sequence, ForwardPlan]]) -> list:
        """[(members, (tokens, conf, entropy))]: the group's batched draw, or, when it raises, each
        member's own (rerunning a plan rewrites the same cache positions, so a retry is safe);
        a member that fails alone is failed."""
        try:
            return [(members, self._run_group(width, members))]
        except Exception as e:
            if len(members) == 1:
                self._fail(members[0][0], e)
                return []
        out = []
        for m in members:
            try:
                out.append(([m], self._run_group(width, [m])))
            except Exception as e:
                self._fail(m[0], e)
        return out

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.error = error
        self.abort(seq)

    def _run_group(self, width: int, members: list[tuple[Sequence, ForwardPlan]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One batched forward and draw for `members`: (tokens, confidence, entropy), (n, K)
        each; entropy only when a member's decoding rule spends it (else None)."""
        dev = self.device
        seqs = [s for s, _ in members]
        plans = [p for _, p in members]
        input_ids = torch.stack([s.tokens[p.start:p.end] for s, p in members])  # (n, W)
        starts = torch.tensor([p.start for p in plans], device=dev)[:, None]
        positions = starts + torch.arange(width, device=dev)[None, :]  # (n, W)
        blocks = torch.tensor([s.block for s in seqs], device=dev)[:, None]
        key_len = max(p.key_len for p in plans)
        mask = limit_mask(attention_limits(positions, blocks), key_len)
        k_max = max(len(p.logit_positions) for p in plans)
        logit_idx = torch.tensor(
            [_pad([x - p.start for x in p.logit_positions], k_max) for p in plans], device=dev)
        slots = [s.slot for s in seqs]
        rows = (slice(slots[0], slots[0] + len(slots))
                if slots == list(range(slots[0], slots[0] + len(slots)))
                else torch.tensor(slots, device=dev))
        access = CacheAccess(self.cache, rows, positions, key_len)
        logits = self.model(input_ids, positions, mask, access, logits_slice=logit_idx)  # (n, K, V)
        self.stats.forward_calls += 1
        if self.mask_token_id is not None and any(s.params.diffusion for s in seqs):
            logits[..., self.mask_token_id] = float("-inf")  # a drawn token is never [MASK]
        settings = [s.params for s in seqs]
        tokens, conf = sample_batch(logits, settings, [s.generator for s in seqs],
                                    [len(p.logit_positions) for p in plans])
        entropy = (draw_entropy(logits, settings)
                   if any(s.params.diffusion and needs_entropy(s.params.rule) for s in seqs) else None)
        return tokens, conf, entropy


def _pad(xs: list[int], n: int) -> list[int]:
    return xs + [xs[-1] if xs else 0] * (n - len(xs))
