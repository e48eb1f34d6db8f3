"""Corpora (corpus.py) read by build-mfcc-cache: folder layouts (LibriSpeech, VoxCeleb with same-named utterances,
plain, deeper; .m4a refused with its conversion), a CSV manifest, a Kaldi wav.scp + utt2spk, their bad input as
one-line errors that lose nothing cached, and --shard K/N: disjoint parts whose union is byte-equal to one build,
built by concurrent processes. Real audio from samples/, real (forked or spawned) pools, tiny sets."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import audio
from cli import cli
from corpus import Shard, folder_corpus, manifest_corpus, parse_shard

ROOT = Path(__file__).resolve().parents[1]
UTTERANCES = ['1688-142285-0002', '1688-142285-0009', '3005-163389-0004', '3005-163389-0007',
              '367-130732-0000', '367-130732-0006']


def flac(librispeech_dir: Path, utterance_id: str) -> Path:
    speaker, chapter, _ = utterance_id.split('-')
    return librispeech_dir / speaker / chapter / f'{utterance_id}.flac'


def write_tree(audio_dir: Path, librispeech_dir: Path, layout: dict[str, str]) -> dict[Path, str]:
    """Writes each relative path of `layout` as a 16-bit wav/flac of a LibriSpeech utterance's samples."""
    written = {}
    for relative, utterance_id in layout.items():
        target = audio_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        signal, rate = sf.read(flac(librispeech_dir, utterance_id), dtype='int16')
        sf.write(target, signal, rate, subtype='PCM_16')
        written[target] = utterance_id
    return written


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result) -> str:
    """The one `Error: ...` line of a failed command."""
    assert result.exit_code == 1, result.output[-3000:]
    lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1 and 'Traceback' not in result.output, result.output[-3000:]
    return lines[0]


def cache_arrays(working_dir: Path) -> dict[str, bytes]:
    """Every cached array (header and data), by path relative to the cache."""
    cache = working_dir / 'audio-fbanks'
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob('*/*.npy'))}


@pytest.mark.parametrize('layout, expected', [
    ({'1688/142285/1688-142285-0002.flac': 0, '3005/163389/3005-163389-0004.flac': 2},
     'LibriSpeech (speaker/chapter/utterance)'),
    ({'id10001/1zcIwhmdeo4/00001.wav': 0, 'id10001/7gWzIy6yIIk/00001.wav': 1, 'id10002/xTV-jFAUKcw/00001.wav': 2},
     'VoxCeleb (speaker/video/utterance)'),
    ({'alice/utt0.wav': 0, 'bob/utt0.ogg': 1}, 'plain speaker/utterance folders'),
    ({'alice/utt0.wav': 0, 'bob/session1/day2/utt0.mp3': 1}, 'speaker folders, files 1 to 3 folders deep'),
])
def test_folder_layouts_are_named_and_every_file_kept_apart(tmp_path, layout, expected):
    for relative in layout:  # layout and names come from the paths alone.
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b'')
    corpus = folder_corpus(tmp_path)
    assert corpus.layout == expected
    assert sorted(u.path for u in corpus.utterances) == sorted(str(tmp_path / r) for r in layout)
    names = {(u.speaker, u.name) for u in corpus.utterances}
    assert len(names) == len(layout)  # the same-named 00001.wav of two videos stay two utterances.
    assert names == {audio.cache_name(tmp_path / r, tmp_path) for r in layout}


def test_voxceleb_layout_builds_one_array_per_file_and_logs_the_layout(tmp_path, librispeech_dir, caplog):
    layout = {'id10001/1zcIwhmdeo4/00001.wav': UTTERANCES[0], 'id10001/7gWzIy6yIIk/00001.wav': UTTERANCES[1],
              'id10002/xTV-jFAUKcw/00001.wav': UTTERANCES[2]}
    written = write_tree(tmp_path / 'vox', librispeech_dir, layout)
    caplog.set_level('INFO')
    cache = audio.Audio(str(tmp_path / 'wd'), str(tmp_path / 'vox'), workers=2)
    assert 'Corpus: VoxCeleb (speaker/video/utterance): 3 audio files of 2 speakers' in caplog.text
    assert sorted(cache.speakers_to_utterances['id10001']) == ['1zcIwhmdeo4%2F00001.wav', '7gWzIy6yIIk%2F00001.wav']
    for path in written:
        speaker, name = audio.cache_name(path, tmp_path / 'vox')
        np.testing.assert_array_equal(np.load(cache.speakers_to_utterances[speaker][name]),
                                      audio.read_mfcc(str(path)))


