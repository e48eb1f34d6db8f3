"""SpecAugment (spec_augment.py): the masks' number and widths, values outside them unchanged, one draw per crop,
and the same masks for the same seed through the tf.data pipeline."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from constants import NUM_FBANKS, NUM_FRAMES, SPEC_AUGMENT_FREQ_MASKS, SPEC_AUGMENT_TIME_MASKS  # noqa: E402
from spec_augment import spec_augment, spec_augmented  # noqa: E402

BATCH = 64


def crops(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 2.0, (BATCH, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32)


def bands(masked: np.ndarray) -> list[tuple[int, int]]:
    """(start, width) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(int), [0]])))
    return [(int(start), int(stop - start)) for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def test_masks_are_bands_of_the_configured_number_and_widths_and_leave_the_rest_unchanged():
    x = crops()
    out = spec_augment(tf.constant(x), tf.constant([7, 0], tf.int64)).numpy()
    zero = out == 0
    np.testing.assert_array_equal(out[~zero], x[~zero])  # inputs are >= 1: only masks give zeros.
    time_masked = zero.all(axis=(2, 3))  # (batch, frames): frames zero across every channel.
    freq_masked = zero.all(axis=(1, 3))  # (batch, fbanks).
    # Every zero is in a masked frame or a masked channel.
    np.testing.assert_array_equal(zero[..., 0], time_masked[:, :, None] | freq_masked[:, None, :])
    for row in range(BATCH):
        for masked, (count, widest) in ((time_masked[row], SPEC_AUGMENT_TIME_MASKS),
                                        (freq_masked[row], SPEC_AUGMENT_FREQ_MASKS)):
            runs = bands(masked)
            assert len(runs) <= count and masked.sum() <= count * widest, row  # overlapping masks merge.
            assert all(width <= count * widest for _, width in runs), row
    # Each crop draws its own masks, and most draw some.
    assert len({tuple(np.flatnonzero(m)) for m in time_masked}) > BATCH // 2
    assert time_masked.any(axis=1).mean() > 0.8 and freq_masked.any(axis=1).mean() > 0.8
    assert 0 < time_masked.sum(axis=1).max() <= SPEC_AUGMENT_TIME_MASKS[0] * SPEC_AUGMENT_TIME_MASKS[1]


def test_the_same_seed_gives_the_same_masks_in_the_pipeline_and_another_seed_others():
    x, labels = crops(1), np.arange(BATCH, dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)

    def run(seed: int) -> list[np.ndarray]:
        return [crops.numpy() for crops, _ in spec_augmented(dataset, seed)]

    first, again, other = run(3), run(3), run(4)
    assert len(first) == 4
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    assert not np.array_equal(first[0] == 0, first[1] == 0)  # each batch its own masks.
    np.testing.assert_array_equal(np.concatenate([y for _, y in spec_augmented(dataset, 3)]), labels)
