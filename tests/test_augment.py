"""Data augmentation: speed perturbation, additive white / pink / file noise at a chosen SNR, the cache variants
(`<speaker>~sp<f>` speakers, `<utterance>~noise<i>` files) and the train/test side of noisy copies."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import welch

import audio
from audio import Augmentation, add_noise, augment, augmentations, noise_signal, speed_perturb
from batcher import train_test_sources

SR = 16000
WORKERS = 2
UTTERANCES = ['3005-163389-0004', '3005-163389-0007', '367-130732-0000', '367-130732-0006']


def tone(frequency: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(signal: np.ndarray) -> float:
    """Frequency of the largest FFT bin (Hann window, 8x zero-padding: bins of SR / (8 * len) Hz)."""
    n = 8 * len(signal)
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal)), n))
    return float(np.argmax(spectrum) * SR / n)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    added = noisy.astype(np.float64) - clean.astype(np.float64)
    return float(10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added ** 2)))


def spectral_slope(signal: np.ndarray, low: float = 50.0, high: float = 6000.0) -> float:
    """Slope of log10 power against log10 frequency (Welch estimate) between `low` and `high` Hz, with power averaged
    in log-spaced bands so that every octave weighs the same."""
    frequencies, power = welch(signal, fs=SR, nperseg=4096)
    edges = np.geomspace(low, high, 25)
    centres, band_powers = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = (frequencies >= lo) & (frequencies < hi)
        if band.any():
            centres.append(np.sqrt(lo * hi))
            band_powers.append(power[band].mean())
    return float(np.polyfit(np.log10(centres), np.log10(band_powers), 1)[0])


# ------------------------------------------------------------------------------------------------- speed_perturb

@pytest.mark.parametrize('factor', [0.9, 1.1])
def test_speed_perturb_divides_the_length_by_the_factor(factor):
    signal = np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    out = speed_perturb(signal, factor)
    assert out.dtype == np.float32
    assert abs(len(out) - len(signal) / factor) <= 1


@pytest.mark.parametrize('factor', [0.9, 1.1])
@pytest.mark.parametrize('frequency', [440.0, 1000.0])
def test_speed_perturb_scales_a_tone_frequency_by_the_factor(factor, frequency):
    out = speed_perturb(tone(frequency), factor)
    assert peak_frequency(tone(frequency)) == pytest.approx(frequency, abs=1.0)
    assert peak_frequency(out) == pytest.approx(frequency * factor, abs=1.0)


# --------------------------------------------------------------------------------------------------------- noise

@pytest.mark.parametrize('target_snr', [0.0, 5.0, 12.3, 20.0, 35.0])
@pytest.mark.parametrize('kind', ['white', 'pink'])
def test_add_noise_reaches_the_requested_snr(target_snr, kind):
    rng = np.random.default_rng(1)
    clean = (tone(300.0) + 0.1 * rng.standard_normal(2 * SR)).astype(np.float32)
    noise = noise_signal(kind, len(clean), rng)
    noisy = add_noise(clean, noise, target_snr)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert snr_db(clean, noisy) == pytest.approx(target_snr, abs=0.01)
    # The added part is the noise, scaled: perfectly correlated with it.
    assert np.corrcoef(noisy.astype(np.float64) - clean, noise)[0, 1] > 0.9999


def test_add_noise_does_not_depend_on_the_noise_level():
    rng = np.random.default_rng(2)
    clean, noise = tone(500.0), rng.standard_normal(2 * SR).astype(np.float32)
    np.testing.assert_allclose(add_noise(clean, noise, 10.0), add_noise(clean, 100 * noise, 10.0), atol=1e-6)


@pytest.mark.parametrize('kind', ['white', 'pink'])
def test_noise_signal_has_the_requested_length_and_is_reproducible(kind):
    first = noise_signal(kind, 12345, np.random.default_rng(5))
    again = noise_signal(kind, 12345, np.random.default_rng(5))
    other = noise_signal(kind, 12345, np.random.default_rng(6))
    assert first.shape == (12345,) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_white_noise_has_a_flat_spectrum():
    slope = spectral_slope(noise_signal('white', 2 ** 17, np.random.default_rng(0)))
    assert -0.1 < slope < 0.1


def test_pink_noise_power_falls_as_one_over_frequency():
    slope = spectral_slope(noise_signal('pink', 2 ** 17, np.random.default_rng(0)))
    assert -1.3 < slope < -0.7
    # An octave apart, pink noise loses about half its power per hertz; white noise keeps it.
    pink = noise_signal('pink', 2 ** 17, np.random.default_rng(1))
    white = noise_signal('white', 2 ** 17, np.random.default_rng(1))
    for signal, expected in ((pink, 0.5), (white, 1.0)):
        frequencies, power = welch(signal, fs=SR, nperseg=4096)
        # Mean power per Hz of the octave 1-2 kHz over that of 0.5-1 kHz: for 1/f, (ln 2 / 1000) / (ln 2 / 500).
        ratio = (power[(frequencies >= 1000) & (frequencies < 2000)].mean()
                 / power[(frequencies >= 500) & (frequencies < 1000)].mean())
        assert ratio == pytest.approx(expected, rel=0.15)


def write_noise(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, SR, subtype='FLOAT')


def find_stretch(stretch: np.ndarray, source: np.ndarray) -> list[int]:
    """Every start in the endlessly repeated `source` at which `stretch` is found."""
    repeated = np.tile(source, len(stretch) // len(source) + 2)
    return [s for s in range(len(source)) if np.array_equal(repeated[s:s + len(stretch)], stretch)]


@pytest.mark.parametrize('length', [1000, 7999, 20000])  # shorter and longer than the 8000-sample file.
def test_noise_from_a_directory_is_a_stretch_of_the_file(tmp_path, length):
    samples = np.random.default_rng(3).uniform(-0.5, 0.5, 8000).astype(np.float32)
    write_noise(tmp_path / 'noise' / 'hum.wav', samples)
    seen_starts = set()
    for seed in range(4):
        stretch = noise_signal(str(tmp_path / 'noise'), length, np.random.default_rng(seed))
        assert stretch.shape == (length,)
        starts = find_stretch(stretch, samples)
        assert len(starts) == 1, f'seed {seed}: not a stretch of the noise file'
        seen_starts.add(starts[0])
    assert len(seen_starts) > 1  # a random stretch, not always the same one.


def test_noise_from_a_directory_of_several_files_comes_from_one_of_them(tmp_path):
    rng = np.random.default_rng(4)
    files = {name: rng.uniform(-0.5, 0.5, 3000 + 1000 * i).astype(np.float32)
             for i, name in enumerate(['a.wav', 'sub/b.wav', 'c.flac'])}
    for name, samples in files.items():
        if name.endswith('.flac'):
            (tmp_path / 'noise' / name).parent.mkdir(parents=True, exist_ok=True)
            sf.write(tmp_path / 'noise' / name, samples, SR, subtype='PCM_24')
            files[name] = sf.read(tmp_path / 'noise' / name, dtype='float32')[0]
        else:
            write_noise(tmp_path / 'noise' / name, samples)
    used = set()
    for seed in range(12):
        stretch = noise_signal(str(tmp_path / 'noise'), 2500, np.random.default_rng(seed))
        sources = [name for name, samples in files.items() if find_stretch(stretch, samples)]
        assert len(sources) == 1
        used.add(sources[0])
    assert len(used) >= 2


def test_silent_noise_file_raises(tmp_path):
    write_noise(tmp_path / 'noise' / 'silence.wav', np.zeros(4000, dtype=np.float32))
    with pytest.raises(audio.AudioError, match='silent noise file'):
        noise_signal(str(tmp_path / 'noise'), 1000, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------------- augment

def speech_like(seconds: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(9)
    return (tone(220.0, seconds) + tone(1300.0, seconds) * 0.3 + 0.05 * rng.standard_normal(int(seconds * SR))
            ).astype(np.float32)


@pytest.mark.parametrize('noise', ['white', 'pink'])
def test_augment_is_deterministic_for_the_same_seed_text(noise):
    clean = speech_like()
    variant = Augmentation('~noise0', noise=noise, snr_range=(5.0, 20.0))
    first = augment(clean, variant, 'spk/utt.flac~noise0')
    np.testing.assert_array_equal(first, augment(clean, variant, 'spk/utt.flac~noise0'))
    other = augment(clean, variant, 'spk/other.flac~noise0')
    assert not np.allclose(first, other)
    assert first.shape == clean.shape
    for noisy in (first, other):
        assert 5.0 - 0.01 <= snr_db(clean, noisy) <= 20.0 + 0.01


def test_augment_draws_the_snr_from_the_range():
    clean = speech_like(0.5)
    variant = Augmentation('~noise0', noise='white', snr_range=(5.0, 20.0))
    snrs = [snr_db(clean, augment(clean, variant, f'file{i}')) for i in range(40)]
    assert all(5.0 - 0.01 <= s <= 20.0 + 0.01 for s in snrs)
    assert max(snrs) - min(snrs) > 7.5  # spread over the range, not a constant.
    fixed = Augmentation('~noise0', noise='white', snr_range=(12.0, 12.0))
    assert snr_db(clean, augment(clean, fixed, 'x')) == pytest.approx(12.0, abs=0.01)


def test_augment_speed_only_is_speed_perturb_and_noise_follows_the_speed_change():
    clean = speech_like()
    np.testing.assert_array_equal(augment(clean, Augmentation('~sp1.1', speed=1.1), 'a'), speed_perturb(clean, 1.1))
    both = augment(clean, Augmentation('~x', speed=0.9, noise='white', snr_range=(10.0, 10.0)), 'a')
    slowed = speed_perturb(clean, 0.9)
    assert both.shape == slowed.shape
    assert snr_db(slowed, both) == pytest.approx(10.0, abs=0.01)
    np.testing.assert_array_equal(augment(clean, Augmentation('~none'), 'a'), clean)


def test_augmentations_lists_the_variants():
    variants = augmentations(True, ['white'], (5, 20))
    assert [v.suffix for v in variants] == ['~sp0.9', '~sp1.1', '~noise0']
    assert [v.speed for v in variants] == [0.9, 1.1, 1.0]
    assert [v.noise for v in variants] == [None, None, 'white']
    assert variants[2].snr_range == (5, 20)
    assert augmentations(False, [], (5, 20)) == []
    two = augmentations(False, ['pink', '/data/musan/noise'], (0, 10))
    assert [(v.suffix, v.noise, v.speed) for v in two] == [('~noise0', 'pink', 1.0),
                                                           ('~noise1', '/data/musan/noise', 1.0)]


# ----------------------------------------------------------------------------------------------- cached variants

def stamps(paths):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope='module')
def augmented_cache(tmp_path_factory, copy_librispeech):
    root = tmp_path_factory.mktemp('augmented')
    audio_dir, cache_dir = root / 'audio', root / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES)
    variants = augmentations(True, ['white'], (5.0, 20.0))
    cache = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS, variants=variants)
    return audio_dir, cache_dir, files, variants, cache


def test_cache_holds_speed_speakers_and_noisy_utterances(augmented_cache):
    _, cache_dir, files, _, cache = augmented_cache
    fbanks = cache_dir / 'audio-fbanks'
    speakers = ['3005', '367']
    expected = set()
    for f in files:
        speaker, name = f.name.split('-')[0], f'{f.parent.name}%2F{f.name}'
        expected |= {f'{speaker}/{name}.npy', f'{speaker}/{name}~noise0.npy', f'{speaker}~sp0.9/{name}.npy',
                     f'{speaker}~sp1.1/{name}.npy'}
    assert {str(p.relative_to(fbanks)) for p in fbanks.rglob('*.npy')} == expected
    assert cache.speaker_ids == sorted(speakers + [f'{s}~sp{f}' for s in speakers for f in (0.9, 1.1)])
    assert sorted(cache.speakers_to_utterances['3005']) == [
        '163389%2F3005-163389-0004.flac', '163389%2F3005-163389-0004.flac~noise0',
        '163389%2F3005-163389-0007.flac', '163389%2F3005-163389-0007.flac~noise0']
    assert not (cache_dir / 'skipped-files.txt').exists()


def test_cached_variants_equal_read_mfcc_with_the_augmentation(augmented_cache):
    _, cache_dir, files, variants, cache = augmented_cache
    fbanks = cache_dir / 'audio-fbanks'
    audio_file = files[0]
    speaker, stem = audio_file.name.split('-')[0], f'{audio_file.parent.name}%2F{audio_file.name}'
    clean = np.load(fbanks / speaker / f'{stem}.npy')
    noisy = np.load(fbanks / speaker / f'{stem}~noise0.npy')
    assert noisy.shape == clean.shape and noisy.dtype == np.float32
    assert np.abs(noisy - clean).mean() > 0.01
    # Computed again in this process: the worker's noise was seeded by the file name, not by process state.
    np.testing.assert_allclose(noisy, audio.read_mfcc(str(audio_file), augmentation=variants[2]), atol=1e-5)
    for variant, factor in zip(variants[:2], (0.9, 1.1), strict=True):
        sped = np.load(fbanks / f'{speaker}~sp{factor}' / f'{stem}.npy')
        assert abs(len(sped) - len(clean) / factor) <= 3
        np.testing.assert_allclose(sped, audio.read_mfcc(str(audio_file), augmentation=variant), atol=1e-5)


def test_rebuilding_the_augmented_cache_does_no_work(augmented_cache):
    audio_dir, cache_dir, _, variants, _ = augmented_cache
    files = sorted(p for p in (cache_dir / 'audio-fbanks').rglob('*') if p.is_file())
    before = stamps(files)
    assert len(before) == 16 + 1  # and the cache-format file.
    again = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS, variants=variants)
    assert stamps(sorted(p for p in (cache_dir / 'audio-fbanks').rglob('*') if p.is_file())) == before
    assert sum(len(u) for u in again.speakers_to_utterances.values()) == 16


def test_noisy_copies_of_the_cache_stay_beside_their_clean_utterance(augmented_cache):
    _, _, _, _, cache = augmented_cache
    for speaker, utterances in cache.speakers_to_utterances.items():
        train, test = train_test_sources(list(utterances.values()))
        for side, other in ((train, test), (test, train)):
            clean_names = {s.path.stem for s in side if '~' not in s.path.stem}
            for source in side:
                assert source.path.stem.split('~')[0] in clean_names, speaker
            assert not {s.path.stem.split('~')[0] for s in other} & clean_names


def test_noisy_copies_go_to_the_side_of_their_clean_utterance(tmp_path):
    paths = []
    for i in range(5):
        for suffix in ('', '~noise0', '~noise1'):
            path = tmp_path / f'utt-{i:02d}{suffix}.npy'
            np.save(path, np.zeros((200, 64), dtype=np.float32))
            paths.append(path)
    order = np.random.default_rng(0).permutation(len(paths))
    train, test = train_test_sources([paths[i] for i in order])
    train_groups = {s.path.stem.split('~')[0] for s in train}
    test_groups = {s.path.stem.split('~')[0] for s in test}
    # 5 clean utterances, 80 % for training: the first 4 with all their copies, the last with its copies.
    assert train_groups == {f'utt-{i:02d}' for i in range(4)} and test_groups == {'utt-04'}
    assert len(train) == 12 and len(test) == 3
    assert all(s.start == 0 and s.end is None for s in train + test)


def test_a_lone_utterance_and_its_noisy_copy_are_split_in_time_alike(tmp_path):
    paths = [tmp_path / 'only.npy', tmp_path / 'only~noise0.npy']
    for path in paths:
        np.save(path, np.zeros((100, 64), dtype=np.float32))
    train, test = train_test_sources(paths)
    assert sorted((s.path.name, s.start, s.end) for s in train) == [('only.npy', 0, 80), ('only~noise0.npy', 0, 80)]
    assert sorted((s.path.name, s.start, s.end) for s in test) == [('only.npy', 80, None),
                                                                   ('only~noise0.npy', 80, None)]
