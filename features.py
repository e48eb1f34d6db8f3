"""Features: reading audio to 16 kHz mono, silence trimming, framing, the mel matrix, fbank energies and per-frame
normalisation; the one source of the constants the in-graph front end (conv_models.PcmToFbank) shares.

Features are python_speech_features' fbank (25 ms windows, 10 ms hop, NFFT 512, pre-emphasis 0.97, no log),
computed with vectorised numpy, each frame normalised to zero mean and unit std. Functions and files still say
"mfcc" for these fbank features (read_mfcc, build-mfcc-cache): the names are the original implementation's.
"""

from functools import lru_cache

import numpy as np
import soundfile as sf
from python_speech_features import get_filterbanks

from constants import (
    FBANK_BLOCK_FRAMES,
    FRAME_LENGTH_S,
    FRAME_STEP_S,
    MIN_FILE_SAMPLE_RATE,
    NFFT,
    NORMALIZE_EPSILON,
    NUM_FBANKS,
    PREEMPHASIS,
    SAMPLE_RATE,
    SILENCE_PERCENTILE,
)


class AudioError(ValueError):
    """An audio file that cannot become features; the message names the file and the reason."""


def frame_length(sample_rate: int = SAMPLE_RATE) -> int:
    """Samples per 25 ms analysis window (400 at 16 kHz)."""
    return int(round(FRAME_LENGTH_S * sample_rate))


def frame_step(sample_rate: int = SAMPLE_RATE) -> int:
    """Samples per 10 ms hop (160 at 16 kHz)."""
    return int(round(FRAME_STEP_S * sample_rate))


def resample(audio: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `from_rate` Hz to `to_rate` Hz (unchanged when the rates are equal or empty)."""
    if from_rate == to_rate or len(audio) == 0:
        return audio
    import librosa  # slow to import: only when a file needs resampling.
    return librosa.resample(audio, orig_sr=from_rate, target_sr=to_rate).astype(np.float32)


def read_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Returns the file's samples as float32 mono at `sample_rate` Hz, shape (samples,), range [-1, 1]."""
    try:
        audio, file_rate = sf.read(path, dtype='float32', always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f'{path}: not a readable audio file (wav, flac, ogg, mp3) ({e}); remove or re-encode '
                         f'it.') from None
    except MemoryError:  # soundfile allocates the length the header declares before decoding.
        raise AudioError(f'{path}: declares more samples than memory holds; re-encode it.') from None
    if file_rate < MIN_FILE_SAMPLE_RATE:
        raise AudioError(f'{path}: declares {file_rate} Hz, below {MIN_FILE_SAMPLE_RATE} Hz; re-encode it.')
    return resample(audio.mean(axis=1), file_rate, sample_rate)


def trim_silence(audio: np.ndarray, path: str = '<array>') -> np.ndarray:
    """Returns the span between the first and last sample at least as loud as the 95th percentile of |audio|."""
    energy = np.abs(audio)
    if not np.all(np.isfinite(energy)):
        raise AudioError(f'{path}: contains NaN or infinite samples; re-encode or remove it.')
    if len(audio) == 0 or not np.any(energy > 0):
        raise AudioError(f'{path}: empty or silent audio; remove it from the data set.')
    loud = np.flatnonzero((energy >= np.percentile(energy, SILENCE_PERCENTILE)) & (energy > 0))
    return audio[loud[0]:loud[-1]]


@lru_cache(maxsize=4)
def mel_matrix(sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """python_speech_features' triangular mel filterbank, transposed: shape (NFFT // 2 + 1, NUM_FBANKS)."""
    return get_filterbanks(NUM_FBANKS, NFFT, sample_rate).T.astype(np.float32)


def fbank(signal: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mel filterbank energies (no log) of a mono signal, as python_speech_features.fbank computes them.

    signal: shape (samples,), at least one 25 ms frame long. Returns float32, shape (frames, NUM_FBANKS),
    frames = 1 + ceil((samples - 400) / 160) at 16 kHz (the last frame zero-padded).
    """
    length, step = frame_length(sample_rate), frame_step(sample_rate)
    signal = np.asarray(signal, dtype=np.float32)
    emphasised = np.append(signal[0], signal[1:] - PREEMPHASIS * signal[:-1])
    num_frames = 1 + int(np.ceil((len(signal) - length) / step))
    padded = np.pad(emphasised, (0, (num_frames - 1) * step + length - len(signal)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, length)[::step]  # a view: no copy.
    energies = np.empty((num_frames, NUM_FBANKS), dtype=np.float32)
    for start in range(0, num_frames, FBANK_BLOCK_FRAMES):  # blocks bound the memory of long files.
        power = np.square(np.abs(np.fft.rfft(frames[start:start + FBANK_BLOCK_FRAMES], NFFT))) / NFFT
        # A float64 product rounded to float32: the same features whatever BLAS's thread count (the cache build's
        # workers run one thread each, an embedding process several), which a float32 product is not.
        energies[start:start + FBANK_BLOCK_FRAMES] = power @ mel_matrix(sample_rate).astype(np.float64)
    energies[energies == 0] = np.finfo(float).eps
    return energies


def normalize_frames(features: np.ndarray, epsilon: float = NORMALIZE_EPSILON) -> np.ndarray:
    """Each row (frame) to zero mean and unit standard deviation; shape unchanged."""
    std = np.maximum(features.std(axis=1, keepdims=True), epsilon)
    return (features - features.mean(axis=1, keepdims=True)) / std


def mfcc_fbank(signal: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Normalised fbank features of a mono signal: float32, shape (frames, NUM_FBANKS)."""
    return normalize_frames(fbank(signal, sample_rate)).astype(np.float32)


def trimmed_features(audio: np.ndarray, path: str = '<array>', sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Normalised fbank of silence-trimmed samples (`path` names them in errors): float32 (frames, NUM_FBANKS)."""
    if len(audio) < frame_length(sample_rate):
        raise AudioError(f'{path}: shorter than one {int(FRAME_LENGTH_S * 1000)} ms frame after '
                         f'trimming silence; remove it from the data set.')
    return mfcc_fbank(audio, sample_rate)


def signal_features(signal: np.ndarray, signal_rate: int = SAMPLE_RATE, path: str = '<array>') -> np.ndarray:
    """Features of a mono signal at `signal_rate` Hz, as read_features gives for a file: resampled to 16 kHz,
    silence trimmed, normalised fbank. Returns float32 (frames, NUM_FBANKS)."""
    audio = resample(np.asarray(signal, dtype=np.float32), signal_rate, SAMPLE_RATE)
    return trimmed_features(trim_silence(audio, path), path)


def read_features(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads a file, trims its silence and returns its normalised fbank: float32, shape (frames, NUM_FBANKS)."""
    return trimmed_features(trim_silence(read_audio(path, sample_rate), path), path, sample_rate)
