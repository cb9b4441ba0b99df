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
"""

from __future__ import annotations

import torch


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
