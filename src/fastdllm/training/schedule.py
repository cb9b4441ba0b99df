"""The learning-rate schedule as one pure function of the step (nanoGPT's `get_lr`).

Linear warmup from lr/warmup_steps to lr, then cosine or linear decay to lr * min_lr_ratio at
the last step, or constant. Being a function of the step alone, the schedule needs no state of
its own in a checkpoint: restoring the step restores it.
"""

from __future__ import annotations

import math

from .config import DiffusionConfig, OptimizerConfig


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ar_weight_at(step: int, cfg: DiffusionConfig, total_steps: int) -> float:
    """Weight of the AR loss at optimizer step `step`: constant, or linear from
    `ar_loss_weight` (first step) to `ar_loss_weight_end` (last step)."""
    if cfg.ar_loss_weight_end is None:
        return cfg.ar_loss_weight
    progress = min(1.0, step / max(1, total_steps - 1))
    return cfg.ar_loss_weight + (cfg.ar_loss_weight_end - cfg.ar_loss_weight) * progress


def uses_ar_loss(cfg: DiffusionConfig) -> bool:
    return cfg.ar_loss_weight > 0 or bool(cfg.ar_loss_weight_end)
