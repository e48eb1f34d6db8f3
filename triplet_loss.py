"""Deep Speaker's triplet loss on cosine similarities, under any Keras backend."""

import keras
from keras import ops

from constants import TRIPLET_ALPHA


def batch_cosine_similarity(x1, x2):
    """Row-wise cosine similarity of two (batch, dims) tensors: shape (batch,)."""
    return ops.sum(ops.normalize(x1, axis=1) * ops.normalize(x2, axis=1), axis=1)


def deep_speaker_loss(y_true, y_pred, alpha: float = TRIPLET_ALPHA):
    """Mean over triplets of max(s_an - s_ap + alpha, 0), in float32.

    y_pred: embeddings (3n, dims) laid out [anchors; positives; negatives]; y_true is ignored (Keras needs one).
    Within a tf.distribute replica the mean is divided by the number of replicas in sync, as Keras' own losses
    are, so that the sum of the replicas' gradients is the gradient of the mean over the whole global batch.
    """
    y_pred = ops.cast(y_pred, 'float32')
    split = ops.shape(y_pred)[0] // 3
    anchor, positive, negative = y_pred[:split], y_pred[split:2 * split], y_pred[2 * split:3 * split]
    s_ap = batch_cosine_similarity(anchor, positive)
    s_an = batch_cosine_similarity(anchor, negative)
    return ops.mean(ops.maximum(s_an - s_ap + alpha, 0.0)) / replicas_in_sync()


def replicas_in_sync() -> int:
    """The number of tf.distribute replicas the current step is one of (1 outside a strategy, and under the other
    Keras backends)."""
    if keras.backend.backend() != 'tensorflow':
        return 1
    import tensorflow as tf
    return tf.distribute.get_strategy().num_replicas_in_sync
