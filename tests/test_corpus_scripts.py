"""The corpus scripts as a user runs them: download_librispeech.sh's argument checks and its skip of extracted
subsets (no network needed), recipes/make_trials.py, and the first stages of recipes/librispeech.sh and
recipes/voxceleb.sh on small fake corpora in their layouts (copies of samples/ audio)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import audio

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ['train-clean-100', 'train-clean-360', 'train-other-500', 'dev-clean', 'dev-other', 'test-clean',
           'test-other']
TIMEOUT = 180


def bash(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})


@pytest.mark.parametrize('args', [['WD', 'train-clean-100', 'train-clean-960'], ['dev_clean']])
def test_download_refuses_unknown_subsets_with_the_list_before_doing_anything(tmp_path, args):
    result = bash('download_librispeech.sh', *[str(tmp_path / 'wd') if a == 'WD' else a for a in args],
                  env={'HOME': str(tmp_path)})
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: unknown LibriSpeech subset '{args[-1]}'")
    assert all(subset in line for subset in SUBSETS)
    assert list(tmp_path.iterdir()) == []


def test_download_skips_extracted_subsets_without_the_network(tmp_path):
    for home, args in ((tmp_path / 'a', [tmp_path / 'wd', 'dev-clean', 'test-other']),
                       (tmp_path / 'b', ['dev-clean'])):  # a subset first: the default working dir.
        working_dir = tmp_path / 'wd' if args[0] == tmp_path / 'wd' else home / '.deep-speaker-wd'
        for subset in args[1:] if args[0] == tmp_path / 'wd' else args:
            (working_dir / 'LibriSpeech' / subset).mkdir(parents=True)
            (working_dir / 'LibriSpeech' / f'.{subset}.done').touch()
        result = bash('download_librispeech.sh', *args, env={'HOME': str(home), 'LIBRISPEECH_URL': 'http://0.0.0.0:9'})
        assert result.returncode == 0, result.stderr
        assert 'LibriSpeech/dev-clean is already extracted.' in result.stderr
        assert sorted(p.name for p in working_dir.iterdir()) == ['LibriSpeech']  # no archive fetched.


def copy_utterances(librispeech_dir: Path, dest: Path, speakers: dict[str, int]) -> list[Path]:
    """Copies the first n utterances (with their transcript) of each sample speaker into a LibriSpeech subset."""
    copied = []
    for speaker, n in speakers.items():
        chapter_dir = next((librispeech_dir / speaker).iterdir())
        target = dest / speaker / chapter_dir.name
        target.mkdir(parents=True)
        for flac in sorted(chapter_dir.glob('*.flac'))[:n]:
            shutil.copyfile(flac, target / flac.name)
            copied.append(target / flac.name)
        for trans in chapter_dir.glob('*.trans.txt'):
            shutil.copyfile(trans, target / trans.name)
    return copied


def test_make_trials_leaves_out_same_text_pairs(tmp_path, librispeech_dir):
    files = copy_utterances(librispeech_dir, tmp_path / 'test', {'1688': 2, '3005': 2})
    (files[0].parent / '1688-142285.trans.txt').write_text(f'{files[0].stem} HELLO  WORLD\n{files[1].stem} OTHER\n')
    (files[2].parent / '3005-163389.trans.txt').write_text(f'{files[2].stem} hello world\n')
    result = subprocess.run([sys.executable, 'recipes/make_trials.py', '--audio_dir', tmp_path / 'test', '--out',
                             tmp_path / 'trials.txt'], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    relative = [f.relative_to(tmp_path / 'test').as_posix() for f in files]
    expected = [f'{int(a[:4] == b[:4])} {a} {b}' for i, a in enumerate(relative) for b in relative[i + 1:]
                if {a, b} != {relative[0], relative[2]}]  # the same text read by two speakers.
    assert (tmp_path / 'trials.txt').read_text().splitlines() == expected
    assert '5 trials (2 target, 3 non-target), 1 same-text pairs left out' in result.stderr


@pytest.fixture(scope='module')
def librispeech_run(tmp_path_factory, librispeech_dir):
    """Stages 1-4 of recipes/librispeech.sh on a fake LibriSpeech folder: (root, out, result)."""
    root = tmp_path_factory.mktemp('librispeech')
    copy_utterances(librispeech_dir, root / 'LibriSpeech' / 'train-clean-100', {'1688': 3, '3005': 2})
    copy_utterances(librispeech_dir, root / 'LibriSpeech' / 'train-clean-360', {'367': 2})
    copy_utterances(librispeech_dir, root / 'LibriSpeech' / 'test-clean', {'1998': 2, '2033': 2})
    copy_utterances(librispeech_dir, root / 'LibriSpeech' / 'test-other', {'2414': 2, '2609': 1})
    out = root / 'out'
    result = bash('recipes/librispeech.sh', env={'SUBSETS': '460', 'LIBRISPEECH': str(root / 'LibriSpeech'),
                                                 'OUT': str(out), 'PY': sys.executable, 'STOP_AFTER': '4',
                                                 'COUNTS': '4,2'})
    return root, out, result


def test_librispeech_recipe_first_stages_cache_the_chosen_subsets_and_write_trials(librispeech_run):
    root, out, result = librispeech_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Corpus: LibriSpeech (speaker/chapter/utterance): 7 audio files of 3 speakers' in result.stderr
    cache = audio.Audio(str(out))
    assert {s: len(u) for s, u in cache.speakers_to_utterances.items()} == {'1688': 3, '3005': 2, '367': 2}
    for flac in (root / 'LibriSpeech' / 'train-clean-360').rglob('*.flac'):
        cached = cache.speakers_to_utterances['367'][f'{flac.parent.name}%2F{flac.name}']
        np.testing.assert_array_equal(np.load(cached), audio.read_mfcc(str(flac)))
    clean = (out / 'trials' / 'librispeech-test-clean.txt').read_text().splitlines()
    other = (out / 'trials' / 'librispeech-test-other.txt').read_text().splitlines()
    assert [line[0] for line in clean] == ['1', '0', '0', '0', '0', '1'] and len(other) == 3
    assert all((root / 'LibriSpeech' / 'test-clean' / path).is_file() for line in clean for path in line.split()[1:])
    assert (out / 'keras-inputs' / 'kx_train.npy').is_file()
    assert len(np.load(out / 'keras-inputs' / 'ky_train.npy')) == 3 * 4


def test_librispeech_recipe_refuses_a_missing_subset_and_an_unknown_size(tmp_path):
    env = {'LIBRISPEECH': str(tmp_path), 'OUT': str(tmp_path / 'out'), 'PY': sys.executable}
    result = bash('recipes/librispeech.sh', env={**env, 'SUBSETS': '960'})
    assert result.returncode == 1 and f'{tmp_path}/train-clean-100: missing' in result.stderr
    result = bash('recipes/librispeech.sh', env={**env, 'SUBSETS': '500'})
    assert result.returncode == 2 and 'SUBSETS=500: expected train-clean-100, 460 or 960' in result.stderr


def test_voxceleb_recipe_first_stages_on_a_voxceleb_tree(tmp_path, librispeech_dir):
    dev = tmp_path / 'vox1_dev_wav' / 'wav'
    sources = sorted(librispeech_dir.rglob('*.flac'))
    layout = {'id10001/1zcIwhmdeo4/00001.wav': 0, 'id10001/7gWzIy6yIIk/00001.wav': 1,
              'id10002/xTV-jFAUKcw/00001.wav': 20, 'id10002/xTV-jFAUKcw/00002.wav': 21}
    for relative, source in layout.items():
        (dev / relative).parent.mkdir(parents=True, exist_ok=True)
        signal, rate = sf.read(sources[source], dtype='int16')
        sf.write(dev / relative, signal, rate, subtype='PCM_16')
    out = tmp_path / 'out'
    result = bash('recipes/voxceleb.sh', env={'VOX_DEV': str(dev), 'OUT': str(out), 'PY': sys.executable,
                                              'STOP_AFTER': '3', 'COUNTS': '4,2'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Corpus: VoxCeleb (speaker/video/utterance): 4 audio files of 2 speakers' in result.stderr
    cache = audio.Audio(str(out))
    assert sorted(cache.speakers_to_utterances['id10001']) == ['1zcIwhmdeo4%2F00001.wav', '7gWzIy6yIIk%2F00001.wav']
    assert len(np.load(out / 'keras-inputs' / 'ky_train.npy')) == 2 * 4
    env = {'VOX_DEV': str(dev), 'OUT': str(out), 'PY': sys.executable, 'STAGE': '3', 'STOP_AFTER': '3'}
    windows = bash('recipes/voxceleb.sh', env={**env, 'SAMPLER': 'windows'})
    assert windows.returncode == 0, windows.stderr[-3000:]
    assert json.loads((out / 'packed' / 'meta.json').read_text())['utterances'] == 4
    unknown = bash('recipes/voxceleb.sh', env={**env, 'SAMPLER': 'random'})
    assert unknown.returncode == 2 and 'SAMPLER=random: expected fixed or windows' in unknown.stderr
