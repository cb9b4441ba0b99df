"""One request decoded speculatively: a block-diffusion draft proposes the next tokens, the
target verifies them in one causal forward, and the longest agreeing prefix plus one target
token is kept (see docs/design.md, "Speculative decoding").

A cycle, for a sequence holding L tokens (prompt + accepted output):

    DRAFT   k = min(draft_length, tokens left in L's block, tokens left before max_new_tokens - 1)
            forward 1, draft_cache "reuse" (default): the draft model on [draft_valid, L + k):
                       the tokens accepted since its last forward and k [MASK]s, block-causal,
                       over the draft cache of everything before and of L's block to its end
                       (KV from earlier cycles: stale inside the block, as the sub-block cache);
                       the first forward in a block runs to the block's end, so its [MASK] tail
                       is in the cache for the later cycles; token shift: the draft for position
                       i is read from the output at i - 1
            forward 1, draft_cache "block": the draft model on [draft_done, block end of L):
                       whole blocks before L's block become the draft's exact block cache; L's
                       block is encoded whole every cycle: known tokens, then [MASK] to its end
            forwards 2..draft_steps (refinement): L's block again ("block": whole; "reuse":
                       [L, L + k)), with the drafts fixed so far in place; each step fixes the
                       next run of draft positions, left to right
    VERIFY  the target on [target_done, L + k), causal: the last accepted token (whose KV is not
            cached yet) and the k drafts; outputs at L - 1 .. L + k - 1 give the target's
            distributions for positions L .. L + k (verification.py)
    ACCEPT  n drafts kept, plus the target's token at L + n; target_done = L + n

Rollback costs nothing in either cache: the target's KV is exact below target_done and the
draft's below draft_done; everything above is rewritten by the next forward before any query
reads it (each forward writes its chunk, then attends), so rejected positions are simply
overwritten and no accepted KV is ever recomputed. `k = 0` (mode "ar", or the last allowed
token) is a plain AR step of the target, the prompt's first verify forward is its prefill.

Drafts are fixed left to right on a schedule that does not look at the drawn tokens, so each
draft token is drawn from a distribution conditioned only on the prefix and the drafts before
it: what speculative sampling needs to stay exact (verification.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from .params import DecodeConfig
from .sampling import distribution
from .sequence import speed_fields


class Stage(Enum):
    DRAFT = "draft"
    VERIFY = "verify"
    FINISHED = "finished"


@dataclass(frozen=True)
class Chunk:
    """One row of a forward: the tokens at absolute positions [start, end), attention over
    the first `key_len` cache positions, and the positions whose output logits are read."""

    start: int
    end: int
    key_len: int
    logit_positions: tuple[int, ...]


@dataclass
class SpeculationStats:
    target_forwards: int = 0
    draft_forwards: int = 0
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_positions: int = 0  # positions the draft forwards encoded (their widths, summed)
    new_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    @property
    def forward_calls(self) -> int:
        return self.target_forwards + self.draft_forwards

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_calls if self.forward_calls else 0.0

    def as_dict(self) -> dict:
        return {
            **speed_fields(self.forward_calls, self.new_tokens, self.seconds),
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "cycles": self.cycles,
            "tokens_per_cycle": round(self.new_tokens / self.cycles, 4) if self.cycles else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "draft_positions": self.draft_positions,
        }


class Speculation:
    """The state of one speculatively decoded request (same reading interface as `Sequence`:
    finished, final_len, final_ids(), output_ids(), stats, finish_reason, trace)."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: DecodeConfig, *,
                 mask_token_id: int, stop_token_ids: tuple[int, ...], device: torch.device):
        self.id = seq_id
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.limit = self.prompt_len + params.max_new_tokens
        self.block = params.block_size
        self.capacity = params.cache_len(self.prompt_len)
        self.mask_id = mask_token_id
        self.stop_ids = set(stop_token_ids)
        # host state: prompt, accepted output, this cycle's drafts, [MASK] beyond
        self.tokens = list(prompt_ids) + [mask_token_id] * (self.capacity - self.prompt_len)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.length = self.prompt_len  # tokens known: prompt + accepted output
        self.target_done = 0  # the target's KV is exact below this position
        self.draft_done = 0  # the draft's KV is exact below this position (whole blocks)
        self.draft_valid = 0  # draft_cache "reuse": KV of the known tokens below this position
        self.tail_block = -1  # draft_cache "reuse": the block whose [MASK] tail was encoded
        self.stage = Stage.VERIFY
        self.k = 0  # draft tokens this cycle
        self.fixed = 0  # draft tokens fixed so far this cycle
        self.draft_step = 0
        self.q: torch.Tensor | None = None  # (k, V) draft distributions when sampling
        self.pending = 0  # merged form: drafts made by the last forward for the next cycle
        self.error: Exception | None = None  # set when this request failed alone (as Sequence.error)
        self.end: int | None = None
        self.finish_reason: str | None = None
        self.final_len = self.prompt_len
        self.stats = SpeculationStats()
        self.trace: list[dict] | None = [] if params.trace else None
        self.target_table: list[int] = []  # page tables of the target's and the draft's caches
        self.draft_table: list[int] = []
        self.cached = 0  # prompt positions from a prefix cache (none in this engine)
        self.scratch = 0  # merged form: where its draft groups' KV goes (positions past capacity)

    # ------------------------------------------------------------------ cycle start
    def begin_cycle(self) -> None:
        """Choose this cycle's draft length; a sequence in mode "ar" never drafts."""
        p, L = self.params, self.length
        if p.merged:  # the drafts came with the previous forward (merged.py)
            self.k, self.stage = self.pending, Stage.VERIFY
            return
        block_end = (L // self.block + 1) * self.block
        self.k = max(0, min(p.draft_length, block_end - L, self.limit - 1 - L)) if p.speculative else 0
        self.fixed, self.draft_step = 0, 0
        self.q = None
        self.stage = Stage.DRAFT if self.k else Stage.VERIFY

    # ------------------------------------------------------------------ drafting
    @property
    def steps_this_cycle(self) -> int:
        return min(self.params.draft_steps, self.k)

    def draft_chunk(self) -> Chunk:
        L, B = self.length, self.block
        block_start, block_end = L // B * B, (L // B + 1) * B
        to_fix = self._next_fix()
        logits = tuple(range(L - 1 + self.fixed, L - 1 + to_fix))
        if self.params.draft_cache == "block":
            start = self.draft_done if self.draft_step == 0 else block_start
            return Chunk(start, block_end, block_end, logits)
        # reuse: the draft cache holds KV for the known tokens below draft_valid (stale inside
        # L's block) and, once L's block was entered, [MASK] KV for the rest of the block
        start = self.draft_valid if self.draft_step == 0 else L
        end = L + self.k if L // B == self.tail_block else block_end
        return Chunk(start, end, block_end, logits)

    def _next_fix(self) -> int:
        """Draft positions fixed once this step is done: an even left-to-right schedule."""
        return (self.draft_step + 1) * self.k // self.steps_this_cycle

    def apply_draft(self, tokens: list[int], q: torch.Tensor | None, width: int) -> None:
        """Drafted tokens (and their distributions when sampling) for this step's positions;
        `width`: the positions this step's forward encoded for this sequence."""
        L = self.length
        if self.draft_step == 0:
            self.draft_done = L // self.block * self.block  # the whole blocks before L's are exact
            self.draft_valid = L
            self.tail_block = L // self.block
        to_fix = self._next_fix()
        self.stats.draft_positions += width
        self.tokens[L + self.fixed: L + to_fix] = tokens
        if q is not None:
            self.q = q if self.fixed == 0 else torch.cat([self.q, q])
        self.fixed = to_fix
        self.draft_step += 1
        self.stats.draft_forwards += 1
        if self.fixed == self.k:
            self.stage = Stage.VERIFY

    def set_pending(self, tokens: list[int], q: torch.Tensor | None) -> None:
        """Merged form: the drafts for the next cycle, made by this cycle's forward."""
        L, m = self.length, len(tokens)
        self.tokens[L:L + m] = tokens
        self.q, self.pending = q, m

    # ------------------------------------------------------------------ verifying
    def verify_chunk(self) -> Chunk:
        L = self.length
        end = L + self.k
        return Chunk(self.target_done, end, end, tuple(range(L - 1, end)))

    def apply_verify(self, accepted: int, next_token: int) -> None:
        L, k = self.length, self.k
        emitted = self.tokens[L:L + accepted] + [next_token]
        self.tokens[L + accepted] = next_token
        rejected = len(self.tokens[L + accepted + 1: L + k + 1])
        self.tokens[L + accepted + 1: L + accepted + 1 + rejected] = [self.mask_id] * rejected  # masks again
        self.target_done = L + accepted
        self.length = L + accepted + 1
        st = self.stats
        st.target_forwards += 1
        st.cycles += 1
        st.drafted += k
        st.accepted += accepted
        st.new_tokens = self.length - self.prompt_len
        self._record(list(range(L, self.length)), emitted, k, accepted)
        for i, t in enumerate(emitted):
            if t in self.stop_ids:
                self._finish("stop", L + i + 1)
                return
        self.final_len = self.length
        if self.length >= self.limit:
            self._finish("length", self.limit)

    def _record(self, positions: list[int], tokens: list[int], drafted: int, accepted: int) -> None:
        if self.trace is None:
            return
        self.trace.append({"step": len(self.trace), "kind": "verify", "positions": positions,
                           "tokens": tokens, "confidences": [1.0] * len(tokens),
                           "drafted": drafted, "accepted": accepted})

    def _finish(self, reason: str, end: int) -> None:
        self.stage = Stage.FINISHED
        self.finish_reason = reason
        self.end = self.final_len = end
        self.stats.new_tokens = end - self.prompt_len
        self.stats.seconds = time.perf_counter() - self.stats.started

    # ------------------------------------------------------------------ results
    @property
    def finished(self) -> bool:
        return self.stage is Stage.FINISHED

    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:self.final_len]

    def final_ids(self) -> list[int]:
        return self.output_ids()


def draft_or_target_distribution(logits: torch.Tensor, params: DecodeConfig) -> torch.Tensor:
    """The distributions (K, V) a sampled draft is drawn from and the target is read as: the
    same temperature, top-k and top-p on both sides, as speculative sampling requires."""
    return distribution(logits, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k)
