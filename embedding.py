"""The one way to embed: crops, features, a signal, a file or many files into speaker embeddings.

Whole utterances are embedded as the mean of the embeddings of NUM_FRAMES-frame windows every WINDOW_HOP frames,
re-normalised (or, with `crop`, the centre crop's embedding); deterministic. Imports checkpoints, conv_models,
batcher (the crop of a short utterance), features and constants.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from batcher import sample_from_mfcc
from checkpoints import build_model
from constants import EMBEDDING_FILES_PER_CHUNK, FEATURE_THREADS, NUM_FRAMES, PREDICT_BATCH_SIZE, WINDOW_HOP
from conv_models import SpeakerModel
from features import read_features, signal_features


def embed_crops(model: keras.Model, crops: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of crops (n, frames, 64, 1) float32: (n, dims) float32, in chunks of `batch_size` (default
    PREDICT_BATCH_SIZE), inference mode, no gradient state."""
    return model.predict(crops, batch_size=batch_size or PREDICT_BATCH_SIZE, verbose=0)


def utterance_windows(mfcc: np.ndarray, crop: bool = False) -> np.ndarray:
    """Fixed-length windows of one utterance's features (frames, 64): the centre crop, or windows of NUM_FRAMES
    frames every WINDOW_HOP frames, the last one ending at the last frame (a short utterance is zero-padded).
    Returns float32 (windows, NUM_FRAMES, 64, 1)."""
    if crop or len(mfcc) <= NUM_FRAMES:
        return sample_from_mfcc(mfcc, NUM_FRAMES)[np.newaxis]
    last = len(mfcc) - NUM_FRAMES
    starts = np.unique(np.minimum(np.arange(0, last + WINDOW_HOP, WINDOW_HOP), last))
    return np.stack([mfcc[start:start + NUM_FRAMES] for start in starts]).astype(np.float32)[..., np.newaxis]


class Embedder:
    """Embeds with one SpeakerModel: whole-utterance windows by default, one centre crop with `crop`."""

    def __init__(self, model: SpeakerModel, crop: bool = False, batch_size: int = PREDICT_BATCH_SIZE):
        self.model, self.crop, self.batch_size = model, crop, batch_size

    @classmethod
    def from_checkpoint(cls, path: str, model: str = 'rescnn', width: float | None = None,
                        crop: bool = False) -> 'Embedder':
        """An Embedder of the model a checkpoint was trained as (a .keras file says its own; `model` and `width`
        give the architecture of .h5 and .weights.h5 files)."""
        return cls(build_model(str(path), model, width), crop)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(n, frames, 64, 1) crops to (n, dims) embeddings."""
        return embed_crops(self.model.m, crops, self.batch_size)

    def pooled(self, windows: list[np.ndarray]) -> np.ndarray:
        """One embedding per utterance from its windows (utterance_windows): the re-normalised mean of the window
        embeddings, float32 (utterances, dims)."""
        window_embeddings = self.embed_crops(np.concatenate(windows))
        offsets = np.cumsum([0] + [len(w) for w in windows[:-1]])
        means = np.add.reduceat(window_embeddings, offsets, axis=0)
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """Normalised fbank features (frames, 64) of one utterance to its embedding (dims,)."""
        return self.pooled([utterance_windows(features, self.crop)])[0]

    def embed_signal(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        """A mono signal (samples,) at `sample_rate` Hz to its embedding (dims,), as a file of it would give."""
        return self.embed_features(signal_features(signal, sample_rate))

    def embed_file(self, path: str | Path) -> np.ndarray:
        """An audio file (any rate, mono or not) to its embedding (dims,)."""
        return self.embed_features(read_features(str(path)))

    def file_windows(self, path: str | Path) -> np.ndarray:
        """The windows (utterance_windows) of an audio file's features: float32 (windows, NUM_FRAMES, 64, 1)."""
        return utterance_windows(read_features(str(path)), self.crop)

    def embed_files(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Audio files to their embeddings, float32 (files, dims), EMBEDDING_FILES_PER_CHUNK files per predict;
        FEATURE_THREADS threads compute the next chunk's features while the model runs on this one (the same
        chunks, so the same numbers as computing them in turn)."""
        chunks = [paths[start:start + EMBEDDING_FILES_PER_CHUNK]
                  for start in range(0, len(paths), EMBEDDING_FILES_PER_CHUNK)]
        embeddings = []
        with ThreadPoolExecutor(FEATURE_THREADS) as pool:
            pending = [pool.submit(self.file_windows, f) for f in chunks[0]] if chunks else []
            for number in tqdm(range(len(chunks)), desc='Embedding utterances', unit='chunk'):
                following = [pool.submit(self.file_windows, f) for f in chunks[number + 1]] \
                    if number + 1 < len(chunks) else []
                embeddings.append(self.pooled([future.result() for future in pending]))
                pending = following
        return np.concatenate(embeddings).astype(np.float32)


def embed_utterances(model: SpeakerModel, files: Sequence[str | Path], crop: bool = False) -> np.ndarray:
    """Embedder(model, crop).embed_files(files): deterministic embeddings of whole files, float32 (files, dims)."""
    return Embedder(model, crop).embed_files(files)