def test_m4a_is_refused_with_the_ffmpeg_command_and_converted_files_are_read(tmp_path, librispeech_dir):
    tree = tmp_path / 'vox2'
    write_tree(tree, librispeech_dir, {'id00012/21Uxsk56VDQ/00001.wav': UTTERANCES[0]})
    (tree / 'id00012' / '21Uxsk56VDQ' / '00001.m4a').write_bytes(b'converted above')
    (tree / 'id00012' / '21Uxsk56VDQ' / '00002.m4a').write_bytes(b'not converted')
    line = error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path / 'wd', '--audio_dir', tree))
    assert line.startswith(f'Error: --audio_dir {tree}: 1 .m4a files')
    assert '00002.m4a' in line and 'ffmpeg' in line and '-ar 16000' in line
    assert not (tmp_path / 'wd').exists()
    (tree / 'id00012' / '21Uxsk56VDQ' / '00002.m4a').unlink()
    corpus = folder_corpus(tree)
    assert [u.name for u in corpus.utterances] == ['21Uxsk56VDQ%2F00001.wav']


@pytest.fixture(scope='module')
def reference(tmp_path_factory, copy_librispeech):
    """A folder tree of 6 utterances of 3 speakers and its cache built in one run: (audio_dir, working_dir)."""
    root = tmp_path_factory.mktemp('reference')
    copy_librispeech(root / 'audio', UTTERANCES)
    audio.Audio(str(root / 'wd'), str(root / 'audio'), workers=2)
    return root / 'audio', root / 'wd'


def test_manifest_with_header_relative_and_absolute_paths(tmp_path, reference):
    audio_dir, _ = reference
    files = sorted(audio_dir.rglob('*.flac'))
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'x.flac').write_bytes(files[0].read_bytes())
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'x.flac').write_bytes(files[1].read_bytes())  # same name, same speaker: kept apart.
    manifest = tmp_path / 'list.csv'
    manifest.write_text('path,speaker\na/x.flac,anna\nb/x.flac,anna\n' + f'"{files[2]}",bo\n')
    corpus = manifest_corpus(manifest)
    assert corpus.layout == f'CSV manifest {manifest}'
    cache = audio.Audio(str(tmp_path / 'wd'), corpus=corpus, workers=2)
    assert sorted(cache.speakers_to_utterances['anna']) == ['a%2Fx.flac', 'b%2Fx.flac']
    (bo_name, bo_path), = cache.speakers_to_utterances['bo'].items()
    assert bo_name == audio.escape_name(str(files[2]))
    np.testing.assert_array_equal(np.load(bo_path), audio.read_mfcc(str(files[2])))
    np.testing.assert_array_equal(np.load(cache.speakers_to_utterances['anna']['b%2Fx.flac']),
                                  audio.read_mfcc(str(files[1])))
    manifest.write_text('a/x.flac,anna\n')  # no header: the first line is data.
    assert [u.name for u in manifest_corpus(manifest).utterances] == ['a%2Fx.flac']


