"""`sample_tokens` / `sample_batch`: greedy, temperature, top-k and top-p, with the confidence of
a drawn token being its probability under the (filtered, renormalised) distribution it was
drawn from."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastdllm.engine.sampling import sample_batch, sample_tokens


def draw(logits, n=1, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    opts = dict(temperature=1.0, top_p=1.0, top_k=0) | kw
    return [sample_tokens(logits, generator=g, **opts) for _ in range(n)]


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p (brute force)."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += float(probs[i])
        if mass >= top_p:
            break
    return kept


def test_greedy_is_argmax_with_max_probability_as_confidence():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    tokens, conf = sample_tokens(logits, temperature=0.0, top_p=0.3, top_k=2, generator=None)
    probs = torch.softmax(logits, -1)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(conf, probs.max(-1).values)
    assert conf.dtype == torch.float32


def test_temperature_confidence_is_the_tempered_probability():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    for tokens, conf in draw(logits, n=5, temperature=0.7):
        probs = torch.softmax(logits / 0.7, -1)
        torch.testing.assert_close(conf, probs.gather(-1, tokens[:, None])[:, 0])


def test_top_k_draws_only_the_k_best_and_renormalises():
    logits = torch.tensor([[3.0, 1.0, 2.5, -1.0, 0.5, 2.0]])
    allowed = {0, 2, 5}
    filtered = torch.full_like(logits, float("-inf"))
    filtered[0, list(allowed)] = logits[0, list(allowed)]
    ref = torch.softmax(filtered, -1)[0]
    seen = set()
    for tokens, conf in draw(logits, n=200, top_k=3):
        t = int(tokens[0])
        seen.add(t)
        assert t in allowed
        torch.testing.assert_close(float(conf[0]), float(ref[t]))
    assert seen == allowed  # every one of them can be drawn


def test_top_k_one_is_greedy_with_full_confidence():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    for tokens, conf in draw(logits, n=3, top_k=1, temperature=2.0):
        assert torch.equal(tokens, logits.argmax(-1))
        assert torch.all(conf == 1.0)


def test_top_p_keeps_the_minimal_nucleus():
    logits = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2]).log()[None]
    probs = torch.softmax(logits[0], -1)
    # sorted cumulative mass 0.4, 0.65, 0.85, 0.95, 1: values between the steps (not on them,
    # where float rounding decides)
    for top_p in (0.3, 0.5, 0.7, 0.86, 0.97):
        keep = nucleus(probs, top_p)
        mass = float(probs[list(keep)].sum())
        seen = set()
        for tokens, conf in draw(logits, n=150, seed=int(top_p * 100), top_p=top_p):
            t = int(tokens[0])
            seen.add(t)
            assert t in keep, (top_p, t, keep)
            torch.testing.assert_close(float(conf[0]), float(probs[t]) / mass)
        assert seen == keep, top_p


def test_top_p_and_top_k_combine_on_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.0, -3.0]])
    # top_k=4 drops the last; at temperature 1 the first three hold > 0.9 of the rest's mass
    probs = torch.softmax(logits[0, :4], -1)
    keep = nucleus(probs, 0.9)
    for tokens, conf in draw(logits, n=100, top_k=4, top_p=0.9):
        t = int(tokens[0])
        assert t in keep
        torch.testing.assert_close(float(conf[0]), float(probs[t] / probs[list(keep)].sum()))


def test_same_generator_seed_same_draws():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    a = draw(logits, n=4, seed=7, temperature=1.5, top_p=0.9)
    b = draw(logits, n=4, seed=7, temperature=1.5, top_p=0.9)
    c = draw(logits, n=4, seed=8, temperature=1.5, top_p=0.9)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def settings(temperature=0.0, top_p=1.0, top_k=0):
    return SimpleNamespace(temperature=temperature, top_p=top_p, top_k=top_k)


def test_sample_batch_greedy_rows():
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(4))
    tokens, conf = sample_batch(logits, [settings()] * 3, [None] * 3)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(conf, torch.softmax(logits, -1).max(-1).values)


def test_sample_batch_rows_follow_their_own_settings_and_generators():
    logits = torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(5))
    rows = [settings(), settings(1.0, top_k=1), settings(0.8, top_p=0.9)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tokens, conf = sample_batch(logits, rows, gens)
    assert tokens.shape == conf.shape == (3, 4)
    assert torch.equal(tokens[0], logits[0].argmax(-1))  # the greedy row stays greedy
    torch.testing.assert_close(conf[0], torch.softmax(logits[0], -1).max(-1).values)
    assert torch.equal(tokens[1], logits[1].argmax(-1)) and torch.all(conf[1] == 1.0)
    t2, c2 = sample_tokens(logits[2], temperature=0.8, top_p=0.9, top_k=0,
                           generator=torch.Generator().manual_seed(2))
    assert torch.equal(tokens[2], t2) and torch.equal(conf[2], c2)
