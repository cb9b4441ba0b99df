"""The Fast-dLLM v2 training objective piece by piece (paper §3.2): block noise and its p
formula, complementary twins, token-shift targets and which stream predicts a block's first
token, padding labels, loss weighting, data rendering and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from fastdllm.errors import FastDLLMError

from fastdllm.model.config import ModelConfig
from fastdllm.model.transformer import Transformer
from fastdllm.training.config import DiffusionConfig, OptimizerConfig
from fastdllm.training.data import Example, render_record
from fastdllm.training.loss import (IGNORE, diffusion_targets, inverse_t_weights, output_index,
                                    target_loss_sum)
from fastdllm.training.noise import (complement, mask_probability, row_seed, sample_block_mask,
                                     sample_sub_block_mask, sample_suffix_mask)
from fastdllm.training.objective import ar_batch, diffusion_batch, diffusion_views
from fastdllm.training.packing import pack_examples
from fastdllm.training.schedule import lr_at

I = IGNORE
MASK = 99


def rows_of(examples, *, seq_len, block, pad_id=2, pad_loss=True):
    exs = [Example(tuple(t), tuple(bool(x) for x in m), f"test:{i}") for i, (t, m) in enumerate(examples)]
    return pack_examples(exs, seq_len=seq_len, alignment=block, pad_id=pad_id, pad_loss=pad_loss,
                         row_pad_id=MASK, too_long="error")


# ---- noise ----

def test_mask_probability_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    eps = 1e-3
    assert torch.allclose(mask_probability(t, eps), (1 - eps) * t + eps)
    assert mask_probability(torch.tensor(0.0), eps) == pytest.approx(eps)
    assert mask_probability(torch.tensor(1.0), eps) == pytest.approx(1.0)


def test_block_noise_is_per_block_and_never_touches_prompt_tokens():
    loss = torch.tensor([False] * 5 + [True] * 27)  # a 5-token prompt, then the response
    for seed in range(20):
        masked, p = sample_block_mask(loss, 8, 1e-3, torch.Generator().manual_seed(seed))
        assert not masked[:5].any()
        assert not (masked & ~loss).any()
        blocks = p.view(4, 8)
        assert torch.equal(blocks, blocks[:, :1].expand(-1, 8))  # one p per block
        assert ((p >= 1e-3) & (p <= 1)).all()


def test_mask_rate_follows_p():
    """Averaged over many blocks, the fraction masked in a block equals its p."""
    loss = torch.ones(64 * 512, dtype=torch.bool)
    masked, p = sample_block_mask(loss, 64, 1e-3, torch.Generator().manual_seed(0))
    rate = masked.view(512, 64).float().mean(1)
    p_block = p.view(512, 64)[:, 0]
    assert (rate - p_block).abs().mean() < 0.06  # binomial noise: std <= 0.0625 per block
    assert abs(float(rate.mean() - p_block.mean())) < 0.01


def test_complementary_twins_cover_each_loss_token_exactly_once():
    examples = [([5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 1, 1, 1, 1]), ([20, 21, 22], [0, 1, 1])]
    rows = rows_of(examples, seq_len=16, block=4)
    cfg = DiffusionConfig(block_size=4)
    view_rows, masked, p, twin = diffusion_views(rows, [row_seed(0, "train", i) for i in range(len(rows))], cfg)
    assert view_rows.tolist() == [0, 0] and twin.tolist() == [False, True]
    loss = rows.loss_mask[0]
    assert torch.equal(masked[0] ^ masked[1], loss)  # in exactly one of the two views
    assert not ((masked[0] | masked[1]) & ~loss).any()  # prompt and tail never masked
    assert torch.equal(p[0], p[1])
    assert torch.equal(complement(masked[0], loss), masked[1])


def test_noise_is_a_function_of_the_seed_only():
    rows = rows_of([([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 1, 1, 1, 1, 1, 1])], seq_len=8, block=4)
    cfg = DiffusionConfig(block_size=4)
    a = diffusion_views(rows, [123], cfg)[1]
    torch.manual_seed(999)  # the global RNG plays no part
    b = diffusion_views(rows, [123], cfg)[1]
    assert torch.equal(a, b)


def test_sub_block_noise_draws_the_states_decoding_visits():
    """noise: sub_block: per block, sub-blocks before the current one visible, the current one
    masked at the block's p, every later one masked; prompt tokens never masked."""
    loss = torch.tensor([False] * 5 + [True] * 59)  # a 5-token prompt, two blocks of 32
    seen = set()
    for seed in range(40):
        masked, p = sample_sub_block_mask(loss, 32, 8, 1e-3, torch.Generator().manual_seed(seed))
        assert not (masked & ~loss).any()
        assert torch.equal(p.view(2, 32), p.view(2, 32)[:, :1].expand(-1, 32))
        for block in range(2):
            subs = masked[block * 32:(block + 1) * 32].view(4, 8)
            covered = (masked | ~loss)[block * 32:(block + 1) * 32].view(4, 8).all(dim=1)
            # the first sub-block with a mask is the current one (or the one after it, if the
            # current drew none): nothing before it is masked, every loss token after it is
            current = next((i for i in range(4) if subs[i].any()), 4)
            assert covered[current + 1:].all()
            seen.add(current)
    assert {0, 1, 2, 3} <= seen  # every sub-block is drawn as the current one


