"""Block-diffusion decoding through the engine (paper §3.3): the block cache is exact, the
trace accounts for every forward, the sub-block cache only changes what it may change, a full
prompt block draws the first token from the prefill, stop tokens and max_new_tokens end a
sequence exactly, outputs do not depend on the batch, the official layout and tokenizer-less
checkpoints decode, and sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from fastdllm import LLM
from fixtures import remote_code_ran, special_token_ids

B, S = 8, 4
REFINE = ("full_block", "sub_block")
SMALL = dict(block_size=B, sub_block_size=S)


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(n: int, offset: int = 3) -> list[int]:
    """n ordinary token ids (no special token), different for different offsets."""
    return [(offset + 7 * i) % 300 + 3 for i in range(n)]


def trace_steps(result) -> list[tuple[str, list[int], list[int]]]:
    return [(s["kind"], s["positions"], s["tokens"]) for s in result.trace]


@pytest.fixture(scope="module")
def qwen2(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@pytest.fixture(scope="module")
def llama(llama_ckpt) -> LLM:
    return LLM.load(llama_ckpt, device="cpu")


@pytest.fixture(scope="module")
def confident(checkpoint_factory) -> LLM:
    """A model whose predictions are peaked (many positions above a 0.5 threshold)."""
    return LLM.load(checkpoint_factory("qwen2", lm_head_scale=40.0), device="cpu")


def test_fixture_models_use_the_tokenizer_mask_token(qwen2, llama):
    assert qwen2.special.mask_token_id == llama.special.mask_token_id == special_token_ids()["mask"]


# ---------------------------------------------------------------- block cache is exact
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_block_cache_equals_uncached_reference(family, request):
    llm = request.getfixturevalue(family)
    for n in (3, 8, 13, 16, 24):  # below, equal to, above, and multiples of B
        for threshold in (1.0, 0.7, 0.3):
            kw = dict(SMALL, threshold=threshold, max_new_tokens=19, sub_block_cache=False,
                      stop_token_ids=[], trace=True)
            cached = llm.generate(prompt(n), **kw)
            reference = llm.generate(prompt(n), block_cache=False, **kw)
            where = f"prompt length {n}, threshold {threshold}"
            assert cached.token_ids == reference.token_ids, where
            assert trace_steps(cached) == trace_steps(reference), where
            assert cached.stats["forward_calls"] == reference.stats["forward_calls"], where
            assert len(cached.token_ids) == 19, where


# ---------------------------------------------------------------- forward-call accounting
def test_threshold_one_unmasks_one_token_per_refinement_step(qwen2):
    for n in (5, 13, 16):
        result = qwen2.generate(prompt(n), **SMALL, threshold=1.0, max_new_tokens=20,
                                stop_token_ids=[], trace=True)
        refine = [s for s in result.trace if s["kind"] in REFINE]
        assert refine and all(len(s["positions"]) == 1 for s in refine)
        # every other traced forward (prefill or commit) draws exactly one token, AR-style
        assert all(len(s["positions"]) == 1 for s in result.trace)
        assert result.stats["new_tokens"] == 20
        # one forward per trace entry, plus the prefill of whole prompt blocks when it draws nothing
        silent_prefill = 1 if n >= B and n % B else 0
        assert result.stats["forward_calls"] == len(result.trace) + silent_prefill
        decoded = sorted(p for s in result.trace for p in s["positions"])
        assert decoded == list(range(n, n + 20))  # every position decoded exactly once


def test_low_threshold_unmasks_several_tokens_per_step(confident):
    threshold = 0.5
    result = confident.generate(prompt(5), **SMALL, threshold=threshold, max_new_tokens=24,
                                stop_token_ids=[], trace=True)
    refine = [s for s in result.trace if s["kind"] in REFINE]
    parallel = [s for s in refine if len(s["positions"]) > 1]
    assert parallel, "no step unmasked more than one token"
    # several tokens in one step only when each of them is above the threshold
    assert all(c >= threshold for s in parallel for c in s["confidences"])
    assert result.stats["tokens_per_forward"] > 1
    assert result.stats["forward_calls"] < result.stats["new_tokens"] == 24
    decoded = sorted(p for s in result.trace for p in s["positions"])
    assert decoded == list(range(5, 5 + 24))


# ---------------------------------------------------------------- sub-block cache
def test_sub_block_cache_is_used_and_only_changes_what_it_may(qwen2):
    kw = dict(SMALL, threshold=0.9, max_new_tokens=24, stop_token_ids=[], trace=True)
    with_cache = qwen2.generate(prompt(5), **kw)
    without = qwen2.generate(prompt(5), sub_block_cache=False, **kw)
    for r in (with_cache, without):
        assert len(r.token_ids) == 24 and r.finish_reason == "length"
    kinds = [s["kind"] for s in with_cache.trace]
    assert "sub_block" in kinds
    assert "sub_block" not in [s["kind"] for s in without.trace]
    # everything before the first sub-block forward is computed identically
    first = kinds.index("sub_block")
    assert first > 0
    assert trace_steps(with_cache)[:first] == trace_steps(without)[:first]
    # each sub-block starts with a full-block forward (which fills the block-local cache), and a
    # sub-block forward never decodes its sub-block's first position (its logit is not computed)
    seen: set[int] = set()
    for s in with_cache.trace:
        if s["kind"] not in REFINE:
            continue
        sub = s["positions"][0] // S
        assert all(p // S == sub for p in s["positions"])  # one step stays in its sub-block
        if sub not in seen:
            assert s["kind"] == "full_block", s
            seen.add(sub)
        if s["kind"] == "sub_block":
            assert all(p % S for p in s["positions"])
    assert with_cache.stats["new_tokens"] == without.stats["new_tokens"] == 24


# ---------------------------------------------------------------- prefill draws the first token
def test_full_prompt_block_draws_first_token_from_prefill(checkpoint_factory, qwen2):
    """The last prompt position sees every prompt token under both causal and block-causal
    attention, but in a model with >= 2 layers its inputs from earlier positions differ (those
    saw the whole block), so its logit equals AR's only for a one-layer model; in general it is
    the block-causal logit."""
    ids = prompt(16)
    one_layer = LLM.load(checkpoint_factory("qwen2", num_layers=1), device="cpu")
    for llm in (one_layer, qwen2):
        result = llm.generate(ids, **SMALL, max_new_tokens=12, stop_token_ids=[], trace=True)
        first = result.trace[0]
        assert first["kind"] == "prefill" and first["positions"] == [16]
        assert result.token_ids[0] == first["tokens"][0]
        assert result.stats["forward_calls"] == len(result.trace)  # the prefill is traced

        causal, block_causal = last_logits(llm, ids)
        assert result.token_ids[0] == int(block_causal.argmax())
    ar = one_layer.generate(ids, mode="ar", max_new_tokens=1, stop_token_ids=[])
    one_layer_first = one_layer.generate(ids, **SMALL, max_new_tokens=1, stop_token_ids=[])
    assert one_layer_first.token_ids == ar.token_ids
    assert one_layer_first.stats["forward_calls"] == 1
    causal, block_causal = last_logits(one_layer, ids)
    torch.testing.assert_close(causal, block_causal)
    causal, block_causal = last_logits(qwen2, ids)
    assert not torch.allclose(causal, block_causal, atol=1e-4)


def last_logits(llm: LLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last prompt position's logits under causal and under block-causal attention
    (brute-force masks, no cache)."""
    t = len(ids)
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    out = []
    for mask in (k <= q, k < (q // B + 1) * B):
        with torch.no_grad():
            logits = llm.model(torch.tensor([ids]), torch.arange(t)[None], mask[None, None])
        out.append(logits[0, -1])
    return out[0], out[1]


def test_mask_token_is_never_drawn(qwen2_ckpt, qwen2):
    """Declare as [MASK] a token the model predicts for the masked positions themselves, and
    unmask everything in one step: it must still never be drawn."""
    ids, vocab = prompt(5), qwen2.config.vocab_size
    # (vocab, 8): the first block of each candidate t, its 3 masked positions holding t
    blocks = torch.tensor([ids + [t] * 3 for t in range(vocab)])
    with torch.no_grad():  # one block: bidirectional attention
        logits = qwen2.model(blocks, torch.arange(8).expand(vocab, 8),
                             torch.ones(1, 1, 8, 8, dtype=torch.bool))
    predicts_itself = (logits[:, 4:7].argmax(-1) == torch.arange(vocab)[:, None]).sum(-1)
    favourite = int(predicts_itself.argmax())
    assert predicts_itself[favourite] >= 1
    as_mask = LLM.load(qwen2_ckpt, device="cpu", mask_token_id=favourite)
    # the official rule: every position above the threshold in one step
    result = as_mask.generate(ids, **SMALL, rule="threshold", threshold=0.01, max_new_tokens=3,
                              stop_token_ids=[], trace=True)
    assert len(result.trace) == 1  # all three decoded by the first forward
    assert len(result.token_ids) == 3 and favourite not in result.token_ids


# ---------------------------------------------------------------- stop and length
def test_stop_token_ends_sequence_only_with_no_mask_before_it(qwen2):
    ids = prompt(5)
    # the official rule decodes out of order (the default left-anchored rule never does)
    kw = dict(SMALL, rule="threshold", threshold=0.9, max_new_tokens=40, trace=True)
    free = qwen2.generate(ids, stop_token_ids=[], **kw)
    out = free.token_ids
    order = {p: i for i, s in enumerate(free.trace) for p in s["positions"]}  # position -> step
    # a token decoded before some earlier position (out of order), not seen before it
    k = next(i for i in range(2, len(out))
             if out[i] not in out[:i] and any(order[5 + j] > order[5 + i] for j in range(i)))
    stop = out[k]
    result = qwen2.generate(ids, stop_token_ids=[stop], **kw)
    assert result.token_ids == out[: k + 1]
    assert result.token_ids[-1] == stop and result.finish_reason == "stop"
    assert result.stats["new_tokens"] == k + 1
    # decoding went on after the stop token appeared, until the positions before it were filled
    stop_step = next(i for i, s in enumerate(result.trace) if 5 + k in s["positions"])
    assert len(result.trace) > stop_step + 1
    assert result.trace[: stop_step + 1] == free.trace[: stop_step + 1]


@pytest.mark.parametrize("n", [1, 5, 13, 33])
def test_diffusion_max_new_tokens_is_exact(qwen2, n):
    for p in (5, 16):
        result = qwen2.generate(prompt(p), **SMALL, threshold=0.7, max_new_tokens=n,
                                stop_token_ids=[], trace=True)
        assert len(result.token_ids) == n and result.finish_reason == "length"
        assert result.stats["new_tokens"] == n
        decoded = [q for s in result.trace for q in s["positions"]]
        assert sorted(decoded) == list(range(p, p + n))  # nothing decoded past the limit
    # a full prompt block and one new token: the prefill alone
    assert qwen2.generate(prompt(16), **SMALL, max_new_tokens=1).stats["forward_calls"] == 1


# ---------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("opts", [
    dict(mode="diffusion", sub_block_cache=True),
    dict(mode="diffusion", sub_block_cache=False),
    dict(mode="ar"),
], ids=["diffusion", "diffusion-no-sub-block-cache", "ar"])
def test_batched_output_equals_single(qwen2, opts):
    prompts = [prompt(3, 1), prompt(13, 2), prompt(8, 3), prompt(21, 4), prompt(5, 5)]
    kw = dict(SMALL, threshold=0.7, max_new_tokens=18, **opts)
    batch = qwen2.generate_batch(prompts, **kw)
    for p, got in zip(prompts, batch):
        alone = qwen2.generate(p, **kw)
        assert got.token_ids == alone.token_ids, f"prompt length {len(p)}"
        assert got.finish_reason == alone.finish_reason
        assert got.stats["forward_calls"] == alone.stats["forward_calls"]
    # the rows really ran side by side at different places in the state machine
    assert len({r.stats["forward_calls"] for r in batch}) > 1


