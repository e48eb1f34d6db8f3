"""SpecAugment (Park et al. 2019) for speaker training: time and frequency masks on each training crop, drawn on the
fly in the tf.data pipeline from stateless seeds, so a run with the same seed masks the same way.

Masked values become 0, a normalised fbank frame's mean; a crop's frame masked in full is all zeros, so the
TDNN's and ECAPA's frame mask leave it out of their pooling, as they do padding. Imports constants only.
"""

import tensorflow as tf

from constants import SPEC_AUGMENT_FREQ_MASKS, SPEC_AUGMENT_TIME_MASKS


def band_keep(batch, length, masks: int, widest: int, seed) -> tf.Tensor:
    """1.0 outside and 0.0 inside `masks` bands per row, each of a width drawn from 0..`widest` at a uniform
    start: (batch, length) float32. `seed`: a stateless seed, int64 (2,)."""
    width_seed, start_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    widths = tf.random.stateless_uniform((batch, masks), width_seed, 0, widest + 1, dtype=tf.int32)
    starts = tf.cast(tf.random.stateless_uniform((batch, masks), start_seed) *
                     tf.cast(length - widths + 1, tf.float32), tf.int32)
    positions = tf.range(length)[tf.newaxis, tf.newaxis, :]
    inside = (positions >= starts[..., tf.newaxis]) & (positions < (starts + widths)[..., tf.newaxis])
    return 1.0 - tf.cast(tf.reduce_any(inside, axis=1), tf.float32)


def spec_augment(crops: tf.Tensor, seed) -> tf.Tensor:
    """`crops` (batch, frames, fbanks, 1) with SPEC_AUGMENT_TIME_MASKS and SPEC_AUGMENT_FREQ_MASKS drawn per crop
    from the stateless `seed` (int64 (2,)) set to zero."""
    shape = tf.shape(crops)
    time_seed, freq_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    keep_time = band_keep(shape[0], shape[1], *SPEC_AUGMENT_TIME_MASKS, time_seed)
    keep_freq = band_keep(shape[0], shape[2], *SPEC_AUGMENT_FREQ_MASKS, freq_seed)
    return crops * (keep_time[:, :, tf.newaxis] * keep_freq[:, tf.newaxis, :])[..., tf.newaxis]


def spec_augmented(dataset: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """`dataset` of (crops, labels) batches with spec_augment applied to each batch's crops, batch i seeded by
    (`seed`, i)."""
    def masked(step, batch):
        crops, labels = batch
        return spec_augment(crops, tf.stack([tf.constant(seed, tf.int64), step])), labels

    return dataset.enumerate().map(masked, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
