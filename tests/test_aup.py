"""AUP (evaluation/aup.py) against a curve worked by hand from d3LLM's definition."""

from __future__ import annotations

import math

import pytest

from fastdllm.evaluation.aup import aup, aup_points, weight


def test_aup_hand_worked_example():
    # Points given out of order; y_max = 90 (say, the AR base). Sorted by tokens per forward:
    # (1, 80), (2, 79), (2.5, 78), (3, 70). The floor is 80 - 5 = 75, so (3, 70) is dropped.
    # W(80) = e^(-3 * 10/90) = e^(-1/3) = 0.716531, W(79) = e^(-3 * 11/90) = e^(-0.36667) = 0.693041,
    # W(78) = e^(-3 * 12/90) = e^(-0.4) = 0.670320.
    # AUP = 1 * 80                                       (rectangle up to the first point, unweighted)
    #     + 0.5 * (2 - 1)   * (79 * 0.693041 + 80 * 0.716531) = 0.5 * 112.0727 = 56.0363
    #     + 0.5 * (2.5 - 2) * (78 * 0.670320 + 79 * 0.693041) = 0.25 * 107.0352 = 26.7588
    #     = 162.7951
    pts = [(2.5, 78.0), (1.0, 80.0), (3.0, 70.0), (2.0, 79.0)]
    assert aup_points(pts) == [(1.0, 80.0), (2.0, 79.0), (2.5, 78.0)]
    assert aup(pts, y_max=90.0) == pytest.approx(162.7951, abs=1e-3)
    assert weight(79.0, 90.0) == pytest.approx(math.exp(-3 * 11 / 90))


def test_aup_without_accuracy_loss_is_the_area_under_the_curve():
    # flat at the best accuracy: W = 1 everywhere, AUP = rho_m * y (rectangle + trapezoids)
    assert aup([(1.0, 50.0), (3.0, 50.0), (2.0, 50.0)]) == pytest.approx(150.0)
    # one point: the rectangle
    assert aup([(2.6, 77.0)], y_max=91.0) == pytest.approx(2.6 * 77.0)


def test_aup_penalises_a_drop_more_than_the_plain_area():
    fast_but_wrong = [(1.0, 90.0), (4.0, 86.0)]
    plain = 1.0 * 90 + 0.5 * 3.0 * (86 + 90)
    assert aup(fast_but_wrong) < plain
    assert weight(95.0, 90.0) == 1.0  # never rewards beating y_max


def test_aup_rejects_bad_points():
    with pytest.raises(ValueError):
        aup([])
    with pytest.raises(ValueError):
        aup([(0.0, 50.0)])
    with pytest.raises(ValueError):
        aup([(1.0, 0.5), (2.0, 150.0)])
