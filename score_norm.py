"""Score normalisation of trial lists (eval-trials --score_norm): mean-centring of the embeddings with the mean
embedding of a cohort of training speakers, and adaptive symmetric score normalisation (AS-norm; Matejka et al.,
Interspeech 2017, after Cumani et al. 2011): each side's score against the cohort, its top-N mean and standard
deviation, s' = ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) / 2.

The cohort is one embedding per speaker of a working dir's feature cache (augmented copies left out): the
re-normalised mean of the embeddings of up to COHORT_UTTERANCES_PER_SPEAKER of its cached utterances, embedded
with the model being scored, as the trial files are (whole-utterance windows, or the centre crop). One per speaker,
so that a speaker with many utterances is not several of the top N.

Imports audio (the cache index), embedding and constants."""

import logging
from pathlib import Path

import numpy as np

from audio import Audio, checked_features
from constants import AUGMENTED_MARK, COHORT_UTTERANCES_PER_SPEAKER, EMBEDDING_FILES_PER_CHUNK
from embedding import Embedder, utterance_windows

logger = logging.getLogger(__name__)

COHORT_CHUNK_ROWS = 1024  # embeddings scored against the whole cohort at once (rows x cohort float32 in memory).


class CohortError(ValueError):
    """A cohort that cannot normalise scores: no cached features, or `size` speakers, fewer than the `top` asked."""

    def __init__(self, message: str, size: int | None = None, top: int | None = None):
        super().__init__(message)
        self.size, self.top = size, top


def cohort_utterances(cohort_dir: str | Path, top: int | None = None) -> list[list[Path]]:
    """The cached utterances (clean, sorted by name, up to COHORT_UTTERANCES_PER_SPEAKER) of each clean speaker of
    the working dir `cohort_dir`, by speaker name. CohortError when it caches nothing, or fewer speakers than
    `top` (AS-norm's top N)."""
    index = Audio(cohort_dir).speakers_to_utterances
    cohort = [[index[speaker][name] for name in sorted(index[speaker]) if AUGMENTED_MARK not in name]
              [:COHORT_UTTERANCES_PER_SPEAKER] for speaker in sorted(index) if AUGMENTED_MARK not in speaker]
    cohort = [utterances for utterances in cohort if utterances]
    if not cohort:
        raise CohortError(f'{cohort_dir}: no cached features; run build-mfcc-cache with this --working_dir first.')
    if top is not None and top > len(cohort):
        raise CohortError(f'{cohort_dir}: a cohort of {len(cohort)} speakers, fewer than the top {top} asked.',
                          len(cohort), top)
    return cohort


def cohort_embeddings(embedder: Embedder, cohort: list[list[Path]]) -> np.ndarray:
    """One unit embedding per cohort speaker: the re-normalised mean of its utterances' embeddings (windows or
    centre crop, as embedder.crop says), EMBEDDING_FILES_PER_CHUNK utterances per predict. Shape (speakers, dims)."""
    files = [path for utterances in cohort for path in utterances]
    owners = np.repeat(np.arange(len(cohort)), [len(utterances) for utterances in cohort])
    sums = np.zeros((len(cohort), embedder.model.m.output_shape[-1]), dtype=np.float64)
    for start in range(0, len(files), EMBEDDING_FILES_PER_CHUNK):
        chunk = files[start:start + EMBEDDING_FILES_PER_CHUNK]
        windows = [utterance_windows(np.asarray(checked_features(path)), embedder.crop) for path in chunk]
        np.add.at(sums, owners[start:start + len(chunk)], embedder.pooled(windows))
    logger.info('Cohort: %d speakers, %d utterances embedded.', len(cohort), len(files))
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)


def centred(embeddings: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Embeddings (n, dims) minus the cohort's `mean` (dims,), re-normalised to unit length."""
    shifted = embeddings - mean
    return shifted / np.linalg.norm(shifted, axis=1, keepdims=True)


def top_cohort_statistics(embeddings: np.ndarray, cohort: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of the `top` highest cosine scores of each embedding (n, dims) against
    the cohort (speakers, dims): two arrays of shape (n,). Rows of NaN (skipped files) give NaN."""
    means, stds = np.empty(len(embeddings)), np.empty(len(embeddings))
    for start in range(0, len(embeddings), COHORT_CHUNK_ROWS):
        scores = embeddings[start:start + COHORT_CHUNK_ROWS] @ cohort.T
        highest = -np.partition(-scores, top - 1, axis=1)[:, :top]
        means[start:start + len(scores)], stds[start:start + len(scores)] = highest.mean(axis=1), highest.std(axis=1)
    return means, stds


def asnorm(scores: np.ndarray, enrol_stats: tuple[np.ndarray, np.ndarray],
           test_stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """AS-norm of trial scores (trials,) with the (mean, std) of each trial's enrolment and test side's top cohort
    scores (each (trials,)): ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) / 2."""
    (enrol_mean, enrol_std), (test_mean, test_std) = enrol_stats, test_stats
    return 0.5 * ((scores - enrol_mean) / enrol_std + (scores - test_mean) / test_std)
