"""From packed rows to one forward's inputs and targets, for both objectives.

Block diffusion (paper §3.2): every row becomes the input [x_t ; x_0] of length 2L with the
same position ids in both halves and the block-diffusion attention mask; with complementary
masking each row yields two views (first view, then its twin) in the same batch. Only L logits
are computed per view: `logits_index` picks, for each noisy position, the noisy output or (for
the position before a block start, `shift_source: clean`) the clean output (see loss.py). That
is the reference layout; `StepLayout` chooses cheaper layouts with the same loss (layout.py:
one shared clean stream for both twins, no noisy block or logit without a target) and the
attention kernel (dense mask, flex BlockMask, or block-sparse tiles).

AR: the row itself with a causal mask per document; targets are the next loss-bearing token
(block padding excluded). The same batch of diffusion rows is the AR term of the adaptation
objective (diffusion.ar_loss_weight).

`Batch.denominator` is this batch's share of the optimizer step's loss normaliser (number of
targets, or of possible targets for `inverse_t`); the trainer sums it over micro-batches and
processes before any backward, so the step's loss is one mean over the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_mask import (causal_document_mask, flex_block_mask, stream_flex_block_mask, stream_mask,
                             stream_tile_keys)
from .config import DiffusionConfig
from .layout import StreamBatch, lay_out_streams
from .loss import IGNORE, ar_targets, diffusion_targets, inverse_t_weights, output_index
from .noise import (apply_mask, complement, sample_block_mask, sample_sub_block_mask,
                    sample_suffix_mask)
from .packing import PackedRows


@dataclass
class Batch:
    input_ids: torch.Tensor  # (m, T): T = 2L for diffusion's reference layout, L for AR
    positions: torch.Tensor  # (m, T)
    attn_mask: object  # (m, 1, T, T) bool tensor, a flex_attention BlockMask, or TileKeys
    logits_index: torch.Tensor | None  # (m, K) output indices to take logits from; None: all
    targets: torch.Tensor  # (m, K), IGNORE where nothing is learned
    weights: torch.Tensor | None  # (m, K) per-target loss weights, or None (all 1)
    denominator: int  # contribution to the step's loss normaliser
    data_tokens: int  # tokens of real examples in these rows (not row-tail padding)


def diffusion_views(rows: PackedRows, seeds: list[int], cfg: DiffusionConfig):
    """Noise every row (and its complementary twin). Returns per-view tensors:
    (view_rows (m,) long, masked (m, L) bool, p (m, L) float, twin (m,) bool)."""
    view_rows, masked, probs, twin = [], [], [], []
    for r, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        if cfg.noise == "sub_block":
            m, p = sample_sub_block_mask(rows.loss_mask[r], cfg.block_size, cfg.sub_block_size, cfg.eps,
                                         generator)
        elif cfg.noise == "suffix":
            m, p = sample_suffix_mask(rows.loss_mask[r], cfg.block_size, generator)
        else:
            m, p = sample_block_mask(rows.loss_mask[r], cfg.block_size, cfg.eps, generator)
        view_rows.append(r), masked.append(m), probs.append(p), twin.append(False)
        if cfg.complementary:
            view_rows.append(r), masked.append(complement(m, rows.loss_mask[r])), probs.append(p)
            twin.append(True)
    return (torch.tensor(view_rows), torch.stack(masked), torch.stack(probs), torch.tensor(twin))


@dataclass(frozen=True)
class StepLayout:
    """How a diffusion micro-batch is computed (layout.py); every choice gives the same loss and
    gradients. The default is the paper's reference layout with the dense mask."""

    shared_clean: bool = False  # [x_t ; x_t' ; x_0] per packed row instead of [x_t ; x_0] per view
    skip_untargeted: bool = False  # noisy blocks and logits only where there are targets
    attention: str = "dense"  # dense (SDPA mask) | flex (BlockMask) | block_sparse (tile key lists)


def diffusion_streams(rows: PackedRows, seeds: list[int], cfg: DiffusionConfig, mask_token_id: int,
                      layout: StepLayout) -> tuple[StreamBatch, int]:
    """The noised views of `rows` laid out as `layout` says, and the batch's loss denominator."""
    view_rows, masked, p, twin = diffusion_views(rows, seeds, cfg)
    tokens, loss_mask, doc_ids = rows.tokens[view_rows], rows.loss_mask[view_rows], rows.doc_ids[view_rows]
    noisy = apply_mask(tokens, masked, mask_token_id)
    targets = diffusion_targets(tokens, masked, doc_ids, cfg.token_shift)  # (m, L) per view
    if cfg.loss_weighting == "inverse_t":
        weights = inverse_t_weights(p, twin, cfg.eps, cfg.token_shift)
        possible = diffusion_targets(tokens, loss_mask, doc_ids, cfg.token_shift)
        denominator = int((possible != IGNORE).sum())
    else:
        weights, denominator = None, int((targets != IGNORE).sum())
    seq_len = rows.tokens.shape[1]
    reads_clean = output_index(seq_len, cfg.block_size, cfg.token_shift, cfg.shift_source) >= seq_len
    views = view_rows.tolist()
    if layout.shared_clean:  # one output row per packed row, its views as noisy streams 1, 2
        groups = [(r, [v for v, row in enumerate(views) if row == r]) for r in range(len(rows))]
    else:  # one output row per view
        groups = [(row, [v]) for v, row in enumerate(views)]
    # with attention that pays only for allowed pairs, one long row wastes nothing on fillers
    flatten = layout.attention != "dense"
    streams = lay_out_streams(rows.tokens, rows.positions, rows.doc_ids, groups, noisy,
                              targets, weights, reads_clean, cfg.block_size, layout.skip_untargeted,
                              flatten, mask_token_id)
    return streams, denominator


def diffusion_batch(rows: PackedRows, seeds: list[int], cfg: DiffusionConfig, mask_token_id: int,
                    device: torch.device, layout: StepLayout = StepLayout()) -> Batch:
    streams, denominator = diffusion_streams(rows, seeds, cfg, mask_token_id, layout)
    labels = streams.labels.to(device)
    if layout.attention == "flex":
        mask = stream_flex_block_mask(labels)
    elif layout.attention == "block_sparse":
        mask = stream_tile_keys(labels, cfg.block_size)
    else:
        mask = stream_mask(labels)
    return Batch(
        input_ids=streams.input_ids.to(device),
        positions=streams.positions.to(device),
        attn_mask=mask,
        logits_index=streams.logits_index.to(device),
        targets=streams.targets.to(device),
        weights=streams.weights.to(device) if streams.weights is not None else None,
        denominator=denominator,
        data_tokens=int(rows.in_example.sum()),
    )


def ar_batch(rows: PackedRows, device: torch.device, use_flex: bool) -> Batch:
    """Next-token batch. Block padding (diffusion rows) is no AR target: after the example's
    last token a causal model has nothing to predict; the diffusion loss keeps learning it."""
    targets = ar_targets(rows.tokens, rows.loss_mask & ~rows.block_pad, rows.doc_ids)
    doc_ids = rows.doc_ids.to(device)
    return Batch(
        input_ids=rows.tokens.to(device),
        positions=rows.positions.to(device),
        attn_mask=flex_block_mask(doc_ids, None) if use_flex else causal_document_mask(doc_ids),
        logits_index=None,
        targets=targets.to(device),
        weights=None,
        denominator=int((targets != IGNORE).sum()),
        data_tokens=int(rows.in_example.sum()),
    )
