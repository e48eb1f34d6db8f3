"""The feature cache on real corpus layouts and real failures: names that never collide (VoxCeleb, LibriSpeech,
plain and deeper trees), no trace of a failed run, a full disk, damaged cache arrays, a fuzz battery of bad audio
files through the real (spawn) pool, and arrays loaded without pickle."""

import os
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import audio
from batcher import KerasFormatConverter

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
TIMEOUT = 120
UTTERANCES = ['1688-142285-0002', '1688-142285-0009', '3005-163389-0004', '3005-163389-0007',
              '367-130732-0000', '367-130732-0006']


def cli(*args, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'cli.py', *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=preexec_fn)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with a last stderr line `Error: ...` holding every fragment, and no traceback."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('Error: '), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def npy_files(working_dir: Path) -> list[Path]:
    return sorted((working_dir / 'audio-fbanks').glob('*/*.npy'))


def temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob('.*') if p.is_file())


def speech(librispeech_dir: Path, utterance_id: str) -> tuple[np.ndarray, int]:
    speaker, chapter, _ = utterance_id.split('-')
    return sf.read(librispeech_dir / speaker / chapter / f'{utterance_id}.flac', dtype='int16')


def write_tree(audio_dir: Path, librispeech_dir: Path, layout: dict[str, str]) -> dict[Path, str]:
    """Writes each relative path of `layout` (.wav or .flac) with the samples of a LibriSpeech utterance; returns
    {written path: source utterance id}."""
    written = {}
    for relative, utterance_id in layout.items():
        target = audio_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        signal, rate = speech(librispeech_dir, utterance_id)
        sf.write(target, signal, rate, subtype='PCM_16')
        written[target] = utterance_id
    return written


def test_same_named_utterances_of_real_layouts_are_all_cached_apart(tmp_path, librispeech_dir):
    layout = {  # VoxCeleb 1/2: speaker/video/utterance.wav, same utterance names in two videos.
        'id10001/1zcIwhmdeo4/00001.wav': UTTERANCES[0], 'id10001/7gWzIy6yIIk/00001.wav': UTTERANCES[1],
        'id10002/xTV-jFAUKcw/00001.wav': UTTERANCES[2],
        # A wav and a flac of one name; names with the escape and augmentation characters; a deeper tree.
        'plain/a.wav': UTTERANCES[3], 'plain/a.flac': UTTERANCES[4], 'plain/x~noise0.wav': UTTERANCES[5],
        'plain/x%7Enoise0.wav': UTTERANCES[0], 'plain/.hidden.wav': UTTERANCES[1],
        'deep/s1/d2/u.wav': UTTERANCES[2], 'deep/s1/d2%2Fu.wav': UTTERANCES[3], 'deep/s1%2Fd2/u.wav': UTTERANCES[4],
    }
    audio_dir, working_dir = tmp_path / 'audio', tmp_path / 'wd'
    written = write_tree(audio_dir, librispeech_dir, layout)
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', WORKERS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Cache holds {len(layout)} utterances of 4 speakers' in result.stderr
    cache = audio.Audio(str(working_dir))
    assert cache.speaker_ids == ['deep', 'id10001', 'id10002', 'plain']
    assert sum(len(u) for u in cache.speakers_to_utterances.values()) == len(layout) == len(npy_files(working_dir))
    # No name of a real file looks like an augmented copy, and each cached array is its own file's features.
    assert not [name for u in cache.speakers_to_utterances.values() for name in u if '~' in name]
    by_features = {}
    for path in npy_files(working_dir):
        by_features.setdefault(np.load(path).tobytes(), []).append(path)
    for audio_file in written:
        matches = by_features[audio.read_mfcc(str(audio_file)).tobytes()]
        assert any(m.parent.name == audio_file.relative_to(audio_dir).parts[0] for m in matches), audio_file
    # Speaker = first folder: the VoxCeleb videos and the deeper folders are not speakers.
    assert sorted(cache.speakers_to_utterances['id10001']) == ['1zcIwhmdeo4%2F00001.wav', '7gWzIy6yIIk%2F00001.wav']
    assert set(cache.speakers_to_utterances['deep']) == {'s1%2Fd2%252Fu.wav', 's1%2Fd2%2Fu.wav', 's1%252Fd2%2Fu.wav'}
    assert {'a.wav', 'a.flac', 'x%7Enoise0.wav', 'x%257Enoise0.wav', '%2Ehidden.wav'} == set(
        cache.speakers_to_utterances['plain'])


