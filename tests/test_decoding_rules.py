"""The parallel-decoding rules through the engine (`DecodeConfig.rule`, selection.py): the block
cache stays exact under every rule, rows of different rules share batched forwards without
changing each other's output, each rule's steps have the shape its definition says, and the
entropy the entropy-bounded rule spends is the entropy of the drawn distribution."""

from __future__ import annotations

import math

import pytest
import torch

from fastdllm import LLM
from fastdllm.engine.params import DecodeConfig
from fastdllm.engine.sampling import draw_entropy
from fastdllm.engine.selection import RULES
from fastdllm.errors import FastDLLMError

B, S = 8, 4
REFINE = ("full_block", "sub_block")
SMALL = dict(block_size=B, sub_block_size=S)
ALTERNATIVES = [r for r in RULES if r != "threshold"]

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(n: int, offset: int = 3) -> list[int]:
    return [(offset + 7 * i) % 300 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def qwen2(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@pytest.fixture(scope="module")
def confident(checkpoint_factory) -> LLM:
    """Peaked predictions: several positions per step pass a 0.5-0.7 threshold."""
    return LLM.load(checkpoint_factory("qwen2", lm_head_scale=40.0), device="cpu")


def test_rule_is_validated_and_defaults_to_the_measured_winner():
    assert DecodeConfig().rule == "left_anchored"  # chosen on the val split, docs/design.md
    for bad in ("greedy", None, 1, "Threshold"):
        with pytest.raises(FastDLLMError) as e:
            DecodeConfig(rule=bad)
        assert e.value.field == "rule" and "left_anchored" in str(e.value)
        assert "--rule threshold" in str(e.value)


@pytest.mark.parametrize("rule", RULES)
def test_block_cache_equals_uncached_reference(confident, rule):
    for n in (3, 8, 13):
        for threshold in (0.9, 0.5):
            kw = dict(SMALL, rule=rule, threshold=threshold, max_new_tokens=19,
                      sub_block_cache=False, stop_token_ids=[], trace=True)
            cached = confident.generate(prompt(n), **kw)
            reference = confident.generate(prompt(n), block_cache=False, **kw)
            where = f"prompt length {n}, threshold {threshold}"
            assert cached.token_ids == reference.token_ids, where
            assert [s["positions"] for s in cached.trace] == [s["positions"] for s in reference.trace], where
            assert len(cached.token_ids) == 19, where


def test_rows_of_different_rules_share_forwards_and_decode_as_alone(confident):
    """One engine, one row per rule (and a sampled one): every row's output equals its solo
    decode, while the entropy is computed for the whole group because one row needs it."""
    configs = [confident.decode_config(**SMALL, rule=rule, threshold=0.6, max_new_tokens=20)
               for rule in RULES]
    configs.append(confident.decode_config(**SMALL, rule="entropy_bounded", threshold=0.6,
                                           max_new_tokens=20, temperature=0.9, seed=4))
    prompts = [prompt(5 + 3 * i, i) for i in range(len(configs))]
    engine = confident.new_engine(len(configs), 64, B)
    seqs = [engine.add(p, c, stop_token_ids=()) for p, c in zip(prompts, configs)]
    steps = sum(1 for _ in engine.stream())
    assert steps < sum(s.stats.forward_calls for s in seqs)  # the rows really were batched
    for seq, p, c in zip(seqs, prompts, configs):
        alone = confident.generate(p, config=c, stop_token_ids=[])
        assert seq.output_ids() == alone.token_ids, c.rule
        assert seq.stats.forward_calls == alone.stats["forward_calls"], c.rule
    # the rules differ on this model: not three names for one decode
    outs = {tuple(s.output_ids()) + (s.stats.forward_calls,) for s in seqs[:3]}
    assert len(outs) == 3


def test_left_anchored_steps_are_runs_from_the_first_mask(confident):
    threshold = 0.6
    result = confident.generate(prompt(5), **SMALL, rule="left_anchored", threshold=threshold,
                                max_new_tokens=24, stop_token_ids=[], trace=True)
    decoded: set[int] = set(range(5))
    parallel = 0
    for s in result.trace:
        pos = s["positions"]
        if s["kind"] in REFINE:
            first_masked = min(p for p in range(pos[0] // S * S, pos[0] // S * S + S) if p not in decoded)
            assert pos == list(range(first_masked, first_masked + len(pos))), s
            if len(pos) > 1:
                parallel += 1
                assert math.prod(s["confidences"]) >= threshold - 1e-5, s
        decoded.update(pos)
    assert parallel and result.stats["tokens_per_forward"] > 1
    assert decoded == set(range(5 + 24))


def test_alternative_rules_at_threshold_one_decode_one_token_per_step(qwen2):
    """On a model whose distributions are never certain, threshold 1 leaves every rule one token
    per step: the entropy-bounded rule takes the most confident, as the official rule does, and
    the left-anchored rule goes strictly left to right, as sub-blocks of one token do."""
    kw = dict(SMALL, threshold=1.0, max_new_tokens=14, stop_token_ids=[], sub_block_cache=False)
    for n in (3, 8):
        official = qwen2.generate(prompt(n), rule="threshold", **kw)
        entropy = qwen2.generate(prompt(n), rule="entropy_bounded", **kw)
        assert entropy.token_ids == official.token_ids
        assert entropy.stats["forward_calls"] == official.stats["forward_calls"]
        anchored = qwen2.generate(prompt(n), rule="left_anchored", trace=True, **kw)
        left_to_right = qwen2.generate(prompt(n), **dict(kw, sub_block_size=1))
        assert anchored.token_ids == left_to_right.token_ids
        refine = [s["positions"] for s in anchored.trace if s["kind"] in REFINE]
        assert all(len(p) == 1 for p in refine)
        assert [p[0] for p in refine] == sorted(p[0] for p in refine)


def test_entropy_bounded_decodes_several_tokens_per_step_on_a_confident_model(confident):
    result = confident.generate(prompt(5), **SMALL, rule="entropy_bounded", threshold=0.7,
                                max_new_tokens=24, stop_token_ids=[], trace=True)
    assert any(len(s["positions"]) > 1 for s in result.trace if s["kind"] in REFINE)
    assert result.stats["forward_calls"] < result.stats["new_tokens"] == 24


def test_draw_entropy_is_the_entropy_of_the_drawn_distribution():
    class Row:
        def __init__(self, temperature=0.0, top_p=1.0, top_k=0):
            self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    V = 16
    logits = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(0))
    logits[0, 0] = 0.0  # uniform: ln V
    logits[0, 1] = -float("inf")
    logits[0, 1, 3] = 5.0  # one token left (the others masked out, as [MASK] is): 0
    segments = [(0, 2), (2, 4), (4, 6)]  # the runner's flat rows: sequence i owns 2 of them

    def entropy(settings):
        return draw_entropy(logits.flatten(0, 1), segments, settings).view(3, 2)

    greedy = entropy([Row()] * 3)
    p = torch.softmax(logits[2], -1)
    torch.testing.assert_close(greedy[0], torch.tensor([math.log(V), 0.0]))
    torch.testing.assert_close(greedy[2], -(p * p.log()).sum(-1))
    mixed = entropy([Row(), Row(1.0, top_k=1), Row(2.0, top_k=4)])
    torch.testing.assert_close(mixed[0], greedy[0])
    assert torch.all(mixed[1] == 0)  # top-k 1: a certain draw
    top4 = torch.softmax(logits[2] / 2.0, -1).topk(4, dim=-1).values
    top4 = top4 / top4.sum(-1, keepdim=True)
    torch.testing.assert_close(mixed[2], -(top4 * top4.log()).sum(-1))
