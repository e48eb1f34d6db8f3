"""Score normalisation (score_norm.py, eval-trials --score_norm): AS-norm and mean-centring against a hand-built
cohort computed here with plain numpy, normalisation before fusion, the cohort read from a cache, and the CLI's
calibration record and one-line errors."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cli import cli  # noqa: E402
from constants import NUM_FBANKS  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from score_norm import CohortError, cohort_utterances  # noqa: E402
from speaker import SpeakerEncoder, SpeakerError  # noqa: E402
from test import Trials, system_scores, trial_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
A1, A2 = '3005/163389/3005-163389-0007.flac', '3005/163389/3005-163389-0004.flac'
B1, B2 = '2414/128291/2414-128291-0009.flac', '2414/128291/2414-128291-0003.flac'
TRIALS = Trials(np.array([1, 0, 0, 1]), np.array([0, 0, 1, 2]), np.array([1, 2, 3, 3]),
                [Path(str(i)) for i in range(4)])


def unit_rows(seed: int, rows: int, dims: int = 3) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dims))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def expected_asnorm(embeddings: np.ndarray, cohort: np.ndarray, trials: Trials, top: int) -> np.ndarray:
    """AS-norm written out trial by trial: each side's top-N cohort scores by a full sort."""
    normalised = []
    for a, b in zip(trials.enrol, trials.test, strict=True):
        score = float(np.dot(embeddings[a], embeddings[b]))
        sides = []
        for side in (a, b):
            highest = sorted((float(np.dot(embeddings[side], c)) for c in cohort), reverse=True)[:top]
            mean = sum(highest) / top
            std = (sum((h - mean) ** 2 for h in highest) / top) ** 0.5
            sides.append((score - mean) / std)
        normalised.append((sides[0] + sides[1]) / 2)
    return np.array(normalised)


def test_asnorm_against_a_hand_built_cohort():
    embeddings, cohort = unit_rows(0, 4), unit_rows(1, 7)
    np.testing.assert_allclose(system_scores(embeddings, cohort, TRIALS, 'asnorm', 3),
                               expected_asnorm(embeddings, cohort, TRIALS, 3), rtol=1e-10)


def test_asnorm_hand_computed_on_a_two_dimensional_cohort():
    """e = (1, 0), t = (0, 1), cohort (1, 0), (0, 1), (-1, 0), top 2: each side's top scores are 1 and 0
    (mean 0.5, std 0.5) and the raw score is 0, so s = ((0 - 0.5) / 0.5 + (0 - 0.5) / 0.5) / 2 = -1."""
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]])
    cohort = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    trials = Trials(np.array([0]), np.array([0]), np.array([1]), [Path('e'), Path('t')])
    np.testing.assert_allclose(system_scores(embeddings, cohort, trials, 'asnorm', 2), [-1.0])


def test_mean_centring_is_the_cosine_of_the_embeddings_minus_the_cohort_mean():
    embeddings, cohort = unit_rows(2, 4), unit_rows(3, 5)
    centred = embeddings - cohort.mean(axis=0)
    expected = [np.dot(centred[a], centred[b]) / (np.linalg.norm(centred[a]) * np.linalg.norm(centred[b]))
                for a, b in zip(TRIALS.enrol, TRIALS.test, strict=True)]
    np.testing.assert_allclose(system_scores(embeddings, cohort, TRIALS, 'mean'), expected, rtol=1e-10)


def test_score_fusion_normalises_each_system_before_the_weighted_mean():
    systems, cohorts = [unit_rows(4, 4), unit_rows(5, 4)], [unit_rows(6, 6), unit_rows(7, 6)]
    expected = (1 * expected_asnorm(systems[0], cohorts[0], TRIALS, 4)
                + 3 * expected_asnorm(systems[1], cohorts[1], TRIALS, 4)) / 4
    np.testing.assert_allclose(trial_scores(systems, cohorts, TRIALS, 'score', [1.0, 3.0], 'asnorm', 4), expected,
                               rtol=1e-10)


