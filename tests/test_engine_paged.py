"""The paged KV cache in the engine: the same tokens as the slot-per-sequence engine it
replaced, for every mode, with prefix caching on and off, through preemption (also in the
middle of a block), cancellation and growth; prefix hits are exact and keyed by attention kind."""

from __future__ import annotations

import json

import pytest
import torch

import golden_engine as golden
from fastdllm import LLM
from fastdllm.model.kv_cache import KVCache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def want() -> dict:
    return json.loads(golden.GOLDEN.read_text())


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_every_mode_equals_the_slot_engine(want, monkeypatch, prefix_caching):
    """tests/data/engine_golden.json was recorded with the engine before paging (5bb25e8): AR,
    diffusion with each rule, sub-block cache off, another block size, sampling, both speculative
    forms (separate draft, self-speculative, merged), a mixed batch; single and batched. The
    cases share one LLM per model, so with prefix caching later cases hit earlier ones' pages."""
    monkeypatch.setattr(golden, "KW", {"prefix_caching": prefix_caching})
    got = golden.record()
    for case, runs in want.items():
        for how, outputs in runs.items():
            assert got[case][how] == outputs, (case, how)


def page_bytes(llm: LLM) -> int:
    cfg = llm.config
    return KVCache.bytes_per_page(cfg.num_layers, llm.default_block_size, cfg.num_kv_heads,
                                  cfg.head_dim, torch.float32)


def prompts(llm: LLM) -> list[list[int]]:
    return golden.prompts(llm)[:4]  # 4 prompts of 40-64 tokens


