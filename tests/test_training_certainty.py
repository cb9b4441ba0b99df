"""Certainty distillation terms (training/loss.py `certainty_sums`, diffusion.certainty_weight /
wrong_confidence_weight): equal to a term-by-term computation on a fixture, zero effect at
weight 0, and a real effect on the trained weights when on."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fastdllm.training import run_training
from fastdllm.training.loss import IGNORE, certainty_sums
from test_training_run import metrics, tiny_run_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_certainty_sums_equal_a_term_by_term_computation():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0]],
                           [[0.5, 0.2, 0.1], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1, IGNORE], [0, 1, 2]])
    ent_expected, wrong_expected = 0.0, 0.0
    for b in range(2):
        for j in range(3):
            t = int(targets[b, j])
            if t == IGNORE:
                continue
            z = logits[b, j].tolist()
            norm = sum(math.exp(v) for v in z)
            p = [math.exp(v) / norm for v in z]
            best = max(range(3), key=lambda k: p[k])  # no ties in the fixture's valid rows
            if best == t:
                ent_expected += -sum(q * math.log(q) for q in p)
            else:
                wrong_expected += -math.log(1.0 - p[best])
    # the fixture has both kinds: rows (0,0) and (1,0) right; (0,1), (1,1), (1,2) wrong
    certain, wrong = certainty_sums(logits, targets)
    assert certain.item() == pytest.approx(ent_expected, rel=1e-6)
    assert wrong.item() == pytest.approx(wrong_expected, rel=1e-6)
    # gradients flow through the kept terms only
    x = logits.clone().requires_grad_(True)
    c, w = certainty_sums(x, targets)
    (c + w).backward()
    assert x.grad[0, 2].abs().sum() == 0 and x.grad[0, 0].abs().sum() > 0


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_weights_zero_are_the_plain_recipe_and_nonzero_changes_training(tmp_path, qwen2_ckpt):
    plain = tiny_run_config(tmp_path, qwen2_ckpt, "plain")
    zero = tiny_run_config(tmp_path, qwen2_ckpt, "zero",
                           diffusion={"certainty_weight": 0.0, "wrong_confidence_weight": 0.0})
    on = tiny_run_config(tmp_path, qwen2_ckpt, "on",
                         diffusion={"certainty_weight": 0.5, "wrong_confidence_weight": 0.5})
    for name, cfg in (("plain", plain), ("zero", zero), ("on", on)):
        run_training(write_config(tmp_path / f"{name}.yaml", cfg))
    a, b, c = _weights(tmp_path / "plain"), _weights(tmp_path / "zero"), _weights(tmp_path / "on")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(not torch.equal(a[k], c[k]) for k in a)
    logged = [r for r in metrics(tmp_path / "on") if "certainty_loss" in r]
    assert logged and all(r["certainty_loss"] >= 0 and r["wrong_confidence_loss"] >= 0 for r in logged)
    assert not any("certainty_loss" in r for r in metrics(tmp_path / "zero"))


def test_sub_block_noise_trains_end_to_end_and_differs_from_uniform(tmp_path, qwen2_ckpt):
    """diffusion.noise: sub_block (the states decoding visits, one view per row) runs through the
    trainer's layout and changes what is learned; the recipe's uniform noise is the default."""
    uniform = tiny_run_config(tmp_path, qwen2_ckpt, "uniform", diffusion={"complementary": False})
    sub = tiny_run_config(tmp_path, qwen2_ckpt, "sub",
                          diffusion={"complementary": False, "noise": "sub_block", "sub_block_size": 4,
                                     "wrong_confidence_weight": 0.5})
    for name, cfg in (("uniform", uniform), ("sub", sub)):
        run_training(write_config(tmp_path / f"{name}.yaml", cfg))
    a, b = _weights(tmp_path / "uniform"), _weights(tmp_path / "sub")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "sub") if "loss" in r)