def test_a_cache_of_the_earlier_naming_is_read_then_upgraded_by_renaming(tmp_path, copy_librispeech,
                                                                          librispeech_dir):
    audio_dir, working_dir = tmp_path / 'audio', tmp_path / 'wd'
    fbanks = working_dir / 'audio-fbanks'
    files = copy_librispeech(audio_dir, UTTERANCES[:3])
    voxceleb = write_tree(audio_dir, librispeech_dir, {'id10001/1zcIwhmdeo4/00001.wav': UTTERANCES[3],
                                                       'id10001/7gWzIy6yIIk/00001.wav': UTTERANCES[4]})
    # What the earlier version wrote: <speaker>/<stem>.npy, copies <speaker>~sp0.9/<stem>.npy and
    # <speaker>/<stem>~noise0.npy, one file for the two 00001.wav, and no cache-format file.
    earlier = {f'{f.parts[-3]}/{f.stem}.npy': audio.read_mfcc(str(f)) for f in files}
    earlier['1688~sp0.9/1688-142285-0002.npy'] = earlier['1688/1688-142285-0002~noise0.npy'] = np.ones((9, 64),
                                                                                                        np.float32)
    earlier['id10001/00001.npy'] = audio.read_mfcc(str(list(voxceleb)[1]))
    for name, features in earlier.items():
        (fbanks / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(fbanks / name, features)
    inodes = {name: (fbanks / name).stat().st_ino for name in earlier}
    assert audio.Audio(str(working_dir)).speaker_ids == ['1688', '1688~sp0.9', '3005', 'id10001']  # read as it is.
    # A tree that lacks some cached file's audio: refused, nothing changed.
    partial = tmp_path / 'partial'
    copy_librispeech(partial, UTTERANCES[:1])
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', partial)
    assert_one_line_error(result, str(fbanks), 'earlier', '--audio_dir', 'delete')
    assert {name: (fbanks / name).stat().st_ino for name in earlier} == inodes
    # The tree it was built from: renamed, not computed again, except the file the two 00001.wav shared.
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', WORKERS)
    assert result.returncode == 0, result.stderr[-3000:]
    renamed = {f'{f.parts[-3]}/{f.stem}.npy': f'{f.parts[-3]}/{f.parts[-2]}%2F{f.name}.npy' for f in files}
    renamed['1688~sp0.9/1688-142285-0002.npy'] = '1688~sp0.9/142285%2F1688-142285-0002.flac.npy'
    renamed['1688/1688-142285-0002~noise0.npy'] = '1688/142285%2F1688-142285-0002.flac~noise0.npy'
    for old, new in renamed.items():
        assert (fbanks / new).stat().st_ino == inodes[old], new
        np.testing.assert_array_equal(np.load(fbanks / new), earlier[old])
    assert sorted(str(p.relative_to(fbanks)) for p in fbanks.glob('*/*.npy')) == sorted(
        [*renamed.values(), 'id10001/1zcIwhmdeo4%2F00001.wav.npy', 'id10001/7gWzIy6yIIk%2F00001.wav.npy'])
    for wav in voxceleb:
        cached = fbanks / 'id10001' / f'{wav.parent.name}%2F{wav.name}.npy'
        np.testing.assert_array_equal(np.load(cached), audio.read_mfcc(str(wav)))


def test_a_missing_audio_dir_creates_nothing(tmp_path):
    working_dir = tmp_path / 'wd'
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', tmp_path / 'nonexistent')
    assert_one_line_error(result, '--audio_dir', str(tmp_path / 'nonexistent'))
    empty = tmp_path / 'empty' / 'speaker'
    empty.mkdir(parents=True)
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', empty.parent)
    assert_one_line_error(result, '--audio_dir', 'no audio files (.flac, .wav, .ogg, .mp3)')
    assert not working_dir.exists()


def limit_file_size(limit: int):
    """preexec_fn: files of the command (and of its pool workers) cannot grow past `limit` bytes, and a write past it
    fails with EFBIG (Python ignores SIGXFSZ) as on a full disk."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_stops_the_build_in_one_line_keeps_what_was_written_and_a_rerun_completes(tmp_path,
                                                                                            copy_librispeech):
    audio_dir, working_dir = tmp_path / 'audio', tmp_path / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES)
    sizes = sorted(audio.read_mfcc(str(f)).nbytes for f in files)
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', WORKERS,
                 preexec_fn=limit_file_size(sizes[2] + 1024))  # the three smallest fit.
    line = assert_one_line_error(result, str(working_dir / 'audio-fbanks'), 'free disk space', 'build-mfcc-cache')
    assert line.split(': ')[1].endswith('.npy')
    assert temp_files(working_dir) == []
    written = npy_files(working_dir)
    assert len(written) <= 3
    expected = {f.name: audio.read_mfcc(str(f)) for f in files}
    for path in written:  # every file in place is whole and right.
        np.testing.assert_array_equal(np.load(path), expected[path.stem.split('%2F')[1]])
    stamps = {p: p.stat().st_mtime_ns for p in written}
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', WORKERS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(npy_files(working_dir)) == len(files)
    assert {p: p.stat().st_mtime_ns for p in written} == stamps


@pytest.fixture(scope='module')
def built(tmp_path_factory, copy_librispeech):
    """A cache of 6 utterances of 3 speakers: (audio_dir, working_dir, {name of the audio file: features})."""
    root = tmp_path_factory.mktemp('built')
    audio_dir, working_dir = root / 'audio', root / 'wd'
    files = copy_librispeech(audio_dir, UTTERANCES)
    audio.Audio(str(working_dir), str(audio_dir), workers=WORKERS)
    return audio_dir, working_dir, {f.name: audio.read_mfcc(str(f)) for f in files}


def damage(paths: list[Path]) -> dict[Path, str]:
    """Damages each file a different way; returns {path: how}."""
    ways = {
        'truncated': lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
        'zeroed': lambda p: p.write_bytes(bytes(p.stat().st_size)),
        'not an array': lambda p: p.write_text('features were here\n'),
        'wrong shape': lambda p: np.save(p, np.load(p)[:, :32]),
        'wrong dtype': lambda p: np.save(p, np.load(p).astype(np.float64)),
        'NaN': lambda p: np.save(p, np.where(np.arange(len(np.load(p)))[:, None] == 3, np.nan, np.load(p))
                                 .astype(np.float32)),
    }
    for path, do in zip(paths, ways.values(), strict=True):
        do(path)
    return dict(zip(paths, ways, strict=True))


def test_damaged_cache_arrays_are_named_when_read_and_rebuilt_by_verify(tmp_path, built):
    audio_dir, source, expected = built
    working_dir = tmp_path / 'wd'
    shutil.copytree(source / 'audio-fbanks', working_dir / 'audio-fbanks')
    paths = npy_files(working_dir)
    for path in damage(paths):
        with pytest.raises(audio.CacheError, match=rf'{path}: damaged cache file .*build-mfcc-cache --verify'):
            audio.checked_features(path)
    result = cli('build-keras-inputs', '--working_dir', working_dir, '--counts_per_speaker', '4,2')
    assert_one_line_error(result, 'damaged cache file', 'build-mfcc-cache --verify')
    assert result.stderr.strip().splitlines()[-1].split('Error: ')[1].split(':')[0] in map(str, paths)
    # Without --verify, the damaged files stay (a build only adds what is missing); with it, they are rebuilt.
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--verify')
    assert result.returncode == 0, result.stderr[-3000:]
    for path in paths:
        assert str(path) in result.stderr  # each damaged file is named in the log.
        np.testing.assert_array_equal(np.load(path), expected[path.stem.split('%2F')[1]])
    result = cli('build-keras-inputs', '--working_dir', working_dir, '--counts_per_speaker', '4,2')
    assert result.returncode == 0, result.stderr[-3000:]


def test_verify_leaves_whole_arrays_untouched(tmp_path, built):
    audio_dir, source, _ = built
    working_dir = tmp_path / 'wd'
    shutil.copytree(source / 'audio-fbanks', working_dir / 'audio-fbanks')
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in npy_files(working_dir)}
    cache = audio.Audio(str(working_dir), str(audio_dir), workers=WORKERS, verify=True)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in npy_files(working_dir)} == stamps
    assert sum(len(u) for u in cache.speakers_to_utterances.values()) == len(UTTERANCES)


def test_a_failing_augmentation_is_a_skipped_file_not_a_crashed_pool(tmp_path, copy_librispeech):
    audio_dir, working_dir, no_noise = tmp_path / 'audio', tmp_path / 'wd', tmp_path / 'no-noise-files'
    files = copy_librispeech(audio_dir, UTTERANCES[:2])
    no_noise.mkdir()
    cache = audio.Audio(str(working_dir), str(audio_dir), workers=WORKERS,
                        variants=audio.augmentations(False, [str(no_noise)], (5.0, 20.0)))
    assert sorted(cache.speakers_to_utterances['1688']) == [f'142285%2F{f.name}' for f in files]
    report = (working_dir / 'skipped-files.txt').read_text().splitlines()
    assert len(report) == 2 and all(line.startswith(tuple(map(str, files))) for line in report)
    assert all('~noise0 copy' in line and 'check --noise' in line for line in report)


class Touch:
    """Unpickling it creates a file: what a malicious pickle could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_cache_and_model_input_arrays_are_loaded_without_pickle(tmp_path, built):
    _, source, _ = built
    working_dir = tmp_path / 'wd'
    shutil.copytree(source / 'audio-fbanks', working_dir / 'audio-fbanks')
    converter = KerasFormatConverter(str(working_dir))
    converter.generate(160, (4, 2), seed=0)
    assert converter.load('train')[0].shape == (3 * 4, 160, 64, 1)
    marker = tmp_path / 'code-ran'
    victims = [npy_files(working_dir)[0], converter.path('kx_train.npy')]
    for victim in victims:
        np.save(victim, np.array([Touch(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(audio.CacheError, match=str(victims[0])):
        audio.checked_features(victims[0])
    with pytest.raises(audio.CacheError, match=str(victims[1])):
        converter.load('train')
    assert not marker.exists()


def wav_header(channels: int, rate: int, bits: int, data_size: int, fmt_tag: int = 1) -> bytes:
    """A 44-byte RIFF/WAVE header declaring what it is given, true or not."""
    block = channels * bits // 8
    fmt = struct.pack('<HHIIHH', fmt_tag, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    return (b'RIFF' + struct.pack('<I', (36 + data_size) & 0xFFFFFFFF) + b'WAVEfmt ' + struct.pack('<I', 16) + fmt
            + b'data' + struct.pack('<I', data_size & 0xFFFFFFFF))


def fuzz_files(root: Path, flac: Path, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Writes about 230 bad or doubtful audio files under root/<kind>/; returns (files that must be skipped, files
    that may be cached or skipped: truncated and header-damaged copies of real speech can still decode)."""
    rng = np.random.default_rng(seed)
    signal, rate = sf.read(flac, dtype='float32')
    must_skip, either = [], []

    def put(kind: str, ext: str, content, table: list[Path]) -> None:
        path = root / kind / f'{len(table):03d}{ext}'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else content(path)
        table.append(path)

    flac_bytes = flac.read_bytes()
    root.mkdir(parents=True, exist_ok=True)
    sf.write(root / 'real.wav', signal, rate, subtype='PCM_16')
    wav_bytes = (root / 'real.wav').read_bytes()
    (root / 'real.wav').unlink()
    pcm = (signal[:rate] * 32767).astype('<i2').tobytes()
    for i in range(40):
        put('random', ['.wav', '.flac'][i % 2], rng.bytes(int(rng.integers(0, 4096))), must_skip)
        put('truncated', '.flac', flac_bytes[:int(rng.integers(0, len(flac_bytes)))], either)
        put('truncated', '.wav', wav_bytes[:int(rng.integers(0, len(wav_bytes)))], either)
        header_damaged = bytearray(wav_bytes)
        for position, value in zip(rng.integers(0, 44, size=3), rng.integers(0, 256, size=3), strict=True):
            header_damaged[position] = value
        put('header', '.wav', bytes(header_damaged), either)
    for channels, file_rate, bits, size, tag in [  # huge or absurd declared sizes, rates and channel counts.
            (1, rate, 16, 0xFFFFFFF0, 1), (1, rate, 16, 0x7FFFFFFF, 1), (2, rate, 16, 0xFFFFFFFE, 1),
            (65535, rate, 16, len(pcm), 1), (1, 0xFFFFFFFF, 16, len(pcm), 1), (1, rate, 32, 0xFFFFFFFF, 3),
            (1, rate, 0, len(pcm), 1), (1, rate, 16, len(pcm), 0xFFFF)]:
        put('huge', '.wav', wav_header(channels, file_rate, bits, size, tag) + pcm, either)
    huge_flac = bytearray(flac_bytes)  # STREAMINFO: 2**36 - 1 samples (256 GiB of float32).
    huge_flac[21] |= 0x0F
    huge_flac[22:26] = b'\xff\xff\xff\xff'
    put('huge', '.flac', bytes(huge_flac), either)
    for file_rate in (1, 7, 100):  # resampling these to 16 kHz would take gigabytes.
        put('slow', '.wav', wav_header(1, file_rate, 16, len(pcm)) + pcm, must_skip)
    for i in range(12):
        x = signal[:rate].copy()
        x[rng.integers(0, len(x), 5)] = [np.nan, np.inf, -np.inf][i % 3]
        put('nonfinite', '.wav', lambda p, x=x: sf.write(p, x, rate, subtype='FLOAT'), must_skip)
    for i in range(12):
        one = lambda p, r=[16000, 8000, 44100][i % 3]: sf.write(p, np.array([0.5]), r, subtype='PCM_16')  # noqa: E731
        put('one-sample', ['.wav', '.flac'][i % 2], one, must_skip)
    for i in range(6):
        put('no-frames', ['.wav', '.flac'][i % 2], lambda p: sf.write(p, np.zeros((0, 1)), rate), must_skip)
        put('no-channels', '.wav', wav_header(0, rate, 16, len(pcm)) + pcm, must_skip)
        put('silent', ['.wav', '.flac'][i % 2], lambda p: sf.write(p, np.zeros(rate), rate), must_skip)
    return must_skip, either


def test_fuzz_battery_through_the_cache_build(tmp_path, librispeech_dir, copy_librispeech, samples_dir):
    audio_dir, working_dir = tmp_path / 'audio', tmp_path / 'wd'
    must_skip, either = fuzz_files(audio_dir, librispeech_dir / '1688' / '142285' / '1688-142285-0002.flac')
    good = copy_librispeech(audio_dir, UTTERANCES[2:])
    (audio_dir / 'philippe').mkdir()
    good.append(Path(shutil.copy(samples_dir / 'PhilippeRemy' / 'PhilippeRemy_001.wav', audio_dir / 'philippe')))
    assert len(must_skip) + len(either) > 200
    result = cli('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', WORKERS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    reasons = {}
    for line in (working_dir / 'skipped-files.txt').read_text().splitlines():
        path, reason = line.split(': ', 1)
        reasons[Path(path)] = reason
    cached = {(p.parent.name, p.stem) for p in npy_files(working_dir)}

    def is_cached(audio_file: Path) -> bool:
        speaker, *rest = audio_file.relative_to(audio_dir).parts
        return (speaker, '%2F'.join(rest)) in cached

    for audio_file in must_skip:
        assert audio_file in reasons and reasons[audio_file], audio_file
        assert not is_cached(audio_file), audio_file
    assert not [r for r in reasons.values() if 'unexpected' in r]  # each failure has its own explanation.
    for audio_file in either:  # cached or listed with a reason, never both, never neither.
        assert is_cached(audio_file) != (audio_file in reasons), audio_file
    for audio_file in good:
        assert is_cached(audio_file) and audio_file not in reasons, audio_file
    assert len(cached) + len(reasons) == len(must_skip) + len(either) + len(good)
    assert temp_files(working_dir) == []
    assert os.path.getsize(working_dir / 'skipped-files.txt') > 0


def test_a_checkpoint_that_cannot_be_written_names_it_and_leaves_no_file(tmp_path):
    import keras

    from checkpoints import AtomicCheckpoint, CheckpointError
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256)])  # 257 KB of weights.
    checkpoint = AtomicCheckpoint(tmp_path, 'M', 'loss', 'min')
    checkpoint.set_model(model)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # this process's writes past 64 KB fail (EFBIG).
    try:
        with pytest.raises(CheckpointError, match=rf'{tmp_path / "M_last.keras"}: cannot be written .*free disk'):
            checkpoint.save(tmp_path / 'M_last.keras', {'epoch': 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
    checkpoint.save(tmp_path / 'M_last.keras', {'epoch': 1})  # space freed: the same save goes through.
    restored = keras.saving.load_model(tmp_path / 'M_last.keras')
    np.testing.assert_array_equal(restored.get_weights()[0], model.get_weights()[0])
