"""The weighted AR term of the adaptation objective (diffusion.ar_loss_weight).

The step minimises mean(diffusion CE) + w * mean(causal next-token CE of the clean rows). Shown
here: the AR term equals transformers' causal-LM loss on the same rows; the step's gradient is
the gradient of that weighted sum; weight 0 is exactly the official recipe; the schedule.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastdllm.training.config import DiffusionConfig
from fastdllm.training.config_file import load_train_config
from fastdllm.training.loss import IGNORE, target_loss_sum
from fastdllm.training.noise import row_seed
from fastdllm.training.objective import ar_batch, diffusion_batch
from fastdllm.training.schedule import ar_weight_at
from fastdllm.training.trainer import Trainer

from fixtures import load_hf_model
from test_training_run import metrics, tiny_run_config, write_config
from fastdllm.training import run_training


def _trainer(tmp_path, base, name, **diffusion) -> Trainer:
    cfg = tiny_run_config(tmp_path, base, name, diffusion={"block_size": 16, **diffusion},
                          train={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 1})
    return Trainer(load_train_config(write_config(tmp_path / f"{name}.yaml", cfg)), resume=False)


def test_ar_term_equals_transformers_causal_lm_loss(tmp_path, qwen2_ckpt, one_thread):
    trainer = _trainer(tmp_path, qwen2_ckpt, "ref", ar_loss_weight=1.0)
    rows = trainer.train_rows.select(list(range(len(trainer.train_rows))))
    batch = ar_batch(rows, torch.device("cpu"), use_flex=False)
    with torch.no_grad():
        ours = target_loss_sum(trainer.model(batch.input_ids, batch.positions, batch.attn_mask),
                               batch.targets) / batch.denominator

    # transformers on each packed document separately (no cross-document attention), labels =
    # the loss-bearing tokens, its own shift: one mean over all targets
    hf = load_hf_model(qwen2_ckpt, "qwen2")
    total, count = 0.0, 0
    for r in range(rows.tokens.shape[0]):
        for doc in rows.doc_ids[r].unique():
            sel = (rows.doc_ids[r] == doc) & rows.in_example[r]
            ids = rows.tokens[r][sel][None]
            learn = rows.loss_mask[r][sel] & ~rows.block_pad[r][sel]  # block padding is no AR target
            labels = torch.where(learn, ids[0], torch.full_like(ids[0], IGNORE))[None]
            n = int((labels[0, 1:] != IGNORE).sum())
            if n == 0:
                continue
            with torch.no_grad():
                total += float(hf(input_ids=ids, labels=labels).loss) * n
            count += n
    assert count == batch.denominator
    assert float(ours) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("weight", [2.5, 0.0])
def test_step_gradient_is_that_of_the_weighted_sum(tmp_path, qwen2_ckpt, one_thread, weight):
    """Weight 0 is the official recipe: the gradient of the diffusion mean alone."""
    trainer = _trainer(tmp_path, qwen2_ckpt, "grad", ar_loss_weight=weight)
    reference = copy.deepcopy(trainer.model)
    seen = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):  # the gradient the optimizer is about to apply
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    record = trainer.train_step()

    # the same step written directly: one diffusion mean and one AR mean over the global batch
    cfg = trainer.cfg
    indices = list(range(cfg.train.micro_batch_size * cfg.train.grad_accum_steps))
    rows = trainer.train_rows.select([trainer.order(g) for g in indices])
    seeds = [row_seed(cfg.train.seed, "train", g) for g in indices]
    diff = diffusion_batch(rows, seeds, cfg.diffusion, trainer.mask_token_id, torch.device("cpu"))
    ar = ar_batch(rows, torch.device("cpu"), False)
    d_loss = target_loss_sum(reference(diff.input_ids, diff.positions, diff.attn_mask,
                                       logits_slice=diff.logits_index), diff.targets) / diff.denominator
    a_loss = target_loss_sum(reference(ar.input_ids, ar.positions, ar.attn_mask), ar.targets) / ar.denominator
    (d_loss + weight * a_loss).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optimizer.grad_clip)

    if weight:
        assert record["diffusion_loss"] == pytest.approx(float(d_loss), rel=1e-5)
        assert record["ar_loss"] == pytest.approx(float(a_loss), rel=1e-5)
    else:
        assert "ar_loss" not in record
    assert record["loss"] == pytest.approx(float(d_loss + weight * a_loss), rel=1e-5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_default_weight_and_weight_zero(tmp_path, qwen2_ckpt, one_thread):
    """A config without the key trains with the measured default (3) and logs the AR term;
    ar_loss_weight: 0 logs none (its step is the diffusion loss alone: the gradient test)."""
    assert DiffusionConfig().ar_loss_weight == 3.0
    for name, diffusion, logged in (("plain", {}, True), ("zero", {"ar_loss_weight": 0.0}, False)):
        cfg = tiny_run_config(tmp_path, qwen2_ckpt, name, diffusion={"block_size": 16, **diffusion})
        run_training(write_config(tmp_path / f"{name}.yaml", cfg))
        steps = [r for r in metrics(tmp_path / name) if "loss" in r]
        assert steps and all(("ar_loss" in r) == logged for r in steps)
        if logged:
            assert all(r["ar_weight"] == 3.0 for r in steps)


def test_ar_term_is_logged_and_validated(tmp_path, qwen2_ckpt, one_thread):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, "logged", diffusion={"block_size": 16, "ar_loss_weight": 1.0},
                          data={"val_fraction": 0.25})
    run_training(write_config(tmp_path / "logged.yaml", cfg))
    records = metrics(tmp_path / "logged")
    steps = [r for r in records if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["diffusion_loss"] + r["ar_loss"]) for r in steps)
    vals = [r for r in records if "val_loss" in r]
    assert vals and all(r["val_ar_loss"] > 0 for r in vals)


def test_ar_weight_schedule():
    constant = DiffusionConfig(ar_loss_weight=1.5)
    assert [ar_weight_at(s, constant, 11) for s in (0, 5, 10)] == [1.5, 1.5, 1.5]
    linear = DiffusionConfig(ar_loss_weight=3.0, ar_loss_weight_end=1.0)
    assert [ar_weight_at(s, linear, 11) for s in (0, 5, 10, 12)] == pytest.approx([3.0, 2.0, 1.0, 1.0])


@pytest.mark.parametrize("key", ["ar_loss_weight", "ar_loss_weight_end"])
def test_negative_ar_weight_is_an_error(key):
    from fastdllm.errors import FastDLLMError
    with pytest.raises(FastDLLMError, match=f"diffusion.{key}"):
        DiffusionConfig(**{key: -1.0})
