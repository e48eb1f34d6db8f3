"""The per-utterance feature cache (`<working_dir>/audio-fbanks/<speaker>/<utterance>.npy`, built by a pool of
workers with atomic writes and a skipped-files report) and its augmented copies (speed perturbation, noise).

The signal processing lives in features.py; the names the original implementation's users import from here
(`read_mfcc`, `AudioError`, `read_audio`, `trim_silence`, `fbank`, ...) are re-exported. "mfcc" names the
normalised fbank features, as in the original. Imports features, workdir and constants only.
"""

import functools
import logging
import math
import os
import sys
import zlib
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from constants import (
    AUDIO_EXTENSIONS,
    AUGMENTED_MARK,
    BABBLE_TALKERS,
    CACHE_FORMAT,
    CACHE_FORMAT_FILE,
    CACHE_JOBS_PER_WORKER,
    CACHE_WORKER_BLAS_THREADS,
    CHANNEL_SNR_RANGE_DB,
    MAX_CACHE_CHUNK,
    MU_LAW_MU,
    NUM_FBANKS,
    RT60_RANGE_S,
    SAMPLE_RATE,
    SKIPPED_FILES_SHARD_REPORT,
    SPEED_FACTORS,
    TELEPHONE_BAND_HZ,
    TELEPHONE_LEVEL_DB,
    TELEPHONE_RATE,
    VERIFY_BLOCK_FRAMES,
)
from corpus import Corpus, Shard, folder_corpus, speakers_without_audio, walk_files
from corpus import cache_name as cache_name
from corpus import escape_name as escape_name
from features import AudioError as AudioError
from features import fbank as fbank
from features import frame_length as frame_length
from features import frame_step as frame_step
from features import mel_matrix as mel_matrix
from features import mfcc_fbank as mfcc_fbank
from features import normalize_frames as normalize_frames
from features import read_audio, trim_silence, trimmed_features
from workdir import WorkingDir, atomic_path, remove_orphan_temp_files, remove_orphans

logger = logging.getLogger(__name__)


class Augmentation(NamedTuple):
    """A variant of an utterance for the cache: speed factor (1.0: unchanged), additive noise (None, 'white',
    'pink' or a noise file) at a random SNR drawn from snr_range (dB), and a channel (None, 'reverb', 'telephone'
    or 'babble' from the other speakers' files under source_dir), each at a random strength seeded by the file
    name."""
    suffix: str
    speed: float = 1.0
    noise: str | None = None
    snr_range: tuple[float, float] = (5.0, 20.0)
    channel: str | None = None
    source_dir: str | None = None


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