def test_suffix_noise_draws_the_left_anchored_rules_states():
    """noise: suffix: per block, visible before a cut and masked from it on (the left-anchored
    rule decodes runs from the first masked place, so these are the only states it visits)."""
    loss = torch.tensor([False] * 5 + [True] * 59)
    cuts = set()
    for seed in range(60):
        masked, p = sample_suffix_mask(loss, 32, torch.Generator().manual_seed(seed))
        assert not (masked & ~loss).any()
        for block in range(2):
            m = masked[block * 32:(block + 1) * 32]
            cut = int(m.int().argmax()) if m.any() else 32
            assert m[cut:].all()  # from the first masked place on, everything is masked
            if block == 1:
                cuts.add(cut)
                assert p[32].item() == (32 - cut) / 32
    assert len(cuts) > 20  # the cut is spread over the block


def test_sub_block_noise_config_and_views():
    rows = rows_of([([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 1, 1, 1, 1, 1, 1])], seq_len=8, block=4)
    cfg = DiffusionConfig(block_size=4, noise="sub_block", sub_block_size=2, complementary=False)
    view_rows, masked, p, twin = diffusion_views(rows, [7], cfg)
    assert view_rows.tolist() == [0] and twin.tolist() == [False]  # no twin
    expected, _ = sample_sub_block_mask(rows.loss_mask[0], 4, 2, cfg.eps, torch.Generator().manual_seed(7))
    assert torch.equal(masked[0], expected)
    with pytest.raises(FastDLLMError, match="diffusion.complementary: false"):
        DiffusionConfig(block_size=4, noise="sub_block", sub_block_size=2)
    with pytest.raises(FastDLLMError, match="must divide diffusion.block_size"):
        DiffusionConfig(block_size=32, noise="sub_block", sub_block_size=5, complementary=False)
    with pytest.raises(FastDLLMError, match="suffix has no complementary twin"):
        DiffusionConfig(noise="suffix")
    with pytest.raises(FastDLLMError, match="diffusion.noise"):
        DiffusionConfig(noise="prefix")


# ---- token shift ----

TOKENS = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
MASKED = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)


def test_shifted_targets_hand_made():
    two_docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    # position j holds token j+1 when token j+1 is masked and in j's document
    assert diffusion_targets(TOKENS, MASKED, two_docs, True).tolist() == [[11, I, 13, I, I, 16, I, I]]
    one_doc = torch.zeros_like(two_docs)
    assert diffusion_targets(TOKENS, MASKED, one_doc, True).tolist() == [[11, I, 13, 14, I, 16, I, I]]


