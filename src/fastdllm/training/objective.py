"""From packed rows to one forward's inputs and targets, for both objectives.

Block diffusion (paper §3.2): every row becomes the input [x_t ; x_0] of length 2L with the
same position ids in both halves and the block-diffusion attention mask; with complementary
masking each row yields two views (first view, then its twin) in the same batch. Only L logits
are computed per view: `logits_index` picks, for each noisy position, the noisy output or (for
the position before a block start, `shift_source: clean`) the clean output (see loss.py).

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

from .attention_mask import block_diffusion_mask, causal_document_mask, flex_block_mask
from .config import DiffusionConfig
from .loss import IGNORE, ar_targets, diffusion_targets, inverse_t_weights, output_index
from .noise import apply_mask, complement, sample_block_mask
from .packing import PackedRows


@dataclass
class Batch:
    input_ids: torch.Tensor  # (m, T): T = 2L for diffusion, L for AR
    positions: torch.Tensor  # (m, T)
    attn_mask: object  # (m, 1, T, T) bool tensor, or a flex_attention BlockMask
    logits_index: torch.Tensor | None  # (m, L) output indices to take logits from; None: all
    targets: torch.Tensor  # (m, L), IGNORE where nothing is learned
    weights: torch.Tensor | None  # (m, L) per-target loss weights, or None (all 1)
    denominator: int  # contribution to the step's loss normaliser
    data_tokens: int  # tokens of real examples in these rows (not row-tail padding)


def diffusion_views(rows: PackedRows, seeds: list[int], cfg: DiffusionConfig):
    """Noise every row (and its complementary twin). Returns per-view tensors:
    (view_rows (m,) long, masked (m, L) bool, p (m, L) float, twin (m,) bool)."""
    view_rows, masked, probs, twin = [], [], [], []
    for r, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        m, p = sample_block_mask(rows.loss_mask[r], cfg.block_size, cfg.eps, generator)
        view_rows.append(r), masked.append(m), probs.append(p), twin.append(False)
        if cfg.complementary:
            view_rows.append(r), masked.append(complement(m, rows.loss_mask[r])), probs.append(p)
            twin.append(True)
    return (torch.tensor(view_rows), torch.stack(masked), torch.stack(probs), torch.tensor(twin))


def diffusion_batch(rows: PackedRows, seeds: list[int], cfg: DiffusionConfig, mask_token_id: int,
                    device: torch.device, use_flex: bool) -> Batch:
    view_rows, masked, p, twin = diffusion_views(rows, seeds, cfg)
    tokens, loss_mask = rows.tokens[view_rows], rows.loss_mask[view_rows]
    doc_ids, positions = rows.doc_ids[view_rows], rows.positions[view_rows]
    noisy = apply_mask(tokens, masked, mask_token_id)
    targets = diffusion_targets(tokens, masked, doc_ids, cfg.token_shift)
    if cfg.loss_weighting == "inverse_t":
        weights = inverse_t_weights(p, twin, cfg.eps, cfg.token_shift).to(device)
        possible = diffusion_targets(tokens, loss_mask, doc_ids, cfg.token_shift)
        denominator = int((possible != IGNORE).sum())
    else:
        weights, denominator = None, int((targets != IGNORE).sum())
    doc_ids = doc_ids.to(device)
    mask = flex_block_mask(doc_ids, cfg.block_size) if use_flex else block_diffusion_mask(doc_ids, cfg.block_size)
    seq_len = rows.tokens.shape[1]
    return Batch(
        input_ids=torch.cat([noisy, tokens], dim=1).to(device),  # (m, 2L): [x_t ; x_0]
        positions=torch.cat([positions, positions], dim=1).to(device),
        attn_mask=mask,
        logits_index=output_index(seq_len, cfg.block_size, cfg.token_shift, cfg.shift_source)
        .expand(len(view_rows), -1).to(device),
        targets=targets.to(device),
        weights=weights,
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
