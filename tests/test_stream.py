"""`LLM.stream`, the driver under generate, the chat CLI and the server: each step's deltas are
the tokens that became final, they add up to what `generate_batch` returns, and stopping early
gives the slots back."""

from __future__ import annotations

import pytest

from fastdllm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(block_size=8, sub_block_size=4, max_new_tokens=20, threshold=0.7)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def qwen2(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


def test_deltas_add_up_to_the_batch_result(qwen2):
    want = qwen2.generate_batch(PROMPTS, **SMALL)
    seqs, got, pieces, calls = [], [[], []], [0, 0], 0
    for step in qwen2.stream(PROMPTS, **SMALL):
        seqs = seqs or [d.seq for d in step]
        calls += step.forward_calls
        for d in step:
            i = seqs.index(d.seq)
            assert d.start == len(PROMPTS[i]) + len(got[i])  # no gap, no overlap
            got[i] += d.token_ids
            pieces[i] += bool(d.token_ids)
    assert got == [r.token_ids for r in want]
    assert all(n > 1 for n in pieces)  # the answer arrived in several pieces
    assert calls == want[0].stats["batch_forward_calls"]


def test_closing_the_stream_frees_the_slots(qwen2):
    steps = qwen2.stream(PROMPTS, **SMALL)
    engine = qwen2._engine
    assert len(engine.running) == 2
    next(steps)
    steps.close()
    assert not engine.running and engine.room == engine.max_slots
    assert engine.pages.manager.used == 0
    assert qwen2.generate(PROMPTS[0], **SMALL).token_ids == qwen2.generate_batch(PROMPTS, **SMALL)[0].token_ids
