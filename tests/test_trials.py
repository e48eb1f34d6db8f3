"""Trial-list evaluation: test.read_trials, scores, the EER / minDCF / DET metrics
of eval_metrics (checked against scikit-learn and brute force) and `cli.py eval-trials` end to end."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

import test as evaluation
from eval_metrics import equal_error_rate, error_rates, min_dcf, plot_det

ROOT = Path(__file__).resolve().parents[1]
AUDIO_ROOT = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
SHORT_A1, SHORT_A2 = '3005/163389/3005-163389-0004.flac', '3005/163389/3005-163389-0007.flac'
SHORT_B1, SHORT_B2 = '367/130732/367-130732-0000.flac', '367/130732/367-130732-0006.flac'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
RESULT_LINE = re.compile(r'EER = ([\d.]+) %, minDCF\(p_target=0\.01\) = ([\d.]+)')


# ---------------------------------------------------------------------------------------------------- read_trials

@pytest.fixture
def audio_root(tmp_path, copy_librispeech) -> Path:
    root = tmp_path / 'audio'
    copy_librispeech(root, ['3005-163389-0004', '3005-163389-0007', '367-130732-0000'])
    return root


def write_list(path: Path, lines: list[str]) -> str:
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def test_read_trials_parses_labels_sides_and_distinct_files(tmp_path, audio_root):
    trials_file = write_list(tmp_path / 'trials.txt', [
        f'1 {SHORT_A1} {SHORT_A2}',
        '',
        f'0 {SHORT_A1} {SHORT_B1}',
        '   ',
        f'0\t{SHORT_B1}   {SHORT_A2}',
        f'1 {SHORT_A2} {SHORT_A1}',
    ])
    trials = evaluation.read_trials(trials_file, str(audio_root))
    assert trials.labels.tolist() == [1, 0, 0, 1]
    assert trials.files == [audio_root / SHORT_A1, audio_root / SHORT_A2, audio_root / SHORT_B1]
    assert [trials.files[i] for i in trials.enrol] == [audio_root / n for n in (SHORT_A1, SHORT_A1, SHORT_B1,
                                                                                SHORT_A2)]
    assert [trials.files[i] for i in trials.test] == [audio_root / n for n in (SHORT_A2, SHORT_B1, SHORT_A2,
                                                                               SHORT_A1)]
    assert len(set(trials.files)) == len(trials.files)


@pytest.mark.parametrize('lines, bad_line, message', [
    ([f'1 {SHORT_A1} {SHORT_A2}', '', f'0 {SHORT_A1} 3005/163389/absent.flac'], 3, 'does not exist'),
    ([f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A1}'], 2, 'expected "label path path"'),
    ([f'1 {SHORT_A1} {SHORT_A2} extra'], 1, 'expected "label path path"'),
    ([f'1 {SHORT_A1} {SHORT_A2}', f'2 {SHORT_A1} {SHORT_B1}'], 2, "label '2'"),
    ([f'yes {SHORT_A1} {SHORT_B1}'], 1, "label 'yes'"),
])
def test_read_trials_errors_name_the_file_and_line(tmp_path, audio_root, lines, bad_line, message):
    trials_file = write_list(tmp_path / 'trials.txt', lines)
    with pytest.raises(evaluation.TrialError) as error:
        evaluation.read_trials(trials_file, str(audio_root))
    assert str(error.value).startswith(f'{trials_file}:{bad_line}: ')
    assert message in str(error.value)


def test_read_trials_missing_file_message_names_the_path(tmp_path, audio_root):
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {SHORT_A1} nowhere/x.flac'])
    with pytest.raises(evaluation.TrialError, match=re.escape(str(audio_root / 'nowhere' / 'x.flac'))):
        evaluation.read_trials(trials_file, str(audio_root))


def test_read_trials_accepts_kaldi_lines_mixed_with_voxceleb_lines(tmp_path, audio_root):
    trials_file = write_list(tmp_path / 'trials.txt', [f'{SHORT_A1} {SHORT_A2} target',
                                                       f'{SHORT_A1}\t{SHORT_B1} nontarget',
                                                       f'0 {SHORT_B1} {SHORT_A2}'])
    trials = evaluation.read_trials(trials_file, str(audio_root))
    assert trials.labels.tolist() == [1, 0, 0]
    assert trials.files == [audio_root / SHORT_A1, audio_root / SHORT_A2, audio_root / SHORT_B1]
    assert trials.enrol.tolist() == [0, 0, 2] and trials.test.tolist() == [1, 2, 1]


@pytest.mark.parametrize('name', ['../outside.flac', '3005/../../outside.flac', '/etc/hostname', '.'])
def test_read_trials_refuses_a_path_outside_the_audio_root_naming_file_and_line(tmp_path, audio_root, name):
    (tmp_path / 'outside.flac').write_bytes((audio_root / SHORT_A1).read_bytes())
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A1} {name}'])
    with pytest.raises(evaluation.TrialError) as error:
        evaluation.read_trials(trials_file, str(audio_root))
    assert str(error.value) == (f'{trials_file}:2: {name} is outside --audio_root {audio_root}; trial paths must '
                                f'lie under it.')


@pytest.mark.parametrize('name', ['../outside.flac', '../../outside.flac'])
def test_read_trials_refuses_a_path_outside_a_relative_audio_root(tmp_path, audio_root, monkeypatch, name):
    """`--audio_root .`: Path('..').is_relative_to(Path('.')) is True, so the root is made absolute first."""
    (tmp_path / 'outside.flac').write_bytes((audio_root / SHORT_A1).read_bytes())
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A1} {name}'])
    monkeypatch.chdir(audio_root)
    with pytest.raises(evaluation.TrialError, match=re.escape(f'{trials_file}:2: {name} is outside --audio_root')):
        evaluation.read_trials(trials_file, '.')


@pytest.mark.parametrize('option', ['scores_file', 'det_plot'])
def test_evaluate_trials_refuses_an_output_in_a_missing_folder_before_loading_a_model(tmp_path, option):
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A1} {SHORT_B1}'])
    output = tmp_path / 'absent' / 'out.csv'
    with pytest.raises(evaluation.TrialError) as error:  # the checkpoint does not exist: it must not be read.
        evaluation.evaluate_trials(trials_file, str(AUDIO_ROOT), [str(tmp_path / 'unused.keras')],
                                   **{option: str(output)})
    assert str(error.value) == f'{output}: folder {output.parent} does not exist; create it or choose another path.'


def test_read_trials_accepts_an_absolute_path_inside_the_audio_root(tmp_path, audio_root):
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {audio_root / SHORT_A1} {SHORT_A2}'])
    assert evaluation.read_trials(trials_file, str(audio_root)).files == [audio_root / SHORT_A1,
                                                                          audio_root / SHORT_A2]


@pytest.mark.parametrize('content', ['', '\n\n   \n'])
def test_read_trials_empty_list_raises(tmp_path, audio_root, content):
    trials_file = tmp_path / 'trials.txt'
    trials_file.write_text(content)
    with pytest.raises(evaluation.TrialError, match=re.escape(f'{trials_file}: no trials')):
        evaluation.read_trials(str(trials_file), str(audio_root))


# ------------------------------------------------------------------------------------------------------ metrics

def sklearn_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER from scikit-learn's ROC: linear interpolation where fnr - fpr changes sign."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    difference = (1 - tpr) - fpr  # from 1 (accept nothing) down to -1 (accept everything).
    k = int(np.flatnonzero(difference <= 0)[0])
    if difference[k] == 0:
        return float(fpr[k])
    t = difference[k - 1] / (difference[k - 1] - difference[k])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def brute_force_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0) -> float:
    """Minimum normalised cost over every realisable threshold: each distinct score, plus one above them all."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    best = np.inf
    for threshold in [*np.unique(scores), np.inf]:
        p_miss = np.mean(scores[labels] < threshold)
        p_fa = np.mean(scores[~labels] >= threshold)
        best = min(best, c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa)
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


