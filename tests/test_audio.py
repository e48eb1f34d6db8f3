"""audio.py: reading, resampling, silence trimming, fbank features and the errors of bad files.

Reference features come from python_speech_features.fbank itself, normalised per frame in the test."""

from pathlib import Path

import numpy as np
import pytest
import python_speech_features
import soundfile as sf

import audio

SR = 16000
UTTERANCE = ('1688', '142285', '1688-142285-0002')  # 2.8 s of real speech.


def reference_normalise(features: np.ndarray) -> np.ndarray:
    """Plain per-frame (v - mean) / max(std, 1e-12), in float64."""
    features = np.asarray(features, dtype=np.float64)
    out = np.empty_like(features)
    for i, row in enumerate(features):
        out[i] = (row - row.mean()) / max(row.std(), 1e-12)
    return out


def reference_fbank(signal: np.ndarray) -> np.ndarray:
    energies, _ = python_speech_features.fbank(np.asarray(signal, dtype=np.float64), samplerate=SR, nfilt=64)
    return energies


def assert_fbank_close(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """Relative tolerance per value, plus the same tolerance relative to the frame's largest energy: the module
    computes in float32, so the faint bins of a frame carry float32 rounding of the frame's total energy."""
    assert got.shape == expected.shape
    frame_scale = np.abs(expected).max(axis=1, keepdims=True)
    excess = np.abs(got - expected) - (rtol * np.abs(expected) + rtol * frame_scale)
    assert excess.max() <= 0, f'{int((excess > 0).sum())} values off by more than rtol={rtol}'


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * rate))) / rate)).astype(np.float32)


@pytest.fixture(scope='module')
def speech_file(librispeech_dir: Path) -> Path:
    speaker, chapter, name = UTTERANCE
    return librispeech_dir / speaker / chapter / f'{name}.flac'


@pytest.fixture(scope='module')
def speech(speech_file: Path) -> np.ndarray:
    signal, rate = sf.read(speech_file, dtype='float32')
    assert rate == SR
    return signal


# ---------------------------------------------------------------- features against python_speech_features


def test_fbank_equals_python_speech_features(speech):
    expected = reference_fbank(speech)
    got = audio.fbank(speech)
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (1 + int(np.ceil((len(speech) - 400) / 160)), 64)
    assert_fbank_close(got, expected)


def test_mfcc_fbank_equals_normalised_python_speech_features(speech):
    expected = reference_normalise(reference_fbank(speech))
    got = audio.mfcc_fbank(speech)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    # Normalised values are O(1); atol covers the entries that land next to 0 where rtol alone means nothing.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('num_samples', [400, 401, 560, 561, 1000, 16000])
def test_fbank_frame_count_and_padding_match_python_speech_features(num_samples):
    signal = np.random.default_rng(num_samples).uniform(-0.5, 0.5, num_samples).astype(np.float32)
    expected = reference_fbank(signal)
    got = audio.fbank(signal)
    assert_fbank_close(got, expected)


def test_normalize_frames_on_hand_computed_rows():
    features = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    got = audio.normalize_frames(features)
    std = np.sqrt(1.25)  # population std of 1, 2, 3, 4 (mean 2.5).
    np.testing.assert_allclose(got[0], [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std])
    np.testing.assert_array_equal(got[1], [0.0, 0.0, 0.0, 0.0])  # std floored at epsilon: no division by zero.


