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


# ---------------------------------------------------------------- the alternative rules
# Both are checked against brute-force definitions written from their descriptions (selection.py),
# on hand-made rows (the cases a reader can verify) and on random ones.
import math  # noqa: E402

import pytest  # noqa: E402

from fastdllm.engine.selection import (  # noqa: E402
    RULES, entropy_bound, select, select_entropy_bounded, select_left_anchored)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def brute_left_anchored(confidence, candidates, threshold):
    out = torch.zeros_like(candidates)
    for r in range(confidence.shape[0]):
        product, first = 1.0, True
        for k in range(confidence.shape[1]):
            if not candidates[r, k]:
                continue
            product = product * float(confidence[r, k])
            if not first and product < f32(threshold):  # the threshold as float32, like the rule
                break
            out[r, k] = True
            first = False
    return out


def brute_entropy_bounded(confidence, entropy, candidates, threshold):
    out = torch.zeros_like(candidates)
    for r in range(confidence.shape[0]):
        idx = [k for k in range(confidence.shape[1]) if candidates[r, k]]
        idx.sort(key=lambda k: (-float(confidence[r, k]), k))  # most confident, then leftmost
        taken: list[int] = []
        for k in idx:
            hs = [float(entropy[r, j]) for j in taken + [k]]
            if sum(hs) - max(hs) > -math.log(threshold):
                break
            taken.append(k)
        for k in taken:
            out[r, k] = True
    return out