def random_trials(seed: int, n_target: int = 150, n_nontarget: int = 900, shift: float = 1.5):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(shift, 1.0, n_target), rng.normal(0.0, 1.0, n_nontarget)])
    labels = np.concatenate([np.ones(n_target, dtype=int), np.zeros(n_nontarget, dtype=int)])
    order = rng.permutation(len(scores))
    return scores[order], labels[order]


@pytest.mark.parametrize('seed', range(5))
def test_eer_matches_sklearn_roc_on_random_scores(seed):
    scores, labels = random_trials(seed, shift=0.5 + 0.5 * seed)
    # Both interpolate on the same polyline of operating points; only float rounding can differ.
    assert equal_error_rate(scores, labels) == pytest.approx(sklearn_eer(scores, labels), abs=1e-12)


def test_eer_matches_sklearn_on_small_uneven_lists():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_target, n_nontarget = rng.integers(1, 6), rng.integers(1, 9)
        scores = rng.standard_normal(n_target + n_nontarget)
        labels = np.array([1] * n_target + [0] * n_nontarget)
        assert equal_error_rate(scores, labels) == pytest.approx(sklearn_eer(scores, labels), abs=1e-12)


def test_eer_of_separable_scores_is_zero_and_of_inverted_scores_is_one():
    scores = np.array([0.9, 0.8, 0.75, 0.2, 0.1, -0.3])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert equal_error_rate(scores, labels) == 0.0
    assert equal_error_rate(-scores, labels) == pytest.approx(1.0)
    assert sklearn_eer(-scores, labels) == pytest.approx(1.0)


