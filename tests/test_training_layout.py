"""The cheaper diffusion step (layout.py, tile attention) against the reference layout: loss and
gradients of the shared clean stream, of skipping untargeted noisy blocks and of block-sparse
attention equal those of [x_t ; x_0] per view with the dense mask, on random packed rows."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastdllm.model.config import ModelConfig
from fastdllm.model.tile_attention import TileKeys, tile_attention
from fastdllm.model.transformer import Transformer
from fastdllm.training.attention_mask import (StreamLabels, block_diffusion_mask, stream_mask,
                                              stream_mask_mod, stream_tile_keys)
from fastdllm.training.config import DiffusionConfig
from fastdllm.training.data import Example
from fastdllm.training.loss import IGNORE, target_loss_sum
from fastdllm.training.objective import StepLayout, diffusion_batch, diffusion_streams
from fastdllm.training.packing import pack_examples

MASK, EOS, B, L = 100, 2, 4, 32
CPU = torch.device("cpu")
LAYOUTS = {
    "shared_clean": StepLayout(shared_clean=True),
    "skip_untargeted": StepLayout(skip_untargeted=True),
    "block_sparse": StepLayout(attention="block_sparse"),
    "all": StepLayout(shared_clean=True, skip_untargeted=True, attention="block_sparse"),
}


def random_rows(seed: int, padding: str):
    """Packed rows of random examples: prompts of several blocks, short answers, row tails."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(7):
        prompt, answer = int(torch.randint(1, 10, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        tokens = torch.randint(3, 90, (prompt + answer,), generator=g).tolist()
        examples.append(Example(tuple(tokens), tuple([False] * prompt + [True] * answer), f"r:{i}"))
    pad_id, pad_loss = (EOS, True) if padding == "eos" else (MASK, False)
    return pack_examples(examples, seq_len=L, alignment=B, pad_id=pad_id, pad_loss=pad_loss,
                         row_pad_id=MASK, too_long="error", packing="next_fit")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True))


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(batch.input_ids, batch.positions, batch.attn_mask, logits_slice=batch.logits_index)
    loss = target_loss_sum(logits, batch.targets, batch.weights) / batch.denominator
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CONFIGS = [dict(complementary=c, token_shift=t, shift_source=s, padding=p)
           for c, t, s, p in itertools.product((True, False), (True, False), ("clean", "noisy"), ("eos", "mask"))
           if t or s == "clean"]  # without token shift the shift source plays no part


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cheaper_layouts_give_the_reference_loss_and_gradients(case):
    padding = case.pop("padding")
    rows = random_rows(len(CONFIGS) + hash(padding) % 7, padding)
    model = tiny_model()
    seeds = list(range(10, 10 + len(rows)))
    for weighting in ("none", "inverse_t"):
        cfg = DiffusionConfig(block_size=B, loss_weighting=weighting, **case)
        ref = diffusion_batch(rows, seeds, cfg, MASK, CPU)
        assert ref.input_ids.shape[1] == 2 * L  # the reference: [x_t ; x_0] per view
        want_loss, want_grads = loss_and_grads(model, ref)
        for name, layout in LAYOUTS.items():
            batch = diffusion_batch(rows, seeds, cfg, MASK, CPU, layout)
            assert batch.denominator == ref.denominator
            assert int((batch.targets != IGNORE).sum()) == int((ref.targets != IGNORE).sum())
            loss, grads = loss_and_grads(model, batch)
            assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6), name
            for n, g in grads.items():
                assert torch.allclose(g, want_grads[n], rtol=1e-4, atol=1e-6), (name, n)


def test_cheaper_layouts_compute_fewer_tokens():
    rows = random_rows(3, "eos")
    cfg = DiffusionConfig(block_size=B)
    seeds = list(range(len(rows)))
    ref = diffusion_batch(rows, seeds, cfg, MASK, CPU)
    shared = diffusion_batch(rows, seeds, cfg, MASK, CPU, LAYOUTS["shared_clean"])
    skip = diffusion_batch(rows, seeds, cfg, MASK, CPU, LAYOUTS["skip_untargeted"])
    assert ref.input_ids.numel() == len(rows) * 2 * 2 * L
    assert shared.input_ids.shape == (len(rows), 3 * L)
    assert skip.input_ids.numel() < ref.input_ids.numel()
    assert skip.logits_index.numel() < ref.logits_index.numel()


