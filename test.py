"""Evaluation: the original Deep Speaker protocol (for each cached speaker an anchor, one positive and up to 99
negatives, on the held-out part of its audio) and VoxCeleb-style trial lists on unseen speakers (evaluate_trials:
embeddings of one or several checkpoints, fusion, scores CSV, DET plot, EER and minDCF), with deterministic
whole-utterance embeddings from embedding.py.

Imports embedding, checkpoints, audio (the cache index), batcher, conv_models, eval_metrics and constants."""

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from audio import Audio
from batcher import Source, load_source, sample_from_mfcc, train_test_sources
from constants import AUGMENTED_MARK, DCF_P_TARGET, NUM_FRAMES, NUM_NEGATIVE_SPEAKERS
from conv_models import SpeakerModel
from embedding import Embedder, embed_crops
from embedding import embed_utterances as embed_utterances
from embedding import utterance_windows as utterance_windows
from eval_metrics import Metrics, eer_threshold, equal_error_rate, evaluate, min_dcf, min_dcf_threshold, plot_det

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


class TrialsResult(NamedTuple):
    """What evaluate_trials measured: EER (fraction), minDCF at DCF_P_TARGET, where the scores went, the score
    thresholds at the EER and at minDCF (accept score >= threshold), and the fingerprint of each model."""
    equal_error_rate: float
    min_dcf: float
    scores_file: str
    num_target: int
    num_nontarget: int
    num_files: int
    eer_threshold: float
    min_dcf_threshold: float
    fingerprints: list[str]


def evaluate_trials(trials_file: str, audio_root: str, checkpoint_files: list[str], model: str = 'rescnn',
                    width: float | None = None, fusion: str = 'score', weights: list[float] | None = None,
                    crop: bool = False, scores_file: str | None = None, det_plot: str | None = None) -> TrialsResult:
    """EER and minDCF of one checkpoint, or of a fusion ('score': weighted mean of cosine scores, 'concat': cosine
    of the concatenated embeddings) of several, on a trial list; each utterance is embedded once per model.
    Writes the scores CSV (default: TRIALS_STEM.scores.csv in the current directory) and, if asked, the DET plot.
    TrialError, CheckpointError or AudioError before anything is written."""
    weights = weights or [1.0] * len(checkpoint_files)
    trials = read_trials(trials_file, audio_root)
    if len(set(trials.labels.tolist())) < 2:
        raise TrialError(f'{trials_file}: needs both target (1) and non-target (0) trials.')
    embedders = [Embedder.from_checkpoint(path, model, width, crop) for path in checkpoint_files]
    embeddings = [embedder.embed_files(trials.files) for embedder in embedders]
    if fusion == 'concat':
        scores = score_trials(concatenated_embeddings(embeddings, weights), trials)
    else:
        scores = fused_scores([score_trials(e, trials) for e in embeddings], weights)
    scores_file = scores_file or f'{Path(trials_file).stem}.scores.csv'
    write_scores(scores_file, trials, scores, audio_root)
    if det_plot:
        plot_det(scores, trials.labels, det_plot, title=' + '.join(Path(p).name for p in checkpoint_files))
    result = TrialsResult(equal_error_rate(scores, trials.labels), min_dcf(scores, trials.labels, DCF_P_TARGET),
                          scores_file, int(trials.labels.sum()), int((trials.labels == 0).sum()), len(trials.files),
                          eer_threshold(scores, trials.labels), min_dcf_threshold(scores, trials.labels, DCF_P_TARGET),
                          [embedder.fingerprint for embedder in embedders])
    logger.info('%d target and %d non-target trials over %d utterances; scores in %s.', result.num_target,
                result.num_nontarget, result.num_files, scores_file)
    return result
