"""The toolkit commands of cli.py with the shipped checkpoint on samples/, in-process (click's CliRunner): embed to
.npz, .csv and Kaldi .ark/.scp, verify (--json, symmetric, calibrated or given threshold), enroll / identify /
profiles --remove, cluster with purity, ARI and NMI, eval-trials recording the thresholds, and the one-line errors
of bad input."""

import csv
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import kaldiio  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # noqa: E402

from cli import cli  # noqa: E402
from constants import DEFAULT_CHECKPOINT, UNKNOWN_SPEAKER  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from speaker import SpeakerEncoder, calibration_file_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHILIPPE = [str(ROOT / 'samples' / 'PhilippeRemy' / f'PhilippeRemy_00{i}.wav') for i in range(1, 5)]
OTHER = str(ROOT / 'samples' / '1255-90413-0001.flac')
LIBRI = ROOT / 'samples' / 'LibriSpeech' / 'test-other'


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok and result.exit_code != 0:
        raise AssertionError(f'{args} exited {result.exit_code}:\n{result.output[-3000:]}\n{result.exception!r}')
    return result


def error_line(result) -> str:
    """The one `Error:` line of a failed command (there must be exactly one)."""
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope='module')
def encoder() -> SpeakerEncoder:
    return SpeakerEncoder()


@pytest.fixture(scope='module')
def narrow_checkpoint(tmp_path_factory) -> Path:
    """An untrained width-0.125 ResCNN: another model, with no calibration beside it."""
    path = tmp_path_factory.mktemp('narrow') / 'narrow.keras'
    DeepSpeakerModel(width=0.125).m.save(path)
    return path


@pytest.fixture()
def two_speakers(tmp_path, copy_librispeech) -> Path:
    """tmp/audio: two speakers' first two utterances (LibriSpeech layout) and a silent file of the first speaker."""
    audio = tmp_path / 'audio'
    copy_librispeech(audio, ['1688-142285-0000', '1688-142285-0001', '3005-163389-0000', '3005-163389-0001'])
    sf.write(audio / '1688' / '142285' / 'silent.wav', np.zeros(8000, dtype=np.float32), 16000)
    return audio


