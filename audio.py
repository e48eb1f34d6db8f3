"""The per-utterance feature cache (`<working_dir>/audio-fbanks/<speaker>/<utterance>.npy`, built by a pool of
workers with atomic writes and a skipped-files report) and its augmented copies (speed perturbation, noise).

The signal processing lives in features.py; the names the original implementation's users import from here
(`read_mfcc`, `AudioError`, `read_audio`, `trim_silence`, `fbank`, ...) are re-exported. "mfcc" names the
normalised fbank features, as in the original. Imports features, workdir and constants only.
"""

import logging
import os
import zlib
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from constants import AUDIO_EXTENSIONS, AUGMENTED_MARK, SAMPLE_RATE, SPEED_FACTORS
from features import AudioError as AudioError
from features import fbank as fbank
from features import frame_length as frame_length
from features import frame_step as frame_step
from features import mel_matrix as mel_matrix
from features import mfcc_fbank as mfcc_fbank
from features import normalize_frames as normalize_frames
from features import read_audio, trim_silence, trimmed_features
from workdir import WorkingDir, atomic_path, remove_orphan_temp_files

logger = logging.getLogger(__name__)


class Augmentation(NamedTuple):
    """A variant of an utterance for the cache: speed factor (1.0: unchanged) and additive noise (None, 'white',
    'pink' or a noise file) at a random SNR drawn from snr_range (dB), seeded by the file name."""
    suffix: str
    speed: float = 1.0
    noise: str | None = None
    snr_range: tuple[float, float] = (5.0, 20.0)


