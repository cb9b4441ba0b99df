"""Issue 21, class 10: as the sampling temperature goes to 0, diffusion decoding goes to greedy
(the threshold reads the sampled token's probability under the model, not under the tempered
distribution, whose confidences are all ~1); the official sampler stays selectable."""

from __future__ import annotations

import pytest

import golden_engine as golden
from fastdllm import LLM
from fastdllm.errors import FastDLLMError


def test_low_temperature_and_top_k_1_decode_as_greedy():
    llm = LLM.load(golden.DIFF)
    prompts = golden.prompts(llm)[:3]
    greedy = llm.generate_batch(prompts, max_new_tokens=48)
    for kw in (dict(temperature=0.01), dict(temperature=1.0, top_k=1)):
        model = llm.generate_batch(prompts, max_new_tokens=48, seed=3, **kw)
        official = llm.generate_batch(prompts, max_new_tokens=48, seed=3, confidence="sampler", **kw)
        assert [r.token_ids for r in model] == [r.token_ids for r in greedy]
        # the official sampler's confidences are ~1: it unmasks whole sub-blocks at once and
        # its text departs from greedy
        assert sum(r.stats["forward_calls"] for r in official) < sum(r.stats["forward_calls"] for r in greedy)
        assert [r.token_ids for r in official] != [r.token_ids for r in greedy]


def test_confidence_is_validated():
    llm = LLM.load(golden.DIFF)
    with pytest.raises(FastDLLMError, match="confidence must be one of") as e:
        llm.decode_config(confidence="tempered")
    assert e.value.field == "confidence"
