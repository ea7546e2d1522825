import warnings

import numpy as np
import pytest
from scipy import stats

from adarank.runner.data.metrics import compute_metrics, macro_f1, matthews
from adarank.runner.data.tasks import get_task

P = np.array([1, 1, 0, 1, 0, 0, 1, 0])
L = np.array([1, 0, 0, 1, 1, 0, 1, 0])
# tp=3 fp=1 fn=1 tn=3


def test_accuracy_f1_mrpc():
    m = compute_metrics(get_task("mrpc"), P, L)
    assert m == pytest.approx({"f1": 2 * 3 / (2 * 3 + 1 + 1), "accuracy": 6 / 8})


def test_matthews_binary_formula():
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(get_task("cola"), P, L)["matthews"] == pytest.approx(expected)  # = 0.5


def test_matthews_multiclass_hand_value():
    # confusion (rows true, cols pred) = [[2,1,0],[0,1,1],[1,0,2]], n=8, correct=5
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 2, 0, 2, 2])
    t, p = np.array([3, 2, 3]), np.array([3, 2, 3])
    expected = (5 * 8 - t @ p) / np.sqrt((64 - p @ p) * (64 - t @ t))
    assert matthews(preds, labels) == pytest.approx(expected)


def test_macro_f1_hand_value():
    labels = np.array([0, 0, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 2, 2, 0])
    f0 = 2 * 1 / (2 * 1 + 1 + 1)  # tp=1, fp=1, fn=1
    f1 = 2 * 1 / (2 * 1 + 1 + 0)  # tp=1, fp=1, fn=0
    f2 = 2 * 2 / (2 * 2 + 0 + 1)  # tp=2, fp=0, fn=1
    assert macro_f1(preds, labels) == pytest.approx((f0 + f1 + f2) / 3)


def test_stsb_matches_scipy():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    preds = labels + rng.normal(0, 1, 50)
    m = compute_metrics(get_task("stsb"), preds[:, None].astype(np.float32), labels, prefix="validation/")
    assert m["validation/pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0], rel=1e-5)
    assert m["validation/spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0], rel=1e-5)


def test_logits_are_argmaxed_and_prefixed():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.5]])
    m = compute_metrics(get_task("mnli"), logits, np.array([0, 2, 0]), prefix="validation_matched/")
    assert m == pytest.approx({"validation_matched/accuracy": 2 / 3})


def test_degenerate_cases_are_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cola = compute_metrics(get_task("cola"), np.ones(6, int), np.array([0, 1, 1, 0, 1, 1]))
        assert cola["matthews"] == 0.0 and cola["accuracy"] == pytest.approx(4 / 6)
        assert compute_metrics(get_task("mrpc"), np.zeros(4, int), np.zeros(4, int))["f1"] == 0.0
        stsb = compute_metrics(get_task("stsb"), np.full(5, 2.5), np.arange(5.0))
        assert stsb == {"pearson": 0.0, "spearman": 0.0}


def test_shape_mismatch():
    with pytest.raises(ValueError, match="compute_metrics"):
        compute_metrics(get_task("sst2"), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="compute_metrics"):
        compute_metrics(get_task("sst2"), np.zeros(0), np.zeros(0))
