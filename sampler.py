"""Training windows drawn on the fly from the packed store (train-model --sampler windows): each batch draws
speakers (balanced, or in proportion to their utterances), a random utterance of each and a fresh random window of
NUM_FRAMES frames in it; validation reads windows of held-out utterances drawn once. Deterministic under the seed.

Softmax batches come from a tf.data pipeline (parallel reads, prefetch) in which batch number b depends only on
(seed, b). Triplet batches come from WindowTripletBatcher, a batcher.TripletBatcher over WindowCrops (a crop per
training utterance, indexed like kx_train), so random triplets and hard-negative mining (WindowMiner) work as they
do on the fixed crops.

Imports store, batcher and constants (and TensorFlow for the datasets).
"""

import logging
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from batcher import HardNegativeMiner, InputsError, TripletBatcher, history_sample, random_triplets
from constants import (
    HELD_OUT_FRACTION,
    MAX_VALIDATION_WINDOWS,
    MIN_TRAINING_SPEAKERS,
    NUM_FBANKS,
    NUM_FRAMES,
    SPEAKER_SAMPLINGS,
    VALIDATION_WINDOWS_PER_UTTERANCE,
)
from store import PackedStore, as_float32

logger = logging.getLogger(__name__)

BATCH_SPEC = (tf.TensorSpec((None, NUM_FRAMES, NUM_FBANKS, 1), tf.float32), tf.TensorSpec((None,), tf.int32))


def held_out_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) utterance indices (sorted) of utterances with speaker `labels` (n,): of a speaker's n
    utterances, round(n * HELD_OUT_FRACTION) are held out, at least 2 but always leaving one for training (n = 2:
    one; n = 1: none), chosen at random with `seed`."""
    counts = np.bincount(labels)
    held = np.where(counts >= 3, np.minimum(counts - 1, np.maximum(2, np.round(counts * HELD_OUT_FRACTION))),
                    counts - 1).astype(np.int64)
    order = np.lexsort((np.random.default_rng(seed).random(len(labels)), labels))  # by speaker, shuffled within.
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(labels)) - first[labels[order]]
    is_held = np.zeros(len(labels), dtype=bool)
    is_held[order] = rank < held[labels[order]]
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def window_starts(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random first frame for a NUM_FRAMES window in each utterance of `lengths` frames: uniform over every
    window inside it; 0 for an utterance shorter than the window (it is zero-padded)."""
    return rng.integers(0, np.maximum(lengths - NUM_FRAMES, 0) + 1)