def test_unshifted_targets_hand_made():
    docs = torch.zeros_like(TOKENS)
    assert diffusion_targets(TOKENS, MASKED, docs, False).tolist() == [[I, 11, I, 13, 14, I, 16, I]]


def test_output_index_reads_block_starts_from_the_clean_stream():
    # L = 8, B = 4: position 3 predicts token 4 (block 1's first token) from clean output 8 + 3
    assert output_index(8, 4, True, "clean").tolist() == [0, 1, 2, 11, 4, 5, 6, 15]
    assert output_index(8, 4, True, "noisy").tolist() == list(range(8))
    assert output_index(8, 4, False, "clean").tolist() == list(range(8))


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    return Transformer(cfg).eval()


def _block_causal(n: int, block: int) -> torch.Tensor:
    i = torch.arange(n)
    return ((i[None, :] // block) <= (i[:, None] // block))[None, None]


@torch.no_grad()
def test_training_logits_are_what_the_engine_computes():
    """The logits a target is trained from equal those the decoder sees at inference:
    inside a block, the noisy block's output over the clean prefix; at a block start, the
    output of the committed (clean) previous block, as the engine's commit forward computes."""
    model = _tiny_model()
    L, B = 12, 4
    tokens = torch.randint(0, 100, (1, L))
    rows = rows_of([(tokens[0].tolist(), [0] + [1] * (L - 1))], seq_len=L, block=B)
    cfg = DiffusionConfig(block_size=B, complementary=False)
    batch = diffusion_batch(rows, [7], cfg, MASK, torch.device("cpu"))
    logits = model(batch.input_ids, batch.positions, batch.attn_mask, logits_slice=batch.logits_index)
    noisy = batch.input_ids[0, :L]
    for j in range(L - 1):
        b = (j + 1) // B  # block of the token predicted from position j
        if (j + 1) % B == 0:  # block start: committed prefix of blocks < b, block-causal
            seq = tokens[:, : b * B]
            ref = model(seq, torch.arange(b * B)[None], _block_causal(b * B, B))[0, j]
        else:  # clean blocks < b, then the noisy block b, attending to all of it
            seq = torch.cat([tokens[0, : b * B], noisy[b * B:(b + 1) * B]])[None]
            ref = model(seq, torch.arange((b + 1) * B)[None], _block_causal((b + 1) * B, B))[0, j]
        assert torch.allclose(logits[0, j], ref, atol=1e-5), j


# ---- padding labels ----

def test_block_padding_with_eos_is_learned_and_rows_tail_is_not():
    EOS = 2
    rows = rows_of([([1, 5, 6, 7, EOS], [0, 0, 1, 1, 1]), ([1, 8, EOS], [0, 1, 1])],
                   seq_len=16, block=4, pad_id=EOS, pad_loss=True)
    assert rows.tokens[0].tolist() == [1, 5, 6, 7, EOS, EOS, EOS, EOS, 1, 8, EOS, EOS, MASK, MASK, MASK, MASK]
    assert rows.loss_mask[0].int().tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert rows.doc_ids[0].tolist() == [0] * 8 + [1] * 4 + [2] * 4
    assert rows.positions[0].tolist() == list(range(8)) + list(range(4)) + list(range(4))
    assert rows.in_example[0].int().tolist() == [1] * 12 + [0] * 4
    # with everything loss-bearing masked, positions after the answer are taught to say EOS:
    # the first padding position after the end token and the rest of the block
    targets = diffusion_targets(rows.tokens, rows.loss_mask, rows.doc_ids, True)
    assert targets[0].tolist() == [I, 6, 7, EOS, EOS, EOS, EOS, I, 8, EOS, EOS, I, I, I, I, I]


def test_block_padding_with_mask_bears_no_loss():
    rows = rows_of([([1, 5, 6], [0, 1, 1])], seq_len=4, block=4, pad_id=MASK, pad_loss=False)
    assert rows.tokens[0].tolist() == [1, 5, 6, MASK]
    assert rows.loss_mask[0].int().tolist() == [0, 1, 1, 0]


def test_examples_start_on_block_boundaries():
    rows = rows_of([([1] * 5, [1] * 5), ([2] * 3, [1] * 3), ([3] * 9, [1] * 9)], seq_len=16, block=4)
    for r in range(len(rows)):
        starts = (rows.positions[r] == 0).nonzero().flatten().tolist()
        assert all(s % 4 == 0 for s in starts)


# ---- loss ----

def test_target_loss_sum_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10)
    targets = torch.tensor([[1, I, 3], [I, I, 9]])
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits[0, 0:1], targets[0, 0:1]) + ce(logits[0, 2:3], targets[0, 2:3]) + \
        ce(logits[1, 2:3], targets[1, 2:3])
    assert torch.allclose(target_loss_sum(logits, targets), expected)
    weights = torch.tensor([[2.0, 5.0, 0.5], [7.0, 7.0, 3.0]])
    weighted = 2.0 * ce(logits[0, 0:1], targets[0, 0:1]) + 0.5 * ce(logits[0, 2:3], targets[0, 2:3]) + \
        3.0 * ce(logits[1, 2:3], targets[1, 2:3])
    assert torch.allclose(target_loss_sum(logits, targets, weights), weighted)


