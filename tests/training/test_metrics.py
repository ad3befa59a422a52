"""AUC and log loss against scikit-learn, with ties and weights."""

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from pep_torchrec.training.metrics import log_loss, roc_auc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    z = np.round(rng.normal(size=2000) + y, 1)  # rounding creates many ties
    w = rng.integers(0, 3, 2000).astype(float)
    assert roc_auc(y, z, w) == pytest.approx(roc_auc_score(y, z, sample_weight=w), abs=1e-12)
    p = 1 / (1 + np.exp(-z))
    assert log_loss(y, z, w) == pytest.approx(sk_log_loss(y, p, sample_weight=w), abs=1e-9)


def test_zero_weight_rows_are_ignored():
    y = np.array([0, 1, 1, 0])
    z = np.array([0.1, 0.9, -5.0, 3.0])
    w = np.array([1, 1, 0, 0])
    assert roc_auc(y, z, w) == 1.0
    assert roc_auc(y[:2], z[:2]) == 1.0


def test_single_class_is_nan():
    assert np.isnan(roc_auc(np.ones(4), np.arange(4.0)))