def test_left_anchored_takes_the_run_from_the_first_mask_while_the_product_holds():
    conf = torch.tensor([[0.99, 0.95, 0.5, 0.99, 0.99]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    # 0.99 * 0.95 = 0.9405 >= 0.9; * 0.5 falls below: the run stops there even though the
    # positions after it are confident (the official rule would take them)
    assert select_left_anchored(conf, cand, 0.9).tolist() == [[True, True, False, False, False]]
    assert select_tokens(conf, cand, 0.9).tolist() == [[True, True, False, True, True]]
    # a low threshold takes the whole run
    assert select_left_anchored(conf, cand, 0.4).tolist() == [[True] * 5]


def test_left_anchored_always_takes_the_first_mask_even_when_unconfident():
    conf = torch.tensor([[0.1, 0.99, 0.99], [0.3, 0.2, 0.1]])
    cand = torch.tensor([[True, True, True], [False, True, True]])
    # the first candidate, not the most confident one: the rule never skips ahead
    assert select_left_anchored(conf, cand, 0.9).tolist() == [[True, False, False], [False, True, False]]


def test_left_anchored_product_equal_to_the_threshold_is_enough():
    conf = torch.tensor([[1.0, 0.5, 1.0, 0.25]])
    cand = torch.ones_like(conf, dtype=torch.bool)  # products 1, 0.5, 0.5, 0.125 (exact in float32)
    assert select_left_anchored(conf, cand, 0.5).tolist() == [[True, True, True, False]]


def test_left_anchored_rows_with_different_masks():
    conf = torch.tensor([[0.97, 0.97, 0.97, 0.97],
                         [0.97, 0.97, 0.97, 0.97],
                         [0.97, 0.97, 0.97, 0.97],
                         [0.99, 0.99, 0.99, 0.99]])
    cand = torch.tensor([[True, True, True, True],    # 0.97^3 = 0.913, 0.97^4 = 0.885
                         [False, False, True, True],  # decoded prefix: the run starts at 2
                         [True, False, True, True],   # a decoded position inside counts as certain
                         [False, False, False, False]])
    assert select_left_anchored(conf, cand, 0.9).tolist() == [
        [True, True, True, False], [False, False, True, True], [True, False, True, True],
        [False, False, False, False]]


def test_entropy_bounded_takes_confident_tokens_while_the_entropy_budget_holds():
    conf = torch.tensor([[0.6, 0.99, 0.95, 0.98]])
    ent = torch.tensor([[1.0, 0.01, 0.06, 0.05]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    # order 1, 3, 2, 0; costs (sum - max): 0, 0.01, 0.06, 0.12 (budget -ln 0.9 = 0.105)
    assert select_entropy_bounded(conf, ent, cand, 0.9).tolist() == [[False, True, True, True]]
    assert select_entropy_bounded(conf, ent, cand, 0.97).tolist() == [[False, True, False, True]]
    # a budget below every second token's entropy: the most confident alone
    assert select_entropy_bounded(conf, ent, cand, 0.995).tolist() == [[False, True, False, False]]


def test_entropy_bounded_always_takes_the_most_confident_and_ties_go_left():
    conf = torch.tensor([[0.3, 0.4, 0.4], [0.2, 0.2, 0.2]])
    ent = torch.tensor([[3.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_entropy_bounded(conf, ent, cand, 0.9).tolist() == [[False, True, False],
                                                                     [True, False, False]]
    # the largest entropy is free: one very uncertain token with one certain one fits any budget
    conf = torch.tensor([[0.99, 0.2]])
    ent = torch.tensor([[0.0, 5.0]])
    assert select_entropy_bounded(conf, ent, torch.ones(1, 2, dtype=torch.bool), 1.0).tolist() == [[True, True]]


def test_entropy_bounded_ignores_non_candidates_and_empty_rows():
    conf = torch.tensor([[0.99, 0.98, 0.9, 0.5], [0.9, 0.9, 0.9, 0.9]])
    ent = torch.tensor([[0.0, 0.0, 0.5, 0.4], [0.0, 0.0, 0.0, 0.0]])
    cand = torch.tensor([[False, False, True, True], [False, False, False, False]])
    assert select_entropy_bounded(conf, ent, cand, 0.9).tolist() == [[False, False, True, False],
                                                                     [False, False, False, False]]


def test_every_rule_takes_all_certain_candidates_and_nothing_else():
    conf = torch.tensor([[1.0, 1.0, 1.0, 0.2]])
    ent = torch.tensor([[0.0, 0.0, 0.0, 1.5]])
    cand = torch.tensor([[True, True, True, False]])
    for rule in RULES:
        assert select(rule, conf, cand, 0.9, ent).tolist() == [[True, True, True, False]], rule


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
def test_alternative_rules_match_brute_force_on_random_rows(threshold):
    g = torch.Generator().manual_seed(2)
    # confidences drawn near 1 so that runs of several tokens happen; some exact ties and ones
    conf = 1 - torch.rand(64, 8, generator=g) ** 3 * 0.6
    conf[:8] = torch.round(conf[:8] * 4) / 4
    ent = torch.rand(64, 8, generator=g) * 0.2
    cand = torch.rand(64, 8, generator=g) < 0.7
    for got, want in [
            (select_left_anchored(conf, cand, threshold), brute_left_anchored(conf, cand, threshold)),
            (select_entropy_bounded(conf, ent, cand, threshold),
             brute_entropy_bounded(conf, ent, cand, threshold))]:
        assert torch.equal(got, want)
        assert not (got & ~cand).any()
        assert torch.equal(got.any(-1), cand.any(-1))  # progress exactly where possible


def test_entropy_bound_is_minus_log_threshold():
    assert entropy_bound(1.0) == 0.0
    assert entropy_bound(0.9) == pytest.approx(0.10536, abs=1e-5)


def test_select_dispatches_and_refuses_what_it_cannot_run():
    conf = torch.tensor([[0.95, 0.2, 0.91]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert torch.equal(select("threshold", conf, cand, 0.9), select_tokens(conf, cand, 0.9))
    assert torch.equal(select("left_anchored", conf, cand, 0.9), select_left_anchored(conf, cand, 0.9))
    with pytest.raises(ValueError, match="entropy"):
        select("entropy_bounded", conf, cand, 0.9)
    with pytest.raises(ValueError, match="unknown decoding rule"):
        select("greedy", conf, cand, 0.9)
