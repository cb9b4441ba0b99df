"""How the noisy and clean streams of a diffusion micro-batch are laid out (paper §3.2).

The reference layout (`twins`, every block) is the paper's: each view becomes one row
[x_t ; x_0] of 2L tokens, so a row with complementary twins costs two rows of 2L. Two exact
savings change only which tokens are computed, never what any target is predicted from:

- `shared_clean`: one row [x_t ; x_t' ; x_0] of 3L tokens per packed row holds both twins. The
  clean stream never attends to a noisy token (attention_mask.py), so its outputs are the same
  in both twins and one copy serves both.
- `skip_untargeted`: a noisy block is attended only by its own queries, so a noisy block none
  of whose outputs is read for a target (a prompt block, the row's tail, or a block the view
  left unmasked) changes nothing and is left out; so is a clean block no kept output depends
  on (each example's last block, the row's tail); logits are computed only where there is a
  target (the LM head runs on targets, not on all L positions of each view).

Every target keeps its logits' source: noisy position j of view s is read from that view's copy
of j's block, or (`output_index`, shift_source: clean) from clean position j. With block-sparse
or flex attention the rows of a micro-batch are laid out one after another as a single row
(documents renumbered apart; attention cost follows allowed pairs, so nothing is padded); with
the dense mask they are padded to the longest with filler tiles that attend only to themselves
and are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_mask import StreamLabels
from .loss import IGNORE


@dataclass(frozen=True)
class StreamBatch:
    input_ids: torch.Tensor  # (g, T)
    positions: torch.Tensor  # (g, T)
    labels: StreamLabels  # (g, T) each
    logits_index: torch.Tensor  # (g, K): layout index whose output predicts each target
    targets: torch.Tensor  # (g, K), IGNORE on padding (and, without skipping, on non-targets)
    weights: torch.Tensor | None  # (g, K), 0 on padding


def _segment(tokens, positions, stream: int, docs, keep: torch.Tensor, block_size: int, offset: int):
    """The kept positions of one stream: (its columns, slot (L,) of each row position, -1 if left out)."""
    idx = keep.nonzero().squeeze(1)
    slot = torch.full(keep.shape, -1, dtype=torch.long)
    slot[idx] = offset + torch.arange(len(idx))
    cols = (tokens[idx], positions[idx], torch.full((len(idx),), stream), idx // block_size, docs[idx])
    return cols, slot


def clean_blocks_needed(block_doc: torch.Tensor, noisy_blocks: torch.Tensor,
                        clean_reads: torch.Tensor) -> torch.Tensor:
    """(blocks,) bool: the clean blocks some computed output depends on. Clean block c is read
    directly by a target at c (a block's last position, shift_source: clean) and by kept noisy
    blocks after it; clean blocks attend to earlier ones of their document, so c is needed
    when any later block of its document is. An example's last clean block (no next block
    in its document) and the row's tail are never needed."""
    blocks = len(block_doc)
    needed = clean_reads.clone()
    for c in range(blocks - 2, -1, -1):
        if block_doc[c + 1] == block_doc[c]:
            needed[c] |= noisy_blocks[c + 1] | needed[c + 1]
    return needed


