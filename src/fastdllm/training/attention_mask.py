"""Training attention masks (paper §3.2, Fig. 2; the three-part mask of bd3lms).

The block-diffusion input is one row of length 2L: the noisy half x_t at indices [0, L) and the
clean half x_0 at [L, 2L), both at the same positions 0..L-1. Blocks of B tokens are aligned to
multiples of B in each half (examples are padded to multiples of B before packing, so an
example's blocks are also the row's blocks). With `doc` the per-token document id of a packed
row, query q may attend key k when they are in the same document and

- noisy q, noisy k: same block (bidirectional inside the noisy block),
- noisy q, clean k: k's block is strictly before q's block (the committed prefix),
- clean q, clean k: k's block is at or before q's block (block-causal clean stream),
- clean q, noisy k: never (the clean stream is exactly what a committed prefix computes).

`block_diffusion_allowed` is that rule written once, elementwise on index tensors; the dense
boolean mask (CPU, SDPA) and the flex_attention BlockMask (CUDA) are both built from it. The AR
objective uses `causal_allowed`: causal inside a document, nothing across documents.

Stream layouts (layout.py). The same rule over per-token labels instead of index arithmetic:
each token of a training row carries its `stream` (0: the clean x_0, s >= 1: noisy view s), its
`block` (the block of the packed row it copies) and its `doc`. `stream_allowed` reads

- noisy q, noisy k: same stream and same block,
- noisy q, clean k: k's block strictly before q's block,
- clean q, clean k: k's block at or before q's block,
- clean q, noisy k: never; and always the same document.

With one noisy stream laid out as [x_t ; x_0] it is exactly `block_diffusion_allowed`; it also
covers the shared clean stream [x_t ; x_t' ; x_0] of complementary twins (clean queries see no
noisy key, so one clean copy serves both twins) and noisy streams that keep only the blocks
holding targets. Blocks are aligned and never straddle documents, so every query of one block
(one tile of B consecutive tokens of a stream) may see the same keys: `stream_tile_keys` lists
them per tile, and block-sparse attention (model/tile_attention.py) pays only for those instead
of the whole T x T square. Dense mask, flex predicate and tile key lists all come from
`stream_allowed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.tile_attention import TileKeys


def block_diffusion_allowed(q: torch.Tensor, k: torch.Tensor, doc_q: torch.Tensor,
                            doc_k: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """May query index q attend key index k? Indices run over [0, 2*seq_len)."""
    q_clean, k_clean = q >= seq_len, k >= seq_len
    q_block = (q % seq_len) // block_size
    k_block = (k % seq_len) // block_size
    noisy_to_noisy = ~q_clean & ~k_clean & (q_block == k_block)
    noisy_to_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_to_clean = q_clean & k_clean & (k_block <= q_block)
    return (doc_q == doc_k) & (noisy_to_noisy | noisy_to_clean | clean_to_clean)


def causal_allowed(q: torch.Tensor, k: torch.Tensor, doc_q: torch.Tensor,
                   doc_k: torch.Tensor) -> torch.Tensor:
    return (doc_q == doc_k) & (k <= q)


def block_diffusion_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense mask (n, 1, 2L, 2L), True = may attend, for rows with document ids (n, L)."""
    n, seq_len = doc_ids.shape
    idx = torch.arange(2 * seq_len, device=doc_ids.device)
    doc = doc_ids.repeat(1, 2)  # (n, 2L): both halves carry the same documents
    allowed = block_diffusion_allowed(idx[:, None], idx[None, :], doc[:, :, None], doc[:, None, :],
                                      seq_len, block_size)
    return allowed[:, None]


def causal_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Dense mask (n, 1, L, L) for next-token training on packed rows."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return causal_allowed(idx[:, None], idx[None, :], doc_ids[:, :, None], doc_ids[:, None, :])[:, None]


