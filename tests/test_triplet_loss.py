"""Tests of triplet_loss: cosine similarities and the triplet hinge loss on hand-built batches."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from constants import TRIPLET_ALPHA  # noqa: E402
from triplet_loss import batch_cosine_similarity, deep_speaker_loss  # noqa: E402


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, computed independently of the module."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum('ij,ij->i', a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def numpy_triplet_loss(anchor, positive, negative, alpha: float) -> float:
    s_ap = numpy_cosine(anchor, positive)
    s_an = numpy_cosine(anchor, negative)
    return float(np.mean(np.maximum(s_an - s_ap + alpha, 0.0)))


def loss(batch: np.ndarray, **kwargs) -> float:
    y_pred = tf.constant(batch, dtype=tf.float32)
    y_true = tf.zeros((batch.shape[0], 1))
    return float(ops.convert_to_numpy(deep_speaker_loss(y_true, y_pred, **kwargs)))


def unit_rows(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
    x = rng.standard_normal((rows, dims))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- batch_cosine_similarity ----------------------------------------------------------------------------------------


def test_batch_cosine_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((6, 16)).astype(np.float32)
    x2 = rng.standard_normal((6, 16)).astype(np.float32)
    got = ops.convert_to_numpy(batch_cosine_similarity(x1, x2))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, numpy_cosine(x1, x2), atol=1e-6)


def test_batch_cosine_similarity_of_known_pairs():
    x1 = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 1.0]], np.float32)
    x2 = np.array([[5.0, 0.0], [0.0, 2.0], [-3.0, -4.0], [1.0, 0.0]], np.float32)
    got = ops.convert_to_numpy(batch_cosine_similarity(tf.constant(x1), tf.constant(x2)))
    np.testing.assert_allclose(got, [1.0, 0.0, -1.0, 1 / np.sqrt(2)], atol=1e-6)


def test_batch_cosine_similarity_ignores_scale():
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((4, 8)).astype(np.float32)
    x2 = rng.standard_normal((4, 8)).astype(np.float32)
    scales = np.array([[0.01], [1.0], [7.0], [300.0]], np.float32)
    np.testing.assert_allclose(ops.convert_to_numpy(batch_cosine_similarity(x1 * scales, x2 / scales)),
                               ops.convert_to_numpy(batch_cosine_similarity(x1, x2)), atol=1e-5)


# --- deep_speaker_loss ------------------------------------------------------------------------------------------------


def test_default_alpha_is_the_documented_margin():
    assert TRIPLET_ALPHA == pytest.approx(0.1)


def test_perfect_triplets_give_zero_loss():
    anchors = unit_rows(np.random.default_rng(2), 4, 8)
    batch = np.concatenate([anchors, anchors, -anchors])  # s_ap = 1, s_an = -1: hinge max(-2 + alpha, 0) = 0.
    assert loss(batch) == pytest.approx(0.0, abs=1e-6)


def test_identical_embeddings_give_alpha():
    embedding = unit_rows(np.random.default_rng(3), 1, 8)
    batch = np.repeat(embedding, 6, axis=0)  # 2 triplets, s_ap = s_an = 1.
    assert loss(batch) == pytest.approx(TRIPLET_ALPHA, abs=1e-6)
    assert loss(batch, alpha=0.35) == pytest.approx(0.35, abs=1e-6)


def test_swapped_positives_and_negatives_give_two_plus_alpha():
    anchors = unit_rows(np.random.default_rng(4), 3, 8)
    batch = np.concatenate([anchors, -anchors, anchors])  # s_ap = -1, s_an = 1.
    assert loss(batch) == pytest.approx(2.0 + TRIPLET_ALPHA, abs=1e-5)


def test_hand_computed_two_triplets():
    anchors = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    positives = np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 1.0]], np.float32)
    negatives = np.array([[0.8, 0.6, 0.0], [1.0, -1.0, 0.0]], np.float32)
    batch = np.concatenate([anchors, positives, negatives])
    # Triplet 1: s_ap = 0.6, s_an = 0.8: hinge 0.8 - 0.6 + 0.1 = 0.3.
    # Triplet 2: s_ap = 1/sqrt(2), s_an = -1/sqrt(2): hinge max(-sqrt(2) + 0.1, 0) = 0.
    expected = numpy_triplet_loss(anchors, positives, negatives, alpha=0.1)
    assert expected == pytest.approx(0.15)
    assert loss(batch, alpha=0.1) == pytest.approx(expected, abs=1e-6)
    # With a margin of 1.5 both triplets count: (0.8 - 0.6 + 1.5 + (-sqrt(2) + 1.5)) / 2.
    expected_wide = numpy_triplet_loss(anchors, positives, negatives, alpha=1.5)
    assert expected_wide == pytest.approx((1.7 + 1.5 - np.sqrt(2)) / 2)
    assert loss(batch, alpha=1.5) == pytest.approx(expected_wide, abs=1e-6)


def test_random_batch_matches_numpy():
    rng = np.random.default_rng(5)
    batch = rng.standard_normal((3 * 8, 32)).astype(np.float32)
    anchors, positives, negatives = batch[:8], batch[8:16], batch[16:]
    expected = numpy_triplet_loss(anchors, positives, negatives, alpha=0.3)
    assert expected > 0
    assert loss(batch, alpha=0.3) == pytest.approx(expected, abs=1e-5)


def test_loss_is_cosine_so_scale_does_not_matter():
    rng = np.random.default_rng(6)
    normalised = unit_rows(rng, 3 * 5, 10)
    scales = rng.uniform(0.05, 50.0, (3 * 5, 1)).astype(np.float32)
    assert loss(normalised * scales, alpha=0.5) == pytest.approx(loss(normalised, alpha=0.5), abs=1e-5)
    assert loss(normalised, alpha=0.5) > 0


def test_loss_accepts_numpy_inputs_and_ignores_y_true():
    rng = np.random.default_rng(7)
    batch = rng.standard_normal((6, 4)).astype(np.float32)
    from_numpy = float(ops.convert_to_numpy(deep_speaker_loss(None, batch)))
    from_other_labels = float(ops.convert_to_numpy(deep_speaker_loss(np.arange(6.0), tf.constant(batch))))
    assert from_numpy == pytest.approx(from_other_labels, abs=1e-7)
    assert from_numpy == pytest.approx(numpy_triplet_loss(batch[:2], batch[2:4], batch[4:], TRIPLET_ALPHA), abs=1e-6)


def test_loss_is_a_scalar_with_gradients_towards_separation():
    rng = np.random.default_rng(8)
    variable = tf.Variable(rng.standard_normal((6, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        value = deep_speaker_loss(None, variable, alpha=2.5)  # margin 2.5 > 2: every triplet is active.
    gradient = tape.gradient(value, variable)
    assert tuple(value.shape) == ()
    assert np.all(np.isfinite(gradient.numpy()))
    assert np.any(gradient.numpy() != 0)
    # A gradient step lowers the loss.
    stepped = variable - 0.1 * gradient
    assert float(deep_speaker_loss(None, stepped, alpha=2.5)) < float(value)
