"""Verification metrics of the original Deep Speaker protocol: F-measure, true positive rate, accuracy and
EER over thresholds 0..1 in steps of 0.001, computed with sorted scores instead of a loop over thresholds."""

from typing import NamedTuple

import numpy as np

from constants import EVAL_THRESHOLD_STEP


class Metrics(NamedTuple):
    f_measure: float
    true_positive_rate: float
    accuracy: float
    equal_error_rate: float


def thresholds_grid(step: float = EVAL_THRESHOLD_STEP) -> np.ndarray:
    """0, step, ..., 1 - step."""
    return np.arange(0.0, 1.0, step)


def counts_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many scores are strictly greater: shape (thresholds,)."""
    return len(scores) - np.searchsorted(np.sort(scores), thresholds, side='right')


def evaluate(sims: np.ndarray, labels: np.ndarray) -> Metrics:
    """Scores `sims` against 0/1 `labels` (any equal shapes). F-measure, TPR and accuracy are taken at the
    threshold of best F-measure; EER is the mean of FRR and FAR where |FRR - FAR| is smallest."""
    sims, labels = np.ravel(sims), np.ravel(labels).astype(bool)
    thresholds = thresholds_grid()
    n_same, n_diff = int(labels.sum()), int((~labels).sum())
    tp = counts_above(sims[labels], thresholds)
    fp = counts_above(sims[~labels], thresholds)
    fn, tn = n_same - tp, n_diff - fp
    with np.errstate(divide='ignore', invalid='ignore'):
        tpr = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    f_measure = 2 * precision * tpr / (precision + tpr + 1e-12)
    accuracy = (tp + tn) / sims.size
    best = int(np.argmax(f_measure))
    frr = 1.0 - tpr if n_same else np.zeros_like(tpr)
    far = fp / max(n_diff, 1)
    closest = int(np.argmin(np.abs(frr - far)))
    eer = (frr[closest] + far[closest]) / 2
    return Metrics(float(f_measure[best]), float(tpr[best]), float(accuracy[best]), float(eer))