def test_stream_rule_on_the_reference_layout_is_the_block_diffusion_mask():
    docs = torch.tensor([[0] * 8 + [1] * 12 + [2] * 4, [0] * 24])
    n, length = docs.shape
    j = torch.arange(2 * length)
    labels = StreamLabels(stream=(j < length).long().expand(n, -1), block=((j % length) // 4).expand(n, -1),
                          doc=docs.repeat(1, 2))
    assert torch.equal(stream_mask(labels), block_diffusion_mask(docs, 4))


@pytest.mark.parametrize("complementary", (True, False))
def test_tile_key_lists_are_exactly_the_dense_mask(complementary):
    """Every query of a tile may see the same keys, and the lists hold exactly those."""
    rows = random_rows(5, "eos")
    cfg = DiffusionConfig(block_size=B, complementary=complementary)
    for shared, skip in itertools.product((True, False), repeat=2):
        streams, _ = diffusion_streams(rows, list(range(len(rows))), cfg, MASK, StepLayout(shared, skip))
        dense = stream_mask(streams.labels)[:, 0]  # (n, T, T)
        keys = stream_tile_keys(streams.labels, B)
        n, length, _ = dense.shape
        rebuilt = torch.zeros(n, length // B, length, dtype=torch.bool)
        rebuilt.scatter_(2, keys.key_index, keys.key_valid)
        assert torch.equal(rebuilt.repeat_interleave(B, dim=1), dense)
        assert dense.any(-1).all()  # every query (fillers too) attends somewhere


def test_tile_attention_equals_dense_sdpa_with_grouped_heads():
    torch.manual_seed(0)
    n, heads, kv_heads, tile, tiles, hd = 2, 6, 2, 4, 5, 8
    length = tile * tiles
    allowed = torch.rand(n, tiles, length) < 0.4
    allowed[:, torch.arange(tiles), torch.arange(tiles) * tile] = True  # no tile without a key
    count = allowed.sum(-1)
    index = torch.sort(allowed.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :int(count.max())]
    keys = TileKeys(index, torch.arange(index.shape[-1]) < count[..., None], tile)
    q = torch.randn(n, heads, length, hd, requires_grad=True)
    k = torch.randn(n, kv_heads, length, hd, requires_grad=True)
    v = torch.randn(n, kv_heads, length, hd, requires_grad=True)
    got = tile_attention(q, k, v, keys)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.repeat_interleave(tile, 1)[:, None],
                                          enable_gqa=True)
    assert torch.allclose(got, want, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-4)


def test_flex_mask_mod_is_the_dense_stream_mask():
    """The CUDA path's predicate, evaluated on every (query, key) pair of a cheaper layout."""
    rows = random_rows(1, "eos")
    streams, _ = diffusion_streams(rows, list(range(len(rows))), DiffusionConfig(block_size=B), MASK,
                                   StepLayout(True, True, "dense"))
    dense = stream_mask(streams.labels)[:, 0]
    n, length, _ = dense.shape
    mod = stream_mask_mod(streams.labels)
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    for row in range(n):
        assert torch.equal(mod(torch.tensor(row), 0, q, k), dense[row])


# ---- packing ----

def _examples(seed: int, n: int, block: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5 * block, (n,), generator=g).tolist()
    return [Example(tuple(range(3, 3 + k)), tuple([False] + [True] * (k - 1)), f"p:{i}")
            for i, k in enumerate(lengths)]


def _packed_examples(rows) -> list[tuple[int, ...]]:
    """Every example of the packed rows (its tokens without block padding), in row order."""
    found = []
    for r in range(len(rows)):
        for d in rows.doc_ids[r][rows.in_example[r]].unique().tolist():
            sel = (rows.doc_ids[r] == d) & rows.in_example[r] & ~rows.block_pad[r]
            assert int(rows.positions[r][sel][0]) == 0  # each example starts at position 0
            found.append(tuple(rows.tokens[r][sel].tolist()))
    return found


@pytest.mark.parametrize("alignment", (1, 8))
def test_first_fit_packs_every_example_once_in_fewer_rows(alignment):
    examples = _examples(alignment, 300, 8)
    kw = dict(seq_len=48, alignment=alignment, pad_id=EOS, pad_loss=True, row_pad_id=MASK, too_long="error")
    next_fit = pack_examples(examples, packing="next_fit", **kw)
    first_fit = pack_examples(examples, packing="first_fit", **kw)
    want = sorted(ex.tokens for ex in examples)
    assert sorted(_packed_examples(next_fit)) == want
    assert sorted(_packed_examples(first_fit)) == want
    assert len(first_fit) < len(next_fit)
    again = pack_examples(examples, packing="first_fit", **kw)
    assert again.fingerprint() == first_fit.fingerprint()  # deterministic: resume stays exact
    for r in range(len(first_fit)):  # blocks stay aligned: every example starts on a multiple
        starts = (first_fit.positions[r] == 0) & first_fit.in_example[r]
        assert (starts.nonzero().squeeze(1) % alignment == 0).all()


def test_checkpoints_from_before_the_new_keys_still_resume():
    """A saved config without train.layout / skip_untargeted / data.packing equals a given config
    holding their defaults, and differs from one that sets another value."""
    from fastdllm.training.config import DataConfig, LoopConfig, TrainConfig, with_added_defaults
    from fastdllm.training.state import check_same_run

    cfg = TrainConfig(data=DataConfig(train_file="t.jsonl"), output_dir="o", train=LoopConfig(max_steps=1),
                      base_model="b")
    old = cfg.to_dict()
    for section, key in (("train", "layout"), ("train", "skip_untargeted"), ("data", "packing")):
        del old[section][key]
    state = {"config": with_added_defaults(old, cfg.to_dict()), "world_size": 1}
    check_same_run(state, cfg.to_dict(), 1, "ckpt")
    other = TrainConfig(data=DataConfig(train_file="t.jsonl"), output_dir="o",
                        train=LoopConfig(max_steps=1, layout="twins"), base_model="b").to_dict()
    with pytest.raises(Exception, match="train.layout"):
        check_same_run({"config": with_added_defaults(old, other), "world_size": 1}, other, 1, "ckpt")
