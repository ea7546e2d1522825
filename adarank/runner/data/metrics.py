"""GLUE metrics in numpy/scipy: accuracy, F1, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats

from .tasks import TaskSpec


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def _f1(preds: np.ndarray, labels: np.ndarray, positive: int) -> float:
    tp = np.sum((preds == positive) & (labels == positive))
    wrong = np.sum((preds == positive) != (labels == positive))  # false positives + false negatives
    # No positive predicted or present: F1 is 0/0; report 0.0 as sklearn does.
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 with class 1 as the positive class (MRPC, QQP)."""
    return _f1(preds, labels, positive=1)


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions (as sklearn)."""
    classes = np.union1d(preds, labels)
    return float(np.mean([_f1(preds, labels, positive=c) for c in classes]))


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form, equal to the usual one for two classes); 0.0 when undefined."""
    classes, inverse = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (inverse[:len(labels)], inverse[len(labels):]), 1.0)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    cov_tp = correct * n - true_counts @ pred_counts
    cov_pp = n * n - pred_counts @ pred_counts
    cov_tt = n * n - true_counts @ true_counts
    # All predictions (or all labels) equal: the correlation is 0/0; report 0.0 as sklearn does.
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp > 0 else 0.0


def _constant(x: np.ndarray) -> bool:
    return len(x) < 2 or bool(np.all(x == x[0]))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (scipy would return nan)."""
    if _constant(preds) or _constant(labels):
        return 0.0
    return float(stats.pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation; 0.0 when either side is constant (scipy would return nan)."""
    if _constant(preds) or _constant(labels):
        return 0.0
    return float(stats.spearmanr(preds, labels)[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: TaskSpec, preds: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Compute `task.metrics` as `{prefix + name: value}`.

    `preds` are class ids (N,) or logits (N, C), which are argmaxed; for regression, scores (N,) or (N, 1).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == 2:
        preds = preds.squeeze(-1) if task.is_regression else preds.argmax(axis=-1)
    if preds.shape != labels.shape or preds.ndim != 1 or len(preds) == 0:
        raise ValueError(f"compute_metrics: need non-empty (N,) preds and labels, got {preds.shape}, {labels.shape}")
    if task.is_regression:
        preds, labels = preds.astype(np.float64), labels.astype(np.float64)
    return {prefix + name: METRICS[name](preds, labels) for name in task.metrics}
