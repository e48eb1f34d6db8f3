"""Tests of system fusion: score fusion (weighted mean of cosine scores), embedding fusion (weighted concatenation)
and eval-trials with several --checkpoint_file, --fusion and --fusion_weights."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import csv  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402

from cli import cli  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from eval_metrics import equal_error_rate  # noqa: E402
from test import Trials, concatenated_embeddings, fused_scores, score_trials  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
TRIALS_LINE = re.compile(r'EER = ([\d.]+) %, minDCF\(p_target=0\.01\) = ([\d.]+)')
# Two short utterances of each of two speakers of samples/LibriSpeech/test-other.
A1, A2 = '3005/163389/3005-163389-0007.flac', '3005/163389/3005-163389-0004.flac'
B1, B2 = '2414/128291/2414-128291-0009.flac', '2414/128291/2414-128291-0003.flac'
TRIALS = [(1, A1, A2), (1, B1, B2), (1, A2, A1), (1, B2, B1), (0, A1, B1), (0, A1, B2), (0, A2, B1), (0, A2, B2)]
# The scores CSV holds 6 decimals: two files' rounding errors add up to 1e-6, far below this.
CSV_TOLERANCE = 1e-5

A = np.array([0.2, 0.5, -0.1])
B = np.array([0.6, 0.1, 0.3])
C = np.array([0.0, 0.0, 1.0])


# --- fused_scores -------------------------------------------------------------------------------------------------


def test_fused_scores_with_equal_weights_is_the_mean():
    np.testing.assert_allclose(fused_scores([A, B], [1.0, 1.0]), [0.4, 0.3, 0.1], atol=1e-12)


def test_fused_scores_with_unequal_weights_hand_computed():
    # (3 * 0.2 + 0.6) / 4, (3 * 0.5 + 0.1) / 4, (3 * -0.1 + 0.3) / 4.
    np.testing.assert_allclose(fused_scores([A, B], [3.0, 1.0]), [0.3, 0.4, 0.0], atol=1e-12)
    # (a + 2 b + c) / 4 for three systems.
    np.testing.assert_allclose(fused_scores([A, B, C], [1.0, 2.0, 1.0]), [0.35, 0.175, 0.375], atol=1e-12)


def test_fused_scores_do_not_depend_on_the_scale_of_the_weights():
    expected = fused_scores([A, B, C], [3.0, 1.0, 2.0])
    for factor in (0.01, 10.0, 1000.0):
        np.testing.assert_allclose(fused_scores([A, B, C], [3.0 * factor, factor, 2.0 * factor]), expected,
                                   atol=1e-12)
    assert not np.allclose(expected, fused_scores([A, B, C], [1.0, 1.0, 1.0]))


def test_fused_scores_with_a_zero_weight_are_the_other_systems_scores():
    np.testing.assert_allclose(fused_scores([A, B], [1.0, 0.0]), A, atol=1e-12)
    np.testing.assert_allclose(fused_scores([A, B], [0.0, 2.5]), B, atol=1e-12)
    assert fused_scores([A, B], [1.0, 1.0]).shape == (3,)


# --- concatenated_embeddings --------------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
    x = rng.standard_normal((rows, dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('weights', [[1.0, 1.0], [2.0, 1.0], [0.3, 5.0, 1.7]])
def test_cosine_of_concatenated_embeddings_is_the_weighted_mean_of_the_systems_cosines(weights):
    rng = np.random.default_rng(len(weights) + int(10 * weights[0]))
    dims = (8, 5, 12)[:len(weights)]  # systems of different embedding sizes.
    systems = [unit_rows(rng, 6, d) for d in dims]
    fused = concatenated_embeddings(systems, weights)
    assert fused.shape == (6, sum(dims))
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-12)
    expected = sum(w * (e @ e.T) for w, e in zip(weights, systems, strict=True)) / sum(weights)
    np.testing.assert_allclose(fused @ fused.T, expected, atol=1e-12)
    # The same through the trial scorer: embedding fusion equals score fusion.
    trials = Trials(np.array([1, 0, 0, 1]), np.array([0, 1, 2, 5]), np.array([3, 4, 0, 5]),
                    [Path(f'u{i}.flac') for i in range(6)])
    np.testing.assert_allclose(score_trials(fused, trials),
                               fused_scores([score_trials(e, trials) for e in systems], weights), atol=1e-12)


def test_concatenated_embeddings_scale_each_system_by_the_root_of_its_weight():
    rng = np.random.default_rng(3)
    first, second = unit_rows(rng, 4, 3), unit_rows(rng, 4, 2)
    fused = concatenated_embeddings([first, second], [3.0, 1.0])
    np.testing.assert_allclose(fused, np.concatenate([np.sqrt(3.0) * first, second], axis=1) / 2.0, atol=1e-12)
    np.testing.assert_allclose(concatenated_embeddings([first, second], [30.0, 10.0]), fused, atol=1e-12)
    only_first = concatenated_embeddings([first, second], [1.0, 0.0])
    np.testing.assert_allclose(only_first, np.concatenate([first, np.zeros_like(second)], axis=1), atol=1e-12)


# --- eval-trials with several checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> dict:
    """Two differently initialised ResCNN checkpoints (width 0.125) and a trial list over four files."""
    directory = tmp_path_factory.mktemp('fusion')
    checkpoints = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        path = directory / f'rescnn_seed{seed}.keras'
        DeepSpeakerModel(width=0.125).m.save(path)
        checkpoints.append(str(path))
    trials = directory / 'trials.txt'
    trials.write_text(''.join(f'{label} {enrol} {test}\n' for label, enrol, test in TRIALS))
    return {'dir': directory, 'checkpoints': checkpoints, 'trials': str(trials)}


def eval_trials(setup: dict, scores_file: Path, checkpoints: list[str], *options: str) -> Result:
    args = ['eval-trials', '--trials', setup['trials'], '--audio_root', str(AUDIO_DIR), '--scores_file',
            str(scores_file)]
    for checkpoint in checkpoints:
        args += ['--checkpoint_file', checkpoint]
    return CliRunner().invoke(cli, args + list(options))


def read_scores(scores_file: Path) -> np.ndarray:
    with open(scores_file, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(int(r['label']), r['enrol'], r['test']) for r in rows] == TRIALS
    return np.array([float(r['score']) for r in rows])


def run_ok(setup: dict, name: str, checkpoints: list[str], *options: str) -> np.ndarray:
    """Scores of a successful eval-trials run, after checking its EER line against them."""
    scores_file = setup['dir'] / f'{name}.scores.csv'
    result = eval_trials(setup, scores_file, checkpoints, *options)
    assert result.exit_code == 0, (result.stderr, result.exception)
    match = TRIALS_LINE.search(result.stdout)
    assert match, result.stdout
    scores = read_scores(scores_file)
    labels = np.array([label for label, _, _ in TRIALS])
    assert float(match.group(1)) == pytest.approx(100 * equal_error_rate(scores, labels), abs=0.005 + 1e-9)
    return scores


@pytest.fixture(scope='module')
def single(setup) -> list[np.ndarray]:
    """Scores of each checkpoint alone."""
    return [run_ok(setup, f'single{i}', [checkpoint]) for i, checkpoint in enumerate(setup['checkpoints'])]


def test_the_two_checkpoints_score_differently(single):
    assert np.max(np.abs(single[0] - single[1])) > 1e-3  # else the fusion tests below could not fail.
    for scores in single:
        assert np.all(np.abs(scores) <= 1.0 + 1e-6)


def test_score_fusion_of_two_checkpoints_is_the_mean_of_their_scores(setup, single):
    fused = run_ok(setup, 'score', setup['checkpoints'], '--fusion', 'score')
    np.testing.assert_allclose(fused, (single[0] + single[1]) / 2, atol=CSV_TOLERANCE)


def test_score_fusion_uses_the_fusion_weights(setup, single):
    fused = run_ok(setup, 'score31', setup['checkpoints'], '--fusion', 'score', '--fusion_weights', '3,1')
    np.testing.assert_allclose(fused, (3 * single[0] + single[1]) / 4, atol=CSV_TOLERANCE)


def test_concat_fusion_with_weights_1_0_scores_as_the_first_checkpoint_alone(setup, single):
    fused = run_ok(setup, 'concat10', setup['checkpoints'], '--fusion', 'concat', '--fusion_weights', '1,0')
    np.testing.assert_allclose(fused, single[0], atol=CSV_TOLERANCE)


def test_concat_fusion_with_equal_weights_equals_score_fusion(setup, single):
    fused = run_ok(setup, 'concat', setup['checkpoints'], '--fusion', 'concat')
    np.testing.assert_allclose(fused, (single[0] + single[1]) / 2, atol=CSV_TOLERANCE)


@pytest.mark.parametrize('weights', ['1,2,3', '1', 'x,1', '1,-1', '0,0'])
def test_bad_fusion_weights_are_a_one_line_error(setup, tmp_path, weights):
    scores_file = tmp_path / 'scores.csv'
    result = eval_trials(setup, scores_file, setup['checkpoints'], '--fusion_weights', weights)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # cli.fail, not an uncaught exception.
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f'Error: --fusion_weights {weights}: expected 2 non-negative '
                                                      f'numbers, one per --checkpoint_file.')
    assert not scores_file.exists()
