"""Calibration (evaluation/calibration.py) and temperature-scaled confidences at decode time
(DecodeConfig.confidence_temperature, read from a checkpoint's generation_config.json)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastdllm.engine.params import DecodeConfig
from fastdllm.engine.sampling import calibrate
from fastdllm.errors import FastDLLMError
from fastdllm.evaluation.calibration import ece, fit_temperature, nll, reliability
from fastdllm.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_recovers_a_known_temperature(true_t):
    # labels drawn from softmax(z / T*): the maximum-likelihood temperature is T* (up to noise)
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(40_000, 12, generator=g)
    labels = torch.multinomial(torch.softmax(z / true_t, dim=-1), 1, generator=g).squeeze(-1)
    t = fit_temperature(z, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert nll(z, labels, t) <= min(nll(z, labels, true_t * 0.8), nll(z, labels, true_t * 1.25))


def test_reliability_and_ece_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    bins = reliability(conf, correct, bins=10)
    assert [(b["lo"], b["count"]) for b in bins] == [(0.5, 2), (0.9, 4)]
    assert bins[1]["accuracy"] == 0.75 and bins[1]["confidence"] == pytest.approx(0.95)
    # ECE = 4/6 * |0.75 - 0.95| + 2/6 * |0.5 - 0.55| = 0.13333 + 0.01667 = 0.15
    assert ece(conf, correct, bins=10) == pytest.approx(0.15)
    assert reliability(torch.tensor([1.0]), torch.tensor([True]), bins=4)[0]["lo"] == 0.75  # 1.0 in the last bin


def test_calibrate_scales_only_rows_that_ask():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [3.0, 0.0, 0.0]])
    tokens = logits.argmax(-1)
    conf = torch.softmax(logits, -1).max(-1).values
    plain, hot = DecodeConfig(), DecodeConfig(confidence_temperature=2.0)
    out = calibrate(logits, tokens, conf, [(0, 2), (2, 3)], [hot, plain])
    assert torch.allclose(out[:2], torch.softmax(logits[:2] / 2.0, -1).max(-1).values)
    assert out[2] == conf[2]
    with pytest.raises(FastDLLMError, match="confidence_temperature"):
        DecodeConfig(confidence_temperature=0.0)


def test_checkpoint_temperature_is_the_default_and_one_is_bit_for_bit(ckpt_copy, qwen2_ckpt):
    d = ckpt_copy(qwen2_ckpt)
    prompts = [[1, 5, 9, 13], [2, 7]]
    base = LLM.load(d, device="cpu")
    assert base.decode_config().confidence_temperature == 1.0
    ref = [r.token_ids for r in base.generate_batch(prompts, max_new_tokens=24, threshold=0.5)]
    one = [r.token_ids for r in base.generate_batch(prompts, max_new_tokens=24, threshold=0.5,
                                                     confidence_temperature=1.0)]
    assert one == ref
    gen = d / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps({**cfg, "confidence_temperature": 100.0}))
    hot = LLM.load(d, device="cpu")
    assert hot.decode_config().confidence_temperature == 100.0
    out = hot.generate_batch(prompts, max_new_tokens=24, threshold=0.5)
    explicit = base.generate_batch(prompts, max_new_tokens=24, threshold=0.5, confidence_temperature=100.0)
    assert [r.token_ids for r in out] == [r.token_ids for r in explicit]
    # at T = 100 every confidence is ~1/V < 0.5: the left-anchored rule takes one token a step
    for r in out:
        assert r.stats["new_tokens"] <= r.stats["forward_calls"]
    assert math.isclose(hot.decode_config(confidence_temperature=1.0).confidence_temperature, 1.0)