def speed_perturb(audio: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Plays `audio` `factor` times faster (tempo and pitch, as sox speed): length divided by `factor`."""
    import librosa
    return librosa.resample(audio, orig_sr=int(round(sample_rate * factor)), target_sr=sample_rate).astype(np.float32)


def noise_signal(kind: str, length: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`length` samples of white or pink (1/f power) noise, or a random stretch of a random file of the noise
    directory `kind`."""
    if kind == 'white':
        return rng.standard_normal(length).astype(np.float32)
    if kind == 'pink':
        spectrum = np.fft.rfft(rng.standard_normal(length))
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        return np.fft.irfft(spectrum, length).astype(np.float32)
    noise_files = find_audio_files(kind)
    noise_file = str(noise_files[rng.integers(len(noise_files))])
    noise = read_audio(noise_file, sample_rate)
    if not np.any(noise):
        raise AudioError(f'{noise_file}: silent noise file; remove it from the noise directory.')
    noise = np.tile(noise, -(-length // len(noise)) + 1)
    start = int(rng.integers(0, len(noise) - length + 1))
    return noise[start:start + length]


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`audio` plus `noise` (same length) scaled to the signal-to-noise ratio `snr_db`."""
    scale = np.sqrt(np.mean(audio ** 2) / (np.mean(noise ** 2) * 10 ** (snr_db / 10)))
    return (audio + scale * noise).astype(np.float32)


def augment(audio: np.ndarray, augmentation: Augmentation, seed_text: str, sample_rate: int = SAMPLE_RATE):
    """Applies a speed change then additive noise; the same `seed_text` always gives the same noise."""
    if augmentation.speed != 1.0:
        audio = speed_perturb(audio, augmentation.speed, sample_rate)
    if augmentation.noise is not None:
        rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
        audio = add_noise(audio, noise_signal(augmentation.noise, len(audio), rng, sample_rate),
                          rng.uniform(*augmentation.snr_range))
    return audio


def read_mfcc(input_filename: str, sample_rate: int = SAMPLE_RATE,
              augmentation: Augmentation | None = None) -> np.ndarray:
    """Reads a file, trims its silence (then applies `augmentation`, if any) and returns its normalised fbank:
    float32, shape (frames, NUM_FBANKS)."""
    audio = trim_silence(read_audio(input_filename, sample_rate), input_filename)
    if augmentation is not None:
        audio = augment(audio, augmentation, input_filename + augmentation.suffix, sample_rate)
    return trimmed_features(audio, input_filename, sample_rate)


def find_audio_files(audio_dir: str) -> list[Path]:
    """Every .flac/.wav under `audio_dir`, sorted."""
    return sorted(p for p in Path(audio_dir).rglob('*') if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def speaker_of(audio_file: Path, audio_dir: Path) -> str:
    """The speaker folder of a file: `speaker/chapter/utt.flac` (LibriSpeech) or `speaker/utt.wav`."""
    depth = len(audio_file.relative_to(audio_dir).parts) - 1
    return audio_file.parent.name if depth == 1 else audio_file.parent.parent.name


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    """Writes `array` to `path` through a uniquely named temporary file (`.<stem>.<pid>-<random>.tmp.npy`), so
    `path` is whole or absent."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def augmentations(speed_perturb: bool, noises: list[str], snr_range: tuple[float, float]) -> list[Augmentation]:
    """The cache variants of each utterance besides the clean one: speeds 0.9 and 1.1 (new speakers, as in
    Kaldi recipes) and one noisy copy per noise kind or file."""
    variants = [Augmentation(f'{AUGMENTED_MARK}sp{factor}', speed=factor) for factor in SPEED_FACTORS
                if speed_perturb]
    variants += [Augmentation(f'{AUGMENTED_MARK}noise{i}', noise=noise, snr_range=snr_range)
                 for i, noise in enumerate(noises)]
    return variants


def _cache_one(job: tuple[str, str, int, Augmentation | None]) -> str | None:
    """Pool worker: features of one file into its cache path. Returns an error message, or None on success."""
    audio_file, cache_file, sample_rate, augmentation = job
    try:
        save_npy_atomically(Path(cache_file), read_mfcc(audio_file, sample_rate, augmentation))
    except AudioError as e:
        return str(e)
    return None


class Audio:
    """Per-utterance fbank cache `<working_dir>/audio-fbanks/<speaker>/<utterance>.npy` and its speaker index."""

    def __init__(self, cache_dir: 'str | WorkingDir', audio_dir: str | None = None, sample_rate: int = SAMPLE_RATE,
                 workers: int | None = None, variants: list[Augmentation] = ()):
        self.working_dir = WorkingDir.of(cache_dir)  # `cache_dir`, the original's name, is the working dir.
        self.cache_dir = self.working_dir.cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if audio_dir is not None:
            self.build_cache(Path(audio_dir).expanduser(), sample_rate, workers or os.cpu_count() or 1,
                             [None, *variants])
        self.speakers_to_utterances = self._index()

    @property
    def speaker_ids(self) -> list[str]:
        return sorted(self.speakers_to_utterances)

    def _index(self) -> dict[str, dict[str, Path]]:
        index = defaultdict(dict)
        for cache_file in sorted(self.cache_dir.glob('*/*.npy')):
            if not cache_file.name.startswith('.'):
                index[cache_file.parent.name][cache_file.stem] = cache_file
        return dict(index)

    def build_cache(self, audio_dir: Path, sample_rate: int, workers: int,
                    variants: list[Augmentation | None]) -> None:
        """Caches every file of `audio_dir` not cached yet, in parallel; bad files are skipped and reported.

        Each variant (None: the clean file) is cached too: a speed change under the speaker `<speaker>~sp<f>`,
        noise as the utterance `<utterance>~noise<i>` of the same speaker.
        """
        if not audio_dir.is_dir():
            raise FileNotFoundError(f'--audio_dir {audio_dir}: no such directory.')
        if removed := remove_orphan_temp_files(self.cache_dir, '*/.*.tmp.npy'):
            logger.info('Removed %d temporary files of an interrupted build.', removed)
        files = find_audio_files(str(audio_dir))
        if not files:
            raise FileNotFoundError(f'--audio_dir {audio_dir}: no .flac or .wav files; expected '
                                    f'speaker/chapter/utterance.flac (LibriSpeech) or speaker/utterance.wav.')
        jobs, errors = [], []
        for audio_file in files:
            if audio_file.parent == audio_dir:
                errors.append(f'{audio_file}: not inside a speaker folder; expected speaker/utterance.wav or '
                              f'speaker/chapter/utterance.flac under --audio_dir.')
                continue
            for variant in variants:
                target = self.cache_path(speaker_of(audio_file, audio_dir), audio_file.stem, variant)
                if not target.exists():
                    target.parent.mkdir(exist_ok=True)
                    jobs.append((str(audio_file), str(target), sample_rate, variant))
        logger.info('%d audio files, %d to compute.', len(files), len(jobs))
        with get_context('spawn').Pool(workers) as pool:
            results = pool.imap_unordered(_cache_one, jobs, chunksize=max(1, len(jobs) // (workers * 16)))
            for error in tqdm(results, total=len(jobs), desc='Building fbank cache', unit='file'):
                if error is not None:
                    errors.append(error)
        self._report_skipped(errors)

    def cache_path(self, speaker: str, utterance: str, variant: Augmentation | None) -> Path:
        if variant is None:
            return self.cache_dir / speaker / f'{utterance}.npy'
        if variant.speed != 1.0:
            return self.cache_dir / f'{speaker}{variant.suffix}' / f'{utterance}.npy'
        return self.cache_dir / speaker / f'{utterance}{variant.suffix}.npy'

    def _report_skipped(self, errors: list[str]) -> None:
        report = self.working_dir.skipped_files_report
        if errors:
            report.write_text('\n'.join(sorted(errors)) + '\n')
            logger.warning('Skipped %d bad audio files, listed in %s.', len(errors), report)
        else:
            report.unlink(missing_ok=True)