CASES = [
    dict(mode="diffusion"),
    dict(mode="diffusion", rule="threshold", threshold=0.7),
    dict(mode="diffusion", sub_block_cache=False),
    dict(mode="diffusion", temperature=0.8, top_p=0.95, seed=5),
    dict(mode="ar"),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_preemption_and_resumption_change_no_token(settings):
    """A pool of 7 pages for 4 sequences of 3-4 pages each: sequences are preempted (pages
    freed, committed KV recomputed later, the block-local cache stashed when a sub-block step
    will read it) and resume; every output equals the one decoded with room to spare."""
    roomy = LLM.load(golden.DIFF, prefix_caching=False)
    tight = LLM.load(golden.DIFF, prefix_caching=False, kv_cache_memory=7 * page_bytes(roomy))
    tight.engine(4, 128, 32)
    ids = prompts(roomy)
    want = [r.token_ids for r in roomy.generate_batch(ids, max_new_tokens=64, stop_token_ids=[], **settings)]
    got = tight.generate_batch(ids, max_new_tokens=64, stop_token_ids=[], **settings)
    assert [r.token_ids for r in got] == want
    pages = tight._engine.pages
    assert pages.manager.num_pages == 7 and pages.preemptions > 0
    if settings == dict(mode="diffusion"):
        assert pages.stashes > 0  # preempted in the middle of a block, after a full-block step
    assert any("recompute" in r.stats["forwards_by_kind"] for r in got)
    assert pages.manager.used == 0
    pages.manager.check()


def test_preemption_with_prefix_caching_and_a_mixed_batch():
    roomy = LLM.load(golden.DIFF)
    tight = LLM.load(golden.DIFF, kv_cache_memory=6 * page_bytes(roomy))
    ids = prompts(roomy)
    configs = [roomy.decode_config(max_new_tokens=48, **s) for s in CASES]

    def run(llm):
        engine = llm.new_engine(len(configs), 128, 32, context=128)
        seqs = [engine.add(ids[i % 4], c, stop_token_ids=()) for i, c in enumerate(configs)]
        waited = 0
        for _ in engine.stream():
            waited = max(waited, engine.waiting)
        return engine, [s.output_ids() for s in seqs], waited

    _, want, _ = run(roomy)
    engine, got, waited = run(tight)
    # the pool is the limit: sequences wait for pages (and may be preempted), tokens unchanged
    assert got == want and waited > 0
    engine.pages.manager.check()
    assert engine.pages.manager.used == 0


def test_a_sequence_grows_page_by_page_and_cancellation_returns_its_pages():
    llm = LLM.load(golden.DIFF)
    engine = llm.engine(2, 256, 32)
    ids = prompts(llm)
    a = engine.add(ids[0], llm.decode_config(max_new_tokens=200), stop_token_ids=())
    b = engine.add(ids[1], llm.decode_config(max_new_tokens=200), stop_token_ids=())
    sizes = []
    for i, _ in enumerate(engine.stream()):
        sizes.append(len(a.pages))
        if i == 20:
            engine.abort(b)  # cancelled mid-decode
            assert not b.pages
        if i == 40:
            break
    assert len(ids[0]) < 64 and sizes[0] == 2  # its prompt block and the first decoding block
    assert sizes[-1] > sizes[0]  # then it grew
    assert sorted(set(sizes)) == list(range(sizes[0], sizes[-1] + 1))  # one page at a time
    engine.abort(a)
    m = engine.pages.manager
    m.check()
    assert m.used == 0 and all(m.refcount(p) == 0 for p in range(m.num_pages + 1))


def test_prefix_hit_gives_the_same_tokens_and_skips_the_prefill():
    llm = LLM.load(golden.DIFF)
    ids = prompts(llm)[3]  # 64 tokens: two whole blocks; the prefill draws the first token
    first = llm.generate(ids, max_new_tokens=40)
    second = llm.generate(ids, max_new_tokens=40)
    assert second.token_ids == first.token_ids
    engine = llm._engine
    usage = engine.pages.usage()
    # the second prompt found its first block (the last one is recomputed: its logit draws)
    assert usage["prefix_hit_tokens"] == 32 and usage["prefix_queried_tokens"] == 128
    # a continuation (an earlier prompt + its answer + more) reuses every full committed block
    longer = ids + first.token_ids + ids[:10]
    cold = LLM.load(golden.DIFF, prefix_caching=False).generate(longer, max_new_tokens=24)
    warm = llm.generate(longer, max_new_tokens=24)
    assert warm.token_ids == cold.token_ids
    seq_hit = engine.pages.usage()["prefix_hit_tokens"] - 32
    assert seq_hit == 64 + 32 * ((len(first.token_ids) - 1) // 32)  # prompt + committed answer blocks


def test_attention_kind_and_block_size_are_part_of_the_key():
    """Causal (AR) KV of a prompt is never reused for block-diffusion decoding of the same
    prompt, nor block-32 KV for block 16: each gets 0 hits, then hits its own kind."""
    llm = LLM.load(golden.DIFF)
    ids = prompts(llm)[0] + prompts(llm)[1]
    runs = [dict(mode="ar"), dict(mode="diffusion"), dict(mode="diffusion", block_size=16, sub_block_size=4)]
    hits = []
    for settings in runs + runs:
        before = llm._engine.pages.usage()["prefix_hit_tokens"] if llm._engine else 0
        out = llm.generate(ids, max_new_tokens=16, **settings)
        hits.append(llm._engine.pages.usage()["prefix_hit_tokens"] - before)
        cold = LLM.load(golden.DIFF, prefix_caching=False).generate(ids, max_new_tokens=16, **settings)
        assert out.token_ids == cold.token_ids, settings
    assert hits[:3] == [0, 0, 0] and all(h > 0 for h in hits[3:])


def test_a_request_larger_than_the_whole_pool_is_refused_clearly():
    from fastdllm.errors import FastDLLMError

    llm = LLM.load(golden.DIFF)
    assert llm.new_engine(1, 64, 32).pages.manager.num_pages > 1000  # default: 1 GiB on the CPU
    small = LLM.load(golden.DIFF, kv_cache_memory=4 * page_bytes(llm))
    engine = small.new_engine(1, 64, 32)
    assert engine.pages.manager.num_pages == 4
    with pytest.raises(FastDLLMError, match="whole KV cache holds 128") as e:
        engine.add(list(range(5, 105)), llm.decode_config(max_new_tokens=100))
    assert e.value.field == "max_new_tokens" and "kv_cache_memory" in str(e.value)


def test_needed_positions_is_the_next_plans_key_length(monkeypatch):
    """Pages are taken by `needed_positions`, which skips building the plan: it must equal the
    plan's key length in every phase (prefill, AR step, refinement, commit, no block cache)."""
    from fastdllm.engine import sequence as S

    real, bad = S.Sequence.needed_positions, []

    def checked(self):
        n = real(self)
        plan = self._next_plan().key_len
        if n != (plan if self.resume_from is None else max(self.committed, plan)):
            bad.append((self.phase, n, plan))
        return n

    monkeypatch.setattr(S.Sequence, "needed_positions", checked)
    llm = LLM.load(golden.DIFF)
    ids = prompts(llm)
    for kw in ({}, {"mode": "ar"}, {"block_size": 16, "sub_block_size": 4},
               {"sub_block_cache": False}, {"block_cache": False}):
        llm.generate_batch(ids, max_new_tokens=40, **kw)
    assert not bad
