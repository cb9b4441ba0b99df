"""The run's train and validation rows, and the order the trainer reads them in.

Rows are read by a global index g = 0, 1, 2, ...: epoch e = g // N reads the N packed rows in a
permutation seeded by (seed, e). Optimizer step s takes indices [s*G, (s+1)*G) for the global
batch of G = micro_batch * grad_accum * world_size rows; process r's micro-batch a is the slice
starting at s*G + (a*world + r)*micro. The data position is therefore just the step, and one
process with micro*accum = G sees the same rows per step as G/micro processes.
"""

from __future__ import annotations

import torch

from ..errors import FastDLLMError
from .config import TrainConfig
from .data import load_examples
from .noise import row_seed
from .packing import PackedRows, pack_examples


def build_datasets(cfg: TrainConfig, tokenizer, mask_token_id: int | None) -> tuple[PackedRows, PackedRows | None]:
    eos = tokenizer.eos_token_id
    data = cfg.data
    load = dict(workers=data.num_workers, cache_dir=data.cache_dir)
    train, dropped = load_examples(data.train_file, tokenizer, eos, **load)
    if not train:
        extra = f" ({dropped} records had no loss-bearing tokens)" if dropped else ""
        raise FastDLLMError(f"data.train_file {data.train_file!r} holds no usable examples{extra}; "
                            "it needs at least one messages, prompt/response or text record")
    if data.val_file is not None:
        val, _ = load_examples(data.val_file, tokenizer, eos, **load)
        if not val:
            raise FastDLLMError(f"data.val_file {data.val_file!r} holds no usable examples")
    elif data.val_fraction > 0:
        if len(train) < 2:
            raise FastDLLMError("data.val_fraction needs at least 2 examples; add data or set it to 0")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
            row_seed(cfg.train.seed, "split", 0))).tolist()
        n_val = min(len(train) - 1, max(1, round(data.val_fraction * len(train))))
        held = set(order[:n_val])
        val = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        val = []
    if cfg.objective == "diffusion" and data.padding == "mask":
        pad_id, pad_loss = mask_token_id, False
    else:
        if eos is None:
            raise FastDLLMError("the tokenizer defines no EOS token, needed for data.padding: eos; "
                                "set eos_token in tokenizer_config.json or use data.padding: mask")
        pad_id, pad_loss = eos, True
    row_pad = mask_token_id if cfg.objective == "diffusion" else (eos if eos is not None else 0)
    kw = dict(seq_len=data.seq_len, alignment=cfg.alignment, pad_id=pad_id, pad_loss=pad_loss,
              row_pad_id=row_pad, too_long=data.too_long, packing=data.packing)
    return pack_examples(train, **kw), (pack_examples(val, **kw) if val else None)


class RowOrder:
    """Global row index -> packed row, one seeded permutation per epoch."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, g: int) -> int:
        epoch = g // self.num_rows
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(row_seed(self.seed, "epoch", epoch))
            self._perm = torch.randperm(self.num_rows, generator=generator)
            self._epoch = epoch
        return int(self._perm[g % self.num_rows])


def micro_batch_indices(step: int, accum: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Global row indices of this process's micro-batches for optimizer step `step`."""
    global_batch = micro * accum * world
    return [[step * global_batch + (a * world + rank) * micro + i for i in range(micro)]
            for a in range(accum)]
