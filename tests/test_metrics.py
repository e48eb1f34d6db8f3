"""eval_metrics.evaluate: hand-computed cases and a cross-check against the original loop over thresholds."""

import numpy as np
import pytest

from eval_metrics import Metrics, evaluate, thresholds_grid


def loop_metrics(sims, labels) -> tuple[float, float, float, float]:
    """The original Deep Speaker computation, one threshold at a time (np.arange(0, 1, 0.001), score > t)."""
    sims, labels = np.ravel(sims), np.ravel(labels).astype(bool)
    best_fm, best_tpr, best_acc = -1.0, 0.0, 0.0
    min_diff, eer = None, 0.0
    for threshold in np.arange(0, 1.0, 0.001):
        predicted = sims > threshold
        tp = int(np.sum(predicted & labels))
        fp = int(np.sum(predicted & ~labels))
        tn = int(np.sum(~predicted & ~labels))
        fn = int(np.sum(~predicted & labels))
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        precision = 0 if tp + fp == 0 else tp / (tp + fp)
        fm = 2 * precision * tpr / (precision + tpr + 1e-12)
        acc = (tp + tn) / sims.size
        if fm > best_fm:
            best_fm, best_tpr, best_acc = fm, tpr, acc
        n_same, n_diff = int(labels.sum()), max(int((~labels).sum()), 1)
        frr = 1 - tp / n_same
        far = fp / n_diff
        if min_diff is None or abs(frr - far) < min_diff:
            min_diff, eer = abs(frr - far), (frr + far) / 2
    return best_fm, best_tpr, best_acc, eer


def scores_and_labels(positives, negatives):
    sims = np.array(list(positives) + list(negatives))
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    return sims, labels


def test_thresholds_grid():
    grid = thresholds_grid()
    assert len(grid) == 1000
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.999)
    np.testing.assert_allclose(np.diff(grid), 0.001)


def test_perfect_separation():
    sims, labels = scores_and_labels([0.95, 0.7, 0.61], [0.6, 0.3, -0.2])
    metrics = evaluate(sims, labels)
    assert isinstance(metrics, Metrics)
    assert metrics.equal_error_rate == 0.0
    assert metrics.f_measure == pytest.approx(1.0, abs=1e-9)
    assert metrics.true_positive_rate == 1.0
    assert metrics.accuracy == 1.0


def test_inverted_scores():
    # Positives [0.1, 0.2] below negatives [0.8, 0.9].
    # t < 0.1: tp 2, fp 2 -> precision 1/2, recall 1, F 2/3, accuracy 1/2, FRR 0, FAR 1.
    # 0.1 <= t < 0.2: tp 1, fp 2 -> F 0.4; FRR 1/2, FAR 1.   0.2 <= t < 0.8: tp 0, fp 2 -> FRR 1, FAR 1 (EER 1).
    sims, labels = scores_and_labels([0.1, 0.2], [0.8, 0.9])
    metrics = evaluate(sims, labels)
    assert metrics.f_measure == pytest.approx(2 / 3, abs=1e-9)
    assert metrics.true_positive_rate == 1.0
    assert metrics.accuracy == 0.5
    assert metrics.equal_error_rate == 1.0


def test_hand_computed_frr_far():
    # Positives [0.9, 0.3], negatives [0.5, 0.2, 0.1]; a score counts as accepted when strictly above t.
    #   t in          tp fp  FRR  FAR   |FRR-FAR|  precision recall  F      accuracy
    #   [0, .1)       2  3   0    1     1          2/5       1       4/7    2/5
    #   [.1, .2)      2  2   0    2/3   2/3        1/2       1       2/3    3/5
    #   [.2, .3)      2  1   0    1/3   1/3        2/3       1       4/5    4/5
    #   [.3, .5)      1  1   1/2  1/3   1/6        1/2       1/2     1/2    3/5
    #   [.5, .9)      1  0   1/2  0     1/2        1         1/2     2/3    4/5
    #   [.9, 1)       0  0   1    0     1          0         0       0      3/5
    # Best F: 4/5 at [.2, .3) with recall 1 and accuracy 4/5; EER at [.3, .5): (1/2 + 1/3) / 2 = 5/12.
    sims, labels = scores_and_labels([0.9, 0.3], [0.5, 0.2, 0.1])
    metrics = evaluate(sims, labels)
    assert metrics.f_measure == pytest.approx(0.8, abs=1e-9)
    assert metrics.true_positive_rate == 1.0
    assert metrics.accuracy == pytest.approx(0.8)
    assert metrics.equal_error_rate == pytest.approx(5 / 12)