def test_embed_writes_npz_csv_and_kaldi_and_lists_the_skipped_file(two_speakers, tmp_path, encoder):
    result = invoke('embed', two_speakers, '--out', tmp_path / 'e.npz')
    assert 'Embedded 4 files' in result.output and 'skipped 1' in result.output
    assert 'silent.wav' in result.output and 'empty or silent' in result.output
    with np.load(tmp_path / 'e.npz', allow_pickle=False) as data:
        names, speakers, embeddings = list(data['names']), list(data['speakers']), data['embeddings']
        assert str(data['fingerprint']) == encoder.fingerprint
    assert speakers == ['1688', '1688', '3005', '3005'] and embeddings.shape == (4, 512)
    for name, embedding in zip(names, embeddings, strict=True):
        np.testing.assert_allclose(embedding, encoder.embed_file(name), atol=1e-5)

    invoke('embed', two_speakers, '--out', tmp_path / 'e.csv')
    with open(tmp_path / 'e.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ['name', 'speaker', 'e0'] and len(rows[0]) == 514
    assert [row[0] for row in rows[1:]] == names and [row[1] for row in rows[1:]] == speakers
    np.testing.assert_allclose(np.array([row[2:] for row in rows[1:]], dtype=float), embeddings, atol=1e-6)

    invoke('embed', two_speakers, '--out', tmp_path / 'e.ark')
    archive = kaldiio.load_scp(str(tmp_path / 'e.scp'))
    assert list(archive) == names
    np.testing.assert_array_equal(np.stack([archive[n] for n in names]), embeddings)


def test_embed_reads_a_kaldi_wav_scp_and_keys_by_its_utterance_ids(tmp_path):
    scp = tmp_path / 'wav.scp'
    scp.write_text(f'philippe-1 {PHILIPPE[0]}\nother-1 {OTHER}\n')
    invoke('embed', scp, '--out', tmp_path / 'out.scp')
    archive = kaldiio.load_scp(str(tmp_path / 'out.scp'))
    assert list(archive) == ['philippe-1', 'other-1'] and archive['other-1'].shape == (512,)


def test_verify_json_is_symmetric_and_names_the_calibrated_threshold():
    forward = json.loads(invoke('verify', PHILIPPE[0], PHILIPPE[1], '--json').stdout)
    backward = json.loads(invoke('verify', PHILIPPE[1], PHILIPPE[0], '--json').stdout)
    assert forward['score'] == backward['score']
    calibration = json.loads(calibration_file_of(DEFAULT_CHECKPOINT).read_text())
    assert forward['threshold'] == calibration['eer_threshold']
    assert 'EER threshold of librispeech-test-other.txt' in forward['threshold_source']
    assert forward['same_speaker'] == (forward['score'] >= forward['threshold'])
    given = invoke('verify', PHILIPPE[0], OTHER, '--threshold', '-0.5').stdout
    assert given.startswith('score = ') and given.strip().endswith('threshold = -0.5000: same speaker')
    strict = invoke('verify', PHILIPPE[0], OTHER, '--threshold', '1').stdout
    assert strict.strip().endswith(': different speakers')


def test_verify_without_threshold_or_calibration_says_how_to_get_one(narrow_checkpoint):
    line = error_line(invoke('verify', PHILIPPE[0], OTHER, '--checkpoint_file', narrow_checkpoint, ok=False))
    assert '--threshold' in line and 'narrow.keras.calibration.json' in line and 'eval-trials' in line
    out_of_range = invoke('verify', PHILIPPE[0], OTHER, '--threshold', '1.5', ok=False)
    assert out_of_range.exit_code == 2 and '--threshold' in out_of_range.output


def test_enroll_identify_and_remove(tmp_path):
    store = tmp_path / 'profiles.npz'
    enrolled = invoke('enroll', '--profiles', store, '--speaker', 'philippe', PHILIPPE[0], PHILIPPE[1])
    assert 'Enrolled philippe from 2 files' in enrolled.output
    libri_1688 = sorted(str(p) for p in (LIBRI / '1688').rglob('*.flac'))
    invoke('enroll', '--profiles', store, '--speaker', '1688', *libri_1688[:2])
    assert '(3 in all)' in invoke('enroll', '--profiles', store, '--speaker', '1688', libri_1688[2]).output

    table = tmp_path / 'identified.csv'
    result = invoke('identify', '--profiles', store, PHILIPPE[2], libri_1688[5], '--top_k', '2', '--threshold',
                    '-1', '--out', table)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [(Path(r['file']).name, r['rank'], r['speaker']) for r in rows] == [
        ('PhilippeRemy_003.wav', '1', 'philippe'), ('PhilippeRemy_003.wav', '2', '1688'),
        ('1688-142285-0005.flac', '1', '1688'), ('1688-142285-0005.flac', '2', 'philippe')]
    assert all(float(rows[i]['score']) >= float(rows[i + 1]['score']) for i in (0, 2))
    assert result.stdout.splitlines()[0].split('\t')[2] == 'philippe'

    own = invoke('identify', '--profiles', store, PHILIPPE[0]).stdout.split('\t')
    calibration = json.loads(calibration_file_of(DEFAULT_CHECKPOINT).read_text())
    assert own[2] == 'philippe' and float(own[3]) >= calibration['eer_threshold']
    stranger = invoke('identify', '--profiles', store, OTHER, '--threshold', '0.99').stdout.strip().split('\t')
    assert stranger[1:3] == ['1', UNKNOWN_SPEAKER] and float(stranger[3]) < 0.99

    listing = invoke('profiles', '--profiles', store).stdout
    assert 'philippe\t2 files' in listing and '1688\t3 files' in listing and '2 speakers' in listing
    invoke('profiles', '--profiles', store, '--remove', 'philippe')
    listing = invoke('profiles', '--profiles', store).stdout
    assert 'philippe' not in listing and '1688\t3 files' in listing
    assert 'no speaker' in error_line(invoke('profiles', '--profiles', store, '--remove', 'philippe', ok=False))
    invoke('profiles', '--profiles', store, '--remove', '1688')
    line = error_line(invoke('identify', '--profiles', store, PHILIPPE[0], '--threshold', '0', ok=False))
    assert str(store) in line and 'no enrolled speakers' in line


def test_a_profile_store_missing_corrupt_or_of_another_model_is_refused(tmp_path, narrow_checkpoint):
    store = tmp_path / 'profiles.npz'
    line = error_line(invoke('identify', '--profiles', store, PHILIPPE[0], '--threshold', '0', ok=False))
    assert 'no such profile store' in line and str(store) in line
    invoke('enroll', '--profiles', store, '--speaker', 'philippe', PHILIPPE[0])
    before = store.read_bytes()
    line = error_line(invoke('enroll', '--profiles', store, '--speaker', 'philippe', PHILIPPE[1], '--checkpoint_file',
                             narrow_checkpoint, ok=False))
    assert 'another model (ResCNN width=0.25' in line and 'width=0.125' in line
    assert store.read_bytes() == before
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_text('garbage')
    assert 'not a speaker profile store' in error_line(invoke('profiles', '--profiles', corrupt, ok=False))


def test_enroll_of_only_bad_files_or_a_bad_name_changes_nothing(tmp_path):
    store = tmp_path / 'profiles.npz'
    invoke('enroll', '--profiles', store, '--speaker', 'philippe', PHILIPPE[0])
    before = store.read_bytes()
    silent = tmp_path / 'silent.wav'
    sf.write(silent, np.zeros(8000, dtype=np.float32), 16000)
    line = error_line(invoke('enroll', '--profiles', store, '--speaker', 'philippe', silent, ok=False))
    assert 'could be embedded' in line and 'unchanged' in line
    line = error_line(invoke('enroll', '--profiles', store, '--speaker', '../x', PHILIPPE[1], ok=False))
    assert "speaker name '../x'" in line
    assert store.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['profiles.npz',
                                                                                          'silent.wav']


def test_cluster_of_the_test_other_folders_prints_purity_ari_and_nmi(tmp_path):
    out = tmp_path / 'clusters.csv'
    result = invoke('cluster', LIBRI, '--num_speakers', '10', '--out', out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and len({r['speaker'] for r in rows}) == 10
    speakers, clusters = [r['speaker'] for r in rows], [r['cluster'] for r in rows]
    assert len(set(clusters)) == 10
    metrics = result.stdout.splitlines()[-1]
    assert metrics.startswith('10 speakers: purity = ')
    assert f'adjusted Rand index = {adjusted_rand_score(speakers, clusters):.4f}' in metrics
    assert f'NMI = {normalized_mutual_info_score(speakers, clusters):.4f}' in metrics
    by_threshold = invoke('cluster', LIBRI / '1688', LIBRI / '3005', '--threshold', '0.5', '--out', out)
    assert '20 files in' in by_threshold.stdout
    assert 'purity' not in invoke('cluster', *PHILIPPE, OTHER, '--num_speakers', '2', '--out', out).stdout
    assert 'exactly one' in error_line(invoke('cluster', LIBRI, '--out', out, ok=False))
    too_many = error_line(invoke('cluster', *PHILIPPE, '--num_speakers', '50', '--out', out, ok=False))
    assert too_many == 'Error: --num_speakers 50: more than the 4 files embedded; give at most 4.'


def test_bad_outputs_inputs_and_stores_are_refused_before_the_model_loads(tmp_path):
    missing_model = ('--checkpoint_file', tmp_path / 'no-such-model.keras')  # loading it would fail: never reached.
    nowhere = tmp_path / 'no-such-folder'
    for command in (['embed', PHILIPPE[0], '--out', nowhere / 'e.npz'],
                    ['identify', '--profiles', tmp_path / 'p.npz', PHILIPPE[0], '--out', nowhere / 'ids.csv'],
                    ['cluster', *PHILIPPE, '--num_speakers', '2', '--out', nowhere / 'c.csv']):
        if command[0] == 'identify':
            invoke('enroll', '--profiles', tmp_path / 'p.npz', '--speaker', 'philippe', PHILIPPE[0])
        line = error_line(invoke(*command, *missing_model, ok=False))
        assert line == f'Error: --out {command[-1]}: no such folder {nowhere}; create it first or give another path.'
    line = error_line(invoke('enroll', '--profiles', nowhere / 'p.npz', '--speaker', 'x', PHILIPPE[0], *missing_model,
                             ok=False))
    assert line.startswith(f'Error: --profiles {nowhere / "p.npz"}: no such folder')
    spaced = tmp_path / 'a b.wav'
    spaced.write_bytes(Path(PHILIPPE[0]).read_bytes())
    line = error_line(invoke('embed', spaced, '--out', tmp_path / 'e.ark', *missing_model, ok=False))
    assert 'Kaldi keys cannot contain whitespace' in line and not (tmp_path / 'e.ark').exists()
    corrupt = tmp_path / 'corrupt.npz'
    corrupt.write_bytes(b'not a zip')
    for command in (['identify', '--profiles', corrupt, PHILIPPE[0]],
                    ['enroll', '--profiles', corrupt, '--speaker', 'x', PHILIPPE[0]]):
        assert 'not a speaker profile store' in error_line(invoke(*command, *missing_model, ok=False))
    binary_list = tmp_path / 'list.txt'
    binary_list.write_bytes(Path(PHILIPPE[0]).read_bytes())
    line = error_line(invoke('embed', binary_list, '--out', tmp_path / 'e.npz', *missing_model, ok=False))
    assert line.startswith(f'Error: {binary_list}: not a text list of audio paths')


def test_eval_trials_records_the_thresholds_that_verify_uses(tmp_path):
    files = [f'1688/142285/1688-142285-000{i}.flac' for i in range(3)] + \
            [f'3005/163389/3005-163389-000{i}.flac' for i in range(3)]
    trials = [f'{int(a[:4] == b[:4])} {a} {b}' for i, a in enumerate(files) for b in files[i + 1:]]
    (tmp_path / 'small.txt').write_text('\n'.join(trials) + '\n')
    calibration, scores = tmp_path / 'small.calibration.json', tmp_path / 'scores.csv'
    checkpoint = tmp_path / 'model.keras'
    shutil.copyfile(DEFAULT_CHECKPOINT, checkpoint)
    result = invoke('eval-trials', '--trials', tmp_path / 'small.txt', '--audio_root', LIBRI, '--checkpoint_file',
                    checkpoint, '--scores_file', scores)
    assert f'recorded in {calibration_file_of(checkpoint)}' in result.stdout
    invoke('eval-trials', '--trials', tmp_path / 'small.txt', '--audio_root', LIBRI, '--checkpoint_file',
           checkpoint, '--scores_file', scores, '--calibration_file', calibration)
    recorded = json.loads(calibration.read_text())
    assert recorded == json.loads(calibration_file_of(checkpoint).read_text())
    assert recorded['trials'] == 'small.txt'
    with open(scores) as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r['label']) for r in rows])
    values = np.array([float(r['score']) for r in rows])
    threshold = recorded['eer_threshold']
    p_miss, p_fa = np.mean(values[labels == 1] < threshold), np.mean(values[labels == 0] >= threshold)
    assert min(p_miss, p_fa) <= recorded['equal_error_rate'] <= max(p_miss, p_fa)
    assert abs(p_miss - p_fa) <= 1 / 6 + 1e-9  # one trial of the 6 targets or the 9 non-targets apart.
    verdict = json.loads(invoke('verify', PHILIPPE[0], OTHER, '--json', '--checkpoint_file', checkpoint,
                                '--operating_point', 'min_dcf').stdout)
    assert verdict['threshold'] == recorded['min_dcf_threshold'] and 'small.txt' in verdict['threshold_source']
    fused = invoke('eval-trials', '--trials', tmp_path / 'small.txt', '--audio_root', LIBRI, '--checkpoint_file',
                   checkpoint, '--checkpoint_file', checkpoint, '--calibration_file', calibration, ok=False)
    assert 'one --checkpoint_file without --crop' in error_line(fused)


@pytest.mark.parametrize('make_args, expected', [
    (lambda tmp: ['embed', tmp, '--out', tmp / 'e.npz'], 'no audio files'),
    (lambda tmp: ['embed', OTHER, '--out', tmp / 'e.txt'], 'unknown embeddings format'),
    (lambda tmp: ['embed', tmp / 'missing.flac', '--out', tmp / 'e.npz'], 'no such file or folder'),
    (lambda tmp: ['identify', '--profiles', tmp / 'p.npz', tmp, '--threshold', '0'], 'no such profile store'),
])
def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, make_args, expected):
    (tmp_path / 'readme.md').write_text('no audio')
    line = error_line(invoke(*make_args(tmp_path), ok=False))
    assert expected in line and str(tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['readme.md']


def test_a_piped_wav_scp_entry_is_refused_with_its_line(tmp_path):
    scp = tmp_path / 'wav.scp'
    scp.write_text(f'a {OTHER}\nb sph2pipe -f wav b.sph |\n')
    line = error_line(invoke('embed', scp, '--out', tmp_path / 'e.ark', ok=False))
    assert f'{scp}:2: a piped command' in line
    assert not (tmp_path / 'e.ark').exists() and not (tmp_path / 'e.scp').exists()