# ---------------------------------------------------------------- checkpoint layouts
# published Fast_dLLM_v2 configs carry "rope_scaling": null, which transformers warns about
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_official_layout_decodes_with_its_block_size_without_remote_code(official_ckpt, qwen2):
    llm = LLM.load(official_ckpt, device="cpu")
    assert llm.decode_config().block_size == 32 and llm.decode_config().mode == "diffusion"
    assert llm.special.mask_token_id == special_token_ids()["mask"]
    result = llm.generate(prompt(5), max_new_tokens=40, stop_token_ids=[], trace=True)
    assert len(result.token_ids) == 40 and result.stats["mode"] == "diffusion"
    commits = [s["positions"][0] for s in result.trace if s["kind"] == "commit"]
    assert commits == [32]  # the first block is [0, 32): bd_size from config.json
    # same weights as the qwen2 fixture: the same decode there with B = 32
    same = qwen2.generate(prompt(5), block_size=32, sub_block_size=8, max_new_tokens=40,
                          stop_token_ids=[])
    assert result.token_ids == same.token_ids
    assert not remote_code_ran(official_ckpt)


def test_checkpoint_without_tokenizer_decodes_token_ids(no_tokenizer_ckpt, qwen2):
    mask = special_token_ids()["mask"]
    llm = LLM.load(no_tokenizer_ckpt, device="cpu", mask_token_id=mask)
    assert llm.tokenizer is None
    for mode in ("diffusion", "ar"):
        result = llm.generate(prompt(9), **SMALL, mode=mode, max_new_tokens=12)
        assert result.text is None and result.token_ids
        assert result.token_ids == qwen2.generate(prompt(9), **SMALL, mode=mode,
                                                  max_new_tokens=12).token_ids