@pytest.mark.parametrize('targets, nontargets, expected', [
    # Sorted: 0.1t 0.2n 0.3n 0.4t 0.5n 0.7t 0.8t. Rejecting 0.1, 0.2, 0.3: miss 1/4, fa 1/3; rejecting 0.4 too:
    # miss 2/4, fa 1/3. The curves cross on that step, where the false-alarm rate stays 1/3.
    ([0.8, 0.7, 0.4, 0.1], [0.5, 0.3, 0.2], 1 / 3),
    # Sorted: 0.1n 0.2t 0.8n 0.9t. Rejecting 0.1 and 0.2: miss 1/2 = fa 1/2 exactly.
    ([0.9, 0.2], [0.8, 0.1], 1 / 2),
    # Sorted: 0.2n 0.3t 0.6t 0.7n 0.9t: miss goes 1/3 -> 2/3 while fa stays 1/2.
    ([0.9, 0.6, 0.3], [0.7, 0.2], 1 / 2),
])
def test_eer_hand_computed(targets, nontargets, expected):
    scores = np.array(targets + nontargets)
    labels = np.array([1] * len(targets) + [0] * len(nontargets))
    assert equal_error_rate(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert sklearn_eer(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize('labels', [[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
def test_eer_of_identical_scores_is_one_half_whatever_the_trial_order(labels):
    """All scores equal (e.g. a collapsed model): no threshold separates anything, so the EER is 50 %."""
    scores, labels = np.full(4, 0.7), np.array(labels)
    assert sklearn_eer(scores, labels) == pytest.approx(0.5)
    assert equal_error_rate(scores, labels) == pytest.approx(0.5)


def test_eer_with_tied_scores_matches_sklearn():
    scores, labels = random_trials(0, n_target=40, n_nontarget=120, shift=1.0)
    scores = np.round(scores, 0)  # a handful of distinct values, each shared by targets and non-targets.
    assert equal_error_rate(scores, labels) == pytest.approx(sklearn_eer(scores, labels), abs=1e-12)


def test_min_dcf_with_tied_scores_equals_brute_force():
    scores, labels = random_trials(1, n_target=40, n_nontarget=120, shift=1.0)
    scores = np.round(scores, 0)
    assert min_dcf(scores, labels, 0.05) == pytest.approx(brute_force_min_dcf(scores, labels, 0.05), abs=1e-12)


@pytest.mark.parametrize('p_target', [0.01, 0.05])
@pytest.mark.parametrize('seed', range(3))
def test_min_dcf_equals_brute_force_over_thresholds(p_target, seed):
    scores, labels = random_trials(seed, n_target=100, n_nontarget=600, shift=2.0)
    assert min_dcf(scores, labels, p_target) == pytest.approx(brute_force_min_dcf(scores, labels, p_target),
                                                              abs=1e-12)


def test_min_dcf_with_other_costs_equals_brute_force():
    scores, labels = random_trials(3, n_target=60, n_nontarget=300)
    for c_miss, c_fa in ((10.0, 1.0), (1.0, 10.0)):
        assert min_dcf(scores, labels, 0.05, c_miss, c_fa) == pytest.approx(
            brute_force_min_dcf(scores, labels, 0.05, c_miss, c_fa), abs=1e-12)


def test_min_dcf_hand_computed():
    # Separable: a threshold with no error exists, cost 0. Inverted: best is to reject everything (p_miss 1):
    # cost 0.01 * 1, normalised by 0.01.
    scores, labels = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])
    assert min_dcf(scores, labels, 0.01) == 0.0
    assert min_dcf(-scores, labels, 0.01) == pytest.approx(1.0)


@pytest.mark.parametrize('labels', [[0, 0, 1, 1], [1, 1, 0, 0]])
def test_min_dcf_of_identical_scores_is_one(labels):
    """All scores equal: accept all (cost 0.99 / 0.01) or reject all (cost 1): minDCF 1 in any trial order."""
    scores, labels = np.full(4, 0.7), np.array(labels)
    assert brute_force_min_dcf(scores, labels, 0.01) == pytest.approx(1.0)
    assert min_dcf(scores, labels, 0.01) == pytest.approx(1.0)


def test_error_rates_endpoints_and_thresholds():
    scores, labels = random_trials(0, n_target=30, n_nontarget=70)
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    assert thresholds.shape == p_miss.shape == p_fa.shape == (len(scores) + 1,)
    assert (p_miss[0], p_fa[0]) == (0.0, 1.0)  # the first threshold accepts everything.
    assert (p_miss[-1], p_fa[-1]) == (1.0, 0.0)  # the last rejects everything.
    assert np.all(np.diff(p_miss) >= 0) and np.all(np.diff(p_fa) <= 0)
    for threshold, miss, fa in zip(thresholds, p_miss, p_fa, strict=True):
        assert miss == pytest.approx(np.mean(scores[labels == 1] < threshold))
        assert fa == pytest.approx(np.mean(scores[labels == 0] >= threshold))


@pytest.mark.parametrize('separable', [False, True])
def test_plot_det_writes_a_readable_png(tmp_path, separable):
    import matplotlib.image

    scores, labels = random_trials(1, shift=8.0 if separable else 1.5)
    path = tmp_path / 'det.png'
    plot_det(scores, labels, str(path), title='test')
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (500, 500)  # 5 x 5 inches at 100 dpi.
    assert image.std() > 0  # not a blank canvas.


@pytest.fixture(scope='module')
def model():
    from conv_models import DeepSpeakerModel
    return DeepSpeakerModel(width=0.125)


def test_score_trials_is_the_cosine_of_each_pair(tmp_path, audio_root):
    trials_file = write_list(tmp_path / 't.txt', [f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A2} {SHORT_B1}',
                                                  f'0 {SHORT_B1} {SHORT_B1}'])
    trials = evaluation.read_trials(trials_file, str(audio_root))
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    np.testing.assert_allclose(evaluation.score_trials(embeddings, trials), [0.6, -0.8, 1.0])


def test_write_scores_rows_follow_the_trial_order(tmp_path, audio_root):
    lines = [f'0 {SHORT_B1} {SHORT_A1}', f'1 {SHORT_A1} {SHORT_A2}', f'0 {SHORT_A2} {SHORT_B1}']
    trials = evaluation.read_trials(write_list(tmp_path / 't.txt', lines), str(audio_root))
    scores = np.array([0.1234567, -0.5, 0.987654321])
    path = tmp_path / 'scores.csv'
    evaluation.write_scores(str(path), trials, scores, str(audio_root))
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['label', 'score', 'enrol', 'test']
    assert rows[1:] == [line.split()[:1] + [f'{s:.6f}'] + line.split()[1:] for line, s in zip(lines, scores,
                                                                                                   strict=True)]


# ------------------------------------------------------------------------------------------------------ the CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'cli.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_eval_trials_prints_eer_and_min_dcf_of_the_scores_it_writes(tmp_path, model):
    checkpoint = tmp_path / 'tiny.keras'
    model.m.save(checkpoint)
    lines = [f'1 {SHORT_A1} {SHORT_A2}', f'1 {SHORT_B1} {SHORT_B2}', f'0 {SHORT_A1} {SHORT_B1}',
             f'0 {SHORT_A2} {SHORT_B2}', f'0 {SHORT_A1} {SHORT_B2}', f'0 {SHORT_A2} {SHORT_B1}']
    trials_file = write_list(tmp_path / 'trials.txt', lines)
    scores_file, det_plot = tmp_path / 'scores.csv', tmp_path / 'det.png'
    result = run_cli('eval-trials', '--trials', trials_file, '--audio_root', str(AUDIO_ROOT), '--checkpoint_file',
                     str(checkpoint), '--scores_file', str(scores_file), '--det_plot', str(det_plot))
    assert result.returncode == 0, result.stderr[-3000:]
    match = RESULT_LINE.search(result.stdout)
    assert match, result.stdout
    with open(scores_file, newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert [f"{r['label']} {r['enrol']} {r['test']}" for r in rows] == lines
    scores, labels = np.array([float(r['score']) for r in rows]), np.array([int(r['label']) for r in rows])
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert float(match.group(1)) == pytest.approx(100 * equal_error_rate(scores, labels), abs=0.005 + 1e-9)
    assert float(match.group(2)) == pytest.approx(min_dcf(scores, labels, 0.01), abs=5e-5 + 1e-9)
    assert det_plot.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_eval_trials_with_a_missing_file_is_a_one_line_error(tmp_path):
    trials_file = write_list(tmp_path / 'trials.txt', [f'1 {SHORT_A1} {SHORT_A2}', '',
                                                       f'0 {SHORT_A1} 3005/163389/absent.flac'])
    result = run_cli('eval-trials', '--trials', trials_file, '--audio_root', str(AUDIO_ROOT), '--checkpoint_file',
                     str(tmp_path / 'unused.keras'), '--scores_file', str(tmp_path / 's.csv'))
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'Error: {trials_file}:3: ') and 'absent.flac does not exist' in last
    assert not (tmp_path / 's.csv').exists()


def test_cli_eval_trials_skips_undecodable_files_with_their_trials_or_refuses_with_strict(tmp_path, model,
                                                                                          copy_librispeech):
    root = tmp_path / 'audio'
    copy_librispeech(root, [Path(name).stem for name in (SHORT_A1, SHORT_A2, SHORT_B1, SHORT_B2)])
    bad = root / '367' / '130732' / 'broken.flac'
    bad.write_text('not audio\n')
    checkpoint = tmp_path / 'tiny.keras'
    model.m.save(checkpoint)
    good = [f'1 {SHORT_A1} {SHORT_A2}', f'1 {SHORT_B1} {SHORT_B2}', f'0 {SHORT_A1} {SHORT_B1}',
            f'0 {SHORT_A2} {SHORT_B2}']
    broken = [f'1 {SHORT_B1} 367/130732/broken.flac', f'367/130732/broken.flac {SHORT_A1} nontarget']
    trials_file = write_list(tmp_path / 'trials.txt', good[:2] + broken + good[2:])
    scores_file = tmp_path / 'scores.csv'
    options = ['eval-trials', '--trials', trials_file, '--audio_root', str(root), '--checkpoint_file',
               str(checkpoint), '--scores_file', str(scores_file)]
    result = run_cli(*options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert RESULT_LINE.search(result.stdout)
    listed = tmp_path / 'trials.skipped.txt'
    assert (f'Skipped 1 files that could not be decoded and their 2 trials (listed in {listed}); scoring the other '
            f'4 trials.') in result.stderr
    assert listed.read_text().startswith(f'{bad}: not a readable audio file (wav, flac, ogg, mp3)')
    with open(scores_file, newline='') as f:
        assert [f"{r['label']} {r['enrol']} {r['test']}" for r in csv.DictReader(f)] == good

    strict = run_cli(*options, '--strict')
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines()[-1].startswith(f'Error: {bad}: not a readable audio file (wav, flac, '
                                                             f'ogg, mp3)')
