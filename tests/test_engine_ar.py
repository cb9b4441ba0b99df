"""AR decoding through the engine: greedy output equals transformers' greedy `generate` token for
token, the real stories260K checkpoint reproduces its published greedy story, the uncached
reference equals the cached path, and stop tokens / max_new_tokens end a sequence exactly."""

from __future__ import annotations

import pytest
import torch

from fastdllm import LLM
from fixtures import load_hf_model

PROMPT = "Once upon a time there was a little girl"
# llama2.c's published greedy sample for stories260K (quoted in its README)
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_greedy(hf, ids: list[int], n: int, eos: list[int] | None) -> list[int]:
    """transformers' greedy continuation of `ids` (new tokens only), stopping at `eos`."""
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_ar_greedy_equals_transformers_generate(family, request):
    model_dir = request.getfixturevalue(f"{family}_ckpt")
    llm = LLM.load(model_dir, device="cpu")
    ids = llm.encode(PROMPT)
    hf = load_hf_model(model_dir, family)

    # no stop tokens: 30 tokens compared one for one
    ours = llm.generate(ids, mode="ar", max_new_tokens=30, stop_token_ids=[])
    assert ours.token_ids == hf_greedy(hf, ids, 30, None)
    assert len(ours.token_ids) == 30 and ours.finish_reason == "length"

    # the checkpoint's own stop ids on both sides: transformers stops after the first eos too
    stops = list(llm.special.stop_token_ids)
    ours = llm.generate(ids, mode="ar", max_new_tokens=30)
    theirs = hf_greedy(hf, ids, 30, stops)
    assert ours.token_ids == theirs


def test_stories260k_reproduces_published_greedy_story(stories260k_dir):
    llm = LLM.load(stories260k_dir, device="cpu")
    ids = llm.encode("Once upon a time")
    result = llm.generate(ids, mode="ar", max_new_tokens=60)
    text = llm.tokenizer.decode(ids + result.token_ids, skip_special_tokens=True)
    assert text.startswith(STORY), text
    assert result.stats["forward_calls"] == len(result.token_ids)  # one forward per AR token


def test_ar_uncached_reference_equals_cached(qwen2_ckpt):
    llm = LLM.load(qwen2_ckpt, device="cpu")
    for prompt in ([5, 6, 7], list(range(3, 40))):
        cached = llm.generate(prompt, mode="ar", max_new_tokens=25, stop_token_ids=[])
        reference = llm.generate(prompt, mode="ar", max_new_tokens=25, stop_token_ids=[],
                                 block_cache=False)
        assert cached.token_ids == reference.token_ids
        assert len(cached.token_ids) == 25


def test_ar_stop_token_ends_the_sequence(qwen2_ckpt):
    llm = LLM.load(qwen2_ckpt, device="cpu")
    ids = llm.encode(PROMPT)
    free = llm.generate(ids, mode="ar", max_new_tokens=30, stop_token_ids=[]).token_ids
    # a token the model emits mid-way (and not before) becomes the stop token
    k = next(i for i in range(5, 30) if free[i] not in free[:i])
    stop = free[k]
    result = llm.generate(ids, mode="ar", max_new_tokens=30, stop_token_ids=[stop])
    assert result.token_ids == free[: k + 1]
    assert result.token_ids[-1] == stop
    assert result.finish_reason == "stop"
    assert result.stats["new_tokens"] == k + 1
    assert result.stats["forward_calls"] == k + 1


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_ar_max_new_tokens_is_exact(qwen2_ckpt, n):
    llm = LLM.load(qwen2_ckpt, device="cpu")
    result = llm.generate(PROMPT, mode="ar", max_new_tokens=n, stop_token_ids=[])
    assert len(result.token_ids) == n
    assert result.finish_reason == "length"
    assert result.stats["new_tokens"] == n
    assert result.stats["forward_calls"] == n  # the prefill draws the first token
    assert result.stats["tokens_per_forward"] == 1.0
