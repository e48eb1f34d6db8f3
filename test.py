"""The original Deep Speaker evaluation: for each speaker an anchor, one positive and up to 99 negatives,
scored by cosine similarity, on the held-out part (test split) of the cached speakers' audio."""

import logging

import numpy as np

from audio import Audio
from batcher import Source, load_source, sample_from_mfcc, train_test_sources
from constants import NUM_FRAMES, NUM_NEGATIVE_SPEAKERS
from conv_models import DeepSpeakerModel
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


def eval_model(working_dir: str, model: DeepSpeakerModel, seed: int = 0,
               num_negative_speakers: int = NUM_NEGATIVE_SPEAKERS) -> Metrics:
    """Metrics of the anchor/positive/negatives protocol over every cached speaker of `working_dir`.

    Each speaker contributes one anchor crop and one positive crop; the negatives of a speaker are the
    positive crops of up to `num_negative_speakers` other speakers. One forward pass, one matrix product.
    """
    audio = Audio(working_dir)
    speakers = audio.speaker_ids
    if len(speakers) < 2:
        raise ValueError(f'--working_dir {working_dir}: {len(speakers)} cached speakers; evaluation needs 2 or more.')
    rng = np.random.default_rng(seed)
    pairs = [anchor_and_positive(train_test_sources(list(audio.speakers_to_utterances[s].values()))[1], rng)
             for s in speakers]
    crops = np.stack([sample_from_mfcc(load_source(source), NUM_FRAMES, rng) for pair in pairs for source in pair])
    embeddings = model.m.predict(crops, batch_size=64, verbose=0)
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
