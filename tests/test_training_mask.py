"""The training attention masks against brute-force definitions written from the textual rule
(paper §3.2 / bd3lms): nested Python loops over every (query, key) pair of a packed row."""

from __future__ import annotations

import pytest
import torch

from fastdllm.training.attention_mask import (block_diffusion_mask, causal_document_mask,
                                              flex_mask_mod)


def brute_force_block_diffusion(docs: list[int], block: int) -> torch.Tensor:
    """The rule, literally. Row = [noisy x_t (L tokens) ; clean x_0 (L tokens)].
    - a noisy token sees the noisy tokens of its own block (both directions);
    - a noisy token sees the clean tokens of the blocks strictly before its block;
    - a clean token sees the clean tokens of its own and earlier blocks;
    - a clean token never sees a noisy token;
    - nobody sees a token of another document (packed example)."""
    L = len(docs)
    allowed = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_noisy, k_noisy = q < L, k < L
            qi, ki = q % L, k % L
            if docs[qi] != docs[ki]:
                continue
            q_block, k_block = qi // block, ki // block
            if q_noisy and k_noisy:
                ok = q_block == k_block
            elif q_noisy and not k_noisy:
                ok = k_block < q_block
            elif not q_noisy and not k_noisy:
                ok = k_block <= q_block
            else:
                ok = False
            allowed[q, k] = ok
    return allowed


def brute_force_causal(docs: list[int]) -> torch.Tensor:
    L = len(docs)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            allowed[q, k] = k <= q and docs[q] == docs[k]
    return allowed


def packed_docs(lengths: list[int], seq_len: int) -> list[int]:
    """Document ids of a row holding examples of these lengths, then its padding tail."""
    docs = [d for d, n in enumerate(lengths) for _ in range(n)]
    return docs + [len(lengths)] * (seq_len - len(docs))


CASES = [  # (block size, example lengths (multiples of the block), row length)
    (1, [5], 5),
    (2, [8], 8),
    (4, [8], 8),
    (4, [4, 8], 16),
    (4, [4, 4, 4], 16),  # three examples and a one-block tail
    (3, [6, 3], 12),
    (8, [8, 8], 16),
    (16, [16], 32),
    (2, [2, 2, 2, 2, 2], 12),
]


@pytest.mark.parametrize("block, lengths, seq_len", CASES)
def test_block_diffusion_mask_matches_the_rule(block, lengths, seq_len):
    docs = packed_docs(lengths, seq_len)
    dense = block_diffusion_mask(torch.tensor([docs]), block)
    assert dense.shape == (1, 1, 2 * seq_len, 2 * seq_len)
    assert torch.equal(dense[0, 0], brute_force_block_diffusion(docs, block))


def test_block_diffusion_mask_batches_rows_independently():
    rows = [packed_docs([4, 4], 12), packed_docs([8], 12), packed_docs([12], 12)]
    dense = block_diffusion_mask(torch.tensor(rows), 4)
    for r, docs in enumerate(rows):
        assert torch.equal(dense[r, 0], brute_force_block_diffusion(docs, 4))


@pytest.mark.parametrize("lengths, seq_len", [([7], 7), ([3, 4], 9), ([1, 1, 5], 8)])
def test_causal_document_mask_matches_the_rule(lengths, seq_len):
    docs = packed_docs(lengths, seq_len)
    dense = causal_document_mask(torch.tensor([docs]))
    assert torch.equal(dense[0, 0], brute_force_causal(docs))


def test_every_query_attends_somewhere():
    """SDPA returns NaN for a query with no allowed key; every token sees at least itself
    (noisy) or its own block (clean)."""
    docs = packed_docs([4, 8], 16)
    dense = block_diffusion_mask(torch.tensor([docs]), 4)
    assert dense[0, 0].any(dim=-1).all()


@pytest.mark.parametrize("block", [4, None])
def test_flex_mask_mod_equals_dense_mask(block):
    """The CUDA path builds its BlockMask from `flex_mask_mod` (per-row document lookups);
    flex's element-level materialisation of it (CPU-capable) must equal the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    docs = torch.tensor([packed_docs([4, 8], 16), packed_docs([16], 16)])
    mask_mod, length = flex_mask_mod(docs, block)
    element_mask = flex.create_mask(mask_mod, 2, None, length, length, device="cpu")
    dense = block_diffusion_mask(docs, block) if block else causal_document_mask(docs)
    assert torch.equal(element_mask, dense)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention run uncompiled (slow, exact)
@torch.no_grad()
def test_flex_block_mask_path_gives_the_dense_paths_logits():
    """The CUDA training path (a flex_attention BlockMask) and the CPU path (a dense boolean
    mask through SDPA) compute the same loss from the same targets; flex runs forward-only on
    CPU, which suffices."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from fastdllm.model.config import ModelConfig
    from fastdllm.model.transformer import Transformer
    from fastdllm.training.config import DiffusionConfig
    from fastdllm.training.data import Example
    from fastdllm.training.loss import target_loss_sum
    from fastdllm.training.objective import StepLayout, ar_batch, diffusion_batch
    from fastdllm.training.packing import pack_examples

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)).eval()
    examples = [Example(tuple(range(3, 3 + n)), tuple([False] * 3 + [True] * (n - 3)), f"x:{n}")
                for n in (20, 37, 9, 50)]
    rows = pack_examples(examples, seq_len=64, alignment=16, pad_id=2, pad_loss=True, row_pad_id=100,
                         too_long="error")
    cpu = torch.device("cpu")
    cfg = DiffusionConfig(block_size=16)
    seeds = list(range(len(rows)))
    for dense, flex in ((diffusion_batch(rows, seeds, cfg, 100, cpu),
                         diffusion_batch(rows, seeds, cfg, 100, cpu, StepLayout(attention="flex"))),
                        (ar_batch(rows, cpu, use_flex=False), ar_batch(rows, cpu, use_flex=True))):
        assert not isinstance(flex.attn_mask, torch.Tensor)  # a BlockMask
        try:
            got = model(flex.input_ids, flex.positions, flex.attn_mask, logits_slice=flex.logits_index)
        except (NotImplementedError, RuntimeError) as e:  # flex_attention without CPU support
            pytest.skip(f"flex_attention cannot run on this CPU build: {e}")
        want = model(dense.input_ids, dense.positions, dense.attn_mask, logits_slice=dense.logits_index)
        # the flex path lays the diffusion views out as one row: compare per-target losses
        assert torch.allclose(target_loss_sum(got, flex.targets), target_loss_sum(want, dense.targets),
                              rtol=1e-5)
        assert torch.equal(flex.targets[flex.targets != -100], dense.targets[dense.targets != -100])
