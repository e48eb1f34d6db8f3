"""Evaluation: the original Deep Speaker protocol (for each cached speaker an anchor, one positive and up to 99
negatives, on the held-out part of its audio) and VoxCeleb-style trial lists on unseen speakers (evaluate_trials:
embeddings of one or several checkpoints, score normalisation, fusion, scores CSV, DET plot, EER and minDCF), with
deterministic whole-utterance embeddings from embedding.py.

Imports embedding, audio (the cache index), batcher, conv_models, eval_metrics, score_norm and constants."""

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from audio import Audio, checked_features
from batcher import Source, load_source, sample_from_mfcc, train_test_sources
from constants import (
    ASNORM_TOP,
    AUGMENTED_MARK,
    DCF_P_TARGET,
    NUM_FRAMES,
    NUM_NEGATIVE_SPEAKERS,
    SKIPPED_TRIALS_SUFFIX,
)
from conv_models import SpeakerModel
from embedding import Embedder, embed_crops
from embedding import embed_utterances as embed_utterances
from embedding import utterance_windows as utterance_windows
from eval_metrics import Metrics, eer_threshold, equal_error_rate, evaluate, min_dcf, min_dcf_threshold, plot_det
from score_norm import asnorm, centred, cohort_embeddings, cohort_utterances, top_cohort_statistics

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
    end = len(checked_features(path)) if end is None else end
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


KALDI_LABELS = {'target': 1, 'nontarget': 0}


def trial_fields(fields: list[str], where: str, line: str) -> tuple[int, str, str]:
    """(label, enrol, test) of one line, VoxCeleb's `1 enrol test` (1 = same speaker, 0 = not) or Kaldi's
    `enrol test target|nontarget`, told apart per line (a list may mix them)."""
    if len(fields) != 3:
        raise TrialError(f'{where}: expected "label path path" or "path path target|nontarget", got {line!r}.')
    if fields[2] in KALDI_LABELS:
        return KALDI_LABELS[fields[2]], fields[0], fields[1]
    if fields[0] not in ('0', '1'):
        raise TrialError(f'{where}: label {fields[0]!r} must be 1 (same speaker) or 0, or the third field target '
                         f'or nontarget.')
    return int(fields[0]), fields[1], fields[2]


def path_under(root: Path, name: str, where: str) -> Path:
    """`name` resolved under `root` (an absolute, normalised path; lexically: symbolic links inside the root may
    point anywhere); TrialError for a path that leaves it (`../`, an absolute path elsewhere)."""
    path = Path(os.path.normpath(root / name))
    if not path.is_relative_to(root) or path == root:
        raise TrialError(f'{where}: {name} is outside --audio_root {root}; trial paths must lie under it.')
    return path


def read_trials(trials_file: str, audio_root: str) -> Trials:
    """Parses the trial lines (trial_fields; paths under `audio_root`) and checks every file exists, before
    anything is computed."""
    root = Path(os.path.abspath(audio_root))  # absolute: Path('..').is_relative_to(Path('.')) is True.
    index: dict[Path, int] = {}
    labels, enrol, test = [], [], []
    lines = Path(trials_file).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f'{trials_file}:{number}'
        label, *names = trial_fields(line.split(), where, line)
        sides = []
        for name in names:
            path = path_under(root, name, where)
            if path not in index:
                if not path.is_file():
                    raise TrialError(f'{where}: {path} does not exist; check --audio_root.')
                index[path] = len(index)
            sides.append(index[path])
        labels.append(label)
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
    names = [os.path.relpath(f, audio_root) for f in trials.files]
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


def system_scores(embeddings: np.ndarray, cohort: np.ndarray | None, trials: Trials, score_norm: str = 'none',
                  top: int = ASNORM_TOP) -> np.ndarray:
    """One system's trial scores (trials,) from its embeddings (files, dims): cosine ('none'), cosine of the
    embeddings centred on the mean of the cohort embeddings (speakers, dims) ('mean'), or AS-norm of the cosine
    against the `top` highest cohort scores of each side ('asnorm')."""
    if score_norm == 'mean':
        return score_trials(centred(embeddings, cohort.mean(axis=0)), trials)
    scores = score_trials(embeddings, trials)
    if score_norm != 'asnorm':
        return scores
    means, stds = top_cohort_statistics(embeddings, cohort, top)
    return asnorm(scores, (means[trials.enrol], stds[trials.enrol]), (means[trials.test], stds[trials.test]))


def trial_scores(embeddings: list[np.ndarray], cohorts: list[np.ndarray | None], trials: Trials, fusion: str,
                 weights: list[float], score_norm: str = 'none', top: int = ASNORM_TOP) -> np.ndarray:
    """The scores of one system or of a fusion: each system's scores normalised (system_scores), then their weighted
    mean ('score'); or the concatenated embeddings ('concat') scored as one system, against the cohort concatenated
    the same way."""
    if fusion == 'concat':
        cohort = concatenated_embeddings(cohorts, weights) if score_norm != 'none' else None
        return system_scores(concatenated_embeddings(embeddings, weights), cohort, trials, score_norm, top)
    return fused_scores([system_scores(e, c, trials, score_norm, top) for e, c in zip(embeddings, cohorts,
                                                                                      strict=True)], weights)


