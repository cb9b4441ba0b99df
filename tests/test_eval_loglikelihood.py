"""Exact continuation log-likelihoods (fastdllm.evaluation.loglikelihood) against an independent
brute-force reference: transformers' model of the same checkpoint, one forward per scored token
with a hand-built 4D attention mask (AR: causal; diffusion: block-causal with the token's block
holding [MASK] from the token to the block end)."""

from __future__ import annotations

import pytest
import torch

from fastdllm.model.checkpoint import load_model
from fastdllm.evaluation.loglikelihood import continuation_logprobs, diffusion_plans, scoring_allowed
from fixtures import load_hf_model, special_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")
MASK = special_token_ids()["mask"]


def _hf_logprobs(hf, seq: list[int], block_size: int, read_at: int, exclude_mask: bool) -> torch.Tensor:
    """log-softmax at output `read_at` of `seq` under block-causal attention with blocks of
    `block_size` (1 = causal), computed by transformers."""
    t = len(seq)
    blk = torch.arange(t) // block_size
    allowed = blk[None, :] <= blk[:, None]
    mask = torch.zeros(1, 1, t, t).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([seq]), attention_mask=mask).logits[0, read_at].double()
    if exclude_mask:
        logits[MASK] = float("-inf")
    return torch.log_softmax(logits, -1)


def reference(hf, context, continuation, mode, block_size, token_shift=True):
    seq, out = context + continuation, []
    for i in range(len(context), len(seq)):
        if mode == "ar":
            lp = _hf_logprobs(hf, seq[:i], 1, i - 1, exclude_mask=False)
        else:
            b, k = divmod(i, block_size)
            start = b * block_size
            if token_shift and k == 0:  # drawn by the previous block's commit forward
                lp = _hf_logprobs(hf, seq[:start], block_size, i - 1, exclude_mask=True)
            else:
                block = seq[start:i] + [MASK] * (block_size - k)
                lp = _hf_logprobs(hf, seq[:start] + block, block_size, i - 1 if token_shift else i,
                                  exclude_mask=True)
        out.append(float(lp[seq[i]]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def models(qwen2_ckpt):
    return load_model(qwen2_ckpt, torch.device("cpu"), torch.float32), load_hf_model(qwen2_ckpt, "qwen2")


@pytest.mark.parametrize("mode,block_size,token_shift,ctx_len,cont_len", [
    ("ar", 4, True, 5, 7),
    ("diffusion", 4, True, 5, 11),   # starts mid-block, spans block starts
    ("diffusion", 4, True, 8, 4),    # starts exactly at a block start
    ("diffusion", 8, False, 3, 9),   # the no-shift ablation
])
def test_logprobs_equal_transformers_reference(models, mode, block_size, token_shift, ctx_len, cont_len):
    ours_model, hf = models
    g = torch.Generator().manual_seed(ctx_len * 100 + cont_len)
    ids = torch.randint(3, 300, (ctx_len + cont_len,), generator=g).tolist()
    context, continuation = ids[:ctx_len], ids[ctx_len:]
    ref = reference(hf, context, continuation, mode, block_size, token_shift)
    # a small chunk size forces several forwards: chunking must not change a number
    for copies in (64, 3):
        logp, greedy = continuation_logprobs(ours_model, context, continuation, mode=mode,
                                             block_size=block_size, token_shift=token_shift,
                                             mask_token_id=MASK, copies_per_forward=copies)
        torch.testing.assert_close(logp, ref, atol=1e-4, rtol=1e-5)
        assert greedy.dtype == torch.bool and greedy.shape == (cont_len,)


def test_greedy_flags_are_the_argmax(models):
    model, _ = models
    context = [5, 6, 7]
    # build the AR-greedy continuation token by token: every flag must then be True
    cont = []
    for _ in range(4):
        with torch.no_grad():
            logits = model(torch.tensor([context + cont]), torch.arange(len(context + cont))[None], None)
        cont.append(int(logits[0, -1].argmax()))
    logp, greedy = continuation_logprobs(model, context, cont, mode="ar", block_size=4)
    assert greedy.all()
    cont[-1] = (cont[-1] + 1) % 300
    _, greedy = continuation_logprobs(model, context, cont, mode="ar", block_size=4)
    assert greedy.tolist() == [True, True, True, False]


def test_mask_rule_and_plan_shapes():
    # clean block-causal; a copy sees itself and clean blocks strictly before its own
    copy = torch.tensor([-1, -1, 0, 0])
    block = torch.tensor([0, 1, 1, 1])
    allowed = scoring_allowed(copy[:, None], copy[None, :], block[:, None], block[None, :])
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, False, True, True], [True, False, True, True]]
    plans = diffusion_plans([1, 2, 3], [4, 5, 6, 7, 8], block_size=4, token_shift=True,
                            mask_token_id=MASK, copies_per_forward=2)
    # tokens at 3, 5, 6, 7 come from copies (2 per forward), the block start 4 from the clean stream
    assert [len(p.source) for p in plans] == [3, 2]
    assert sorted(torch.cat([p.target_index for p in plans]).tolist()) == [0, 1, 2, 3, 4]


def test_empty_context_is_an_error(models):
    from fastdllm.errors import FastDLLMError

    with pytest.raises(FastDLLMError, match="context is empty"):
        continuation_logprobs(models[0], [], [1, 2], mode="ar", block_size=4)