def test_inverse_t_weights():
    p = torch.tensor([[0.25, 0.25, 1.0, 1.0]])
    first = inverse_t_weights(p, torch.tensor([False]), 1e-3, token_shift=False)
    assert torch.allclose(first, torch.tensor([[4.0, 4.0, 1.0, 1.0]]))
    twin = inverse_t_weights(p, torch.tensor([True]), 1e-3, token_shift=False)
    assert torch.allclose(twin, torch.tensor([[1 / 0.75, 1 / 0.75, 1e3, 1e3]]))  # 1 - p, floored at eps
    shifted = inverse_t_weights(p, torch.tensor([False]), 1e-3, token_shift=True)
    assert torch.allclose(shifted, torch.tensor([[4.0, 1.0, 1.0, 0.0]]))  # aligned with shifted targets


@pytest.mark.parametrize("weighting", ["none", "inverse_t"])
def test_batch_denominators(weighting):
    rows = rows_of([([1, 5, 6, 7, 8, 9, 10, 11], [0, 1, 1, 1, 1, 1, 1, 1])], seq_len=8, block=4)
    cfg = DiffusionConfig(block_size=4, loss_weighting=weighting)
    batch = diffusion_batch(rows, [3], cfg, MASK, torch.device("cpu"))
    assert batch.input_ids.shape == (2, 16) and batch.targets.shape == (2, 8)
    n_targets = int((batch.targets != I).sum())
    # with complementary twins every shifted-predictable loss token is a target exactly once:
    # 7 loss tokens, all predictable from the previous position
    assert n_targets == 7
    if weighting == "none":
        assert batch.weights is None and batch.denominator == 7
    else:
        assert batch.weights.shape == (2, 8) and batch.denominator == 14  # possible targets, both views
    # noisy half: masked loss tokens are [MASK]; clean half: the tokens; positions twice over
    for v in range(2):
        noisy, clean = batch.input_ids[v, :8], batch.input_ids[v, 8:]
        assert torch.equal(clean, rows.tokens[0])
        assert noisy[0] == 1  # the prompt token is never masked
        assert torch.equal(batch.positions[v, :8], batch.positions[v, 8:])


def test_ar_batch_targets_next_loss_tokens():
    rows = rows_of([([1, 5, 6, 2], [0, 1, 1, 1]), ([1, 7, 2], [0, 1, 1])], seq_len=8, block=1)
    batch = ar_batch(rows, torch.device("cpu"), use_flex=False)
    assert batch.targets[0].tolist() == [5, 6, 2, I, 7, 2, I, I]
    assert batch.denominator == 5 and batch.logits_index is None


# ---- data rendering ----