def synthetic_rir(rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A room impulse response of reverberation time `rt60` seconds: Gaussian noise under an exponential envelope
    falling 60 dB in `rt60` (amplitude exp(-3 ln(10) t / rt60)), `rt60` long, its first sample the direct path
    (the largest); unit energy, float32, shape (samples,)."""
    t = np.arange(max(2, int(rt60 * sample_rate))) / sample_rate
    rir = rng.standard_normal(len(t)) * np.exp(-3 * math.log(10) * t / rt60)
    rir[0] = np.max(np.abs(rir))
    return (rir / np.sqrt(np.sum(rir ** 2))).astype(np.float32)


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """`audio` convolved with `rir`, cut to its length and scaled back to its RMS."""
    from scipy.signal import fftconvolve
    wet = fftconvolve(audio, rir)[:len(audio)]
    return (wet * np.sqrt(np.mean(audio ** 2) / max(np.mean(wet ** 2), 1e-20))).astype(np.float32)


def mu_law(x: np.ndarray, mu: int = MU_LAW_MU) -> np.ndarray:
    """`x` (in [-1, 1]) through an 8-bit mu-law codec: companded, quantised to mu + 1 levels, expanded."""
    companded = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    quantised = np.round((companded + 1) / 2 * mu) / mu * 2 - 1
    return np.sign(quantised) * ((1 + mu) ** np.abs(quantised) - 1) / mu


def telephone(audio: np.ndarray, level_db: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` as a telephone line carries it: resampled to 8 kHz, band-passed to 300-3400 Hz (Butterworth, order
    8), through 8-bit mu-law at a peak level of `level_db` dBFS, resampled back; same length and RMS scale."""
    from scipy.signal import butter, resample_poly, sosfilt
    narrow = resample_poly(audio, TELEPHONE_RATE, sample_rate)
    band = sosfilt(butter(4, TELEPHONE_BAND_HZ, btype='bandpass', fs=TELEPHONE_RATE, output='sos'), narrow)
    gain = 10 ** (level_db / 20) / max(np.max(np.abs(band)), 1e-20)
    coded = mu_law(np.clip(band * gain, -1, 1)) / gain
    return resample_poly(coded, sample_rate, TELEPHONE_RATE)[:len(audio)].astype(np.float32)


def babble(length: int, talkers: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The sum of `talkers` (each looped to `length` from a random start and scaled to unit RMS): (length,)."""
    total = np.zeros(length)
    for talker in talkers:
        looped = np.tile(talker, -(-length // len(talker)) + 1)
        start = int(rng.integers(0, len(talker)))
        total += looped[start:start + length] / max(np.sqrt(np.mean(talker ** 2)), 1e-20)
    return total.astype(np.float32)


@functools.lru_cache(maxsize=4)
def speaker_files(source_dir: str) -> tuple[tuple[str, str], ...]:
    """(speaker, path) of every audio file under `source_dir` (the speaker: its first folder there), sorted."""
    root = Path(source_dir).expanduser().resolve()
    return tuple((f.relative_to(root).parts[0], str(f)) for f in find_audio_files(str(root)) if f.parent != root)


def babble_talkers(source_file: str, source_dir: str, rng: np.random.Generator,
                   sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """BABBLE_TALKERS (3 to 6, drawn) trimmed utterances of speakers other than `source_file`'s, under
    `source_dir`; AudioError when it has no other speaker."""
    speaker = Path(source_file).expanduser().resolve().relative_to(Path(source_dir).expanduser().resolve()).parts[0]
    others = [path for name, path in speaker_files(source_dir) if name != speaker]
    if not others:
        raise AudioError(f'{source_dir}: no speaker but {speaker} to make babble from; babble needs the files of '
                         f'other training speakers.')
    count = min(len(others), int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1)))
    chosen = rng.choice(len(others), size=count, replace=False)
    return [trim_silence(read_audio(others[i], sample_rate), others[i]) for i in sorted(chosen)]


def apply_channel(audio: np.ndarray, augmentation: Augmentation, rng: np.random.Generator, source_file: str,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` through the augmentation's channel at a strength drawn from `rng`: reverberation of an RT60 in
    RT60_RANGE_S, a telephone line at a peak level in TELEPHONE_LEVEL_DB, or babble at an SNR in snr_range."""
    if augmentation.channel == 'reverb':
        return reverberate(audio, synthetic_rir(rng.uniform(*RT60_RANGE_S), rng, sample_rate))
    if augmentation.channel == 'telephone':
        return telephone(audio, rng.uniform(*TELEPHONE_LEVEL_DB), sample_rate)
    talkers = babble_talkers(source_file, augmentation.source_dir, rng, sample_rate)
    return add_noise(audio, babble(len(audio), talkers, rng), rng.uniform(*augmentation.snr_range))


def augment(audio: np.ndarray, augmentation: Augmentation, seed_text: str, sample_rate: int = SAMPLE_RATE,
            source_file: str | None = None):
    """Applies a speed change, additive noise, then the channel of `augmentation`; the same `seed_text` always
    gives the same noise and strength. `source_file`: the file `audio` comes from (babble leaves its speaker out)."""
    if augmentation.speed != 1.0:
        audio = speed_perturb(audio, augmentation.speed, sample_rate)
    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    if augmentation.noise is not None:
        audio = add_noise(audio, noise_signal(augmentation.noise, len(audio), rng, sample_rate),
                          rng.uniform(*augmentation.snr_range))
    if augmentation.channel is not None:
        audio = apply_channel(audio, augmentation, rng, source_file or seed_text, sample_rate)
    return audio


def read_mfcc(input_filename: str, sample_rate: int = SAMPLE_RATE,
              augmentation: Augmentation | None = None) -> np.ndarray:
    """Reads a file, trims its silence (then applies `augmentation`, if any) and returns its normalised fbank:
    float32, shape (frames, NUM_FBANKS)."""
    audio = trim_silence(read_audio(input_filename, sample_rate), input_filename)
    if augmentation is not None:
        audio = augment(audio, augmentation, input_filename + augmentation.suffix, sample_rate, input_filename)
    return trimmed_features(audio, input_filename, sample_rate)


def find_audio_files(audio_dir: str) -> list[Path]:
    """Every .flac/.wav/.ogg/.mp3 under `audio_dir`, sorted (found with os.scandir: no stat per file)."""
    return [Path(audio_dir, *parts) for parts in walk_files(str(audio_dir), AUDIO_EXTENSIONS)]


class CacheError(OSError):
    """A cache that cannot be written or read back; the message names the file and the fix."""


def checked_features(path: Path) -> np.ndarray:
    """The cached features of `path`, memory-mapped: float32, shape (frames >= 1, NUM_FBANKS), all finite.
    Raises CacheError naming a damaged file (truncated, not an array, wrong shape or dtype, NaN)."""
    try:
        features = np.load(path, mmap_mode='r', allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise CacheError(f'{path}: damaged cache file (not a whole .npy array: {e}); run build-mfcc-cache '
                         f'--verify to rebuild it.') from None
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[1] != NUM_FBANKS or not len(features):
        raise CacheError(f'{path}: damaged cache file ({features.dtype} array of shape {features.shape}, expected '
                         f'float32 (frames, {NUM_FBANKS})); run build-mfcc-cache --verify to rebuild it.')
    for start in range(0, len(features), VERIFY_BLOCK_FRAMES):
        if not np.isfinite(features[start:start + VERIFY_BLOCK_FRAMES]).all():
            raise CacheError(f'{path}: damaged cache file (NaN or infinite values); run build-mfcc-cache --verify '
                             f'to rebuild it.')
    return features


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    """Writes `array` to `path` through a uniquely named temporary file (`.<stem>.<pid>-<random>.tmp.npy`), so
    `path` is whole or absent."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def augmentations(speed_perturb: bool, noises: list[str], snr_range: tuple[float, float],
                  channels: list[str] = (), source_dir: str | None = None) -> list[Augmentation]:
    """The cache variants of each utterance besides the clean one: speeds 0.9 and 1.1 (new speakers, as in
    Kaldi recipes), one noisy copy per noise kind or file, and one copy per channel of CHANNEL_AUGMENTATIONS
    (`<utterance>~reverb`, `~telephone`, `~babble` of the other speakers under `source_dir`, `~white`; babble and
    white noise at CHANNEL_SNR_RANGE_DB)."""
    variants = [Augmentation(f'{AUGMENTED_MARK}sp{factor}', speed=factor) for factor in SPEED_FACTORS
                if speed_perturb]
    variants += [Augmentation(f'{AUGMENTED_MARK}noise{i}', noise=noise, snr_range=snr_range)
                 for i, noise in enumerate(noises)]
    for channel in channels:
        variants.append(Augmentation(f'{AUGMENTED_MARK}{channel}', noise='white' if channel == 'white' else None,
                                     snr_range=CHANNEL_SNR_RANGE_DB, channel=None if channel == 'white' else channel,
                                     source_dir=source_dir))
    return variants


SKIPPED, UNWRITABLE = 'skipped', 'unwritable'  # outcomes of a pool job that failed.


def _single_threaded_worker() -> None:
    """Pool initializer: one BLAS thread per worker. The workers already fill the cores; BLAS threads of their
    own (OpenBLAS starts one per core in each process) spin-wait against each other and the other workers,
    which took 2.5 times the CPU per file (21 ms against 8.5 ms per 12 s file, 2 workers on 2 cores)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(CACHE_WORKER_BLAS_THREADS)


def worker_pool(workers: int):
    """A process pool for the cache build. Forked (workers start in milliseconds, importing nothing) unless
    TensorFlow is loaded in this process, whose threads make fork unsafe: then spawned (each worker imports
    audio.py, and the __main__ module of this process). Each worker computes with one BLAS thread."""
    context = get_context('spawn' if 'tensorflow' in sys.modules else 'fork')
    return context.Pool(workers, initializer=_single_threaded_worker)


def owner(cache_file: Path) -> tuple[str, str]:
    """The clean (speaker, utterance) names a cached array or temporary file of the cache belongs to: augmented
    copies (`<speaker>~sp0.9/<utterance>`, `<speaker>/<utterance>~noise0`) belong to their clean utterance;
    temporary files are `.<stem>.<pid>-<random>.tmp.npy`."""
    stem = cache_file.name[1:].rsplit('.', 3)[0] if cache_file.name.startswith('.') else cache_file.name[:-4]
    return cache_file.parent.name.partition(AUGMENTED_MARK)[0], stem.partition(AUGMENTED_MARK)[0]


def _cache_one(job: tuple[str, str, int, Augmentation | None]) -> tuple[str, str] | None:
    """Pool worker: features of one file into its cache path. Returns None on success, else (SKIPPED, why the
    audio file cannot become features) or (UNWRITABLE, why the cache file cannot be written)."""
    audio_file, cache_file, sample_rate, augmentation = job
    try:
        features = read_mfcc(audio_file, sample_rate, augmentation)
    except AudioError as e:
        return SKIPPED, str(e)
    except Exception as e:  # a decoder, resampler or noise source failing on a file must not crash the pool.
        variant = f' ({augmentation.suffix} copy)' if augmentation else ''
        return SKIPPED, (f'{audio_file}{variant}: unexpected {type(e).__name__} ({e}) while computing its features; '
                         f'remove or re-encode it, or check --noise.')
    try:
        save_npy_atomically(Path(cache_file), features)
    except OSError as e:
        return UNWRITABLE, (f'{cache_file}: cannot be written ({e.strerror or e}); free disk space and run '
                            f'build-mfcc-cache again (what is cached is kept).')
    return None


class Audio:
    """Per-utterance fbank cache `<working_dir>/audio-fbanks/<speaker>/<utterance>.npy` and its speaker index.

    Names (see corpus.py; a CSV manifest or a Kaldi data dir names them its own way): the speaker is the first
    folder under --audio_dir; the utterance is the path under it, extension kept, '/' written %2F (and '%', '~', a
    leading '.' escaped the same way), so no two files share a name: `1688/142285/1688-142285-0002.flac` ->
    `1688/142285%2F1688-142285-0002.flac.npy`, `alice/utt0.wav` -> `alice/utt0.wav.npy`. The file `cache-format`
    records this scheme. A cache of the earlier version (named by file stem, which lost same-named utterances of
    one speaker) is still read as it is; building into it first renames its files to this scheme (see
    _upgrade_earlier_cache), so nothing is computed again but the lost utterances.
    """

    def __init__(self, cache_dir: 'str | WorkingDir', audio_dir: str | None = None, sample_rate: int = SAMPLE_RATE,
                 workers: int | None = None, variants: list[Augmentation] = (), verify: bool = False,
                 corpus: Corpus | None = None, shard: Shard | None = None):
        self.working_dir = WorkingDir.of(cache_dir)  # `cache_dir`, the original's name, is the working dir.
        self.cache_dir = self.working_dir.cache_dir
        if audio_dir is not None:
            corpus = folder_corpus(Path(audio_dir).expanduser())
        names = None
        if corpus is not None:
            names = self.build(corpus, sample_rate, workers or os.cpu_count() or 1, [None, *variants], verify, shard)
        self.speakers_to_utterances = self._index(names)

    @property
    def speaker_ids(self) -> list[str]:
        return sorted(self.speakers_to_utterances)

    def _scan(self) -> tuple[dict[str, list[str]], list[Path]]:
        """({cache folder: the names of its cached arrays, sorted}, the temporary files of writes), empty folders
        left out; read with os.scandir (no stat per file), so a cache of a million files is listed in seconds."""
        if not self.cache_dir.is_dir():
            return {}, []
        names, temps = {}, []
        with os.scandir(self.cache_dir) as folders:
            for folder in sorted((f for f in folders if not f.name.startswith('.') and f.is_dir()),
                                 key=lambda f: f.name):
                with os.scandir(folder.path) as entries:
                    found = [e.name for e in entries if e.name.endswith('.npy')]
                temps += [Path(folder.path, name) for name in found if name.startswith('.') and '.tmp.' in name]
                if found := sorted(name for name in found if not name.startswith('.')):
                    names[folder.name] = found
        return names, temps

    def cached_names(self) -> dict[str, list[str]]:
        """{cache folder: the names of its cached arrays, sorted}, temporary files and empty folders left out."""
        return self._scan()[0]

    def cached_files(self) -> list[Path]:
        """Every cached array in place (temporary files left out), sorted."""
        return [self.cache_dir / folder / name for folder, names in self.cached_names().items() for name in names]

    def _index(self, names: dict[str, list[str]] | None = None) -> dict[str, dict[str, Path]]:
        """{speaker: {utterance: cached array}} of `names` (see cached_names; read when not given)."""
        return {folder: {name[:-len('.npy')]: self.cache_dir / folder / name for name in found}
                for folder, found in (self.cached_names() if names is None else names).items()}

    def _prepare_cache_dir(self, corpus: Corpus, shard: Shard | None) -> None:
        """Creates the cache directory with its format file (written atomically: shards may start together), or
        upgrades a cache of the earlier naming; refuses a cache of an unknown format."""
        format_file = self.cache_dir / CACHE_FORMAT_FILE
        if format_file.exists():
            if (found := format_file.read_text().strip()) != CACHE_FORMAT:
                raise CacheError(f'{self.cache_dir}: cache format {found}, this version writes {CACHE_FORMAT}; '
                                 f'build into another --working_dir or delete {self.cache_dir}.')
            return
        if self.cached_files():
            if corpus.root is None or shard is not None:
                raise CacheError(f'{self.cache_dir}: built by an earlier deep-speaker; upgrade it first with one '
                                 f'build-mfcc-cache --audio_dir (no --shard) from the tree it was built from, or '
                                 f'delete {self.cache_dir}.')
            self._upgrade_earlier_cache([Path(u.path) for u in corpus.utterances], corpus.root)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(format_file, tag=CACHE_FORMAT_FILE) as tmp:
            tmp.write_text(CACHE_FORMAT + '\n')

    def _upgrade_earlier_cache(self, files: list[Path], audio_dir: Path) -> None:
        """Renames the files of a cache of the earlier naming (`<speaker>/<stem>.npy`, the speaker being the folder
        above the file, or the one above that) to this version's names, augmented copies included. A file whose
        stem several audio files share is deleted (which of them it holds is unknown) and computed again. Refuses,
        changing nothing, when some cached file has no audio file under `audio_dir`."""
        earlier: dict[tuple[str, str], list[Path]] = defaultdict(list)
        current = set()
        for audio_file in (f for f in files if f.parent != audio_dir):
            in_speaker_folder = audio_file.parent.parent == audio_dir
            earlier_speaker = audio_file.parent.name if in_speaker_folder else audio_file.parent.parent.name
            earlier[(earlier_speaker, audio_file.stem)].append(audio_file)
            current.add(cache_name(audio_file, audio_dir))
        moves, ambiguous, unknown = [], [], []
        for cache_file in self.cached_files():
            speaker, speed_mark, speed = cache_file.parent.name.partition(AUGMENTED_MARK)
            utterance, noise_mark, noise = cache_file.stem.partition(AUGMENTED_MARK)
            sources = earlier.get((speaker, utterance), [])
            if (speaker, utterance) in current:  # renamed by an upgrade that was interrupted.
                continue
            if len(sources) == 1:
                new_speaker, new_utterance = cache_name(sources[0], audio_dir)
                moves.append((cache_file, self.cache_dir / f'{new_speaker}{speed_mark}{speed}' /
                              f'{new_utterance}{noise_mark}{noise}.npy'))
            elif sources:
                ambiguous.append(cache_file)
            else:
                unknown.append(cache_file)
        if unknown:
            raise CacheError(f'{self.cache_dir}: built by an earlier deep-speaker, and {len(unknown)} of its files '
                             f'(e.g. {unknown[0].name}) have no audio file under --audio_dir {audio_dir} to be renamed '
                             f'after; use the --audio_dir it was built from, or delete {self.cache_dir}.')
        for cache_file, target in moves:
            target.parent.mkdir(exist_ok=True)
            os.replace(cache_file, target)
        for cache_file in ambiguous:
            cache_file.unlink()
        for folder in self.cache_dir.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        logger.info('Upgraded a cache of the earlier naming: %d files renamed, %d shared by same-named utterances '
                    'deleted (computed again).', len(moves), len(ambiguous))

    def remove_damaged(self, shard: Shard | None = None) -> int:
        """Deletes every cached array (of `shard`, if given) that does not read back whole (see checked_features);
        returns how many."""
        damaged = 0
        files = [f for f in self.cached_files() if shard is None or shard.holds(*owner(f))]
        for cache_file in tqdm(files, desc='Verifying fbank cache', unit='file'):
            try:
                checked_features(cache_file)
            except CacheError as e:
                logger.warning('%s; deleted, computed again from its audio file.', str(e).split('; run ')[0])
                cache_file.unlink()
                damaged += 1
        logger.info('Verified the cache: %d damaged files deleted.', damaged)
        return damaged

    def build_cache(self, audio_dir: Path, sample_rate: int, workers: int,
                    variants: list[Augmentation | None], verify: bool = False) -> None:
        """Caches every audio file under `audio_dir` (see build and corpus.folder_corpus)."""
        self.build(folder_corpus(audio_dir), sample_rate, workers, variants, verify)

    def build(self, corpus: Corpus, sample_rate: int, workers: int, variants: list[Augmentation | None],
              verify: bool = False, shard: Shard | None = None) -> dict[str, list[str]]:
        """Caches every utterance of `corpus` (of `shard`, if given) not cached yet, in parallel; bad files are
        skipped and reported. With `verify`, damaged cached arrays are deleted first, so they are recomputed. A
        cache file that cannot be written (full disk) stops the build with a CacheError naming it, leaving every
        finished file in place and no temporary file. What is cached is found with os.scandir, so a re-run of a
        complete cache reads no audio and starts no process.

        Each variant (None: the clean file) is cached too: a speed change under the speaker `<speaker>~sp<f>`,
        noise as the utterance `<utterance>~noise<i>` of the same speaker. Returns the cached names afterwards (see
        cached_names).
        """
        logger.info('Corpus: %s%s.', corpus.description(), f', shard {shard}' if shard else '')
        self._prepare_cache_dir(corpus, shard)

        def owned(tmp: Path) -> bool:
            return shard is None or shard.holds(*owner(tmp))

        names, temps = self._scan()
        if removed := remove_orphans(filter(owned, temps)):
            logger.info('Removed %d temporary files of an interrupted build.', removed)
        if verify and self.remove_damaged(shard):
            names = self.cached_names()
        mine = [u for u in corpus.utterances if shard is None or shard.holds(u.speaker, u.name)]
        jobs = self._missing_jobs(mine, sample_rate, variants, names)
        logger.info('%d audio files, %d to compute.', len(mine), len(jobs))
        errors = list(corpus.skipped)
        if jobs:
            try:
                errors += self._compute(jobs, workers)
            finally:  # the pool's workers are gone: the temporary files of those stopped mid-write go too.
                remove_orphan_temp_files(self.cache_dir, '*/.*.tmp.npy', owned)
            names = self.cached_names()
        self._report_skipped(errors, shard)
        cached = {(folder, name[:-len('.npy')]) for folder, found in names.items() for name in found}
        if unusable := speakers_without_audio(mine, cached):
            logger.warning('%d speakers have no usable audio (every file of theirs is skipped, see the report): '
                           '%s; they are left out of the cache.', len(unusable), ', '.join(unusable[:10]) +
                           (', ...' if len(unusable) > 10 else ''))
        return names

    def _missing_jobs(self, utterances: list, sample_rate: int, variants: list[Augmentation | None],
                      names: dict[str, list[str]]) -> list[tuple[str, str, int, Augmentation | None]]:
        """The pool jobs (audio file, cache file, rate, variant) of the arrays not among the cached `names` yet;
        creates their folders."""
        cached = {folder: set(found) for folder, found in names.items()}
        jobs = []
        for utterance in utterances:
            for variant in variants:
                folder, name = self.cache_location(utterance.speaker, utterance.name, variant)
                if name not in cached.get(folder, ()):
                    jobs.append((utterance.path, str(self.cache_dir / folder / name), sample_rate, variant))
        for folder in {Path(job[1]).parent for job in jobs}:
            folder.mkdir(exist_ok=True)
        return jobs

    def _compute(self, jobs: list[tuple[str, str, int, Augmentation | None]], workers: int) -> list[str]:
        """Runs the jobs in a pool started once (forked when it can be, see worker_pool) in chunks; returns the
        skipped files' messages; CacheError at the first file that cannot be written."""
        workers = min(workers, len(jobs))
        chunk = max(1, min(MAX_CACHE_CHUNK, len(jobs) // (workers * CACHE_JOBS_PER_WORKER)))
        errors = []
        with worker_pool(workers) as pool:
            results = pool.imap_unordered(_cache_one, jobs, chunksize=chunk)
            for failure in tqdm(results, total=len(jobs), desc='Building fbank cache', unit='file'):
                if failure is not None and failure[0] == UNWRITABLE:
                    raise CacheError(failure[1])
                if failure is not None:
                    errors.append(failure[1])
        return errors

    def cache_location(self, speaker: str, utterance: str, variant: Augmentation | None) -> tuple[str, str]:
        """(cache folder, file name) of an utterance or of its augmented copy."""
        if variant is None:
            return speaker, f'{utterance}.npy'
        if variant.speed != 1.0:
            return f'{speaker}{variant.suffix}', f'{utterance}.npy'
        return speaker, f'{utterance}{variant.suffix}.npy'

    def cache_path(self, speaker: str, utterance: str, variant: Augmentation | None) -> Path:
        return self.cache_dir.joinpath(*self.cache_location(speaker, utterance, variant))

    def skipped_files_report(self, shard: Shard | None = None) -> Path:
        """skipped-files.txt of the working dir; one per part with --shard (parts may run at once)."""
        if shard is None:
            return self.working_dir.skipped_files_report
        return self.working_dir.root / SKIPPED_FILES_SHARD_REPORT.format(index=shard.index, count=shard.count)

    def _report_skipped(self, errors: list[str], shard: Shard | None) -> None:
        report = self.skipped_files_report(shard)
        if errors:
            report.write_text('\n'.join(sorted(errors)) + '\n')
            logger.warning('Skipped %d bad audio files, listed in %s.', len(errors), report)
        else:
            report.unlink(missing_ok=True)