@pytest.mark.parametrize('text, fragments', [
    ('path,speaker\na/x.flac,anna\nmissing.flac,anna\ngone.wav,bo\n',
     ['line 3', 'missing.flac: no such file (and 1 more lines)', 'fix the paths']),
    ('a/x.flac,anna\nb/y.flac,bo\na/x.flac,bo\n', ['line 3', 'already listed on line 1', 'duplicate']),
    ('a/x.flac,anna\na/x.flac\n', ['line 2', 'expected "path,speaker"']),
])
def test_bad_manifest_is_one_line_naming_the_line_and_keeps_the_cache(tmp_path, reference, text, fragments):
    audio_dir, built = reference
    working_dir = tmp_path / 'wd'
    (working_dir / 'audio-fbanks').mkdir(parents=True)
    shutil.copyfile(built / 'audio-fbanks' / 'cache-format', working_dir / 'audio-fbanks' / 'cache-format')
    kept = working_dir / 'audio-fbanks' / '1688' / 'kept.npy'
    kept.parent.mkdir()
    np.save(kept, np.ones((3, 64), np.float32))
    for name in ('a/x.flac', 'b/y.flac'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(next(audio_dir.rglob('*.flac')).read_bytes())
    manifest = tmp_path / 'list.csv'
    manifest.write_text(text)
    line = error_line(invoke('build-mfcc-cache', '--working_dir', working_dir, '--manifest', manifest))
    assert line.startswith(f'Error: --manifest {manifest}: ')
    for fragment in fragments:
        assert fragment in line, line
    assert np.array_equal(np.load(kept), np.ones((3, 64), np.float32))


def test_kaldi_wav_scp_and_utt2spk_name_utterances_by_id(tmp_path, reference, monkeypatch):
    audio_dir, _ = reference
    files = sorted(audio_dir.rglob('*.flac'))[:3]
    monkeypatch.chdir(tmp_path)  # Kaldi reads relative paths from the current folder.
    (tmp_path / 'wav').mkdir()
    (tmp_path / 'wav' / 'u1.flac').write_bytes(files[0].read_bytes())
    (tmp_path / 'wav.scp').write_text(f'spkA-u1 wav/u1.flac\nspkA-u2 {files[1]}\nspkB-u3 {files[2]}\n')
    (tmp_path / 'utt2spk').write_text('spkA-u1 spkA\nspkA-u2 spkA\nspkB-u3 spkB\n')
    result = invoke('build-mfcc-cache', '--working_dir', tmp_path / 'wd', '--wav_scp', tmp_path / 'wav.scp',
                    '--utt2spk', tmp_path / 'utt2spk', '--workers', 2)
    assert result.exit_code == 0, result.output[-3000:]
    cache = audio.Audio(str(tmp_path / 'wd'))
    assert {s: sorted(u) for s, u in cache.speakers_to_utterances.items()} == {'spkA': ['spkA-u1', 'spkA-u2'],
                                                                               'spkB': ['spkB-u3']}
    np.testing.assert_array_equal(np.load(cache.speakers_to_utterances['spkB']['spkB-u3']),
                                  audio.read_mfcc(str(files[2])))


@pytest.mark.parametrize('wav_scp, utt2spk, option, fragments', [
    ('u1 sox in.sph -t wav - |\n', 'u1 s\n', '--wav_scp', ['line 1', 'piped command', 'sox in.sph -t wav - >']),
    ('u1 {f}\nu1 {f}\n', 'u1 s\n', '--wav_scp', ['line 2', 'already on line 1', 'duplicate utterance id']),
    ('u1 {f}\nu2 {f}\n', 'u1 s\n', '--wav_scp', ['line 2', 'u2 has no speaker', 'utt2spk']),
    ('u1 missing.wav\n', 'u1 s\n', '--wav_scp', ['line 1', 'missing.wav: no such file']),
    ('u1 {f}\n', 'u1\n', '--utt2spk', ['line 1', 'expected']),
])
def test_bad_kaldi_data_dir_is_one_line_naming_file_and_line(tmp_path, reference, wav_scp, utt2spk, option,
                                                             fragments):
    audio_dir, _ = reference
    (tmp_path / 'wav.scp').write_text(wav_scp.format(f=next(audio_dir.rglob('*.flac'))))
    (tmp_path / 'utt2spk').write_text(utt2spk)
    line = error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path / 'wd', '--wav_scp', tmp_path / 'wav.scp',
                             '--utt2spk', tmp_path / 'utt2spk'))
    named = tmp_path / ('wav.scp' if option == '--wav_scp' else 'utt2spk')
    assert line.startswith(f'Error: {option} {named}: '), line
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / 'wd').exists()