def test_read_mfcc_is_normalised_fbank_of_the_trimmed_file(speech_file, speech):
    got = audio.read_mfcc(str(speech_file))
    assert got.dtype == np.float32
    assert got.ndim == 2 and got.shape[1] == 64
    np.testing.assert_allclose(got.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(got.std(axis=1), 1.0, atol=1e-4)
    # The documented trimming rule, written out: keep from the first to the last sample louder than the
    # 95th percentile of |x| (the original Deep Speaker slice, last index excluded).
    energy = np.abs(speech)
    loud = np.flatnonzero(energy > np.percentile(energy, 95))
    trimmed = speech[loud[0]:loud[-1]]
    assert len(trimmed) < len(speech)
    expected = reference_normalise(reference_fbank(trimmed))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reading and resampling


@pytest.mark.parametrize('rate', [48000, 44100, 8000])
def test_read_audio_resamples_to_16k(tmp_path, rate):
    seconds = 1.0
    path = tmp_path / f'tone-{rate}.wav'
    sf.write(path, sine(440.0, seconds, rate), rate, subtype='FLOAT')
    got = audio.read_audio(str(path))
    assert got.dtype == np.float32
    assert got.ndim == 1
    assert abs(len(got) - seconds * rate * SR / rate) <= 3
    # Away from the edges the resampled tone is the same tone sampled at 16 kHz.
    expected = sine(440.0, seconds, SR)
    middle = slice(1000, 15000)
    np.testing.assert_allclose(got[middle], expected[middle], atol=2e-3)


def test_read_audio_resamples_real_48k_speech(samples_dir):
    path = samples_dir / 'PhilippeRemy' / 'PhilippeRemy_001.wav'
    info = sf.info(path)
    assert info.samplerate == 48000
    got = audio.read_audio(str(path))
    assert abs(len(got) - info.frames / 3) <= 3
    assert np.abs(got).max() > 0.01  # speech, not silence.


def test_read_audio_keeps_16k_samples_unchanged(speech_file, speech):
    got = audio.read_audio(str(speech_file))
    np.testing.assert_array_equal(got, speech)


def test_stereo_with_identical_channels_reads_as_the_mono_file(tmp_path):
    signal = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
    sf.write(tmp_path / 'mono.wav', signal, SR, subtype='PCM_16')
    sf.write(tmp_path / 'stereo.wav', np.stack([signal, signal], axis=1), SR, subtype='PCM_16')
    mono = audio.read_audio(str(tmp_path / 'mono.wav'))
    stereo = audio.read_audio(str(tmp_path / 'stereo.wav'))
    assert stereo.shape == mono.shape == (8000,)
    np.testing.assert_array_equal(stereo, mono)


def test_stereo_channels_are_averaged(tmp_path):
    left = np.random.default_rng(1).uniform(-0.5, 0.5, 4000).astype(np.float32)
    right = np.random.default_rng(2).uniform(-0.5, 0.5, 4000).astype(np.float32)
    sf.write(tmp_path / 'stereo.wav', np.stack([left, right], axis=1), SR, subtype='FLOAT')
    got = audio.read_audio(str(tmp_path / 'stereo.wav'))
    np.testing.assert_allclose(got, (left.astype(np.float64) + right) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(('subtype', 'tolerance'), [('PCM_24', 2.0 ** -23), ('FLOAT', 0.0), ('PCM_16', 2.0 ** -15)])
def test_read_audio_wav_subtypes(tmp_path, subtype, tolerance):
    signal = np.random.default_rng(3).uniform(-0.9, 0.9, 3000).astype(np.float32)
    path = tmp_path / f'{subtype}.wav'
    sf.write(path, signal, SR, subtype=subtype)
    assert sf.info(path).subtype == subtype
    got = audio.read_audio(str(path))
    assert got.dtype == np.float32
    assert got.shape == signal.shape
    np.testing.assert_allclose(got, signal, rtol=0, atol=tolerance)


# ---------------------------------------------------------------- silence trimming


def test_trim_silence_drops_leading_and_trailing_zeros():
    tone = sine(200.0, 1.0, SR)  # 80-sample period.
    padded = np.concatenate([np.zeros(SR, np.float32), tone, np.zeros(SR, np.float32)])
    got = audio.trim_silence(padded)
    period = SR // 200
    assert len(tone) - 2 * period <= len(got) <= len(tone)
    assert got[0] != 0 and got[-1] != 0
    # It is a contiguous slice of the tone itself: none of the padding is left.
    start = np.flatnonzero(padded == got[0])
    start = [s for s in start if np.array_equal(padded[s:s + len(got)], got)]
    assert len(start) == 1
    assert SR <= start[0] and start[0] + len(got) <= SR + len(tone)


def test_trim_silence_drops_zeros_around_a_clipped_signal():
    # A hard-clipped tone: most of its samples sit at the same |amplitude|, as in a clipped recording.
    tone = np.clip(sine(200.0, 1.0, SR, amplitude=1.0), -0.5, 0.5)
    padded = np.concatenate([np.zeros(SR, np.float32), tone, np.zeros(SR, np.float32)])
    got = audio.trim_silence(padded)
    assert len(got) <= len(tone)
    assert got[0] != 0 and got[-1] != 0


def test_trim_silence_of_silence_raises():
    with pytest.raises(audio.AudioError, match='silent'):
        audio.trim_silence(np.zeros(1000, np.float32), 'some/file.wav')


# ---------------------------------------------------------------- bad files


def assert_audio_error_names(path: Path) -> None:
    with pytest.raises(audio.AudioError) as error:
        audio.read_mfcc(str(path))
    assert str(path) in str(error.value)


def test_corrupt_bytes_raise_audio_error(tmp_path):
    path = tmp_path / 'corrupt.wav'
    path.write_bytes(np.random.default_rng(4).bytes(5000))
    assert_audio_error_names(path)


def test_truncated_flac_raises_audio_error(tmp_path, speech_file):
    path = tmp_path / 'truncated.flac'
    data = speech_file.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert_audio_error_names(path)


def test_zero_length_flac_raises_audio_error(tmp_path):
    path = tmp_path / 'empty.flac'
    path.write_bytes(b'')
    assert_audio_error_names(path)


def test_text_file_named_flac_raises_audio_error(tmp_path):
    path = tmp_path / 'notes.flac'
    path.write_text('this is not audio\n' * 50)
    assert_audio_error_names(path)


def test_silent_wav_raises_audio_error(tmp_path):
    path = tmp_path / 'silent.wav'
    sf.write(path, np.zeros(SR, np.float32), SR)
    assert_audio_error_names(path)


def test_wav_without_samples_raises_audio_error(tmp_path):
    path = tmp_path / 'no-samples.wav'
    sf.write(path, np.zeros(0, np.float32), SR)
    assert sf.info(path).frames == 0
    assert_audio_error_names(path)


def test_file_shorter_than_one_frame_raises_audio_error(tmp_path):
    path = tmp_path / 'short.wav'
    sf.write(path, np.random.default_rng(5).uniform(-0.5, 0.5, 100), SR)
    assert_audio_error_names(path)


def test_float_wav_with_nan_samples_is_refused_or_gives_finite_features(tmp_path):
    signal = sine(440.0, 1.0, SR)
    signal[5000] = np.nan
    path = tmp_path / 'nan.wav'
    sf.write(path, signal, SR, subtype='FLOAT')
    assert np.isnan(sf.read(path, dtype='float32')[0]).any()  # the file really holds a NaN.
    # Either the file is refused, or its features are finite: NaN features must never reach the cache.
    try:
        features = audio.read_mfcc(str(path))
    except audio.AudioError as error:
        assert str(path) in str(error)
    else:
        assert np.isfinite(features).all(), f'{int(np.isnan(features).sum())} NaN features from {path}'


def test_ten_minute_file_keeps_memory_bounded(tmp_path):
    """A 10-minute file: features come out whole, and the peak of numpy allocations stays within a few copies of
    the audio (all the frames' spectra at once, the unbounded way, would take 247 MB alone)."""
    import tracemalloc

    samples = 16000 * 600
    signal = (0.1 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32)
    path = tmp_path / 'long.wav'
    sf.write(path, signal, 16000, subtype='PCM_16')
    tracemalloc.start()
    try:
        features = audio.read_mfcc(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert features.shape[1] == 64 and abs(len(features) - samples / 160) < 5
    assert peak < 5.5 * signal.nbytes, f'{peak / 1e6:.0f} MB'
