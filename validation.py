"""Speaker-level validation (train-model --val_speakers N): N training speakers held out of the classifier and the
triplet training (a fixed, seeded choice; their augmented copies with them), the model inputs without them (labels
remapped to the speakers left), and the callback that scores all pairs of the held-out speakers' utterances as
verification trials after every epoch: EER and minDCF as `val_eer` and `val_min_dcf` in the Keras logs (so in
history.csv and TensorBoard), which the best checkpoint is then chosen by.

Targets are whole cached utterances embedded as eval-trials embeds them (embedding.utterance_windows: the mean of
NUM_FRAMES-frame windows), so the number measured is the one the dev lists measure. A speaker with a single
utterance (most of train-clean-100) gives VALIDATION_TARGETS_PER_SPEAKER non-overlapping segments of it instead:
its target trials then share a recording session, like those of the test-other list.

Imports audio (the cache index), embedding, eval_metrics, workdir and constants."""

import json
import logging
from pathlib import Path

import keras
import numpy as np

from audio import Audio, checked_features
from constants import (
    AUGMENTED_MARK,
    DCF_P_TARGET,
    EMBEDDING_LAYER,
    INFERENCE_BATCH_SIZE,
    MIN_TRAINING_SPEAKERS,
    VALIDATION_SEED,
    VALIDATION_SEGMENT_FRAMES,
    VALIDATION_SPEAKERS_FILE,
    VALIDATION_TARGETS_PER_SPEAKER,
)
from embedding import embed_crops, utterance_windows
from eval_metrics import equal_error_rate, min_dcf
from workdir import atomic_path

logger = logging.getLogger(__name__)


class ValidationError(ValueError):
    """Speaker-level validation that cannot be set up; `count` held-out speakers asked, at most `limit` possible
    (`available` speakers, MIN_TRAINING_SPEAKERS of whom must train), or held-out speakers that differ from those a
    checkpoint was trained without. The message names the directory and the fix."""

    def __init__(self, message: str, count: int, limit: int | None = None, available: int | None = None):
        super().__init__(message)
        self.count, self.limit, self.available = count, limit, available


def base_speaker(speaker: str) -> str:
    """The speaker an input speaker is a copy of: '1234~sp0.9' -> '1234' (augmented copies share the voice)."""
    return speaker.split(AUGMENTED_MARK)[0]


def held_out_speakers(speakers: list[str], count: int) -> list[str]:
    """The `count` speakers (base names) held out of training, sorted: the first `count` of a permutation of the
    sorted base speakers seeded with VALIDATION_SEED, so the choice depends only on `count` and the speakers, and a
    smaller `count` holds out a subset of a larger one's. ValidationError when fewer than MIN_TRAINING_SPEAKERS
    would be left to train."""
    bases = sorted({base_speaker(s) for s in speakers})
    limit = max(0, len(bases) - MIN_TRAINING_SPEAKERS)
    if count > limit:
        raise ValidationError(f'{count} held-out speakers asked; at most {limit} of the {len(bases)} can be held out '
                              f'({MIN_TRAINING_SPEAKERS} must train).', count, limit, len(bases))
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(bases))
    return sorted(bases[i] for i in order[:count])


class Rows:
    """A read-only view of the rows `rows` (sorted indices) of a (memory-mapped) array: indexing it with integers,
    integer arrays or slices reads only the rows asked for, so held-out speakers cost no copy of the inputs."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape, self.dtype = (len(rows), *array.shape[1:]), array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return self.array[self.rows[key]]


def training_subset(kx: np.ndarray, ky: np.ndarray, input_speakers: list[str],
                    held_out: list[str]) -> tuple[np.ndarray | Rows, np.ndarray, int]:
    """The crops of the speakers not `held_out` (augmented copies of a held-out speaker are held out too), their
    labels renumbered 0..k-1 in class order, and k. kx: (n, frames, 64, 1); ky: (n,) class indices of
    `input_speakers`. Without held-out speakers, the arrays themselves."""
    if not held_out:
        return kx, ky, len(input_speakers)
    held = set(held_out)
    keep = np.array([base_speaker(s) not in held for s in input_speakers])
    new_label = (np.cumsum(keep) - 1).astype(np.int32)
    rows = np.flatnonzero(keep[np.asarray(ky)])
    return Rows(kx, rows), new_label[np.asarray(ky)[rows]], int(keep.sum())


def recorded_held_out(directory: Path) -> list[str]:
    """The speakers a phase's checkpoints were trained without (VALIDATION_SPEAKERS_FILE); [] when none."""
    path = directory / VALIDATION_SPEAKERS_FILE
    return json.loads(path.read_text())['held_out'] if path.exists() else []


def record_held_out(directory: Path, held_out: list[str]) -> None:
    """Writes the held-out speakers into the phase's checkpoint dir (removes the file when there are none)."""
    path = directory / VALIDATION_SPEAKERS_FILE
    if not held_out:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({'held_out': held_out}, indent=1) + '\n')


def check_resumed_held_out(directory: Path, held_out: list[str], resumed: bool) -> None:
    """ValidationError when a resumed phase would hold out other speakers than its checkpoints were trained
    without (its best checkpoint was chosen by another measure, or on other speakers)."""
    recorded = recorded_held_out(directory)
    if resumed and recorded != held_out:
        raise ValidationError(f'{directory}: trained holding out {len(recorded)} speakers, not {len(held_out)}; '
                              f'resume with --val_speakers {len(recorded)} or delete {directory}.',
                              len(held_out), len(recorded))