class TrialsResult(NamedTuple):
    """What evaluate_trials measured: EER (fraction), minDCF at DCF_P_TARGET, where the scores went, the score
    thresholds at the EER and at minDCF (accept score >= threshold) and the fingerprint of each model."""
    equal_error_rate: float
    min_dcf: float
    scores_file: str
    num_target: int
    num_nontarget: int
    num_files: int
    eer_threshold: float
    min_dcf_threshold: float
    fingerprints: list[str]


def without_files(trials: Trials, skipped: set[int]) -> Trials:
    """The trials none of whose sides is in `skipped` (indices into trials.files)."""
    keep = ~(np.isin(trials.enrol, list(skipped)) | np.isin(trials.test, list(skipped)))
    return Trials(trials.labels[keep], trials.enrol[keep], trials.test[keep], trials.files)


def write_skipped(path: Path, reasons: dict[int, str]) -> None:
    """One line per skipped file: the reason it could not be decoded (its path first)."""
    path.write_text(''.join(f'{reasons[i]}\n' for i in sorted(reasons)))


def check_both_classes(trials_file: str, labels: np.ndarray, after: str = '') -> None:
    if len(set(labels.tolist())) < 2:
        raise TrialError(f'{trials_file}: needs both target (1) and non-target (0) trials{after}.')


def check_writable_folder(output: str | None) -> None:
    """TrialError naming `output` when its folder does not exist or cannot be written (checked before any
    embedding); nothing for None."""
    if output is None:
        return
    folder = Path(output).parent
    if not folder.is_dir():
        raise TrialError(f'{output}: folder {folder} does not exist; create it or choose another path.')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrialError(f'{output}: folder {folder} is not writable; choose another path.')


def evaluate_trials(trials_file: str, audio_root: str, checkpoint_files: list[str], model: str = 'rescnn',
                    width: float | None = None, fusion: str = 'score', weights: list[float] | None = None,
                    crop: bool = False, scores_file: str | None = None, det_plot: str | None = None,
                    strict: bool = False, score_norm: str = 'none', cohort_dir: str | None = None,
                    asnorm_top: int = ASNORM_TOP) -> TrialsResult:
    """EER and minDCF of one checkpoint, or of a fusion ('score': weighted mean of cosine scores, 'concat': cosine
    of the concatenated embeddings) of several, on a trial list; each utterance is embedded once per model. With
    `score_norm` 'mean' or 'asnorm' (top `asnorm_top`), each model's scores are normalised against the speakers
    cached in `cohort_dir`, each embedded by that model, before the fusion (score_norm.py).
    Writes the scores CSV (default: TRIALS_STEM.scores.csv in the current directory) and, if asked, the DET plot.
    A file that cannot be decoded is skipped with its trials, logged and listed in TRIALS_STEM.skipped.txt beside
    the scores, and the rest scored; with `strict`, its AudioError is raised instead. TrialError, CheckpointError,
    CohortError or AudioError before anything is written."""
    weights = weights or [1.0] * len(checkpoint_files)
    trials = read_trials(trials_file, audio_root)
    check_both_classes(trials_file, trials.labels)
    scores_file = scores_file or f'{Path(trials_file).stem}.scores.csv'
    for output in (scores_file, det_plot):
        check_writable_folder(output)
    cohort = None
    if score_norm != 'none':
        cohort = cohort_utterances(cohort_dir, asnorm_top if score_norm == 'asnorm' else None)
    reasons: dict[int, str] | None = None if strict else {}
    embedders = [Embedder.from_checkpoint(path, model, width, crop) for path in checkpoint_files]
    embeddings = [embedder.embed_files(trials.files, reasons) for embedder in embedders]
    cohorts = [cohort_embeddings(embedder, cohort) if cohort else None for embedder in embedders]
    skipped_list = Path(scores_file).with_name(Path(trials_file).stem + SKIPPED_TRIALS_SUFFIX)
    skipped_list.unlink(missing_ok=True)
    num_trials = len(trials.labels)
    if reasons:
        for reason in reasons.values():
            logger.warning('Skipped: %s', reason)
        trials = without_files(trials, set(reasons))
        check_both_classes(trials_file, trials.labels, f' after skipping {len(reasons)} undecodable files (listed '
                                                       f'in {skipped_list})')
        write_skipped(skipped_list, reasons)
        logger.warning('Skipped %d files that could not be decoded and their %d trials (listed in %s); scoring the '
                       'other %d trials.', len(reasons), num_trials - len(trials.labels), skipped_list,
                       len(trials.labels))
    scores = trial_scores(embeddings, cohorts, trials, fusion, weights, score_norm, asnorm_top)
    write_scores(scores_file, trials, scores, audio_root)
    if det_plot:
        plot_det(scores, trials.labels, det_plot, title=' + '.join(Path(p).name for p in checkpoint_files))
    used_files = len(set(trials.enrol.tolist()) | set(trials.test.tolist()))
    result = TrialsResult(equal_error_rate(scores, trials.labels), min_dcf(scores, trials.labels, DCF_P_TARGET),
                          scores_file, int(trials.labels.sum()), int((trials.labels == 0).sum()), used_files,
                          eer_threshold(scores, trials.labels), min_dcf_threshold(scores, trials.labels, DCF_P_TARGET),
                          [embedder.fingerprint for embedder in embedders])
    logger.info('%d target and %d non-target trials over %d utterances; scores in %s.', result.num_target,
                result.num_nontarget, result.num_files, scores_file)
    return result