def synthetic_cache(directory: Path, speakers: dict[str, int]) -> Path:
    """A working dir caching `speakers[name]` random utterances of 200 frames for each speaker name."""
    rng = np.random.default_rng(0)
    for speaker, count in speakers.items():
        folder = directory / 'audio-fbanks' / speaker
        folder.mkdir(parents=True)
        for number in range(count):
            np.save(folder / f'u{number}.flac.npy', rng.standard_normal((200, NUM_FBANKS)).astype(np.float32))
    return directory


def test_the_cohort_is_the_clean_speakers_with_at_most_four_clean_utterances_each(tmp_path):
    working_dir = synthetic_cache(tmp_path, {'a': 6, 'b': 1, 'b~sp0.9': 1})
    np.save(working_dir / 'audio-fbanks' / 'b' / 'u0~noise0.npy', np.zeros((200, NUM_FBANKS), dtype=np.float32))
    cohort = cohort_utterances(working_dir, top=2)
    assert [[p.name for p in utterances] for utterances in cohort] == [
        ['u0.flac.npy', 'u1.flac.npy', 'u2.flac.npy', 'u3.flac.npy'], ['u0.flac.npy']]
    with pytest.raises(CohortError) as error:
        cohort_utterances(working_dir, top=3)
    assert (error.value.size, error.value.top) == (2, 3)
    with pytest.raises(CohortError, match='no cached features'):
        cohort_utterances(tmp_path / 'empty')


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp('score_norm')
    keras.utils.set_random_seed(1)
    checkpoint = directory / 'tiny.keras'
    DeepSpeakerModel(width=0.0625).m.save(checkpoint)
    trials = directory / 'trials.txt'
    trials.write_text(f'1 {A1} {A2}\n1 {B1} {B2}\n0 {A1} {B1}\n0 {A2} {B2}\n0 {A1} {B2}\n')
    return {'checkpoint': str(checkpoint), 'trials': str(trials),
            'cohort': str(synthetic_cache(directory / 'cohort', {'c1': 2, 'c2': 1, 'c3': 1}))}


def eval_trials(setup: dict, tmp_path: Path, *options: str):
    return CliRunner().invoke(cli, ['eval-trials', '--trials', setup['trials'], '--audio_root', str(AUDIO_DIR),
                                    '--checkpoint_file', setup['checkpoint'], '--scores_file',
                                    str(tmp_path / 'scores.csv'), *options])


def test_cli_asnorm_records_its_normalisation_and_verify_refuses_those_thresholds(setup, tmp_path):
    calibration = tmp_path / 'asnorm.calibration.json'
    result = eval_trials(setup, tmp_path, '--score_norm', 'asnorm', '--cohort_dir', setup['cohort'], '--asnorm_top',
                         '2', '--calibration_file', str(calibration))
    assert result.exit_code == 0, result.output
    recorded = json.loads(calibration.read_text())
    assert (recorded['score_norm'], recorded['asnorm_top'], recorded['cohort']) == ('asnorm', 2, setup['cohort'])
    assert not Path(setup['checkpoint'] + '.calibration.json').exists()
    with pytest.raises(SpeakerError, match='thresholds of asnorm-normalised scores'):
        SpeakerEncoder(setup['checkpoint']).decision_threshold(calibration=calibration)


@pytest.mark.parametrize(('options', 'message'), [
    (['--asnorm_top', '4'], '--asnorm_top 4: --cohort_dir {cohort} caches 3 speakers; give at most 3.'),
    (['--asnorm_top', '2', '--score_norm', 'none'], '--score_norm mean and asnorm need a --cohort_dir (a working dir '
                                                    'of training speakers), and --cohort_dir needs one of them.'),
])
def test_cli_cohort_errors_are_one_line_naming_the_option(setup, tmp_path, options, message):
    result = eval_trials(setup, tmp_path, '--score_norm', 'asnorm', '--cohort_dir', setup['cohort'], *options)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == 'Error: ' + message.format(cohort=setup['cohort'])
    assert not (tmp_path / 'scores.csv').exists()
