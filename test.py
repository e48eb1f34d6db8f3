"""Evaluation: the original Deep Speaker protocol (for each cached speaker an anchor, one positive and up to 99
negatives, on the held-out part of its audio) and VoxCeleb-style trial lists on unseen speakers, with
deterministic whole-utterance embeddings."""

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from audio import Audio, read_mfcc
from batcher import Source, load_source, sample_from_mfcc, train_test_sources
from constants import AUGMENTED_MARK, EMBEDDING_FILES_PER_CHUNK, NUM_FRAMES, NUM_NEGATIVE_SPEAKERS, WINDOW_HOP
from conv_models import SpeakerModel
from embedding import embed_crops
from eval_metrics import Metrics, evaluate

logger = logging.getLogger(__name__)


def batch_cosine_similarity(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, dims) arrays (rows are L2-normalised embeddings): shape (n,)."""
    return np.sum(np.multiply(x1, x2), axis=1)


def anchor_and_positive(test_sources: list[Source], rng: np.random.Generator) -> tuple[Source, Source]:
    """Two distinct held-out utterances of a speaker, or the two halves of a lone held-out span."""
    if len(test_sources) >= 2:
        first, second = rng.choice(len(test_sources), size=2, replace=False)
        return test_sources[first], test_sources[second]
    path, start, end = test_sources[0]
    end = len(np.load(path, mmap_mode='r')) if end is None else end
    middle = (start + end) // 2
    return Source(path, start, middle), Source(path, middle, end)


def eval_model(working_dir: str, model: SpeakerModel, seed: int = 0,
               num_negative_speakers: int = NUM_NEGATIVE_SPEAKERS) -> Metrics:
    """Metrics of the anchor/positive/negatives protocol over every cached speaker of `working_dir` (augmented
    copies left out).

    Each speaker contributes one anchor crop and one positive crop; the negatives of a speaker are the
    positive crops of up to `num_negative_speakers` other speakers. One forward pass, one matrix product.
    """
    audio = Audio(working_dir)
    speakers = [s for s in audio.speaker_ids if AUGMENTED_MARK not in s]
    if len(speakers) < 2:
        raise ValueError(f'--working_dir {working_dir}: {len(speakers)} cached speakers; evaluation needs 2 or more.')
    rng = np.random.default_rng(seed)
    clean = {s: [path for name, path in audio.speakers_to_utterances[s].items() if AUGMENTED_MARK not in name]
             for s in speakers}
    pairs = [anchor_and_positive(train_test_sources(clean[s])[1], rng) for s in speakers]
    crops = np.stack([sample_from_mfcc(load_source(source), NUM_FRAMES, rng) for pair in pairs for source in pair])
    embeddings = embed_crops(model.m, crops)
    anchors, positives = embeddings[0::2], embeddings[1::2]
    sims = anchors @ positives.T
    num_speakers = len(speakers)
    num_negatives = min(num_negative_speakers, num_speakers - 1)
    y_pred = np.empty((num_speakers, num_negatives + 1))
    y_pred[:, 0] = np.diag(sims)
    for i in range(num_speakers):
        others = np.delete(np.arange(num_speakers), i)
        y_pred[i, 1:] = sims[i, rng.choice(others, size=num_negatives, replace=False)]
    y_true = np.zeros_like(y_pred)
    y_true[:, 0] = 1.0
    logger.info('Evaluated %d speakers, 1 positive and %d negatives each.', num_speakers, num_negatives)
    return evaluate(y_pred, y_true)


class TrialError(ValueError):
    """A trial list that cannot be scored; the message names the file and line."""


class Trials(NamedTuple):
    """A parsed trial list: labels (n,) of 0/1, indices (n,) of each side into `files`, the distinct files."""
    labels: np.ndarray
    enrol: np.ndarray
    test: np.ndarray
    files: list[Path]


def read_trials(trials_file: str, audio_root: str) -> Trials:
    """Parses `label path path` lines (1 = same speaker, paths relative to `audio_root`) and checks every file
    exists, before anything is computed."""
    index: dict[Path, int] = {}
    labels, enrol, test = [], [], []
    lines = Path(trials_file).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f'{trials_file}:{number}'
        if len(fields) != 3:
            raise TrialError(f'{where}: expected "label path path", got {line!r}.')
        if fields[0] not in ('0', '1'):
            raise TrialError(f'{where}: label {fields[0]!r} must be 1 (same speaker) or 0.')
        sides = []
        for name in fields[1:]:
            path = Path(audio_root) / name
            if path not in index:
                if not path.is_file():
                    raise TrialError(f'{where}: {path} does not exist; check --audio_root.')
                index[path] = len(index)
            sides.append(index[path])
        labels.append(int(fields[0]))
        enrol.append(sides[0])
        test.append(sides[1])
    if not labels:
        raise TrialError(f'{trials_file}: no trials in the list.')
    return Trials(np.array(labels), np.array(enrol), np.array(test), list(index))


def utterance_windows(mfcc: np.ndarray, crop: bool) -> np.ndarray:
    """Fixed-length windows of one utterance's features: the centre crop, or windows of NUM_FRAMES frames every
    WINDOW_HOP frames, the last one ending at the last frame (a short utterance is zero-padded).
    Returns float32 (windows, NUM_FRAMES, 64, 1)."""
    if crop or len(mfcc) <= NUM_FRAMES:
        return sample_from_mfcc(mfcc, NUM_FRAMES)[np.newaxis]
    last = len(mfcc) - NUM_FRAMES
    starts = np.unique(np.minimum(np.arange(0, last + WINDOW_HOP, WINDOW_HOP), last))
    return np.stack([mfcc[start:start + NUM_FRAMES] for start in starts]).astype(np.float32)[..., np.newaxis]


def embed_utterances(model: SpeakerModel, files: list[Path], crop: bool = False) -> np.ndarray:
    """Deterministic embeddings of whole files: the mean of the window embeddings, re-normalised (or the centre
    crop's embedding with `crop`). Returns float32 (files, 512)."""
    embeddings = []
    for start in tqdm(range(0, len(files), EMBEDDING_FILES_PER_CHUNK), desc='Embedding utterances', unit='chunk'):
        windows = [utterance_windows(read_mfcc(str(f)), crop) for f in files[start:start + EMBEDDING_FILES_PER_CHUNK]]
        window_embeddings = embed_crops(model.m, np.concatenate(windows))
        offsets = np.cumsum([0] + [len(w) for w in windows[:-1]])
        means = np.add.reduceat(window_embeddings, offsets, axis=0)
        embeddings.append(means / np.linalg.norm(means, axis=1, keepdims=True))
    return np.concatenate(embeddings).astype(np.float32)


def score_trials(embeddings: np.ndarray, trials: Trials) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings: shape (trials,)."""
    return batch_cosine_similarity(embeddings[trials.enrol], embeddings[trials.test])


def write_scores(path: str, trials: Trials, scores: np.ndarray, audio_root: str) -> None:
    """CSV `label,score,enrol,test` in the order of the trial list, paths relative to `audio_root`."""
    names = [str(f.relative_to(audio_root)) for f in trials.files]
    rows = [f'{label},{score:.6f},{names[a]},{names[b]}'
            for label, score, a, b in zip(trials.labels, scores, trials.enrol, trials.test, strict=True)]
    Path(path).write_text('label,score,enrol,test\n' + '\n'.join(rows) + '\n')


def fused_scores(scores: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Score fusion: the weighted mean of several systems' scores of the same trials, shape (trials,)."""
    return np.average(np.stack(scores), axis=0, weights=weights)


def concatenated_embeddings(embeddings: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Embedding fusion: each system's unit embeddings scaled by sqrt(weight), concatenated, re-normalised; the
    cosine of two fused embeddings is then the weighted mean of the systems' cosines. Shape (files, sum dims)."""
    fused = np.concatenate([np.sqrt(w) * e for e, w in zip(embeddings, weights, strict=True)], axis=1)
    return fused / np.linalg.norm(fused, axis=1, keepdims=True)