def test_a_score_equal_to_the_threshold_is_rejected():
    # Acceptance is "score > t": a positive scoring exactly 0.0 is rejected at every threshold 0 .. 0.999.
    # So tp = 0 everywhere: F 0, recall 0, accuracy at the first threshold (1 of 2 right), FRR 1 and FAR 0
    # everywhere -> EER 1/2. (With ">=" it would be accepted at t = 0: F 1, EER 0.)
    sims, labels = scores_and_labels([0.0], [-0.5])
    metrics = evaluate(sims, labels)
    assert metrics.f_measure == 0.0
    assert metrics.true_positive_rate == 0.0
    assert metrics.accuracy == 0.5
    assert metrics.equal_error_rate == 0.5


def test_negative_tied_with_a_positive():
    # Positives [0.5, 0.25], negative [0.25]:
    #   t < 0.25:        tp 2, fp 1 -> FRR 0,   FAR 1, precision 2/3, recall 1,   F 0.8, accuracy 2/3
    #   0.25 <= t < 0.5: tp 1, fp 0 -> FRR 1/2, FAR 0, precision 1,   recall 1/2, F 2/3
    #   0.5 <= t:        tp 0, fp 0 -> FRR 1,   FAR 0
    # Smallest |FRR - FAR| is 1/2, first reached at t = 0.25: EER (1/2 + 0) / 2 = 1/4.
    sims, labels = scores_and_labels([0.5, 0.25], [0.25])
    metrics = evaluate(sims, labels)
    assert metrics.f_measure == pytest.approx(0.8, abs=1e-9)
    assert metrics.true_positive_rate == 1.0
    assert metrics.accuracy == pytest.approx(2 / 3)
    assert metrics.equal_error_rate == pytest.approx(0.25)


def test_shape_of_the_evaluation_protocol_is_flattened():
    # eval_model passes (speakers, 1 + negatives) scores with the positive in column 0.
    y_pred = np.array([[0.9, 0.2, 0.4], [0.7, 0.1, 0.8]])
    y_true = np.zeros_like(y_pred)
    y_true[:, 0] = 1
    assert evaluate(y_pred, y_true) == evaluate(y_pred.ravel(), y_true.ravel())
    assert tuple(evaluate(y_pred, y_true)) == loop_metrics(y_pred, y_true)


@pytest.mark.parametrize('seed', range(6))
def test_matches_loop_implementation_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(rng.integers(1, 40)), int(rng.integers(1, 200))
    positives = np.clip(rng.normal(0.6, 0.25, n_pos), -1, 1)
    negatives = np.clip(rng.normal(0.3, 0.25, n_neg), -1, 1)
    sims, labels = scores_and_labels(positives, negatives)
    order = rng.permutation(len(sims))
    sims, labels = sims[order], labels[order]
    assert tuple(evaluate(sims, labels)) == loop_metrics(sims, labels)


@pytest.mark.parametrize('seed', range(3))
def test_matches_loop_implementation_with_ties_on_the_grid(seed):
    rng = np.random.default_rng(100 + seed)
    # Scores drawn from the thresholds themselves: every score equals some threshold exactly.
    sims = rng.choice(np.arange(0, 1.0, 0.001), size=300)
    labels = (rng.random(300) < sims).astype(int)  # higher scores more often positive.
    assert 0 < labels.sum() < 300
    assert tuple(evaluate(sims, labels)) == loop_metrics(sims, labels)


def test_matches_loop_implementation_on_float32_scores():
    rng = np.random.default_rng(7)
    sims = rng.uniform(-1, 1, (50, 100)).astype(np.float32)
    labels = np.zeros((50, 100))
    labels[:, 0] = 1
    sims[:, 0] = np.clip(sims[:, 0] + 0.5, -1, 1)
    assert tuple(evaluate(sims, labels)) == loop_metrics(sims, labels)
