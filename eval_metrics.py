"""Verification metrics of the original Deep Speaker protocol: F-measure, true positive rate, accuracy and
EER over thresholds 0..1 in steps of 0.001, computed with sorted scores instead of a loop over thresholds."""

from typing import NamedTuple

import numpy as np

from constants import DCF_P_TARGET, EVAL_THRESHOLD_STEP


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


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every threshold that separates the sorted scores (accept score >= threshold).

    Returns (thresholds, p_miss, p_fa), one entry per distinct score plus one: the first threshold accepts
    everything, the last (inf) nothing; equal scores are never split. labels: 1 target, 0 non-target; both
    classes must be present.
    """
    order = np.argsort(scores, kind='stable')
    sorted_scores, sorted_labels = np.asarray(scores)[order], np.asarray(labels)[order].astype(bool)
    n_target, n_nontarget = sorted_labels.sum(), (~sorted_labels).sum()
    misses = np.concatenate([[0], np.cumsum(sorted_labels)])
    kept_nontargets = np.concatenate([[0], np.cumsum(~sorted_labels)])
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1, [len(sorted_scores)]])
    thresholds = np.concatenate([sorted_scores, [np.inf]])[cuts]
    return thresholds, misses[cuts] / n_target, (n_nontarget - kept_nontargets[cuts]) / n_nontarget


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER, linearly interpolated where the miss and false-alarm curves cross (fraction, not %)."""
    _, p_miss, p_fa = error_rates(scores, labels)
    crossing = int(np.argmax(p_miss >= p_fa))
    if crossing == 0:
        return float(p_miss[0])
    d_before, d_after = p_fa[crossing - 1] - p_miss[crossing - 1], p_miss[crossing] - p_fa[crossing]
    weight = d_before / (d_before + d_after) if d_before + d_after > 0 else 0.0
    return float(p_miss[crossing - 1] + weight * (p_miss[crossing] - p_miss[crossing - 1]))


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = DCF_P_TARGET, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost over all thresholds (NIST SRE definition)."""
    _, p_miss, p_fa = error_rates(scores, labels)
    cost = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def threshold_at(thresholds: np.ndarray, index: int) -> float:
    """A score threshold that accepts the same scores as thresholds[index] (error_rates'), halfway between it and
    the distinct score below it so that it holds for scores in between; just above the top score for inf."""
    if index == 0:
        return float(thresholds[0])
    below = float(thresholds[index - 1])
    return float(np.nextafter(below, np.inf)) if np.isinf(thresholds[index]) else (below + float(thresholds[index])) / 2


def eer_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (accept score >= it) where the miss rate first reaches the false-alarm rate."""
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    return threshold_at(thresholds, int(np.argmax(p_miss >= p_fa)))


def min_dcf_threshold(scores: np.ndarray, labels: np.ndarray, p_target: float = DCF_P_TARGET, c_miss: float = 1.0,
                      c_fa: float = 1.0) -> float:
    """The score threshold (accept score >= it) of the minimum detection cost (min_dcf's)."""
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    return threshold_at(thresholds, int(np.argmin(c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa)))


def plot_det(scores: np.ndarray, labels: np.ndarray, path: str, title: str = 'DET curve') -> None:
    """Draws the DET curve (normal-deviate axes, EER marked) to a PNG file."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    _, p_miss, p_fa = error_rates(scores, labels)
    clip = (1e-4, 1 - 1e-4)
    ticks = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    eer = equal_error_rate(scores, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(norm.ppf(np.clip(p_fa, *clip)), norm.ppf(np.clip(p_miss, *clip)), label='DET')
    ax.plot(norm.ppf(eer), norm.ppf(eer), 'o', label=f'EER {100 * eer:.2f} %')
    ax.set_xticks(norm.ppf(ticks), [f'{100 * t:g}' for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [f'{100 * t:g}' for t in ticks])
    ax.set_xlim(norm.ppf(0.0005), norm.ppf(0.5))
    ax.set_ylim(norm.ppf(0.0005), norm.ppf(0.5))
    ax.set_xlabel('False alarm rate (%)')
    ax.set_ylabel('Miss rate (%)')
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