def test_prompt_response_uses_the_chat_template(tiny_tokenizer):
    record = {"prompt": "What is two plus two?", "response": "Four."}
    tokens, loss = render_record(record, tiny_tokenizer, tiny_tokenizer.eos_token_id, "test:1")
    learned = tiny_tokenizer.decode([t for t, m in zip(tokens, loss) if m])
    assert learned == "Four.<|im_end|>\n"
    prompt = tiny_tokenizer.decode([t for t, m in zip(tokens, loss) if not m])
    assert prompt == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    assert loss == sorted(loss)  # prompt first, then the learned response


def test_messages_learn_every_assistant_turn_only(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    tokens, loss = render_record({"messages": messages}, tiny_tokenizer, None, "test:1")
    spans, current = [], []
    for t, m in zip(tokens, loss):
        if m:
            current.append(t)
        elif current:
            spans.append(tiny_tokenizer.decode(current)), current.clear()
    if current:
        spans.append(tiny_tokenizer.decode(current))
    assert spans == ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_plain_prompt_response_and_text_without_a_chat_template(stories260k_dir):
    from fastdllm.model.checkpoint import load_tokenizer

    tok = load_tokenizer(stories260k_dir)
    assert not tok.chat_template
    tokens, loss = render_record({"prompt": "Q: Hi?\nA:", "response": "Hello."}, tok, 2, "t:1")
    prompt = tok("Q: Hi?\nA:")["input_ids"]
    assert tokens[: len(prompt)] == prompt and prompt[0] == tok.bos_token_id
    assert tokens[len(prompt):] == tok("Hello.", add_special_tokens=False)["input_ids"] + [2]
    assert loss == [False] * len(prompt) + [True] * (len(tokens) - len(prompt))
    tokens, loss = render_record({"text": "Once upon a time"}, tok, 2, "t:2")
    assert tokens[0] == tok.bos_token_id and tokens[-1] == 2 and all(loss)


# ---- schedule ----

def test_lr_schedule():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(19, cfg, 20) == pytest.approx(0.1)  # the last step reaches min_lr
    mid = 4 + (19 - 4) / 2
    assert lr_at(int(mid), cfg, 20) < 1.0
    half = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (11 - 4) / 15))
    assert lr_at(11, cfg, 20) == pytest.approx(half)
    lin = OptimizerConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(s, lin, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimizerConfig(lr=0.3, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == pytest.approx([0.15, 0.3, 0.3, 0.3])


# ---- the mask token ----

@pytest.mark.parametrize("vocab, tie, grown", [(512, True, 576), (512, False, 576), (576, False, 576)])
def test_add_mask_token(stories260k_dir, vocab, tie, grown):
    """A tokenizer without |<MASK>| gets it at id len(tokenizer) (Qwen2.5: 151665); the
    embedding grows (to a multiple of 64) only when that id does not fit, e.g. not when the
    vocabulary already has spare rows, as Qwen's does. The mask row starts at the mean row."""
    from fastdllm.model.checkpoint import MASK_TOKEN, load_tokenizer
    from fastdllm.training.mask_token import add_mask_token

    tok = load_tokenizer(stories260k_dir)
    assert MASK_TOKEN not in tok.get_vocab() and len(tok) == 512
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                                    num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=tie))
    emb_before = model.model.embed_tokens.weight.detach().clone()
    head_before = model.lm_head.weight.detach().clone()
    mask_id = add_mask_token(model, tok, 64)
    assert mask_id == 512 == tok.convert_tokens_to_ids(MASK_TOKEN) and len(tok) == 513
    assert model.config.vocab_size == grown and model.config.mask_token_id == 512
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape == head.shape == (grown, 16)
    assert (head is emb) == tie
    assert torch.equal(emb[:512], emb_before[:512]) and torch.equal(head[:512], head_before[:512])
    assert torch.allclose(emb[512], emb_before[:512].mean(0), atol=1e-6)
    assert torch.allclose(head[512], head_before[:512].mean(0), atol=1e-6)
    assert tok("a |<MASK>| b", add_special_tokens=False)["input_ids"].count(512) == 1
    logits = model(torch.tensor([[1, 512]]), torch.tensor([[0, 1]]), None)
    assert logits.shape == (1, 2, grown)