def test_a_speaker_with_no_usable_audio_is_named_and_the_others_cached(tmp_path, reference, caplog):
    audio_dir, _ = reference
    good = next(audio_dir.rglob('*.flac'))
    (tmp_path / 'bad.wav').write_text('not audio\n' * 50)
    manifest = tmp_path / 'list.csv'
    manifest.write_text(f'{good},anna\nbad.wav,mute\n')
    caplog.set_level('INFO')
    cache = audio.Audio(str(tmp_path / 'wd'), corpus=manifest_corpus(manifest), workers=2)
    assert cache.speaker_ids == ['anna']
    warnings = [r.getMessage() for r in caplog.records if 'no usable audio' in r.getMessage()]
    assert len(warnings) == 1 and ': mute;' in warnings[0]
    assert str(tmp_path / 'bad.wav') in (tmp_path / 'wd' / 'skipped-files.txt').read_text()


def test_shards_are_disjoint_and_their_union_is_byte_equal_to_one_build(tmp_path, reference):
    audio_dir, single = reference
    corpus = folder_corpus(audio_dir)
    parts = [{(u.speaker, u.name) for u in corpus.utterances if Shard(k, 3).holds(u.speaker, u.name)}
             for k in (1, 2, 3)]
    assert sum(map(len, parts)) == len(corpus.utterances) == len(set().union(*parts))
    for k in (1, 2, 3):
        cache = audio.Audio(str(tmp_path / 'wd'), corpus=corpus, workers=1, shard=Shard(k, 3))
        built = {(s, n) for s, names in cache.speakers_to_utterances.items() for n in names}
        assert built == set().union(*parts[:k])  # each part adds its own files only.
    assert cache_arrays(tmp_path / 'wd') == cache_arrays(single)


def test_concurrent_shard_processes_build_one_cache(tmp_path, reference):
    audio_dir, single = reference
    runs = [subprocess.Popen([sys.executable, 'cli.py', 'build-mfcc-cache', '--working_dir', str(tmp_path / 'wd'),
                              '--audio_dir', str(audio_dir), '--shard', f'{k}/2', '--workers', '1'],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    logs = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    assert 'shard 1/2' in logs[0] and 'shard 2/2' in logs[1]
    assert cache_arrays(tmp_path / 'wd') == cache_arrays(single)
    assert not [p for p in (tmp_path / 'wd').rglob('.*')]


@pytest.mark.parametrize('spec', ['3/2', '0/2', 'a/b', '2', '1/0'])
def test_bad_shard_specs_are_refused_naming_the_option(tmp_path, reference, spec):
    line = error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path / 'wd', '--audio_dir', reference[0],
                             '--shard', spec))
    assert line.startswith(f'Error: --shard {spec}: expected K/N') and not (tmp_path / 'wd').exists()
    with pytest.raises(ValueError):
        parse_shard(spec)


def test_exactly_one_source_is_required(tmp_path, reference):
    assert 'exactly one of' in error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path))
    (tmp_path / 'list.csv').write_text('x,y\n')
    line = error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path, '--audio_dir', reference[0],
                             '--manifest', tmp_path / 'list.csv'))
    assert '--audio_dir and --manifest' in line
    assert '--utt2spk' in error_line(invoke('build-mfcc-cache', '--working_dir', tmp_path, '--wav_scp',
                                            tmp_path / 'list.csv'))


def test_rerun_of_a_complete_cache_reads_no_audio(tmp_path, reference):
    audio_dir, built = reference
    shutil.copytree(audio_dir, tmp_path / 'audio')
    shutil.copytree(built, tmp_path / 'wd')
    for path in (tmp_path / 'audio').rglob('*.flac'):  # unreadable now: a re-run that read one would skip it.
        path.write_bytes(b'')
    cache = audio.Audio(str(tmp_path / 'wd'), str(tmp_path / 'audio'), workers=2)
    assert sum(map(len, cache.speakers_to_utterances.values())) == len(UTTERANCES)
    assert not (tmp_path / 'wd' / 'skipped-files.txt').exists()
