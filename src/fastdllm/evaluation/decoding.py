"""Batched decoding for evaluation: prompts sorted by length, run through one engine in batches,
stopped by stop tokens and by stop strings (lm-eval's `until`), with the speed of the run.

Speed counts generated tokens only (the tokens returned, up to and including a stop token,
never prompt tokens, never masks), model forwards (each forward of a batch counted once, so
batching shows up as fewer forwards per token), and wall seconds of the decode calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.params import DecodeConfig
from ..text_stream import TextStream


@dataclass
class Speed:
    generated_tokens: int = 0
    forwards: int = 0  # model calls (one per batched group)
    sequence_forwards: int = 0  # forwards each sequence took part in, summed
    seconds: float = 0.0

    def add(self, other: "Speed") -> None:
        self.generated_tokens += other.generated_tokens
        self.forwards += other.forwards
        self.sequence_forwards += other.sequence_forwards
        self.seconds += other.seconds

    def as_dict(self) -> dict:
        t = self.generated_tokens
        return {"generated_tokens": t, "forwards": self.forwards,
                "tokens_per_forward": round(t / self.sequence_forwards, 4) if self.sequence_forwards else 0.0,
                "tokens_per_model_call": round(t / self.forwards, 4) if self.forwards else 0.0,
                "seconds": round(self.seconds, 4),
                "tokens_per_second": round(t / self.seconds, 3) if self.seconds else 0.0}


@dataclass
class Output:
    text: str
    token_ids: list[int]  # generated tokens kept (a final stop token included)
    finish_reason: str  # "stop" (token or string) | "length"
    forward_calls: int


def length_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompts`, longest first (equal lengths share a prefill; long prompts first so
    the cache is sized once and memory problems show up at once)."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def decode(llm, prompts: Sequence[list[int]], params: DecodeConfig, *, batch_size: int,
           stop: tuple[str, ...] = (), on_batch: Callable[[int], None] | None = None
           ) -> tuple[list[Output], Speed]:
    """Outputs in the order of `prompts`, and the run's speed. `stop` strings cut the text
    (the text ends right before the first one) and end the sequence early."""
    order = length_order(prompts)
    outputs: list[Output | None] = [None] * len(prompts)
    speed = Speed()
    detok = llm.decode if llm.tokenizer is not None else (lambda ids: "")
    for at in range(0, len(order), batch_size):
        idx = order[at:at + batch_size]
        batch = [prompts[i] for i in idx]
        for x in batch:
            llm.check_request(len(x), params)
        engine = llm.engine(len(batch), max(params.cache_len(len(x)) for x in batch), params.block)
        calls0 = engine.stats.forward_calls
        t0 = time.perf_counter()
        seqs = [engine.add(list(x), params) for x in batch]
        streams = [TextStream(detok, stop) for _ in seqs]
        live = set(range(len(seqs)))
        for _ in engine.stream():  # the engine's one step loop; stop strings end rows early
            for j in list(live):
                s = seqs[j]
                if stop:
                    streams[j].feed(s)
                if s.finished or streams[j].stopped:
                    engine.abort(s)  # a stop string ended it: free its slot now
                    live.discard(j)
        speed.seconds += time.perf_counter() - t0
        speed.forwards += engine.stats.forward_calls - calls0
        for j, (i, s) in enumerate(zip(idx, seqs)):
            ids = s.output_ids() if s.finished else s.final_ids()
            if streams[j].stopped:
                text, reason = streams[j].text, "stop"
                ids = _tokens_of_text(ids, text, detok)
            else:
                text, reason = detok(ids), s.finish_reason or "length"
            speed.generated_tokens += len(ids)
            speed.sequence_forwards += s.stats.forward_calls
            outputs[i] = Output(text, ids, reason, s.stats.forward_calls)
        if on_batch is not None:
            on_batch(len(batch))
    return outputs, speed


def _tokens_of_text(ids: list[int], text: str, detok) -> list[int]:
    """The shortest prefix of `ids` whose text covers `text` (tokens past a stop string are
    not counted as generated output)."""
    for n in range(len(ids) + 1):
        if len(detok(ids[:n])) >= len(text):
            return ids[:n]
    return ids
