"""`select_tokens`, the threshold rule of parallel decoding (paper §3.3): every masked candidate
above the threshold, plus always the single most confident one."""

from __future__ import annotations

import torch

from fastdllm.engine.selection import select_tokens


def brute_force(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    out = torch.zeros_like(candidates)
    for r in range(confidence.shape[0]):
        idx = [k for k in range(confidence.shape[1]) if candidates[r, k]]
        if not idx:
            continue
        best = max(idx, key=lambda k: float(confidence[r, k]))  # first of ties, like argmax
        for k in idx:
            out[r, k] = k == best or float(confidence[r, k]) > threshold
    return out


def test_threshold_rule_selects_every_candidate_above_it():
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.5, 0.99]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_tokens(conf, cand, 0.9).tolist() == [[True, False, True, False, True]]
    # strictly above: a confidence equal to the threshold is not enough (unless it is the best)
    conf = torch.tensor([[0.9, 0.95, 0.3]])
    assert select_tokens(conf, torch.ones(1, 3, dtype=torch.bool), 0.9).tolist() == [[False, True, False]]


def test_the_most_confident_candidate_is_always_selected():
    conf = torch.tensor([[0.1, 0.3, 0.2], [0.05, 0.01, 0.02]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_tokens(conf, cand, 0.9).tolist() == [[False, True, False], [True, False, False]]
    # threshold 1.0: exactly one token per row, every time
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(50, 8, generator=g)
    cand = torch.rand(50, 8, generator=g) < 0.6
    chosen = select_tokens(conf, cand, 1.0)
    assert chosen.sum(-1).tolist() == cand.any(-1).long().tolist()


def test_non_candidates_are_never_selected():
    conf = torch.tensor([[0.99, 0.98, 0.2, 0.1]])
    cand = torch.tensor([[False, False, True, True]])
    # the two confident positions are already decoded: the best remaining candidate is chosen
    assert select_tokens(conf, cand, 0.5).tolist() == [[False, False, True, False]]


def test_rows_without_candidates_select_nothing():
    conf = torch.tensor([[0.99, 0.98], [0.3, 0.4]])
    cand = torch.tensor([[False, False], [True, False]])
    assert select_tokens(conf, cand, 0.5).tolist() == [[False, False], [True, False]]


def test_matches_brute_force_on_random_rows():
    g = torch.Generator().manual_seed(1)
    for threshold in (0.1, 0.5, 0.9, 1.0):
        conf = torch.rand(64, 12, generator=g)
        cand = torch.rand(64, 12, generator=g) < 0.5
        got = select_tokens(conf, cand, threshold)
        assert torch.equal(got, brute_force(conf, cand, threshold)), threshold
        assert not (got & ~cand).any()
        assert torch.equal(got.any(-1), cand.any(-1))  # progress exactly where possible


def test_inputs_are_not_modified():
    conf = torch.tensor([[0.2, 0.7]])
    cand = torch.tensor([[True, False]])
    before = conf.clone(), cand.clone()
    select_tokens(conf, cand, 0.5)
    assert torch.equal(conf, before[0]) and torch.equal(cand, before[1])
