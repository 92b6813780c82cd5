import numpy as np
import pytest

from eclip.evaluation import macro_f1, random_box_baseline, ranks_metrics


def test_ranks_metrics_by_hand():
    # query 0: relevant items 0 and 2, ranked 1st and 3rd -> AP@R (R=2) = (1/1 + 0)/2 = 0.5
    # query 1: relevant item 1, ranked 2nd -> R@1 = 0, AP@R (R=1) = 0, map10 = 1/2
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.1]])
    relevant = np.array([[True, False, True], [False, True, False]])
    m = ranks_metrics(scores, relevant, ks=(1, 2))
    assert m["r1"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1.0)
    assert m["map_r"] == pytest.approx((0.5 + 0.0) / 2)
    # map@10 of query 0: (1/1 + 2/3) / 2; of query 1: (1/2) / 1
    assert m["map10"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_perfect_and_reversed_rankings():
    relevant = np.eye(4, dtype=bool)
    assert ranks_metrics(np.eye(4), relevant)["map_r"] == 1.0
    assert ranks_metrics(-np.eye(4), relevant)["r1"] == 0.0


def test_macro_f1():
    truth = np.array([0, 0, 1, 1, 2])
    assert macro_f1(truth, truth, 3) == 1.0
    predicted = np.array([0, 1, 1, 1, 2])  # class 0: f1 2/3, class 1: f1 0.8, class 2: 1
    assert macro_f1(predicted, truth, 3) == pytest.approx((2 / 3 + 0.8 + 1) / 3)


def test_random_box_accuracy_grows_with_the_box():
    small, small_iou = random_box_baseline([(0.4, 0.4, 0.5, 0.5)] * 10)
    large, large_iou = random_box_baseline([(0.2, 0.2, 0.8, 0.8)] * 10)
    assert small < 0.02 < large
    assert 0 < small_iou < large_iou < 1