class WindowSampler:
    """Softmax batches of fresh windows of the training utterances `utterances` (store indices, sorted) of `store`.

    'balanced': each crop's speaker uniformly among the speakers, then one of its utterances uniformly;
    'proportional': an utterance uniformly, so a speaker in proportion to its number of utterances.
    """

    def __init__(self, store: PackedStore, utterances: np.ndarray, speaker_sampling: str, seed: int):
        if speaker_sampling not in SPEAKER_SAMPLINGS:
            raise ValueError(f'speaker sampling {speaker_sampling}: expected one of {", ".join(SPEAKER_SAMPLINGS)}.')
        self.store, self.utterances, self.seed = store, utterances, seed
        self.speaker_sampling = speaker_sampling
        labels = store.labels[utterances]  # sorted, as the store is sorted by speaker.
        self.speakers, self.first, self.counts = np.unique(labels, return_index=True, return_counts=True)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Store indices of n utterances drawn by the speaker sampling."""
        if self.speaker_sampling == 'proportional':
            return self.utterances[rng.integers(len(self.utterances), size=n)]
        speakers = rng.integers(len(self.speakers), size=n)
        return self.utterances[self.first[speakers] + rng.integers(self.counts[speakers])]

    def frames_batch(self, number: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `number`: windows (batch_size, NUM_FRAMES, NUM_FBANKS) of the store's dtype and their speakers'
        class indices (batch_size,) int32; the same (seed, number) always gives the same batch."""
        rng = np.random.default_rng([self.seed, 0, number])
        utterances = self.draw(rng, batch_size)
        starts = window_starts(self.store.lengths[utterances], rng)
        return self.store.read_frames(utterances, starts, NUM_FRAMES), self.store.labels[utterances]

    def batch(self, number: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """frames_batch as float32 crops (batch_size, NUM_FRAMES, NUM_FBANKS, 1) and class indices."""
        frames, labels = self.frames_batch(number, batch_size)
        return as_float32(frames)[..., np.newaxis], labels

    def dataset(self, batch_size: int, first_batch: int = 0) -> tf.data.Dataset:
        """Endless batches number first_batch, first_batch + 1, ...: read in parallel, cast to float32 crops by
        TensorFlow (outside the GIL), delivered in order."""
        return batch_dataset(tf.data.Dataset.counter(start=first_batch),
                             lambda number: self.frames_batch(int(number), batch_size), self.store.dtype)


def batch_dataset(numbers: tf.data.Dataset, read, dtype: np.dtype) -> tf.data.Dataset:
    """Batches `read(number)` -> (frames (n, NUM_FRAMES, NUM_FBANKS) of `dtype`, labels (n,) int32) for each of
    `numbers`, read in parallel and delivered in order as (float32 crops (n, NUM_FRAMES, NUM_FBANKS, 1), labels),
    prefetched."""
    def crops(number):
        frames, labels = tf.numpy_function(read, [number], (tf.as_dtype(dtype), tf.int32))
        frames = tf.ensure_shape(tf.cast(frames, tf.float32), BATCH_SPEC[0].shape[:-1])
        return frames[..., tf.newaxis], tf.ensure_shape(labels, BATCH_SPEC[1].shape)

    return numbers.map(crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


class FixedWindows(NamedTuple):
    """Windows drawn once: store utterance indices and first frames (n,) each."""
    utterances: np.ndarray
    starts: np.ndarray


def validation_windows(store: PackedStore, held_out: np.ndarray, seed: int) -> FixedWindows:
    """VALIDATION_WINDOWS_PER_UTTERANCE windows of each held-out utterance, at most MAX_VALIDATION_WINDOWS in
    all (then spread evenly over the held-out utterances in a random order), drawn once with `seed`."""
    rng = np.random.default_rng([seed, 1])
    count = min(MAX_VALIDATION_WINDOWS, VALIDATION_WINDOWS_PER_UTTERANCE * len(held_out))
    utterances = rng.permutation(held_out)[np.arange(count) % len(held_out)]
    return FixedWindows(utterances, window_starts(store.lengths[utterances], rng))


def fixed_windows_dataset(store: PackedStore, windows: FixedWindows, batch_size: int) -> tf.data.Dataset:
    """One pass over `windows` in batches of (crops, class indices), read from the store batch by batch."""
    def read(number):
        part = slice(int(number) * batch_size, (int(number) + 1) * batch_size)
        utterances = windows.utterances[part]
        return store.read_frames(utterances, windows.starts[part], NUM_FRAMES), store.labels[utterances]

    numbers = tf.data.Dataset.range(-(-len(windows.utterances) // batch_size))
    return batch_dataset(numbers, read, store.dtype)


class WindowSplit(NamedTuple):
    """A store split for training: training and held-out utterance indices, sorted."""
    store: PackedStore
    train: np.ndarray
    held_out: np.ndarray


def training_split(store: PackedStore, seed: int) -> WindowSplit:
    """The seeded held-out split of `store`; InputsError when it cannot train (fewer than MIN_TRAINING_SPEAKERS
    speakers, or held-out utterances of fewer than 2 speakers: speakers need 2 utterances to have one held out)."""
    train, held_out = held_out_split(store.labels, seed)
    speakers, held_speakers = len(store.speakers), len(np.unique(store.labels[held_out]))
    if speakers < MIN_TRAINING_SPEAKERS or held_speakers < 2:
        raise InputsError(f'{store.directory}: {speakers} speakers, {held_speakers} with an utterance held out for '
                          f'validation; training needs {MIN_TRAINING_SPEAKERS} speakers and 2 of them with 2 '
                          f'utterances or more: cache audio of more speakers, then run build-packed-store again.')
    logger.info('Packed store %s: %d speakers, %d training and %d held-out utterances.', store.directory, speakers,
                len(train), len(held_out))
    return WindowSplit(store, train, held_out)


class WindowCrops:
    """Crops indexed like kx_train: slot i is a window of utterance slots[i] of the store starting at frame
    starts[i]. Slots are the utterances given, with a second slot for a speaker's lone utterance (two windows of it
    make a positive pair). shape: (slots, NUM_FRAMES, NUM_FBANKS, 1)."""

    def __init__(self, store: PackedStore, utterances: np.ndarray, rng: np.random.Generator):
        labels = store.labels[utterances]
        alone = utterances[np.bincount(labels)[labels] == 1]
        self.store, self.slots = store, np.sort(np.concatenate([utterances, alone]))
        self.labels = store.labels[self.slots]
        self.starts = self.drawn_starts(rng)
        self.shape = (len(self.slots), NUM_FRAMES, NUM_FBANKS, 1)

    def __len__(self) -> int:
        return len(self.slots)

    def drawn_starts(self, rng: np.random.Generator) -> np.ndarray:
        """A fresh random window start for every slot."""
        return window_starts(self.store.lengths[self.slots], rng)

    def read(self, indices: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Crops of slots `indices` at first frames `starts`: (n, NUM_FRAMES, NUM_FBANKS, 1) float32."""
        return self.store.read_windows(self.slots[indices], starts, NUM_FRAMES)

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        return self.read(indices, self.starts[indices])

    def redraw(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        """New windows for slots `indices`."""
        self.starts[indices] = window_starts(self.store.lengths[self.slots[indices]], rng)


class WindowTripletBatcher(TripletBatcher):
    """Triplet batches of WindowCrops: random triplets (and those before the miner's first refresh) take a fresh
    window of each chosen slot; mined triplets take the windows the history embedded. With 'proportional' speaker
    sampling, random triplets' anchor speakers are drawn in proportion to their slots (utterances)."""

    def __init__(self, crops: WindowCrops, labels: np.ndarray, seed: int, selector=random_triplets,
                 speaker_sampling: str = 'balanced'):
        super().__init__(crops, labels, seed, selector)
        if speaker_sampling == 'proportional':
            self.speakers = self.labels  # random_triplets draws uniformly from this: a speaker per slot.

    selection_parts = 2  # slots and window starts.

    def select(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The slots of the next batch's triplets [anchors; positives; negatives] and the first frames of their
        windows: (n,) int64 each."""
        (indices,) = super().select(batch_size)
        if not (isinstance(self.selector, HardNegativeMiner) and self.selector.history is not None):
            self.kx.redraw(indices, self.rng)
        return indices, self.kx.starts[indices].astype(np.int64)

    @property
    def frames_dtype(self) -> np.dtype:
        return self.kx.store.dtype

    def frames(self, indices: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """The windows of a selection as stored: (n, NUM_FRAMES, NUM_FBANKS) of the store's dtype (thread-safe)."""
        return self.kx.store.read_frames(self.kx.slots[indices], starts, NUM_FRAMES)

    def crops(self, indices: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(n, NUM_FRAMES, NUM_FBANKS, 1) float32 windows of a selection."""
        return self.kx.read(indices, starts)


class WindowMiner(HardNegativeMiner):
    """HardNegativeMiner over WindowCrops: each refresh draws fresh windows of every slot, embeds those of the
    history, and only then makes them the windows batches read, with the history that mined them."""

    def refresh(self, kx: WindowCrops, embed, chunk: int) -> None:
        starts = kx.drawn_starts(self.rng)
        positions = np.sort(history_sample(self.labels, self.history_size, self.rng))
        embeddings = np.concatenate([embed(kx.read(positions[i:i + chunk], starts[positions[i:i + chunk]]))
                                     for i in range(0, len(positions), chunk)])
        kx.starts, self.history = starts, (positions, embeddings.astype(np.float32, copy=False),
                                           self.labels[positions])