# ---------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_reproducible(qwen2):
    kw = dict(SMALL, threshold=0.9, max_new_tokens=16, stop_token_ids=[], temperature=1.0)
    outs = {}
    for seed in range(4):
        a = qwen2.generate(prompt(6), seed=seed, **kw).token_ids
        b = qwen2.generate(prompt(6), seed=seed, **kw).token_ids
        assert a == b, f"seed {seed}"
        outs[seed] = tuple(a)
    assert len(set(outs.values())) > 1  # different seeds draw different text
    greedy = qwen2.generate(prompt(6), **kw | dict(temperature=0.0)).token_ids
    assert any(list(o) != greedy for o in outs.values())


def test_top_k_one_equals_greedy(qwen2):
    # AR: the one token left is the argmax. (In diffusion its confidence under the filtered
    # distribution is 1.0, so the threshold rule unmasks differently from greedy.)
    kw = dict(mode="ar", max_new_tokens=20, stop_token_ids=[])
    greedy = qwen2.generate(prompt(6), **kw).token_ids
    assert qwen2.generate(prompt(6), temperature=1.3, top_k=1, seed=1, **kw).token_ids == greedy
    assert qwen2.generate(prompt(6), temperature=1.3, top_k=1, seed=2, **kw).token_ids == greedy
