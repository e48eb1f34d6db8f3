"""Channel augmentation (audio.py, build-mfcc-cache --augment): synthetic room responses of the asked RT60,
the telephone band and mu-law codec, babble of other speakers' utterances and white noise at the drawn SNR, seeded
determinism, and the cached copies."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.signal import welch

from audio import (
    Augmentation,
    augment,
    augmentations,
    babble,
    babble_talkers,
    mu_law,
    read_audio,
    synthetic_rir,
    telephone,
    trim_silence,
)
from cli import cli
from constants import BABBLE_TALKERS, CHANNEL_SNR_RANGE_DB
from features import AudioError

SR = 16000
# Two utterances of each of four speakers of samples/LibriSpeech/test-other (short ones).
UTTERANCES = ['3005-163389-0004', '3005-163389-0007', '367-130732-0000', '367-130732-0006', '1688-142285-0000',
              '1688-142285-0001', '2414-128291-0003', '2414-128291-0009']


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    added = noisy.astype(np.float64) - clean.astype(np.float64)
    return float(10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added ** 2)))


def measured_rt60(rir: np.ndarray) -> float:
    """RT60 from Schroeder's backward-integrated energy decay: the -5 to -25 dB slope (T20) extrapolated to 60 dB."""
    energy = np.cumsum((rir.astype(np.float64) ** 2)[::-1])[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    fit = (decay_db <= -5) & (decay_db >= -25)
    slope = np.polyfit(np.flatnonzero(fit) / SR, decay_db[fit], 1)[0]  # dB per second.
    return float(-60 / slope)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory, copy_librispeech) -> tuple[Path, list[Path]]:
    audio_dir = tmp_path_factory.mktemp('channels') / 'audio'
    return audio_dir, copy_librispeech(audio_dir, UTTERANCES)


@pytest.fixture(scope='module')
def speech(corpus) -> np.ndarray:
    return trim_silence(read_audio(str(corpus[1][0]), SR), 'speech')


