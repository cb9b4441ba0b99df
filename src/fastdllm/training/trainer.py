"""The training loop: adapt a pretrained AR model into a block-diffusion model (paper §3.2) or
train it autoregressively, on one process or many (data parallel through `accelerate`).

One optimizer step reads top to bottom: set the step's learning rate; build this process's
micro-batches (noise is seeded per row, see noise.py); sum the loss normaliser over all
micro-batches and processes; forward/backward each micro-batch (gradient sync only on the
last); clip; step; log, validate and checkpoint on the main process. Resuming restores model,
optimizer, step (= data position, see dataset.py) and RNG states from the latest complete
checkpoint, so an interrupted run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..errors import FastDLLMError
from ..model.checkpoint import save_checkpoint
from .sharding import clip_grad_norm, full_model, full_optimizer_state, load_full_optimizer_state, shard_model
from .base_model import initial_model, resumed_model
from .config import TrainConfig, with_added_defaults
from .config_file import load_train_config
from .dataset import RowOrder, build_datasets, micro_batch_indices
from .loss import certainty_sums, target_loss_sum
from .noise import row_seed
from .objective import Batch, StepLayout, ar_batch, diffusion_batch
from .packing import PackedRows
from .schedule import ar_weight_at, lr_at, uses_ar_loss
from .state import (
    check_same_run,
    latest_checkpoint,
    optimizer_from_flat,
    read_checkpoint,
    remove_stale,
    restore_rng,
    rng_for_rank,
    rng_snapshot,
    truncate_metrics,
    write_checkpoint,
)


def run_training(config_path: str, resume: bool = False, *, stop_after_steps: int | None = None) -> Path:
    """Train as the YAML file says; returns the final model directory (`output_dir/final`).

    `resume=True` continues from the latest complete checkpoint under `output_dir`.
    `stop_after_steps` ends the run early without writing the final model (tests use it to
    simulate an interruption); the return value is then the last checkpoint, if any."""
    return Trainer(load_train_config(config_path), resume).fit(stop_after_steps)


def _accelerator(cfg: TrainConfig):
    try:
        from accelerate import Accelerator
    except ImportError:
        raise FastDLLMError("training needs the accelerate package: pip install 'fastdllm[train]'") from None
    # cpu=True on a machine without CUDA makes a multi-process launch (torchrun, accelerate
    # launch --multi_gpu) data parallel over gloo instead of N independent runs. Mixed precision
    # is our own autocast (Trainer.autocast), not accelerate's: its process-wide state refuses a
    # second run with another precision in the same process.
    return Accelerator(cpu=not torch.cuda.is_available())


def adamw_kernel(device: torch.device, sharded: bool) -> dict[str, bool]:
    """How AdamW updates the parameters: on CUDA in fused kernels (plain tensors) or as
    multi-tensor foreach ops (FSDP's DTensor shards), instead of a Python loop of small kernels
    per parameter; on the CPU the per-parameter loop, whose numbers the CPU runs were
    published with."""
    if device.type != "cuda":
        return {"foreach": False}
    return {"foreach": True} if sharded else {"fused": True}


def _optimizer(model, cfg: TrainConfig, device: torch.device, sharded: bool) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases), the usual LLM practice."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied embeddings appear once
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optimizer.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    o = cfg.optimizer
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.adam_eps, **adamw_kernel(device, sharded))


def validation_attention(attention: str, compiled: bool) -> str:
    """The attention validation runs with: the training one, except that flex_attention is
    never run uncompiled (it then materialises the whole float32 score matrix): block-sparse
    tiles instead (the AR term: the dense mask), which compute the same loss."""
    return "block_sparse" if attention == "flex" and not compiled else attention


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg = cfg
        self.acc = _accelerator(cfg)
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        latest = latest_checkpoint(self.ckpt_root)
        world = self.acc.num_processes
        self.step, self.tokens_seen, self.data_tokens_seen, self.elapsed = 0, 0, 0, 0.0
        if resume and latest is None:
            raise FastDLLMError(f"nothing to resume: {self.ckpt_root} holds no complete checkpoint; "
                                "start the run without resuming", field="resume")
        if not resume and latest is not None:
            raise FastDLLMError(f"{self.run_dir} already holds checkpoints ({latest.name}); resume "
                                "that run or choose a new output_dir", field="resume", fixes=[("resume", True)])
        if resume:
            state, tensors = read_checkpoint(latest)
            state["config"] = with_added_defaults(state["config"], cfg.to_dict())
            check_same_run(state, cfg.to_dict(), world, latest)
            model, self.tokenizer, self.generation_config = resumed_model(latest)
        else:
            model, self.tokenizer, self.generation_config = initial_model(cfg)
        self.mask_token_id = model.config.mask_token_id
        self.train_rows, self.val_rows = build_datasets(cfg, self.tokenizer, self.mask_token_id)
        self.fingerprint = self.train_rows.fingerprint()
        t = cfg.train
        self.global_rows = t.micro_batch_size * t.grad_accum_steps * world
        self.total_steps = t.max_steps or math.ceil(t.max_tokens / (self.global_rows * cfg.data.seq_len))
        model.gradient_checkpointing = t.gradient_checkpointing
        # FSDP with one process has nothing to shard: it runs as a plain single-process run
        self.sharded = t.fsdp and world > 1
        if self.sharded:
            # before the optimizer: params become shards
            shard_model(model.to(self.acc.device), torch.bfloat16 if t.precision == "bf16" else None)
            self.model = model
            self.optimizer = _optimizer(model, cfg, self.acc.device, sharded=True)
        else:
            self.model, self.optimizer = self.acc.prepare(
                model, _optimizer(model, cfg, self.acc.device, sharded=False))
        self.forward = torch.compile(self.model) if t.compile else self.model
        # validation runs the unwrapped model (see evaluate), compiled when training is
        plain = self.acc.unwrap_model(self.model)
        self.eval_forward = plain if not t.compile else self.forward if plain is self.model else torch.compile(plain)
        # flex_attention pays only compiled; uncompiled, block-sparse tiles (diffusion) and the
        # dense masks (AR) are faster and tested
        attention = t.attention
        if attention == "auto":
            attention = "flex" if t.compile and self.acc.device.type == "cuda" else "block_sparse"
        self.use_flex = attention == "flex"
        self.layout = StepLayout(shared_clean=t.layout == "shared_clean", skip_untargeted=t.skip_untargeted,
                                 attention=attention)
        self.eval_layout = dataclasses.replace(self.layout, attention=validation_attention(attention, t.compile))
        self.ar_term = cfg.objective == "diffusion" and uses_ar_loss(cfg.diffusion)
        # certainty distillation: computed only when weighted, so weights 0 are the plain recipe
        self.certainty_term = cfg.objective == "diffusion" and (
            cfg.diffusion.certainty_weight > 0 or cfg.diffusion.wrong_confidence_weight > 0)
        self.order = RowOrder(len(self.train_rows), t.seed)
        self.last_loss: float | None = None
        self.last_val: float | None = None
        if resume:
            if state["data_fingerprint"] != self.fingerprint:
                raise FastDLLMError(f"the training data changed since {latest} was written; resume "
                                    "needs the same data files (or start a new run)")
            saved = optimizer_from_flat(tensors, state["optimizer"])
            if self.sharded:
                load_full_optimizer_state(self.model, self.optimizer, saved)
            else:
                self.optimizer.load_state_dict(saved)
            restore_rng(rng_for_rank(tensors, state["rng"], self.acc.process_index))
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.data_tokens_seen, self.elapsed = state["data_tokens_seen"], state["elapsed_s"]
            self.last_loss, self.last_val = state["last_loss"], state["last_val_loss"]
        else:
            torch.manual_seed(t.seed)
        if self.acc.is_main_process:
            remove_stale(self.ckpt_root)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            metrics = self.run_dir / "metrics.jsonl"
            if resume:
                truncate_metrics(metrics, self.step)
            else:
                metrics.unlink(missing_ok=True)  # left by an earlier attempt that saved nothing

    # ---- one optimizer step ----

    def make_batch(self, rows: PackedRows, seeds: list[int], layout: StepLayout | None = None) -> Batch:
        layout = layout or self.layout
        if self.cfg.objective == "ar":
            return ar_batch(rows, self.acc.device, layout.attention == "flex")
        return diffusion_batch(rows, seeds, self.cfg.diffusion, self.mask_token_id, self.acc.device,
                               layout)

    def autocast(self):
        """bf16 autocast for forwards when configured; weights and optimizer stay float32."""
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")

    def _reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").tolist() if self.acc.num_processes > 1 else t.tolist()

    def train_step(self) -> dict:
        """One optimizer step. With the AR term (diffusion.ar_loss_weight) each micro-batch's
        packed rows also get a causal next-token forward of the clean rows; the step minimises
        mean(diffusion CE) + w * mean(AR CE), each mean over its own targets of the global batch.
        The AR forward gets its own backward (under no_sync): one DDP forward per backward."""
        t = self.cfg.train
        lr = lr_at(self.step, self.cfg.optimizer, self.total_steps)
        ar_weight = ar_weight_at(self.step, self.cfg.diffusion, self.total_steps) if self.ar_term else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts: list[tuple[str, Batch]] = []  # ("main" | "ar", batch), the last one syncs gradients
        for indices in micro_batch_indices(self.step, t.grad_accum_steps, t.micro_batch_size,
                                           self.acc.process_index, self.acc.num_processes):
            rows = self.train_rows.select([self.order(g) for g in indices])
            if ar_weight > 0:
                parts.append(("ar", ar_batch(rows, self.acc.device, self.use_flex)))
            parts.append(("main", self.make_batch(rows, [row_seed(t.seed, "train", g) for g in indices])))
        main = [b for kind, b in parts if kind == "main"]
        denominator, ar_denominator, data_tokens = self._reduce(
            sum(b.denominator for b in main), sum(b.denominator for kind, b in parts if kind == "ar"),
            sum(b.data_tokens for b in main))
        # DDP averages gradients over processes; scale so the step's gradient is that of one mean
        # over every target of the global batch
        scale = {"main": self.acc.num_processes / max(denominator, 1.0),
                 "ar": ar_weight * self.acc.num_processes / max(ar_denominator, 1.0)}
        sums = {kind: torch.zeros((), dtype=torch.float64, device=self.acc.device)
                for kind in (*scale, "certainty", "wrong")}
        d = self.cfg.diffusion
        for i, (kind, batch) in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                with self.autocast():
                    logits = self.forward(batch.input_ids, batch.positions, batch.attn_mask,
                                          logits_slice=batch.logits_index)
                loss = target_loss_sum(logits, batch.targets, batch.weights)
                sums[kind] += loss.detach().double()  # no host sync per micro-batch
                if kind == "main" and self.certainty_term:
                    certain, wrong = certainty_sums(logits, batch.targets)
                    loss = loss + d.certainty_weight * certain + d.wrong_confidence_weight * wrong
                    sums["certainty"] += certain.detach().double()
                    sums["wrong"] += wrong.detach().double()
                self.acc.backward(loss * scale[kind])
        grad_norm = None
        if self.cfg.optimizer.grad_clip > 0:
            if self.sharded:
                grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.optimizer.grad_clip)
            else:
                grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        main_total, ar_total, certain_total, wrong_total = self._reduce(
            *torch.stack([sums["main"], sums["ar"], sums["certainty"], sums["wrong"]]).tolist())
        self.tokens_seen += self.global_rows * self.cfg.data.seq_len
        self.data_tokens_seen += int(data_tokens)
        main_loss = main_total / max(denominator, 1.0)
        record = {"step": self.step, "loss": main_loss, "lr": lr, "grad_norm": grad_norm,
                  "data_tokens": int(data_tokens)}
        if self.ar_term:
            ar_loss = ar_total / max(ar_denominator, 1.0) if ar_weight > 0 else None
            record.update(diffusion_loss=main_loss, ar_loss=ar_loss, ar_weight=ar_weight,
                          loss=main_loss + ar_weight * (ar_loss or 0.0))
        if self.certainty_term:
            certain, wrong = certain_total / max(denominator, 1.0), wrong_total / max(denominator, 1.0)
            record.update(certainty_loss=certain, wrong_confidence_loss=wrong,
                          loss=record["loss"] + d.certainty_weight * certain
                          + d.wrong_confidence_weight * wrong)
        self.last_loss = record["loss"]
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean validation loss of the objective (`val_loss`, noise fixed per row so values
        compare across evaluations) and, for the diffusion objective, the causal next-token
        loss of the same rows (`val_ar_loss`: the AR skill the adaptation must keep). Runs the
        unwrapped model: processes may do unequal numbers of forwards, which DDP's collectives
        must not see."""
        if self.val_rows is None:
            return None
        model = self.acc.unwrap_model(self.model)
        model.eval()
        # sharded: every forward is collective, so every process runs all rows (same count)
        first, stride = (0, 1) if self.sharded else (self.acc.process_index, self.acc.num_processes)
        mine = list(range(first, len(self.val_rows), stride))
        totals = [0.0, 0.0, 0.0, 0.0]  # main loss, main count, AR loss, AR count
        micro = self.cfg.train.micro_batch_size
        for start in range(0, len(mine), micro):
            chunk = mine[start:start + micro]
            rows = self.val_rows.select(chunk)
            batches = [self.make_batch(rows, [row_seed(self.cfg.train.seed, "val", i) for i in chunk],
                                       self.eval_layout)]
            if self.cfg.objective == "diffusion":
                batches.append(ar_batch(rows, self.acc.device, self.eval_layout.attention == "flex"))
            for k, batch in enumerate(batches):
                with self.autocast():
                    logits = self.eval_forward(batch.input_ids, batch.positions, batch.attn_mask,
                                               logits_slice=batch.logits_index)
                totals[2 * k] += target_loss_sum(logits, batch.targets, batch.weights).item()
                totals[2 * k + 1] += batch.denominator
        model.train()
        main, count, ar, ar_count = self._reduce(*totals) if not self.sharded else totals
        self.last_val = main / max(count, 1.0)
        result = {"val_loss": self.last_val}
        if self.cfg.objective == "diffusion":
            result["val_ar_loss"] = ar / max(ar_count, 1.0)
        return result

    # ---- the run ----

    def fit(self, stop_after_steps: int | None = None) -> Path:
        from tqdm.auto import tqdm

        t = self.cfg.train
        main = self.acc.is_main_process
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not main, desc="train",
                   dynamic_ncols=True)
        if t.eval_interval and self.step == 0:
            self._log_val()  # the starting point, to compare later validations with
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            if stop_after_steps is not None and self.step >= stop_after_steps:
                bar.close()
                return latest_checkpoint(self.ckpt_root) or self.run_dir
            step_start = time.perf_counter()
            record = self.train_step()
            window_tokens += record["data_tokens"]
            bar.update(1)
            if self.step % t.log_interval == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                record["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                self._log(record)
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < self.total_steps:
                self._log_val()
            self.elapsed += time.perf_counter() - step_start  # before save: it is checkpointed
            if t.save_interval and self.step % t.save_interval == 0:
                self.save()
        bar.close()
        self._log_val()
        return self.write_final()

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_val(self) -> None:
        val = self.evaluate()
        if val is not None:
            self._log({"step": self.step, **val})

    def _trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "data_tokens_seen": self.data_tokens_seen, "elapsed_s": self.elapsed,
                "last_loss": self.last_loss, "last_val_loss": self.last_val,
                "world_size": self.acc.num_processes, "data_fingerprint": self.fingerprint,
                "config": self.cfg.to_dict()}

    def save(self) -> None:
        from accelerate.utils import gather_object

        snapshots = gather_object([rng_snapshot()])  # every process's RNG, for an exact resume
        model, optimizer_state = self._full_state(optimizer=True)
        if self.acc.is_main_process:
            write_checkpoint(self.ckpt_root, self.step, model=model,
                             tokenizer=self.tokenizer, generation_config=self.generation_config,
                             official_layout=self.cfg.official_layout,
                             optimizer_state=optimizer_state, rng_snapshots=snapshots,
                             trainer_state=self._trainer_state(), keep_last_k=self.cfg.train.keep_last_k)
        self.acc.wait_for_everyone()

    def _full_state(self, optimizer: bool):
        """(plain model, optimizer state) with full weights for the main process to write;
        gathered from the shards when sharded (collective: every process calls it)."""
        if not self.sharded:
            return (self.acc.unwrap_model(self.model),
                    self.optimizer.state_dict() if optimizer else None)
        model = full_model(self.model)
        return model, full_optimizer_state(self.model, self.optimizer) if optimizer else None

    def write_final(self) -> Path:
        final = self.run_dir / "final"
        model, _ = self._full_state(optimizer=False)
        if self.acc.is_main_process:
            summary = {"steps": self.step, "tokens_seen": self.tokens_seen,
                       "data_tokens_seen": self.data_tokens_seen,
                       "final_train_loss": self.last_loss, "final_val_loss": self.last_val,
                       "wall_time_s": round(self.elapsed, 3),
                       "data_tokens_per_s": round(self.data_tokens_seen / max(self.elapsed, 1e-9), 1),
                       "world_size": self.acc.num_processes, "global_batch_rows": self.global_rows,
                       "config": self.cfg.to_dict()}
            save_checkpoint(final, model, tokenizer=self.tokenizer,
                            generation_config=self.generation_config,
                            official_layout=self.cfg.official_layout,
                            extra_files={"training_summary.json": json.dumps(summary, indent=2) + "\n"})
        self.acc.wait_for_everyone()
        return final
