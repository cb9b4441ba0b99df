"""Block padding and packing of examples into fixed-length rows (paper §3.2, "Padding").

Block padding. Every example starts on a block boundary and is padded at its end to a multiple
of B, so a block never straddles two examples and each example's blocks are aligned to its own
position 0, as at inference. With `data.padding: eos` (our default) the padding tokens are the
tokenizer's EOS and bear loss like response tokens: they are noised and learned, so after the
answer (and its end-of-turn token) the diffusion decoder fills the rest of the final block with
stop tokens in parallel instead of spending steps on positions it throws away. With
`data.padding: mask` the padding is the [MASK] token and bears no loss (the literal reading of
the paper's ablation; the model then never learns what follows an answer inside a block).

Packing. Padded examples are placed into rows of `seq_len` tokens; the row's tail is filled
with a padding token that bears no loss and forms its own document. `data.packing: next_fit`
places them one after another in file order, opening a new row whenever the next one does not
fit (13.7% of the shipped data's row tokens were tail padding). `first_fit` (the default) takes
the examples in windows of PACK_WINDOW in file order, sorts each window by padded length
(longest first, ties in file order) and puts each into the first row of the window with room:
first-fit decreasing, which leaves far less tail (docs/training.md). Both are deterministic
functions of the file, so the rows, their fingerprint and a resume are exact; rows keep their
window's order, and the trainer's per-epoch permutation shuffles them anyway. A per-token document id keeps attention inside each example and position ids
restart at 0 for each example, so a packed example sees exactly what it would see alone.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

from ..errors import FastDLLMError
from .data import Example


@dataclass(frozen=True)
class PackedRows:
    tokens: torch.Tensor  # (N, L) long
    loss_mask: torch.Tensor  # (N, L) bool
    doc_ids: torch.Tensor  # (N, L) long, distinct per example within a row
    positions: torch.Tensor  # (N, L) long, restarting at 0 for each example
    in_example: torch.Tensor  # (N, L) bool, False on a row's tail padding
    block_pad: torch.Tensor  # (N, L) bool, True on the padding that ends an example's last block

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> "PackedRows":
        idx = torch.as_tensor(rows, dtype=torch.long)
        return PackedRows(self.tokens[idx], self.loss_mask[idx], self.doc_ids[idx],
                          self.positions[idx], self.in_example[idx], self.block_pad[idx])

    def fingerprint(self) -> str:
        """Digest of the packed data, saved with checkpoints so a resume on changed data fails."""
        h = hashlib.sha256()
        for t in (self.tokens, self.loss_mask):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def pad_to_block(tokens: list[int], loss: list[bool], block_size: int, pad_id: int,
                 pad_loss: bool) -> tuple[list[int], list[bool]]:
    extra = -len(tokens) % block_size
    return tokens + [pad_id] * extra, loss + [pad_loss] * extra


PACK_WINDOW = 1024  # examples sorted together by first_fit packing


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, each in sorted order) for items of these lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties in given order
    free = torch.zeros(len(lengths), dtype=torch.long)  # room left in each open bin
    bins: list[list[int]] = []
    for i in order:
        fits = (free[:len(bins)] >= lengths[i]).nonzero()
        if len(fits):
            b = int(fits[0])
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            free[len(bins)] = capacity - lengths[i]
            bins.append([i])
    return bins


def pack_examples(examples: list[Example], *, seq_len: int, alignment: int, pad_id: int,
                  pad_loss: bool, row_pad_id: int, too_long: str, packing: str = "first_fit") -> PackedRows:
    """Block-pad, truncate (or reject) and pack examples into rows of `seq_len` tokens."""
    padded: list[tuple[list[int], list[bool], int]] = []
    truncated = 0
    for ex in examples:
        tokens, loss = list(ex.tokens), list(ex.loss_mask)
        if len(tokens) > seq_len:
            if too_long == "error":
                raise FastDLLMError(
                    f"{ex.source}: example has {len(tokens)} tokens, more than data.seq_len={seq_len}; "
                    "raise data.seq_len, shorten the example, or set data.too_long: truncate")
            tokens, loss = tokens[:seq_len], loss[:seq_len]
            truncated += 1
        length = len(tokens)
        tokens, loss = pad_to_block(tokens, loss, alignment, pad_id, pad_loss)
        padded.append((tokens, loss, length))
    rows: list[list[tuple[list[int], list[bool], int]]] = []
    if packing == "next_fit":
        used = seq_len  # forces a new row for the first example
        for item in padded:
            if used + len(item[0]) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(item)
            used += len(item[0])
    else:
        for start in range(0, len(padded), PACK_WINDOW):
            window = padded[start:start + PACK_WINDOW]
            for row in first_fit_decreasing([len(t) for t, _, _ in window], seq_len):
                rows.append([window[i] for i in row])
    if truncated:
        warnings.warn(f"truncated {truncated} of {len(examples)} examples longer than "
                      f"data.seq_len={seq_len} tokens (set data.too_long: error to reject them)",
                      stacklevel=2)
    n = len(rows)
    out = {
        "tokens": torch.full((n, seq_len), row_pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((n, seq_len), dtype=torch.bool),
        "doc_ids": torch.zeros((n, seq_len), dtype=torch.long),
        "positions": torch.zeros((n, seq_len), dtype=torch.long),
        "in_example": torch.zeros((n, seq_len), dtype=torch.bool),
        "block_pad": torch.zeros((n, seq_len), dtype=torch.bool),
    }
    for r, row in enumerate(rows):
        start = 0
        for doc, (tokens, loss, length) in enumerate(row):
            end = start + len(tokens)
            out["block_pad"][r, start + length:end] = True
            out["tokens"][r, start:end] = torch.tensor(tokens)
            out["loss_mask"][r, start:end] = torch.tensor(loss)
            out["doc_ids"][r, start:end] = doc
            out["positions"][r, start:end] = torch.arange(len(tokens))
            out["in_example"][r, start:end] = True
            start = end
        out["doc_ids"][r, start:] = len(row)  # the tail is a document of its own
        out["positions"][r, start:] = torch.arange(seq_len - start)
    return PackedRows(**out)