@pytest.mark.parametrize('rt60', [0.3, 0.8])
def test_synthetic_room_response_decays_60_db_in_the_asked_time(rt60):
    rir = synthetic_rir(rt60, np.random.default_rng(0))
    assert rir.dtype == np.float32 and len(rir) == int(rt60 * SR)
    assert np.sum(rir.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert np.argmax(np.abs(rir)) == 0  # the direct path comes first.
    assert measured_rt60(rir) == pytest.approx(rt60, rel=0.1)


def test_telephone_band_suppresses_energy_above_3400_hz_and_below_300_hz():
    noise = np.random.default_rng(1).standard_normal(2 * SR).astype(np.float32) * 0.1
    out = telephone(noise, -10.0)
    assert out.shape == noise.shape and out.dtype == np.float32
    frequencies, power = welch(out, fs=SR, nperseg=1024)
    passband = power[(frequencies >= 500) & (frequencies <= 3000)].mean()
    assert 10 * np.log10(power[frequencies >= 3700].mean() / passband) < -30
    assert 10 * np.log10(power[(frequencies > 0) & (frequencies <= 120)].mean() / passband) < -20
    frequencies, clean_power = welch(noise, fs=SR, nperseg=1024)
    assert 10 * np.log10(clean_power[frequencies >= 3700].mean() / clean_power[(frequencies >= 500) &
                                                                               (frequencies <= 3000)].mean()) > -3


def test_mu_law_has_256_levels_and_keeps_the_signal_within_half_a_companded_step():
    x = np.linspace(-1, 1, 200001)
    coded = mu_law(x)
    assert len(np.unique(np.round(coded, 9))) == 256

    def compand(v):
        return np.sign(v) * np.log1p(255 * np.abs(v)) / np.log(256)

    assert np.max(np.abs(compand(coded) - compand(x))) <= 1 / 255 + 1e-9  # levels 2/255 apart.
    assert np.max(np.abs(coded - x)) > 1e-3  # it does quantise.


def test_babble_is_other_speakers_at_the_drawn_snr(corpus, speech):
    audio_dir, files = corpus
    rng = np.random.default_rng(2)
    talkers = babble_talkers(str(files[0]), str(audio_dir), rng)
    assert BABBLE_TALKERS[0] <= len(talkers) <= BABBLE_TALKERS[1]
    own = {len(trim_silence(read_audio(str(f), SR), 'x')) for f in files[:2]}  # speaker 3005's utterances.
    assert not own & {len(t) for t in talkers}
    mixed = babble(len(speech), talkers, rng)
    assert mixed.shape == speech.shape
    variant = Augmentation('~babble', channel='babble', source_dir=str(audio_dir), snr_range=CHANNEL_SNR_RANGE_DB)
    snrs = [snr_db(speech, augment(speech, variant, f'{files[0]}~babble{i}', source_file=str(files[0])))
            for i in range(3)]
    assert all(CHANNEL_SNR_RANGE_DB[0] - 0.01 <= s <= CHANNEL_SNR_RANGE_DB[1] + 0.01 for s in snrs)
    fixed = variant._replace(snr_range=(9.0, 9.0))
    assert snr_db(speech, augment(speech, fixed, 'x', source_file=str(files[0]))) == pytest.approx(9.0, abs=0.01)


def test_babble_needs_another_speaker(corpus, tmp_path, copy_librispeech):
    alone = copy_librispeech(tmp_path, UTTERANCES[:2])
    with pytest.raises(AudioError, match='no speaker but 3005'):
        babble_talkers(str(alone[0]), str(tmp_path), np.random.default_rng(0))


@pytest.mark.parametrize('channel', ['reverb', 'telephone', 'babble', 'white'])
def test_each_channel_is_seeded_by_the_file_name(corpus, speech, channel):
    audio_dir, files = corpus
    variant = next(v for v in augmentations(False, [], (5, 20), [channel], str(audio_dir)))
    assert variant.suffix == f'~{channel}'
    first = augment(speech, variant, f'{files[0]}~{channel}', source_file=str(files[0]))
    again = augment(speech, variant, f'{files[0]}~{channel}', source_file=str(files[0]))
    other = augment(speech, variant, f'{files[1]}~{channel}', source_file=str(files[0]))
    np.testing.assert_array_equal(first, again)
    assert first.shape == speech.shape and not np.allclose(first, other) and not np.allclose(first, speech)
    if channel == 'white':
        assert CHANNEL_SNR_RANGE_DB[0] - 0.01 <= snr_db(speech, first) <= CHANNEL_SNR_RANGE_DB[1] + 0.01
    if channel == 'reverb':  # the reverberant copy keeps the loudness.
        assert np.mean(first ** 2) == pytest.approx(np.mean(speech ** 2), rel=1e-3)


def test_build_mfcc_cache_augment_caches_a_copy_per_channel(corpus, tmp_path):
    audio_dir, files = corpus
    result = CliRunner().invoke(cli, ['build-mfcc-cache', '--working_dir', str(tmp_path), '--audio_dir',
                                      str(audio_dir), '--augment', 'telephone,babble', '--workers', '1'])
    assert result.exit_code == 0, result.output
    cached = sorted(p.name for p in (tmp_path / 'audio-fbanks' / '3005').glob('*.npy'))
    assert cached == sorted(f'163389%2F{f.name}{suffix}.npy' for f in files[:2] for suffix in
                            ('', '~telephone', '~babble'))
    bad = CliRunner().invoke(cli, ['build-mfcc-cache', '--working_dir', str(tmp_path), '--audio_dir',
                                   str(audio_dir), '--augment', 'reverb,echo'])
    assert bad.exit_code == 1
    assert bad.stderr.startswith('Error: --augment reverb,echo: expected a comma-separated list of reverb, '
                                 'telephone, babble, white, each once.')
