"""The engine: a set of running sequences, one KV cache, and a `step()` that advances every
sequence by one forward.

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

import torch

from ..errors import FastDLLMError
from ..kv_cache import CacheAccess, KVCache
from ..model import Transformer
from .attention import attention_limits, limit_mask
from .params import DecodeConfig
from .sampling import sample_batch
from .sequence import ForwardPlan, Sequence


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
        self.free_slots = list(range(max_slots))
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def add(self, prompt_ids: list[int], params: DecodeConfig, *,
            stop_token_ids: tuple[int, ...] | None = None) -> Sequence:
        if not self.free_slots:
            raise FastDLLMError("the engine is full: every batch slot is in use")
        if params.speculative:
            raise FastDLLMError("speculative decoding needs the speculative engine "
                                "(fastdllm.engine.speculative); this engine decodes one model",
                                field="mode")
        if params.diffusion and self.mask_token_id is None:
            raise FastDLLMError(
                "diffusion decoding needs a mask token, and this checkpoint has none "
                "(no mask_token_id in config.json, no |<MASK>| in the tokenizer); pass "
                "--mask-token-id, use --mode ar, or adapt the model with `fastdllm train`",
                field="mode")
        needed = params.cache_len(len(prompt_ids))
        if needed > self.max_len:  # checked before the sequence allocates its buffers
            raise FastDLLMError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"needs {needed} positions but the engine holds {self.max_len}",
                field="max_new_tokens")
        seq = Sequence(next(self._ids), prompt_ids, params, mask_token_id=self.mask_token_id,
                       stop_token_ids=self.stop_token_ids if stop_token_ids is None else stop_token_ids,
                       device=self.device)
        seq.slot = self.free_slots.pop(0)
        seq.begin()
        self.running.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.free_slots.append(seq.slot)
        self.free_slots.sort()

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward for every running sequence (batched by width). Returns the sequences
        that advanced; finished ones have left `running`."""
        t0 = time.perf_counter()
        groups: dict[int, list[tuple[Sequence, ForwardPlan]]] = defaultdict(list)
        for seq in self.running:
            if not seq.finished:
                plan = seq.plan()
                groups[plan.end - plan.start].append((seq, plan))
        advanced = []
        for width, members in groups.items():
            self._run_group(width, members)
            advanced.extend(seq for seq, _ in members)
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self._release(seq)
        self.stats.steps += 1
        self.stats.seconds += time.perf_counter() - t0
        return advanced

    def _run_group(self, width: int, members: list[tuple[Sequence, ForwardPlan]]) -> None:
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
        tokens, conf = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                    [len(p.logit_positions) for p in plans])
        for i, (seq, plan) in enumerate(members):
            k = len(plan.logit_positions)
            seq.advance(plan, tokens[i, :k], conf[i, :k])


def _pad(xs: list[int], n: int) -> list[int]:
    return xs + [xs[-1] if xs else 0] * (n - len(xs))
