import numpy as np
import pytest

from tuneloop.evaluate import compute_metrics


def test_classification_metrics_known_values():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    preds = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    m = compute_metrics(("accuracy", "f1", "matthews_correlation"), preds, labels)
    # tp=3 fp=1 fn=1 tn=3: precision = recall = 0.75, mcc = (9 - 1) / sqrt(4*4*4*4) = 0.5
    assert m == pytest.approx({"accuracy": 0.75, "f1": 0.75, "matthews_correlation": 0.5})


def test_macro_f1_three_classes():
    m = compute_metrics(("f1_macro",), np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    # class f1: 1.0, 2/3, 2/3
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_regression_metrics_known_values():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    m = compute_metrics(("pearson", "spearman"), np.array([1.0, 2.0, 3.0, 5.0]), labels)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pearson"] == pytest.approx(0.9827076298239908)
    assert compute_metrics(("pearson",), np.ones(4), labels)["pearson"] == 0.0
