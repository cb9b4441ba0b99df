"""Speculative decoding: block-diffusion drafts verified by a causal target.

Greedy speculative output equals the target's plain AR greedy output token for token (random
tiny models sharing a vocabulary, self-speculative, and the shipped pair), over prompts shorter
than, equal to and longer than a block, stops inside a draft, max_new_tokens limits and mixed
batches; seeded sampling reproduces the target's distribution (chi-square); after rejections
both caches equal a fresh computation of the accepted prefix; bad pairs and settings are
refused with clear errors.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastdllm import LLM
from fastdllm.model.config import ModelConfig
from fastdllm.engine.attention import attention_limits, limit_mask
from fastdllm.engine.engine import Engine
from fastdllm.engine.params import DecodeConfig, RunnerConfig
from fastdllm.engine.sampling import distribution
from fastdllm.engine.speculative import SpeculativeEngine
from fastdllm.engine.verification import accept_greedy, accept_sampled
from fastdllm.errors import FastDLLMError
from fastdllm.model.kv_cache import KVCache
from fastdllm.model.transformer import Transformer
from fixtures import REPO_ROOT, special_token_ids, update_config

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED_AR = REPO_ROOT / "models" / "fastdllm-wp-ar"
SHIPPED_DIFFUSION = REPO_ROOT / "models" / "fastdllm-wp-diffusion"
SMALL = dict(block_size=8, sub_block_size=4)


@pytest.fixture(scope="module")
def pair(qwen2_ckpt, checkpoint_factory) -> LLM:
    """A random target and another random model (same tokenizer) as its draft: nearly every
    draft token is rejected."""
    draft = checkpoint_factory("qwen2", seed=1, mask_token_id=special_token_ids()["mask"])
    return LLM.load(qwen2_ckpt, device="cpu", draft_model=draft)


@pytest.fixture(scope="module")
def twin(qwen2_ckpt, checkpoint_factory) -> LLM:
    """The target's weights in a second checkpoint as the draft: drafting with block-diffusion
    attention, some drafts are accepted and some rejected."""
    draft = checkpoint_factory("qwen2", seed=0, mask_token_id=special_token_ids()["mask"])
    return LLM.load(qwen2_ckpt, device="cpu", draft_model=draft)


@pytest.fixture(scope="module")
def shipped() -> LLM:
    return LLM.load(SHIPPED_AR, device="cpu", draft_model=SHIPPED_DIFFUSION)


def _prompts(n_tokens: list[int]) -> list[list[int]]:
    return [[(7 * i + 3 * n) % 250 + 5 for i in range(n)] for n in n_tokens]


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("draft_cache", ["reuse", "block"])
@pytest.mark.parametrize("draft_length,draft_steps", [(1, 1), (3, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize("which", ["pair", "twin"])
def test_random_pair_greedy_equals_target_ar(which, draft_length, draft_steps, draft_cache, request):
    pair = request.getfixturevalue(which)
    for ids in _prompts([3, 8, 13]):  # shorter than, equal to, longer than a block of 8
        ar = pair.generate(ids, mode="ar", max_new_tokens=30, stop_token_ids=[], **SMALL)
        sp = pair.generate(ids, max_new_tokens=30, stop_token_ids=[], draft_length=draft_length,
                           draft_steps=draft_steps, draft_cache=draft_cache, **SMALL)
        assert sp.token_ids == ar.token_ids
        assert sp.stats["mode"] == "speculative" and sp.finish_reason == "length"
        s = sp.stats
        assert s["target_forwards"] == s["cycles"] and s["forward_calls"] == s["target_forwards"] + s["draft_forwards"]
        assert s["new_tokens"] == 30 and s["accepted"] == 30 - s["cycles"]


def test_self_speculative_greedy_equals_own_ar(qwen2_ckpt):
    llm = LLM.load(qwen2_ckpt, device="cpu")  # drafts with block-diffusion attention, verifies causally
    for ids in _prompts([5, 16, 21]):
        ar = llm.generate(ids, mode="ar", max_new_tokens=25, stop_token_ids=[], **SMALL)
        sp = llm.generate(ids, mode="speculative", draft_length=6, max_new_tokens=25,
                          stop_token_ids=[], **SMALL)
        assert sp.token_ids == ar.token_ids


@pytest.mark.parametrize("draft_length", [1, 4, 8])
def test_merged_self_speculative_equals_own_ar(qwen2_ckpt, draft_length):
    """One forward verifies the last draft and drafts the next for every outcome (merged.py);
    batched rows at different positions, and the causal cache stays exact."""
    llm = LLM.load(qwen2_ckpt, device="cpu")
    prompts = _prompts([5, 16, 21])
    ar = [llm.generate(p, mode="ar", max_new_tokens=25, stop_token_ids=[], **SMALL).token_ids
          for p in prompts]
    out = llm.generate_batch(prompts, mode="speculative", merged=True, draft_length=draft_length,
                             max_new_tokens=25, stop_token_ids=[], **SMALL)
    assert [r.token_ids for r in out] == ar
    for r in out:
        assert r.stats["forward_calls"] == r.stats["cycles"] == r.stats["target_forwards"]
    engine = llm.new_engine(1, 64, 8, speculative=True)
    seq = engine.add(prompts[2], llm.decode_config(mode="speculative", merged=True, max_new_tokens=30,
                                                   draft_length=draft_length, **SMALL), stop_token_ids=())
    while engine.running:
        engine.step()
        if seq.finished:  # its pages went back to the pool
            break
        t = seq.target_done
        fresh = _fresh_kv(engine.target, torch.tensor(seq.tokens[:t]), 1)
        for layer in range(engine.target.config.num_layers):
            torch.testing.assert_close(engine.cache.kv_of(layer, seq.target_table, t)[0],
                                       fresh.kv_of(layer, fresh.region_pages(0), t)[0], atol=2e-5, rtol=1e-4)


def test_merged_shipped_model_equals_own_ar(tmp_path):
    llm = LLM.load(SHIPPED_DIFFUSION, device="cpu")
    ids = llm.encode_chat([{"role": "user", "content": "Mia buys 3 pens for 4 dollars each. How much does she pay?"}])
    ar = llm.generate(ids, mode="ar", max_new_tokens=64)
    merged = llm.generate(ids, mode="speculative", merged=True, draft_length=8, max_new_tokens=64)
    assert merged.token_ids == ar.token_ids
    assert merged.stats["tokens_per_forward"] > 2


def test_max_new_tokens_and_stops_inside_a_draft(shipped):
    ids = shipped.encode_chat([{"role": "user", "content": "Tom has 5 apples and buys 7 more. "
                                "How many apples does he have?"}])
    free = shipped.generate(ids, mode="ar", max_new_tokens=60, stop_token_ids=[]).token_ids
    for n in (1, 2, 7, 33):
        sp = shipped.generate(ids, max_new_tokens=n, stop_token_ids=[], draft_length=8)
        assert sp.token_ids == free[:n] and sp.finish_reason == "length"
    # a stop token first seen mid-answer: the speculative run must end exactly there, even when
    # the stop sits inside an accepted draft with more accepted tokens after it
    k = next(i for i in range(10, 60) if free[i] not in free[:i])
    sp = shipped.generate(ids, max_new_tokens=60, stop_token_ids=[free[k]], draft_length=16)
    assert sp.token_ids == free[: k + 1] and sp.finish_reason == "stop"
    assert sp.stats["new_tokens"] == k + 1


def test_shipped_pair_greedy_equals_ar_batch_1_and_8(shipped):
    from fastdllm.tasks import SHIPPED_SPLIT, format_prompt, make_splits

    problems = make_splits(*SHIPPED_SPLIT)[1][:6]
    prompts = [shipped.encode_chat([{"role": "user", "content": format_prompt(p.question)}])
               for p in problems]
    prompts[1] = prompts[1][:32]  # a prompt of exactly one block, and one shorter than a block
    prompts[2] = prompts[2][:20]
    ar = [r.token_ids for r in shipped.generate_batch(prompts, mode="ar", max_new_tokens=64)]
    alone = [shipped.generate(p, max_new_tokens=64).token_ids for p in prompts[:3]]
    batched = shipped.generate_batch(prompts, max_new_tokens=64, draft_length=8)
    assert [r.token_ids for r in batched] == ar
    assert alone == ar[:3]
    cycles = sum(r.stats["cycles"] for r in batched)
    assert sum(len(r.token_ids) for r in batched) / cycles > 3  # the drafts are mostly accepted


def test_mixed_batch_of_modes_and_settings(pair):
    """Speculative rows with different draft lengths, an AR row (the server's opt-out) and a
    sampled row in one engine: each row gets what it gets alone."""
    prompts = _prompts([4, 9, 17, 8])
    settings = [dict(draft_length=2), dict(draft_length=8, draft_steps=3), dict(mode="ar"),
                dict(temperature=0.9, top_k=20, seed=4)]
    alone = []
    for ids, o in zip(prompts, settings):
        params = pair.decode_config(max_new_tokens=20, **SMALL, **o)
        alone.append(pair.generate(ids, config=params, stop_token_ids=[]).token_ids)
    engine = pair.new_engine(4, 64, 8, speculative=True)
    seqs = [engine.add(ids, pair.decode_config(max_new_tokens=20, **SMALL, **o), stop_token_ids=())
            for ids, o in zip(prompts, settings)]
    while engine.running:
        engine.step()
    assert [s.output_ids() for s in seqs] == alone
    assert alone[2] == pair.generate(prompts[2], mode="ar", max_new_tokens=20, stop_token_ids=[],
                                     **SMALL).token_ids


# ---------------------------------------------------------------------------------- isolation
CULPRIT = [3, 2, 1]  # ids _prompts never makes, in an order a peer will not draw: the culprit's mark


@pytest.fixture(scope="module")
def self_spec(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


def _forward_fault(monkeypatch):
    """Any forward whose input holds the culprit's mark raises (its first one: the prompt)."""
    forward = Transformer.forward

    def faulty(self, input_ids, *args, **kwargs):
        x = input_ids
        a, b, c = CULPRIT
        if bool(((x[:, :-2] == a) & (x[:, 1:-1] == b) & (x[:, 2:] == c)).any()):
            raise RuntimeError("injected fault in a forward")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", faulty)


def _row_fault(monkeypatch):
    """The culprit's own verification raises on its third cycle (mid-decode)."""
    from fastdllm.engine.speculation import Speculation

    apply_verify = Speculation.apply_verify

    def faulty(self, accepted, next_token):
        if self.tokens[:3] == CULPRIT and self.stats.cycles == 2:
            raise RuntimeError("injected fault in a row")
        apply_verify(self, accepted, next_token)

    monkeypatch.setattr(Speculation, "apply_verify", faulty)


@pytest.mark.parametrize("fault", [_forward_fault, _row_fault], ids=["forward", "row"])
@pytest.mark.parametrize("which,merged", [("pair", False), ("self_spec", False), ("self_spec", True)],
                         ids=["draft-model", "self-speculative", "merged"])
def test_one_failing_request_does_not_fail_its_batch(which, merged, fault, request, monkeypatch):
    """Issue 21, class 1: a request whose row fails (its forward raises, or its own verification)
    ends alone with its error; its peers (greedy, an AR opt-out, a seeded sampled one) keep the
    outputs they get alone, and the engine serves the next batch."""
    llm = request.getfixturevalue(which)
    prompts = _prompts([4, 9, 17, 8])
    prompts[1] = CULPRIT + prompts[1]
    spec = dict(mode="speculative", draft_length=4, merged=merged)
    settings = [spec, spec, dict(mode="ar"), dict(spec, temperature=0.9, top_k=20, seed=4)]
    params = [llm.decode_config(max_new_tokens=20, **SMALL, **o) for o in settings]
    alone = [llm.generate(p, config=c, stop_token_ids=[]).token_ids for p, c in zip(prompts, params)]
    fault(monkeypatch)
    engine = llm.new_engine(4, 64, 8, speculative=True)
    seqs = [engine.add(p, c, stop_token_ids=()) for p, c in zip(prompts, params)]
    while engine.running:
        engine.step()
    assert "injected fault" in str(seqs[1].error) and seqs[1] not in engine.running
    assert [s.error for s in seqs[2:]] == [None, None]
    assert [s.output_ids() for i, s in enumerate(seqs) if i != 1] == alone[:1] + alone[2:]
    assert all(s.error is None and s.finished for i, s in enumerate(seqs) if i != 1)
    assert engine.usage()["pages_used"] == 0  # the culprit's pages went back too
    again = engine.add(prompts[0], params[0], stop_token_ids=())
    while engine.running:
        engine.step()
    assert again.output_ids() == alone[0]


# ---------------------------------------------------------------------------------- caches
def _fresh_kv(model: Transformer, tokens: torch.Tensor, block: int):
    cfg = model.config
    cache = KVCache.regions(cfg.num_layers, 1, len(tokens), cfg.num_kv_heads, cfg.head_dim,
                            torch.float32, "cpu")
    pos = torch.arange(len(tokens))[None]
    mask = limit_mask(attention_limits(pos, torch.tensor([[block]])), len(tokens))
    with torch.inference_mode():
        model(tokens[None], pos, mask, cache.region_access(slice(0, 1), pos, len(tokens)))
    return cache


@pytest.mark.parametrize("draft_cache", ["block", "reuse"])
@pytest.mark.parametrize("two_models", [True, False])
def test_cache_rollback_equals_fresh_computation(pair, qwen2_ckpt, two_models, draft_cache):
    """The target's cache is exact below target_done after every cycle; with draft_cache "block"
    the draft's is too, below draft_done (whole blocks). "reuse" keeps stale in-block KV by
    design: its draft cache is checked only for the blocks before the first one it entered."""
    llm = pair if two_models else LLM.load(qwen2_ckpt, device="cpu")  # self-speculative: some accepted
    engine = llm.new_engine(1, 64, 8, speculative=True)
    seq = engine.add(_prompts([11])[0], llm.decode_config(mode="speculative", max_new_tokens=40,
                                                          draft_length=6, draft_cache=draft_cache,
                                                          **SMALL),
                     stop_token_ids=())
    while engine.running:
        engine.step()
        if seq.finished:  # its pages went back to the pools
            break
        t, d = seq.target_done, seq.draft_done
        assert t == seq.length - 1 and d % 8 == 0 and d <= seq.length
        if draft_cache == "reuse":
            d = 8  # the prompt's first block: encoded whole, block-causally, on the first cycle
        target = _fresh_kv(engine.target, torch.tensor(seq.tokens[:t]), 1)
        draft = _fresh_kv(engine.draft, torch.tensor(seq.tokens[:d]), 8) if d else None
        for layer in range(engine.target.config.num_layers):
            ours, ref = (engine.cache.kv_of(layer, seq.target_table, t),
                         target.kv_of(layer, target.region_pages(0), t))
            torch.testing.assert_close(ours[0], ref[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(ours[1], ref[1], atol=2e-5, rtol=1e-4)
            if draft is not None:
                torch.testing.assert_close(engine.draft_cache.kv_of(layer, seq.draft_table, d)[0],
                                           draft.kv_of(layer, draft.region_pages(0), d)[0],
                                           atol=2e-5, rtol=1e-4)
    s = seq.stats
    assert s.drafted > s.accepted  # there were rejections to roll back
    assert two_models or s.accepted > 0


# ---------------------------------------------------------------------------------- sampling
def test_accept_rule_greedy_and_sampled_units():
    # a batch of three rows: 3, 2 and 1 drafts (padding after each row's drafts agrees or not)
    accepted, nxt = accept_greedy(torch.tensor([[4, 5, 6], [4, 5, 0], [3, 0, 0]]),
                                  torch.tensor([[4, 5, 9, 1], [4, 5, 7, 0], [4, 0, 0, 0]]),
                                  torch.tensor([3, 2, 1]))
    assert accepted.tolist() == [2, 2, 0] and nxt.tolist() == [9, 7, 4]
    accepted, nxt = accept_greedy(torch.zeros(2, 0, dtype=torch.long), torch.tensor([[8], [9]]),
                                  torch.tensor([0, 0]))  # no drafts (mode "ar"): the target's token
    assert accepted.tolist() == [0, 0] and nxt.tolist() == [8, 9]
    # one draft position: the emitted token is distributed as p, whatever q is
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 6000
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        acc, nxt = accept_sampled(d, q, p, g)
        counts[int(d) if int(acc) == 1 else int(nxt)] += 1
    assert counts[3] == 0  # the target never emits a token it gives probability 0
    expected = p[0, :3] * n
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, chi2)  # chi-square, 2 degrees of freedom, p = 0.001


def _accept_sampled_on_the_host(draft, q, p, generator) -> tuple[int, int]:
    """The acceptance rule as it was written before it moved to the device (host reads at each
    branch): the reference the device version must equal draw for draw."""
    k = draft.shape[0]
    if k == 0:
        return 0, int(torch.multinomial(p[0], 1, generator=generator))
    idx = torch.arange(k)
    p_d, q_d = p[idx, draft], q[idx, draft]
    u = torch.rand(k, generator=generator)
    rejected = (u * q_d >= p_d).int()
    if not bool(rejected.any()):
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    n = int(rejected.argmax())
    residual = (p[n] - q[n]).clamp_min(0.0)
    total = residual.sum()
    probs = residual / total if float(total) > 0 else p[n]
    return n, int(torch.multinomial(probs, 1, generator=generator))


def test_sampled_acceptance_on_the_device_draws_as_the_host_rule():
    """The same uniforms and the same token for the same generator state, so a seeded request
    decodes as it did when acceptance read back each branch (drafts of 0..5, near-equal p and q,
    p == q: every branch, the residual guard included)."""
    g = torch.Generator().manual_seed(0)
    outcomes = set()
    for trial in range(300):
        k, V = trial % 6, 11
        q = torch.softmax(torch.randn(k, V, generator=g) * 2, -1)
        p = torch.softmax(torch.randn(k + 1, V, generator=g) * 2, -1)
        if trial % 7 == 0:
            p[:k] = q
        draft = torch.multinomial(q, 1, generator=g)[:, 0] if k else torch.zeros(0, dtype=torch.long)
        seed = 1000 + trial
        a = accept_sampled(draft, q, p, torch.Generator().manual_seed(seed))
        b = _accept_sampled_on_the_host(draft, q, p, torch.Generator().manual_seed(seed))
        assert (int(a[0]), int(a[1])) == b
        outcomes.add("all" if b[0] == k else "rejected")
    assert outcomes == {"all", "rejected"}


def _tiny_models(vocab: int):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=False)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = Transformer(cfg)
        with torch.no_grad():
            for name, prm in m.named_parameters():
                prm.normal_(0, 0.5 if "embed" in name or "lm_head" in name else 0.1)
                if "norm" in name:
                    prm.fill_(1.0)
        models.append(m.eval())
    return models


@pytest.mark.parametrize("settings,merged", [(dict(temperature=1.0), False),
                                             (dict(temperature=0.7, top_k=4, top_p=0.9), False),
                                             (dict(temperature=1.0), True)])
def test_speculative_sampling_matches_the_target_distribution(settings, merged):
    """Joint distribution of the first two sampled tokens over a vocabulary of 6 (+ the mask)
    against the target's exact p(t1) p(t2 | t1). Two models: t2 is drafted in the first cycle
    and verified. Merged (self-speculative): t1 comes from the prefill forward, which drafts t2
    for the second forward to verify."""
    vocab, mask_id, prompt = 7, 6, [1, 2, 3]
    target, draft = _tiny_models(vocab)
    if merged:
        draft = target
    params = DecodeConfig(mode="speculative", max_new_tokens=3 if merged else 2, block_size=4,
                          sub_block_size=4, draft_length=1, merged=merged, **settings)
    with torch.inference_mode():
        logits0 = target(torch.tensor([prompt]), torch.arange(3)[None], None)[0, -1]
        p1 = distribution(logits0, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        logits1 = target(seqs, torch.arange(4)[None].expand(vocab, -1), None)[:, -1]
        p2 = distribution(logits1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    joint = (p1[:, None] * p2).flatten()  # (V * V,)
    engine = SpeculativeEngine(target, draft, max_slots=100, max_len=8, num_pages=100, page_size=8,
                               mask_token_id=mask_id, stop_token_ids=())
    counts = torch.zeros(vocab * vocab)
    draws = 4000
    for batch in range(draws // 100):
        seqs = [engine.add(prompt, dataclasses.replace(params, seed=1000 * batch + i))
                for i in range(100)]
        while engine.running:
            engine.step()
        for s in seqs:
            a, b = s.output_ids()[:2]
            counts[a * vocab + b] += 1
            assert s.stats.drafted == 1
    assert counts[joint == 0].sum() == 0
    keep = joint * draws >= 5  # pool the rare cells, as a chi-square test requires
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([joint[keep], joint[~keep].sum()[None]]) * draws
    chi2 = float(((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    dof = int(keep.sum())  # cells - 1 (the pooled cell is one more)
    # the 0.999 quantile of chi-square(dof) (Wilson-Hilferty), so a correct sampler fails 1 in 1000
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < critical, (chi2, critical, dof)
    # the draft and the target disagree, so rejections and residual draws were exercised
    assert engine.stats.forward_calls > 0


def test_seeded_sampling_is_reproducible(pair):
    a = pair.generate([5, 6, 7], max_new_tokens=20, temperature=0.8, seed=3, **SMALL)
    b = pair.generate([5, 6, 7], max_new_tokens=20, temperature=0.8, seed=3, **SMALL)
    assert a.token_ids == b.token_ids


# ------------------------------------------------ static steps, acceptance on the device
def _with_runner(llm: LLM, runner: RunnerConfig) -> LLM:
    """The same models under another RunnerConfig, with engines of their own."""
    return dataclasses.replace(llm, runner=runner, _engine=None, _spec_engine=None)


STATIC = RunnerConfig(cpu_static="eager")  # the padded layout a CUDA graph replays, run eagerly
EAGER = RunnerConfig(enforce_eager=True)


def _decode(llm: LLM, prompts, settings, max_new_tokens=30):
    engine = llm.new_engine(len(prompts), 64, 8, speculative=True)
    seqs = [engine.add(ids, llm.decode_config(max_new_tokens=max_new_tokens, **SMALL, **o), stop_token_ids=())
            for ids, o in zip(prompts, settings)]
    while engine.running:
        engine.step()
    return engine, [s.output_ids() for s in seqs]


@pytest.mark.parametrize("draft_cache", ["reuse", "block"])
@pytest.mark.parametrize("which", ["pair", "twin", "self"])
def test_static_steps_decode_as_the_eager_engine_and_the_target(which, draft_cache, request, qwen2_ckpt):
    """Issue 20, defect 3: draft and verify forwards run as static steps (verify k + 1 wide, the
    draft up to two blocks); a forward no width holds (here the first verify, a 40-token prompt
    and its drafts) runs eagerly. Greedy rows give the target's AR output, a seeded sampled row
    what the eager engine gives it, batched with rows of other draft lengths and refinement."""
    llm = LLM.load(qwen2_ckpt, device="cpu") if which == "self" else request.getfixturevalue(which)
    prompts = _prompts([3, 8, 13, 40, 6])
    settings = [dict(draft_length=3), dict(draft_length=8), dict(draft_length=8, draft_steps=2),
                dict(draft_length=5), dict(draft_length=4, temperature=0.8, top_p=0.9, seed=3)]
    settings = [dict(o, mode="speculative", draft_cache=draft_cache) for o in settings]
    engine, got = _decode(_with_runner(llm, STATIC), prompts, settings)
    _, want = _decode(_with_runner(llm, EAGER), prompts, settings)
    assert got == want
    ar = [llm.generate(p, mode="ar", max_new_tokens=30, stop_token_ids=[], **SMALL).token_ids
          for p in prompts[:4]]
    assert got[:4] == ar
    verify = engine.stats.steps  # one verify forward per cycle of the batch
    drafts = engine.stats.forward_calls - verify
    assert engine.target_runner.static.steps_run == verify - 1  # all but the 40-token prefill
    assert engine.draft_runner.static.steps_run == drafts  # the prompt's draft: 48 <= 64 wide


def test_seeded_sampling_is_unchanged_by_static_steps():
    """Sampled speculative outputs recorded before draft and verify moved to static steps and to
    acceptance on the device (commit 56a15a8, the shipped models, batch of 3, fp32 on the CPU):
    the same tokens, eager and static (tests/data/speculative_sampled_golden.json)."""
    golden = json.loads((REPO_ROOT / "tests" / "data" / "speculative_sampled_golden.json").read_text())
    pair = LLM.load(SHIPPED_AR, device="cpu", draft_model=SHIPPED_DIFFUSION)
    one = LLM.load(SHIPPED_DIFFUSION, device="cpu")
    for case, rec in golden.items():
        llm = pair if case.startswith("pair") else one
        qs = ["Mia buys 3 pens for 4 dollars each and pays with 20 dollars. How much change does she get?",
              "Tom reads 15 pages a day for 4 days. How many pages does he read?"]
        prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in qs]
        prompts.append(prompts[0][:5])
        for runner in (EAGER, STATIC):
            out = _with_runner(llm, runner).generate_batch(prompts, mode="speculative", max_new_tokens=40,
                                                           **rec["settings"])
            assert [r.token_ids for r in out] == rec["batch"], (case, runner)


def _reads_per_step(engine, count_syncs) -> list[tuple[int, int]]:
    """(host reads, model forwards) of every step, stepping the engine to the end."""
    out = []
    while engine.running:
        calls = engine.stats.forward_calls
        count_syncs.count = 0
        with count_syncs:
            engine.step()
        out.append((count_syncs.count, engine.stats.forward_calls - calls))
    return out


@pytest.mark.parametrize("runner", [EAGER, STATIC], ids=["eager", "static"])
def test_each_forward_reads_back_once_for_the_whole_batch(pair, count_syncs, runner):
    """Draft forwards bring back the batch's drafted tokens, verify forwards every row's
    (accepted, next token): one transfer per forward, greedy and sampled rows alike (a sampled
    row's acceptance and draws stay on the device)."""
    llm = _with_runner(pair, runner)
    engine = llm.new_engine(5, 64, 8, speculative=True)
    rows = [dict(draft_length=3), dict(draft_length=8, draft_steps=2), dict(mode="ar"),
            dict(draft_length=6, temperature=0.8, seed=1), dict(draft_length=2, temperature=1.0, top_k=5, seed=2)]
    for ids, o in zip(_prompts([3, 9, 14, 5, 20]), rows):
        engine.add(ids, llm.decode_config(max_new_tokens=24, **SMALL, **{"mode": "speculative", **o}),
                   stop_token_ids=())
    steps = _reads_per_step(engine, count_syncs)
    assert len(steps) > 5 and all(reads == forwards for reads, forwards in steps), steps


def test_merged_form_reads_back_once_per_forward_when_greedy(qwen2_ckpt, count_syncs):
    """The merged form builds its masks on the device from per-query key limits and verifies
    the batch in one pass: greedy rows read back once per forward (the outcome and the chosen
    group's drafts together); a sampled row draws its next drafts once its outcome is known,
    one more read for all such rows."""
    llm = LLM.load(qwen2_ckpt, device="cpu")
    prompts = _prompts([5, 16, 21])
    for sampled, most in ((False, 1), (True, 2)):
        engine = llm.new_engine(3, 64, 8, speculative=True)
        seqs = [engine.add(ids, llm.decode_config(
                    mode="speculative", merged=True, draft_length=4, max_new_tokens=25, **SMALL,
                    **(dict(temperature=0.8, seed=4) if sampled and i == 0 else {})), stop_token_ids=())
                for i, ids in enumerate(prompts)]
        steps = _reads_per_step(engine, count_syncs)
        assert all(forwards == 1 and reads <= most for reads, forwards in steps), steps
        assert max(reads for reads, _ in steps) == most
        ar = [llm.generate(p, mode="ar", max_new_tokens=25, stop_token_ids=[], **SMALL).token_ids
              for p in prompts]
        assert [s.output_ids() for s in seqs][sampled:] == ar[sampled:]


# ---------------------------------------------------------------------------------- errors
def test_bad_pairs_and_settings_are_refused(qwen2_ckpt, checkpoint_factory, ckpt_copy, pair):
    mask = special_token_ids()["mask"]
    bigger = checkpoint_factory("qwen2", seed=1, mask_token_id=mask, vocab_size=448)
    with pytest.raises(FastDLLMError, match="vocabulary") as e:
        LLM.load(qwen2_ckpt, device="cpu", draft_model=bigger)
    assert e.value.field == "draft_model"

    other_tok = ckpt_copy(checkpoint_factory("qwen2", seed=1, mask_token_id=mask))
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, two ids swapped
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(FastDLLMError, match="another tokenizer") as e:
        LLM.load(qwen2_ckpt, device="cpu", draft_model=other_tok)
    assert e.value.field == "draft_model"

    no_shift = ckpt_copy(qwen2_ckpt)
    update_config(no_shift, token_shift=False)
    with pytest.raises(FastDLLMError, match="no causal next-token mode") as e:
        LLM.load(no_shift, device="cpu", draft_model=qwen2_ckpt)
    assert e.value.field == "model"

    for length in (0, -1, 9):
        with pytest.raises(FastDLLMError, match="draft_length") as e:
            pair.generate([1, 2, 3], draft_length=length, **SMALL)
        assert e.value.field == "draft_length"
    with pytest.raises(FastDLLMError, match="draft_steps"):
        pair.generate([1, 2, 3], draft_length=2, draft_steps=3, **SMALL)
    with pytest.raises(FastDLLMError, match="draft_cache must be one of") as e:
        pair.generate([1, 2, 3], draft_cache="sub-block", **SMALL)
    assert e.value.field == "draft_cache"
    with pytest.raises(FastDLLMError, match="self-speculative only"):
        pair.generate([1, 2, 3], merged=True, **SMALL)
    with pytest.raises(FastDLLMError, match="speculative engine"):
        Engine(pair.model, max_slots=1, max_len=64, num_pages=4, page_size=16, mask_token_id=mask,
               stop_token_ids=()).add(
            [1, 2], pair.decode_config(**SMALL))


# ---------------------------------------------------------------------------------- front ends
def test_cli_generate_with_a_draft_model(qwen2_ckpt, twin, capsys):
    from fastdllm.cli import main

    draft = str(twin.draft.model_dir)
    args = ["generate", "--model", str(qwen2_ckpt), "--prompt-ids", "5,6,7,8,9", "--device", "cpu",
            "--json", "--max-new-tokens", "20", "--block-size", "8", "--sub-block-size", "4"]
    outs = {}
    for name, extra in (("spec", ["--draft-model", draft, "--draft-length", "4"]), ("ar", ["--mode", "ar"]),
                        ("block", ["--draft-model", draft, "--draft-length", "4", "--draft-cache", "block"])):
        assert main(args + extra) == 0
        outs[name] = json.loads(capsys.readouterr().out)
    assert outs["spec"]["token_ids"] == outs["ar"]["token_ids"] == outs["block"]["token_ids"]
    assert outs["spec"]["cycles"] < len(outs["spec"]["token_ids"])
    assert main(args + ["--draft-model", draft, "--draft-length", "9"]) == 2
    assert "draft_length must be between 1 and the block size (8)" in capsys.readouterr().err


def test_server_speculative_by_default_with_ar_opt_out(twin):
    import httpx

    from fastdllm.server import BackgroundServer, ServerConfig

    config = ServerConfig(served_model_name="tiny", defaults=twin.decode_config(max_new_tokens=24, **SMALL),
                          max_batch=4)
    ref = twin.generate("The answer is", mode="ar", max_new_tokens=24, **SMALL)
    with BackgroundServer(twin, config) as srv:
        def post(**body):
            return httpx.post(f"{srv.base_url}/completions",
                              json={"model": "tiny", "prompt": "The answer is", **body}, timeout=60)
        spec, ar = post(), post(mode="ar")
        short = post(draft_length=2, draft_cache="block")
        bad = post(mode="diffusion")
    for r in (spec, ar, short):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mode"


def _without_mask_token(src, dst):
    """A copy of checkpoint `src` whose tokenizer never had |<MASK>| (an AR base before its
    adaptation added it): one special token fewer, every other id the same."""
    import shutil

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "|<MASK>|"]
    del tok["model"]["vocab"]["|<MASK>|"]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("mask_token", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapted_draft_with_one_extra_special_token_is_accepted(tmp_path):
    """Issue 20, defect 10: the natural lossless pair, an AR base as target and its adaptation
    (whose tokenizer gained the mask token) as draft, is accepted, and decodes as the AR alone."""
    base = _without_mask_token(SHIPPED_AR, tmp_path / "ar")
    alone = LLM.load(base, device="cpu")
    assert "|<MASK>|" not in alone.tokenizer.get_vocab()
    assert len(LLM.load(SHIPPED_DIFFUSION, device="cpu").tokenizer.get_vocab()) == \
        len(alone.tokenizer.get_vocab()) + 1
    pair = LLM.load(base, device="cpu", draft_model=SHIPPED_DIFFUSION)
    prompt = pair.encode_chat([{"role": "user", "content": "Tom has 5 apples and buys 7 more. "
                                                           "How many apples does he have?"}])
    out = pair.generate(prompt, max_new_tokens=24)
    assert out.params.mode == "speculative"
    assert out.token_ids == alone.generate(prompt, mode="ar", max_new_tokens=24).token_ids


def test_a_token_under_another_id_is_still_refused(tmp_path):
    """The check compares what both tokenizers define: a token both have, under different ids
    (here |<MASK>| moved to a new id), makes them different tokenizers."""
    from fastdllm.llm import check_same_tokenizer
    from fastdllm.model.checkpoint import load_tokenizer

    moved = _without_mask_token(SHIPPED_DIFFUSION, tmp_path / "moved")
    tok = json.loads((moved / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 1024, "content": "|<MASK>|", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    tok["model"]["vocab"]["|<MASK>|"] = 1024
    (moved / "tokenizer.json").write_text(json.dumps(tok))
    assert load_tokenizer(moved).convert_tokens_to_ids("|<MASK>|") == 1024
    with pytest.raises(FastDLLMError, match="another tokenizer") as e:
        check_same_tokenizer(SHIPPED_AR, load_tokenizer(SHIPPED_AR), moved, load_tokenizer(moved))
    assert e.value.field == "draft_model"
    assert "|<MASK>|" in str(e.value)
