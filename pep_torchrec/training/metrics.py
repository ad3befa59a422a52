"""Evaluation metrics: exact (tie-aware) ROC AUC and log loss over weighted examples.

Computed from the gathered predictions of all ranks, so the numbers do not depend on the world size.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted ROC AUC; tied scores count one half (the Mann-Whitney statistic).

    Args:
        labels: [N] in {0, 1}.
        scores: [N] any monotone score (logits are fine).
        weights: [N] non-negative example weights (0 drops an example), default 1.
    Returns:
        AUC in [0, 1], or NaN when one class has zero weight.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.ones_like(labels) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], w[order]
    pos_w, neg_w = w * y, w * (1.0 - y)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    # Group equal scores: within a group a positive beats the negatives of all lower groups and ties
    # with the group's own negatives (half credit).
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], boundaries))
    group_pos = np.add.reduceat(pos_w, starts)
    group_neg = np.add.reduceat(neg_w, starts)
    neg_below = np.cumsum(group_neg) - group_neg
    credit = (group_pos * (neg_below + 0.5 * group_neg)).sum()
    return float(credit / (total_pos * total_neg))


def log_loss(labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted mean binary cross-entropy of sigmoid(logits), computed stably from logits."""
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    # log(1 + exp(-|z|)) + max(z, 0) - y z  ==  BCE(sigmoid(z), y)
    losses = np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0.0) - y * z
    total = w.sum()
    return float((w * losses).sum() / total) if total > 0 else float("nan")
