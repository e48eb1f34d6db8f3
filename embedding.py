"""The one way to embed: crops, features, a signal, a file or many files into speaker embeddings.

Whole utterances are embedded as the mean of the embeddings of NUM_FRAMES-frame windows every WINDOW_HOP frames,
re-normalised (or, with `crop`, the centre crop's embedding); deterministic. Imports checkpoints, conv_models,
batcher (the crop of a short utterance), features and constants.
"""

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from batcher import sample_from_mfcc
from checkpoints import build_model, model_fingerprint
from constants import EMBEDDING_FILES_PER_CHUNK, FEATURE_THREADS, INFERENCE_BATCH_SIZE, NUM_FRAMES, WINDOW_HOP
from conv_models import SpeakerModel
from features import AudioError, read_features, signal_features


def embed_crops(model: keras.Model, crops: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of crops (n, frames, NUM_FBANKS, 1) float32 (an array or a memory map, read a chunk at a time):
    float32 (n, dims).

    Runs `batch_size` crops at a time (default constants.INFERENCE_BATCH_SIZE) through the model's compiled
    predict function (training=False, no gradient tape). Unlike an eager `model(crops)`, which keeps every
    layer's output until the call returns (about 4 GB for 500 crops through the ResCNN at width 0.25), the graph
    frees each activation after its last use, so memory grows with `batch_size` times the largest layer output,
    not the whole network. With `batch_size` at most the training batch a pass needs less than a training step,
    which holds every activation of its batch for the gradients. Results depend on `batch_size` only by float
    round-off (oneDNN picks kernels by batch size; 64, 96 and 500 agree bit for bit on this project's CPU).
    """
    batch_size = batch_size or INFERENCE_BATCH_SIZE
    if len(crops) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    chunks = [model.predict_on_batch(np.asarray(crops[start:start + batch_size], dtype=np.float32))
              for start in range(0, len(crops), batch_size)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


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

    def __init__(self, model: SpeakerModel, crop: bool = False, batch_size: int = INFERENCE_BATCH_SIZE):
        self.model, self.crop, self.batch_size = model, crop, batch_size

    @classmethod
    def from_checkpoint(cls, path: str, model: str = 'rescnn', width: float | None = None,
                        crop: bool = False) -> 'Embedder':
        """An Embedder of the model a checkpoint was trained as (a .keras file says its own; `model` and `width`
        give the architecture of .h5 and .weights.h5 files)."""
        return cls(build_model(str(path), model, width), crop)

    @property
    def fingerprint(self) -> str:
        """The model's architecture and weights hash (checkpoints.model_fingerprint)."""
        return model_fingerprint(self.model)

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

    def embed_files(self, paths: Sequence[str | Path], skipped: dict[int, str] | None = None,
                    progress: bool = True) -> np.ndarray:
        """Audio files to their embeddings, float32 (files, dims), EMBEDDING_FILES_PER_CHUNK files per predict;
        FEATURE_THREADS threads compute the next chunk's features while the model runs on this one (the same
        chunks, so the same numbers as computing them in turn). A file that cannot be decoded raises its
        AudioError; with a `skipped` dict, it gets a row of NaN instead, and skipped[its index] = the reason."""
        embeddings = np.full((len(paths), self.model.m.output_shape[-1]), np.nan, dtype=np.float32)
        starts = range(0, len(paths), EMBEDDING_FILES_PER_CHUNK)
        with ThreadPoolExecutor(FEATURE_THREADS) as pool:
            def submit(start: int) -> list[tuple[int, Future]]:
                rows = range(start, min(start + EMBEDDING_FILES_PER_CHUNK, len(paths)))
                return [(row, pool.submit(self.file_windows, paths[row])) for row in rows]

            pending = submit(0)
            for start in tqdm(starts, desc='Embedding utterances', unit='chunk', disable=not progress):
                following = submit(start + EMBEDDING_FILES_PER_CHUNK)
                rows, windows = [], []
                for row, future in pending:
                    try:
                        windows.append(future.result())
                    except AudioError as e:
                        if skipped is None:
                            raise
                        skipped[row] = str(e)
                        continue
                    rows.append(row)
                if rows:
                    embeddings[rows] = self.pooled(windows)
                pending = following
        return embeddings


def embed_utterances(model: SpeakerModel, files: Sequence[str | Path], crop: bool = False) -> np.ndarray:
    """Embedder(model, crop).embed_files(files): deterministic embeddings of whole files, float32 (files, dims)."""
    return Embedder(model, crop).embed_files(files)
