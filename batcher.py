"""Model inputs: fixed-length crops of cached features, the per-speaker train/test split, the Keras input
files (kx/ky train/test, memory-mapped) and the triplet batcher with its triplet-selection seam."""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import dill
import numpy as np
from tqdm import tqdm

from audio import Audio, CacheError, checked_features
from constants import (
    AUGMENTED_MARK,
    COUNTS_PER_SPEAKER,
    INFERENCE_BATCH_SIZE,
    MIN_TRAINING_SPEAKERS,
    NUM_FBANKS,
    NUM_FRAMES,
    TRAIN_TEST_RATIO,
)
from workdir import INPUTS_META, NotBuiltError, WorkingDir, atomic_path, remove_orphan_temp_files

logger = logging.getLogger(__name__)


class Source(NamedTuple):
    """A span of frames [start, end) of one cached utterance (end None: to the end)."""
    path: Path
    start: int = 0
    end: int | None = None


def sample_from_mfcc(mfcc: np.ndarray, max_length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A crop of `max_length` frames with a channel axis: shape (max_length, NUM_FBANKS, 1).

    With `rng` the crop starts at a random frame (training); without, it is the centre crop, so the same
    features always give the same crop. Shorter features are zero-padded at the end.
    """
    excess = len(mfcc) - max_length
    if excess >= 0:
        start = int(rng.integers(0, excess + 1)) if rng is not None else excess // 2
        crop = mfcc[start:start + max_length]
    else:
        crop = np.concatenate([mfcc, np.zeros((-excess, mfcc.shape[1]), dtype=mfcc.dtype)])
    return np.asarray(crop, dtype=np.float32)[..., np.newaxis]


def load_source(source: Source) -> np.ndarray:
    """The frames of a source, memory-mapped: shape (frames, NUM_FBANKS); CacheError for a damaged cache file."""
    return checked_features(source.path)[source.start:source.end]


def train_test_sources(utterances: list[Path], ratio: float = TRAIN_TEST_RATIO) -> tuple[list[Source], list[Source]]:
    """Splits one speaker's utterances: the first `ratio` of them for training, the rest for testing. Noisy
    copies (`<utterance>~noise<i>`) go to the side of their clean utterance.

    A speaker with a single utterance is split in time instead: its first `ratio` of frames train, the rest test.
    """
    groups: dict[str, list[Path]] = {}
    for utterance in sorted(utterances):
        groups.setdefault(utterance.stem.split(AUGMENTED_MARK)[0], []).append(utterance)
    if len(groups) == 1:
        sides = ([], [])
        for utterance in utterances:
            split = int(len(checked_features(utterance)) * ratio)
            sides[0].append(Source(utterance, 0, split))
            sides[1].append(Source(utterance, split, None))
        return sides
    names = sorted(groups)
    num_train = min(len(names) - 1, max(1, int(len(names) * ratio)))
    return ([Source(u) for name in names[:num_train] for u in groups[name]],
            [Source(u) for name in names[num_train:] for u in groups[name]])


class SparseCategoricalSpeakers:
    """Maps speaker ids to softmax class indices (sorted order)."""

    def __init__(self, speakers_list):
        self.speaker_ids = sorted(speakers_list)
        if len(set(self.speaker_ids)) != len(self.speaker_ids):
            raise ValueError('speaker ids must be unique.')
        self.map = {speaker: index for index, speaker in enumerate(self.speaker_ids)}

    def get_index(self, speaker_id: str) -> int:
        return self.map[speaker_id]


def write_npy_atomically(path: Path, shape: tuple, dtype, fill: Callable[[np.ndarray], None]) -> None:
    """Creates `path` as a memory-mapped .npy of `shape`, filled by `fill(array)`, renamed into place when whole."""
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=shape)
        fill(array)
        array.flush()
        del array


class InputsError(ValueError):
    """A cache or model inputs that cannot train a model (too few speakers); the message names the directory."""


def check_speaker_count(directory: Path, num_speakers: int, what: str) -> None:
    """InputsError when `num_speakers` (of `what` in `directory`) is below MIN_TRAINING_SPEAKERS."""
    if num_speakers < MIN_TRAINING_SPEAKERS:
        raise InputsError(f'{directory}: {what} of {num_speakers} speaker{"s" * (num_speakers != 1)} found, '
                          f'{MIN_TRAINING_SPEAKERS} needed (softmax and triplet training); cache audio of more '
                          f'speakers, then build the model inputs again.')


class KerasFormatConverter:
    """Builds and reads `<working_dir>/keras-inputs/`: kx_train.npy (n, 160, 64, 1) float32 crops, ky_train.npy
    (n,) int32 class indices, the same for test, categorical_speakers.pkl (dill) and meta.json (what they were
    built from). NotBuiltError without cached features."""

    def __init__(self, working_dir: 'str | WorkingDir'):
        self.workdir = WorkingDir.of(working_dir)
        self.working_dir, self.output_dir = self.workdir.root, self.workdir.inputs_dir
        self.audio = Audio(self.workdir)
        if not self.audio.speakers_to_utterances:
            raise NotBuiltError(self.working_dir, 'features', 'no cached features')
        self.categorical_speakers = SparseCategoricalSpeakers(self.audio.speaker_ids)

    def path(self, name: str) -> Path:
        return self.output_dir / name

    def is_built(self, settings: dict) -> bool:
        try:
            return self.workdir.inputs_settings() == settings
        except NotBuiltError:
            return False

    def settings(self, max_length: int, counts_per_speaker, seed: int) -> dict:
        """What the inputs are built from, recorded in meta.json: a change rebuilds them."""
        return {'max_length': max_length, 'counts_per_speaker': list(counts_per_speaker), 'seed': seed,
                'speakers': self.categorical_speakers.speaker_ids}

    def generate(self, max_length: int = NUM_FRAMES, counts_per_speaker=COUNTS_PER_SPEAKER, seed: int = 0) -> None:
        """Writes the four arrays and the speaker map; does nothing when they exist for the same settings.
        InputsError, before anything is written, when the cache holds fewer than MIN_TRAINING_SPEAKERS speakers."""
        check_speaker_count(self.workdir.cache_dir, len(self.categorical_speakers.speaker_ids), 'features')
        remove_orphan_temp_files(self.output_dir, '.*.tmp.npy')  # those of a killed build.
        settings = self.settings(max_length, counts_per_speaker, seed)
        if self.is_built(settings):
            logger.info('%s is up to date; nothing to do.', self.output_dir)
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path(INPUTS_META).unlink(missing_ok=True)
        rng = np.random.default_rng(seed)
        splits = {s: train_test_sources(list(u.values())) for s, u in self.audio.speakers_to_utterances.items()}
        for phase, count in zip(('train', 'test'), counts_per_speaker, strict=True):
            sources = {speaker: split[phase == 'test'] for speaker, split in splits.items()}
            self.generate_per_phase(phase, sources, count, max_length, rng)
        # For users of the original implementation only: deep-speaker never loads this pickle (unpickling runs code).
        with open(self.path('categorical_speakers.pkl'), 'wb') as w:
            dill.dump(self.categorical_speakers, w)
        self.path(INPUTS_META).write_text(json.dumps(settings))

    def generate_per_phase(self, phase: str, sources: dict[str, list[Source]], num_per_speaker: int,
                           max_length: int, rng: np.random.Generator) -> None:
        speakers = self.categorical_speakers.speaker_ids
        total = len(speakers) * num_per_speaker

        def fill_x(kx: np.ndarray) -> None:
            for i, speaker in enumerate(tqdm(speakers, desc=f'Building kx_{phase}', unit='speaker')):
                features = [load_source(s) for s in sources[speaker]]
                for j in range(num_per_speaker):
                    kx[i * num_per_speaker + j] = sample_from_mfcc(features[rng.integers(len(features))],
                                                                   max_length, rng)

        def fill_y(ky: np.ndarray) -> None:
            ky[:] = np.repeat(np.arange(len(speakers), dtype=np.int32), num_per_speaker)

        write_npy_atomically(self.path(f'kx_{phase}.npy'), (total, max_length, NUM_FBANKS, 1), np.float32, fill_x)
        write_npy_atomically(self.path(f'ky_{phase}.npy'), (total,), np.int32, fill_y)

    def load(self, phase: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (kx, ky) of 'train' or 'test'; NotBuiltError before generate, CacheError for a damaged
        file, InputsError when they hold fewer than MIN_TRAINING_SPEAKERS speakers (inputs of an earlier version)."""
        self.workdir.inputs_settings()
        arrays = []
        for name in (f'kx_{phase}.npy', f'ky_{phase}.npy'):
            try:
                arrays.append(np.load(self.path(name), mmap_mode='r', allow_pickle=False))
            except (ValueError, EOFError, OSError) as e:
                raise CacheError(f'{self.path(name)}: damaged model input ({e}); delete {self.output_dir} and run '
                                 f'build-keras-inputs again.') from None
        check_speaker_count(self.output_dir, len(np.unique(arrays[1])), f'ky_{phase}.npy: crops')
        return arrays[0], arrays[1]

    @property
    def num_speakers(self) -> int:
        """Softmax classes of the built inputs (their meta.json), whatever the cache holds now."""
        return len(self.workdir.input_speakers())


def indices_by_label(labels: np.ndarray) -> dict:
    """The positions of each label in `labels` (n,), ascending: np.flatnonzero(labels == label) for every label,
    from one stable sort (O(n log n), not O(labels x n): a million crops of thousands of speakers take 0.1 s)."""
    order = np.argsort(labels, kind='stable')
    values, starts = np.unique(labels[order], return_index=True)
    return dict(zip(values.tolist(), np.split(order, starts[1:]), strict=True))


TripletSelector = Callable[['TripletBatcher', int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def random_triplets(batcher: 'TripletBatcher', n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of n (anchor, positive, negative) crops: random speakers, two distinct crops of each, and a crop
    of another speaker."""
    rng, labels = batcher.rng, batcher.labels
    speakers = rng.choice(batcher.speakers, size=n)
    anchors, positives = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for k, speaker in enumerate(speakers):
        anchors[k], positives[k] = rng.choice(batcher.indices_of[speaker], size=2, replace=False)
    negatives = rng.integers(len(labels), size=n)
    while np.any(same := labels[negatives] == labels[anchors]):
        negatives[same] = rng.integers(len(labels), size=int(same.sum()))
    return anchors, positives, negatives


class TripletBatcher:
    """Triplet batches [anchors; positives; negatives] from memory-mapped crops `kx` with class labels `ky`.

    Which crops make a triplet is the `selector`'s choice (random_triplets by default): hard-negative mining
    plugs in there.
    """

    def __init__(self, kx: np.ndarray, ky: np.ndarray, seed: int, selector: TripletSelector = random_triplets):
        self.kx, self.labels = kx, np.asarray(ky)
        self.speakers = np.unique(self.labels)
        if len(self.speakers) < 2:
            raise ValueError('triplet training needs at least 2 speakers.')
        self.indices_of = indices_by_label(self.labels)
        too_few = [int(s) for s, idx in self.indices_of.items() if len(idx) < 2]
        if too_few:
            raise ValueError(f'speakers {too_few} have fewer than 2 crops; raise --counts_per_speaker.')
        self.rng = np.random.default_rng(seed)
        self.selector = selector

    selection_parts = 1  # arrays in a selection (select's result), each (3 * (batch_size // 3),) int64.

    def get_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x: (3 * (batch_size // 3), 160, 64, 1) float32; y: zeros (Keras needs a target)."""
        x = self.crops(*self.select(batch_size))
        return x, np.zeros(len(x), dtype=np.float32)

    def select(self, batch_size: int) -> tuple[np.ndarray, ...]:
        """The rows of kx of the next batch's batch_size // 3 triplets, [anchors; positives; negatives]: (n,)
        int64. Batches are chosen one after the other (the selector's random state, a miner's history)."""
        anchors, positives, negatives = self.selector(self, batch_size // 3)
        return (np.concatenate([anchors, positives, negatives]).astype(np.int64, copy=False),)

    @property
    def frames_dtype(self) -> np.dtype:
        """The dtype `frames` returns."""
        return self.kx.dtype

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """The crops of a selection as stored: (n, 160, 64, 1) of frames_dtype. Reads only: safe in several
        threads at once."""
        order = np.argsort(indices)
        x = np.empty((len(indices),) + self.kx.shape[1:], dtype=self.frames_dtype)
        x[order] = self.kx[indices[order]]
        return x

    def crops(self, *selection: np.ndarray) -> np.ndarray:
        """The crops of a selection: (n, 160, 64, 1) float32."""
        return np.asarray(self.frames(*selection), dtype=np.float32)


def history_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of about `size` crops, the same number from each speaker (at least 2), for the mining history.
    With more speakers than size // 2, a random subset of size // 2 speakers is taken."""
    positions = indices_by_label(labels)
    speakers = np.unique(labels)
    if len(speakers) > size // 2:
        speakers = rng.choice(speakers, size=max(2, size // 2), replace=False)
    per_speaker = max(2, size // len(speakers))
    picks = []
    for speaker in speakers:
        candidates = positions[speaker]
        if len(candidates) >= per_speaker:
            picks.append(rng.choice(candidates, size=per_speaker, replace=False))
        else:  # every distinct crop, then repeats: two history entries of a speaker are two different crops.
            picks.append(np.concatenate([candidates, rng.choice(candidates, size=per_speaker - len(candidates))]))
    return np.concatenate(picks)


def mined_pairs(anchor_sims: np.ndarray, same_speaker: np.ndarray, anchor_positions: np.ndarray,
                mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the history of the positive and negative of each anchor, from one similarity matrix.

    anchor_sims: (anchors, history) cosine similarities of each anchor (itself a history crop, at
    `anchor_positions`) with every history crop; same_speaker: (anchors, history) True where the history crop is
    of the anchor's speaker. The positive is the least similar other crop of the same speaker. The negative is,
    for 'hard', the most similar crop of another speaker; for 'semihard', the most similar one still less
    similar than the positive (FaceNet), or the hardest when every negative is more similar than the positive.
    """
    rows = np.arange(len(anchor_sims))
    candidates = same_speaker.copy()
    candidates[rows, anchor_positions] = False
    positives = np.argmin(np.where(candidates, anchor_sims, np.inf), axis=1)
    negative_sims = np.where(same_speaker, -np.inf, anchor_sims)
    hardest = np.argmax(negative_sims, axis=1)
    if mode == 'hard':
        return positives, hardest
    easier = ~same_speaker & (anchor_sims < anchor_sims[rows, positives][:, None])
    semihard = np.argmax(np.where(easier, negative_sims, -np.inf), axis=1)
    return positives, np.where(easier.any(axis=1), semihard, hardest)


class HardNegativeMiner:
    """Triplet selector ('hard' or 'semihard') over a history of embedded crops.

    `refresh(kx, embed)` samples `history_size` training crops (equal numbers per speaker) and embeds them with
    the current model; each batch then takes random history crops as anchors and mines their positives and
    negatives from one (anchors x history) similarity matrix. Until the first refresh, triplets are random.
    """

    def __init__(self, labels: np.ndarray, mode: str, history_size: int, seed: int):
        if mode not in ('hard', 'semihard'):
            raise ValueError(f'--triplet_mining {mode}: expected hard, semihard or random.')
        self.labels, self.mode, self.history_size = np.asarray(labels), mode, history_size
        self.rng = np.random.default_rng(seed)
        self.history: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.selection_seconds: list[float] = []

    def refresh(self, kx: np.ndarray, embed: Callable[[np.ndarray], np.ndarray],
                chunk: int = INFERENCE_BATCH_SIZE) -> None:
        """Re-samples and re-embeds the history; `embed` maps crops (n, 160, 64, 1) to embeddings (n, dims). The
        crops are read from `kx` (a memory map) `chunk` at a time: only one chunk of them is ever in memory."""
        positions = np.sort(history_sample(self.labels, self.history_size, self.rng))
        embeddings = np.concatenate([embed(kx[positions[start:start + chunk]])
                                     for start in range(0, len(positions), chunk)])
        self.history = (positions, embeddings.astype(np.float32, copy=False), self.labels[positions])

    def select(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices into kx of n mined (anchor, positive, negative) crops."""
        positions, embeddings, labels = self.history
        anchor_positions = self.rng.choice(len(positions), size=n, replace=n > len(positions))
        anchor_sims = embeddings[anchor_positions] @ embeddings.T
        same_speaker = labels[anchor_positions][:, None] == labels[None, :]
        positives, negatives = mined_pairs(anchor_sims, same_speaker, anchor_positions, self.mode)
        return positions[anchor_positions], positions[positives], positions[negatives]

    def __call__(self, batcher: TripletBatcher, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.history is None:
            return random_triplets(batcher, n)
        start = time.perf_counter()
        triplets = self.select(n)
        self.selection_seconds.append(time.perf_counter() - start)
        return triplets
