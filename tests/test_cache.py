"""audio.Audio: the per-utterance fbank cache built with a real (spawn) process pool from real files."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import audio

WORKERS = 2
# Three speakers, two short utterances each, in the LibriSpeech layout.
UTTERANCES = ['1688-142285-0002', '1688-142285-0009', '3005-163389-0004', '3005-163389-0007',
              '367-130732-0000', '367-130732-0006']
SPEAKERS = ['1688', '3005', '367']


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / 'audio-fbanks').rglob('*.npy'))


def stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """(inode, mtime in ns) of each file: a rewrite through os.replace changes both."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def utterance_name(audio_file: Path) -> str:
    """LibriSpeech speaker/chapter/utt.flac: the utterance is cached as 'chapter%2Futt.flac'."""
    return f'{audio_file.parent.name}%2F{audio_file.name}'


def expected_cache_path(cache_dir: Path, audio_file: Path) -> Path:
    speaker = audio_file.name.split('-')[0]
    return cache_dir / 'audio-fbanks' / speaker / f'{utterance_name(audio_file)}.npy'


@pytest.fixture(scope='module')
def built(tmp_path_factory, copy_librispeech):
    """A cache built once from the small tree: (audio_dir, cache_dir, copied files, Audio)."""
    root = tmp_path_factory.mktemp('cache')
    audio_dir, cache_dir = root / 'audio', root / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES)
    return audio_dir, cache_dir, files, audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)


def test_one_npy_per_utterance_equal_to_read_mfcc(built):
    _, cache_dir, files, _ = built
    assert cache_files(cache_dir) == sorted(expected_cache_path(cache_dir, f) for f in files)
    for audio_file in files:
        cached = np.load(expected_cache_path(cache_dir, audio_file))
        expected = audio.read_mfcc(str(audio_file))
        assert cached.dtype == np.float32
        np.testing.assert_array_equal(cached, expected)


def test_speaker_index(built):
    _, cache_dir, files, cache = built
    assert cache.speaker_ids == sorted(SPEAKERS)
    expected = {}
    for audio_file in files:
        speaker = audio_file.name.split('-')[0]
        expected.setdefault(speaker, {})[utterance_name(audio_file)] = expected_cache_path(cache_dir, audio_file)
    assert cache.speakers_to_utterances == expected
    # Reading the cache without an audio_dir gives the same index.
    assert audio.Audio(str(cache_dir)).speakers_to_utterances == expected


def test_no_temporary_files_and_no_skipped_report_after_a_clean_build(built):
    _, cache_dir, _, _ = built
    leftovers = [p for p in cache_dir.rglob('*') if p.name.startswith('.')]
    assert leftovers == []
    assert not (cache_dir / 'skipped-files.txt').exists()


def test_second_run_does_no_work(tmp_path, copy_librispeech):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    copy_librispeech(audio_dir, UTTERANCES[:4])
    audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    before = stamps(cache_files(cache_dir))
    assert len(before) == 4
    again = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert stamps(cache_files(cache_dir)) == before
    assert again.speaker_ids == ['1688', '3005']


def test_resume_recreates_only_the_missing_file(tmp_path, copy_librispeech):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES[:4])
    audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    victim = expected_cache_path(cache_dir, files[2])
    victim.unlink()
    others = stamps(cache_files(cache_dir))
    assert victim not in others and len(others) == 3
    cache = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert victim.exists()
    np.testing.assert_array_equal(np.load(victim), audio.read_mfcc(str(files[2])))
    assert stamps(list(others)) == others
    assert utterance_name(files[2]) in cache.speakers_to_utterances['3005']


def test_plain_speaker_utterance_wav_layout(tmp_path, librispeech_dir):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    sources = {'alice': ['1688-142285-0002', '1688-142285-0009'], 'bob': ['367-130732-0006']}
    written = {}
    for speaker, names in sources.items():
        (audio_dir / speaker).mkdir(parents=True)
        for i, name in enumerate(names):
            spk, chapter, _ = name.split('-')
            signal, rate = sf.read(librispeech_dir / spk / chapter / f'{name}.flac', dtype='int16')
            target = audio_dir / speaker / f'utt{i}.wav'
            sf.write(target, signal, rate, subtype='PCM_16')
            written[target] = librispeech_dir / spk / chapter / f'{name}.flac'
    cache = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert cache.speaker_ids == ['alice', 'bob']
    assert sorted(cache.speakers_to_utterances['alice']) == ['utt0.wav', 'utt1.wav']
    assert sorted(cache.speakers_to_utterances['bob']) == ['utt0.wav']
    for wav, flac in written.items():
        cached = np.load(cache_dir / 'audio-fbanks' / wav.parent.name / f'{wav.name}.npy')
        # Same 16-bit samples as the LibriSpeech flac: same features.
        np.testing.assert_array_equal(cached, audio.read_mfcc(str(flac)))


def test_bad_file_is_skipped_and_reported(tmp_path, copy_librispeech):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES[:4])
    bad = audio_dir / '1688' / '142285' / '1688-142285-9999.flac'
    bad.write_text('not audio at all\n' * 20)
    cache = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert cache_files(cache_dir) == sorted(expected_cache_path(cache_dir, f) for f in files)
    assert utterance_name(bad) not in cache.speakers_to_utterances['1688']
    report = (cache_dir / 'skipped-files.txt').read_text().splitlines()
    assert len(report) == 1
    assert str(bad) in report[0]
    assert [p for p in cache_dir.rglob('*') if p.name.startswith('.')] == []
    # Once the bad file is gone, a clean run removes the report.
    bad.unlink()
    audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert not (cache_dir / 'skipped-files.txt').exists()


def test_missing_audio_dir_raises_naming_it(tmp_path):
    missing = tmp_path / 'no-such-dir'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        audio.Audio(str(tmp_path / 'wd'), str(missing), workers=WORKERS)


def test_audio_dir_without_audio_raises_naming_it(tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'speaker').mkdir(parents=True)
    (empty / 'speaker' / 'readme.txt').write_text('no audio here')
    with pytest.raises(FileNotFoundError, match=str(empty)):
        audio.Audio(str(tmp_path / 'wd'), str(empty), workers=WORKERS)


def test_new_files_are_added_to_an_existing_cache(tmp_path, copy_librispeech):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    copy_librispeech(audio_dir, UTTERANCES[:2])
    audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    first = stamps(cache_files(cache_dir))
    added = copy_librispeech(audio_dir, UTTERANCES[4:])
    cache = audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert cache.speaker_ids == ['1688', '367']
    assert stamps(list(first)) == first
    for audio_file in added:
        np.testing.assert_array_equal(np.load(expected_cache_path(cache_dir, audio_file)),
                                      audio.read_mfcc(str(audio_file)))
    shutil.rmtree(audio_dir)  # the cache stands on its own.
    assert audio.Audio(str(cache_dir)).speaker_ids == ['1688', '367']


def test_file_outside_a_speaker_folder_is_skipped_with_the_expected_layout(tmp_path, copy_librispeech):
    audio_dir, cache_dir = tmp_path / 'audio', tmp_path / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES[:2])
    loose = audio_dir / 'loose.flac'
    loose.write_bytes(files[0].read_bytes())
    audio.Audio(str(cache_dir), str(audio_dir), workers=WORKERS)
    assert cache_files(cache_dir) == sorted(expected_cache_path(cache_dir, f) for f in files)
    report = (cache_dir / 'skipped-files.txt').read_text().splitlines()
    assert len(report) == 1 and str(loose) in report[0]
    assert 'speaker/utterance.wav' in report[0] and 'speaker/chapter/utterance.flac' in report[0]