def check_pretrained_held_out(softmax_directory: Path, held_out: list[str]) -> None:
    """ValidationError when the softmax checkpoint a triplet phase starts from was trained on some of the speakers
    the triplet phase holds out (their validation trials would be optimistic)."""
    seen = sorted(set(held_out) - set(recorded_held_out(softmax_directory)))
    if seen:
        limit = len(recorded_held_out(softmax_directory))
        raise ValidationError(f'{softmax_directory}: the softmax phase was trained on {len(seen)} of these '
                              f'{len(held_out)} held-out speakers; give at most {limit}, the number it held out.',
                              len(held_out), limit)


def speaker_targets(features: list[np.ndarray], per_speaker: int = VALIDATION_TARGETS_PER_SPEAKER,
                    segment_frames: int = VALIDATION_SEGMENT_FRAMES) -> list[np.ndarray]:
    """The targets of one speaker from its utterances' features (frames, 64): up to `per_speaker` utterances, or
    a lone utterance cut into up to `per_speaker` consecutive non-overlapping segments of at least
    `segment_frames` frames (all of it used; one segment when it is shorter than two)."""
    if len(features) > 1:
        return features[:per_speaker]
    count = int(np.clip(len(features[0]) // segment_frames, 1, per_speaker))
    return np.array_split(features[0], count)


def validation_targets(working_dir, held_out: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """The windows (utterance_windows: (windows, NUM_FRAMES, 64, 1) float32) of every target of the held-out
    speakers, from the clean cached utterances (sorted by name) of `working_dir`, and each target's speaker index
    into `held_out`: shape (targets,)."""
    index = Audio(working_dir).speakers_to_utterances
    windows, speakers = [], []
    for number, speaker in enumerate(held_out):
        clean = [index[speaker][name] for name in sorted(index.get(speaker, {})) if AUGMENTED_MARK not in name]
        if not clean:
            logger.warning('Held-out speaker %s has no cached utterance; it gives no validation trials.', speaker)
            continue
        for target in speaker_targets([checked_features(path) for path in clean]):
            windows.append(utterance_windows(np.asarray(target)))
            speakers.append(number)
    return windows, np.array(speakers, dtype=np.int64)


def embedding_model(model: keras.Model) -> keras.Model:
    """The part of a training model (softmax head or not) that ends at its EMBEDDING_LAYER, sharing its layers."""
    return keras.Model(model.inputs, model.get_layer(EMBEDDING_LAYER).output)


def pooled_embeddings(window_embeddings: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One unit embedding per target: the re-normalised mean of its unit window embeddings. window_embeddings:
    (windows, dims), the windows of each target consecutive, `counts` (targets,) of them. Shape (targets, dims)."""
    units = window_embeddings / np.linalg.norm(window_embeddings, axis=1, keepdims=True)
    means = np.add.reduceat(units, np.cumsum(np.concatenate([[0], counts[:-1]])), axis=0)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


class SpeakerValidation(keras.callbacks.Callback):
    """After each epoch, embeds the held-out speakers' targets with the model (up to its EMBEDDING_LAYER, in
    inference mode) and scores every pair of targets as a trial (same speaker: target): writes `val_eer` (fraction)
    and `val_min_dcf` (at DCF_P_TARGET) into the epoch's logs. Place it before the callbacks that read them."""

    def __init__(self, windows: list[np.ndarray], speakers: np.ndarray, batch_size: int = INFERENCE_BATCH_SIZE):
        super().__init__()
        self.first, self.second = np.triu_indices(len(windows), k=1)
        self.labels = (speakers[self.first] == speakers[self.second]).astype(np.int64)
        if self.labels.all() or not self.labels.any():
            raise ValidationError(f'{len(windows)} validation targets give no target or no non-target trial; hold '
                                  f'out more speakers, with cached features.', len(set(speakers.tolist())))
        self.crops, self.counts = np.concatenate(windows), np.array([len(w) for w in windows])
        self.batch_size, self.encoder = batch_size, None
        logger.info('Speaker validation: %d targets of %d held-out speakers, %d target and %d non-target trials.',
                    len(windows), len(set(speakers.tolist())), self.labels.sum(), (1 - self.labels).sum())

    def scores(self) -> np.ndarray:
        """Cosine score of every trial: shape (trials,)."""
        if self.encoder is None:
            self.encoder = embedding_model(self.model)
        embeddings = pooled_embeddings(embed_crops(self.encoder, self.crops, self.batch_size), self.counts)
        return np.sum(embeddings[self.first] * embeddings[self.second], axis=1)

    def on_epoch_end(self, epoch, logs=None):
        scores = self.scores()
        eer, dcf = equal_error_rate(scores, self.labels), min_dcf(scores, self.labels, DCF_P_TARGET)
        if logs is not None:
            logs.update(val_eer=eer, val_min_dcf=dcf)
        logger.info('Epoch %d: held-out speakers EER %.2f %%, minDCF %.4f.', epoch + 1, 100 * eer, dcf)