def lay_out_streams(tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                    groups: list[tuple[int, list[int]]], noisy: torch.Tensor,
                    targets: torch.Tensor, weights: torch.Tensor | None, reads_clean: torch.Tensor,
                    block_size: int, skip_untargeted: bool, flatten: bool, filler_id: int) -> StreamBatch:
    """tokens, positions, doc_ids: (n, L) packed rows; noisy, targets, weights: (m, L)
    per view; groups: per output row, (packed row, its views in stream order); reads_clean
    (L,) bool. `flatten` puts all output rows one after another in a single row (documents
    renumbered apart), for attention that pays only for allowed pairs: no filler needed."""
    length = tokens.shape[1]
    blocks = length // block_size
    every = torch.ones(length, dtype=torch.bool)
    rows = []
    for g, (r, views) in enumerate(groups):
        docs = doc_ids[r] + g * (length + 1) if flatten else doc_ids[r]
        parts, picks, offset = [], [], 0
        noisy_blocks = torch.zeros(blocks, dtype=torch.bool)  # kept in some noisy stream
        clean_reads = torch.zeros(blocks, dtype=torch.bool)  # holding a target read from clean
        for stream, v in enumerate(views, start=1):
            is_target = targets[v] != IGNORE
            keep = every
            if skip_untargeted:  # whole blocks holding a target read from this noisy stream
                keep = (is_target & ~reads_clean).view(blocks, block_size).any(1).repeat_interleave(block_size)
            cols, slot = _segment(noisy[v], positions[r], stream, docs, keep, block_size, offset)
            parts.append(cols)
            picks.append((v, slot, is_target if skip_untargeted else every))
            offset += len(cols[0])
            noisy_blocks |= keep.view(blocks, block_size).any(1)
            clean_reads |= (is_target & reads_clean).view(blocks, block_size).any(1)
        keep = every
        if skip_untargeted:
            keep = clean_blocks_needed(doc_ids[r, ::block_size], noisy_blocks, clean_reads).repeat_interleave(block_size)
        cols, clean_slot = _segment(tokens[r], positions[r], 0, docs, keep, block_size, offset)
        parts.append(cols)
        index, tgt, wts = [], [], []
        for v, slot, pick in picks:
            source = torch.where(reads_clean, clean_slot, slot)[pick]
            assert bool((source >= 0).all()), "a target reads a position that was left out"
            index.append(source), tgt.append(targets[v, pick])
            if weights is not None:
                wts.append(weights[v, pick])
        rows.append(([torch.cat(c) for c in zip(*parts)], torch.cat(index), torch.cat(tgt),
                     torch.cat(wts) if wts else None))
    if flatten:  # one row: later rows' outputs shift by the widths before them
        starts = torch.tensor([0] + [len(cols[0]) for cols, *_ in rows[:-1]]).cumsum(0).tolist()
        rows = [([torch.cat(c) for c in zip(*(cols for cols, *_ in rows))],
                 torch.cat([index + s for (_, index, _, _), s in zip(rows, starts)]),
                 torch.cat([tgt for _, _, tgt, _ in rows]),
                 torch.cat([w for *_, w in rows]) if weights is not None else None)]
    width = max(len(cols[0]) for cols, *_ in rows)
    outputs = max(len(index) for _, index, _, _ in rows)
    out = {k: [] for k in ("ids", "pos", "stream", "block", "doc", "index", "targets", "weights")}
    for (ids, pos, stream, block, doc), index, tgt, wts in rows:
        fill = width - len(ids)  # a multiple of the block: whole filler tiles, each on its own
        out["ids"].append(torch.cat([ids, torch.full((fill,), filler_id, dtype=torch.long)]))
        out["pos"].append(torch.cat([pos, torch.zeros(fill, dtype=torch.long)]))
        out["stream"].append(torch.cat([stream, torch.ones(fill, dtype=torch.long)]))
        out["block"].append(torch.cat([block, blocks + torch.arange(fill) // block_size]))
        out["doc"].append(torch.cat([doc, torch.full((fill,), -1, dtype=torch.long)]))
        pad = outputs - len(index)
        out["index"].append(torch.cat([index, torch.zeros(pad, dtype=torch.long)]))
        out["targets"].append(torch.cat([tgt, torch.full((pad,), IGNORE, dtype=torch.long)]))
        if wts is not None:
            out["weights"].append(torch.cat([wts, torch.zeros(pad, dtype=wts.dtype)]))
    return StreamBatch(
        input_ids=torch.stack(out["ids"]), positions=torch.stack(out["pos"]),
        labels=StreamLabels(torch.stack(out["stream"]), torch.stack(out["block"]), torch.stack(out["doc"])),
        logits_index=torch.stack(out["index"]), targets=torch.stack(out["targets"]),
        weights=torch.stack(out["weights"]) if weights is not None else None)