def stream_allowed(q_stream: torch.Tensor, q_block: torch.Tensor, q_doc: torch.Tensor,
                   k_stream: torch.Tensor, k_block: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """May a query with these labels attend a key with those? (elementwise, broadcasting)"""
    q_clean, k_clean = q_stream == 0, k_stream == 0
    same_noisy_block = ~q_clean & (k_stream == q_stream) & (k_block == q_block)
    noisy_to_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_to_clean = q_clean & k_clean & (k_block <= q_block)
    return (q_doc == k_doc) & (same_noisy_block | noisy_to_clean | clean_to_clean)


@dataclass(frozen=True)
class StreamLabels:
    """Per-token labels (n, T) of a stream layout: stream (0 clean, s >= 1 noisy view s), the
    packed row's block each token copies, and its document (-1 on filler tokens, which see only
    their own tile: fillers get blocks of their own)."""

    stream: torch.Tensor
    block: torch.Tensor
    doc: torch.Tensor

    def to(self, device) -> "StreamLabels":
        return StreamLabels(self.stream.to(device), self.block.to(device), self.doc.to(device))


def stream_mask(labels: StreamLabels) -> torch.Tensor:
    """Dense mask (n, 1, T, T), True = may attend."""
    s, b, d = labels.stream, labels.block, labels.doc
    return stream_allowed(s[:, :, None], b[:, :, None], d[:, :, None],
                          s[:, None, :], b[:, None, :], d[:, None, :])[:, None]


def stream_mask_mod(labels: StreamLabels):
    """The rule as a flex_attention mask_mod: labels looked up per batch row and index."""
    s, b, d = labels.stream, labels.block, labels.doc

    def stream_mod(n, h, q, k):
        return stream_allowed(s[n, q], b[n, q], d[n, q], s[n, k], b[n, k], d[n, k])
    return stream_mod


def stream_flex_block_mask(labels: StreamLabels):
    """The rule as a flex_attention BlockMask (CUDA path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, length = labels.stream.shape
    return create_block_mask(stream_mask_mod(labels), B=n, H=None, Q_LEN=length, KV_LEN=length,
                             device=labels.stream.device)


def stream_tile_keys(labels: StreamLabels, tile: int) -> TileKeys:
    """For each tile of `tile` consecutive tokens (one block of one stream), the keys its
    queries may see, from the rule at the tile's first query (every query of a tile has the
    same labels but for its index inside the block, which the rule does not read)."""
    s, b, d = labels.stream, labels.block, labels.doc
    n, length = s.shape
    first = slice(0, length, tile)
    allowed = stream_allowed(s[:, first, None], b[:, first, None], d[:, first, None],
                             s[:, None, :], b[:, None, :], d[:, None, :])  # (n, tiles, T)
    count = allowed.sum(-1)
    width = int(count.max())
    # stable sort puts each tile's allowed keys first, in index order
    key_index = torch.sort(allowed.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    key_index = key_index[..., :width].contiguous()
    key_valid = torch.arange(width, device=s.device) < count[..., None]
    return TileKeys(key_index=key_index, key_valid=key_valid, tile=tile)


def flex_mask_mod(doc_ids: torch.Tensor, block_size: int | None):
    """(mask_mod, length) for flex_attention: the block-diffusion rule over 2L when
    `block_size` is given, causal over L otherwise; documents looked up per batch row."""
    n, seq_len = doc_ids.shape
    if block_size is None:
        def causal_mod(b, h, q, k):
            return causal_allowed(q, k, doc_ids[b, q], doc_ids[b, k])
        return causal_mod, seq_len
    doc = doc_ids.repeat(1, 2)

    def block_diffusion_mod(b, h, q, k):
        return block_diffusion_allowed(q, k, doc[b, q], doc[b, k], seq_len, block_size)
    return block_diffusion_mod, 2 * seq_len


def flex_block_mask(doc_ids: torch.Tensor, block_size: int | None):
    """The rule as a flex_attention BlockMask (CUDA path). Only tiles holding some allowed pair
    are computed: the 2L x 2L block-diffusion mask is mostly empty, so this is where its cost
    drops well below dense attention over 2L."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod, length = flex_mask_mod(doc_ids, block_size)
    return create_block_mask(mask_mod, B=doc_ids.shape[0], H=None, Q_LEN=length, KV_LEN=length,
                             device=doc_ids.device)
