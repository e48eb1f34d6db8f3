"""The train / test / eval-trials commands with --model tdnn and --model gru, each stage a `cli.py` process."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import csv  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402

from cli import cli  # noqa: E402
from conv_models import (  # noqa: E402
    checkpoint_architecture,
)
from eval_metrics import equal_error_rate, min_dcf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
SMALL_WIDTH = 0.125
TINY = ['--width', str(SMALL_WIDTH), '--batch_size', '24']
# The TDNN options of the command-line TDNN run, and the frame layers they give at SMALL_WIDTH.
CLI_TDNN_OPTIONS = ['--tdnn_layers', '128:5:1,128:3:2,128:3:3,384:1:1', '--bn_before_relu', '--dropout', '0.1',
                    '--learning_rate', '0.002']
CLI_TDNN_ARCHITECTURE = {'width': 1.0, 'frame_layers': ((16, 5, 1), (16, 3, 2), (16, 3, 3), (48, 1, 1)),
                         'bn_before_relu': True}
METRICS_LINE = re.compile(r'f-measure = ([\d.]+), true positive rate = ([\d.]+), accuracy = ([\d.]+), '
                          r'equal error rate = ([\d.]+)')
TRIALS_LINE = re.compile(r'EER = ([\d.]+) %, minDCF\(p_target=0\.01\) = ([\d.]+)')
# Two short utterances of each of two speakers of samples/LibriSpeech/test-other.
A1, A2 = '3005/163389/3005-163389-0007.flac', '3005/163389/3005-163389-0004.flac'
B1, B2 = '2414/128291/2414-128291-0009.flac', '2414/128291/2414-128291-0003.flac'
TRIALS = [(1, A1, A2), (1, B1, B2), (1, A2, A1), (1, B2, B1), (0, A1, B1), (0, A1, B2), (0, A2, B1), (0, A2, B2)]


# --- Command line -------------------------------------------------------------------------------------------------


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, 'cli.py', *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} exited {result.returncode}:\n{result.stderr[-3000:]}')
    return result


def write_trials(path: Path) -> Path:
    path.write_text(''.join(f'{label} {enrol} {test}\n' for label, enrol, test in TRIALS))
    return path


def config_layer_names(checkpoint: Path) -> set[str]:
    with zipfile.ZipFile(checkpoint) as archive:
        return {layer['name'] for layer in json.loads(archive.read('config.json'))['config']['layers']}


def eval_trials(*args: str) -> Result:
    """eval-trials in this process (TensorFlow is already imported here: seconds saved per run)."""
    result = CliRunner().invoke(cli, ['eval-trials', *args])
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    return result


def assert_eval_trials_line_matches_its_scores(result: Result, scores_file: Path) -> None:
    match = TRIALS_LINE.search(result.stdout)
    assert match, result.stdout
    with open(scores_file, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(int(r['label']), r['enrol'], r['test']) for r in rows] == TRIALS
    scores, labels = np.array([float(r['score']) for r in rows]), np.array([int(r['label']) for r in rows])
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    np.testing.assert_allclose(scores[:2], scores[2:4], atol=2e-6)  # a trial and its mirror score the same.
    assert float(match.group(1)) == pytest.approx(100 * equal_error_rate(scores, labels), abs=0.005 + 1e-9)
    assert float(match.group(2)) == pytest.approx(min_dcf(scores, labels, 0.01), abs=5e-5 + 1e-9)


@pytest.fixture(scope='module')
def tdnn_dir(tmp_path_factory) -> dict:
    """A working dir after cache, inputs, one TDNN softmax epoch (with CLI_TDNN_OPTIONS) and one TDNN triplet epoch
    (hard mining, no TDNN options), each stage a `cli.py` process."""
    wd = tmp_path_factory.mktemp('tdnn-wd')
    run('build-mfcc-cache', '--working_dir', str(wd), '--audio_dir', str(AUDIO_DIR))
    run('build-keras-inputs', '--working_dir', str(wd), '--counts_per_speaker', '8,4')
    softmax = run('train-model', '--working_dir', str(wd), '--model', 'tdnn', '--pre_training_phase', '--epochs',
                  '1', '--steps_per_epoch', '2', *TINY, *CLI_TDNN_OPTIONS)
    triplet = run('train-model', '--working_dir', str(wd), '--model', 'tdnn', '--epochs', '1', '--steps_per_epoch',
                  '2', '--triplet_mining', 'hard', '--history_size', '60', '--refresh_every', '1', *TINY)
    return {'wd': wd, 'softmax': softmax, 'triplet': triplet}


def test_cli_tdnn_training_writes_tdnn_checkpoints_in_both_phases(tdnn_dir):
    wd = tdnn_dir['wd']
    softmax, triplet = wd / 'checkpoints-softmax' / 'TDNN_best.keras', wd / 'checkpoints-triplets' / 'TDNN_best.keras'
    for phase in ('checkpoints-softmax', 'checkpoints-triplets'):
        assert sorted(p.name for p in (wd / phase).glob('*.keras')) == ['TDNN_best.keras', 'TDNN_last.keras']
        assert json.loads((wd / phase / 'TDNN_state.json').read_text())['epoch'] == 1
    # The triplet phase takes the softmax checkpoint's architecture: no need to repeat the TDNN options.
    assert checkpoint_architecture(str(softmax)) == ('tdnn', CLI_TDNN_ARCHITECTURE)
    assert checkpoint_architecture(str(triplet)) == ('tdnn', CLI_TDNN_ARCHITECTURE)
    assert {f'tdnn{n}_dropout' for n in range(1, 5)} <= config_layer_names(softmax)
    last = keras.saving.load_model(wd / 'checkpoints-softmax' / 'TDNN_last.keras', compile=True)
    assert float(keras.ops.convert_to_numpy(last.optimizer.learning_rate)) == pytest.approx(0.002)
    assert {'softmax_layer', 'stats_pooling'} <= config_layer_names(softmax)
    assert 'ln' in config_layer_names(triplet) and 'softmax_layer' not in config_layer_names(triplet)
    assert re.search(r'Epoch 1: val_accuracy = [\d.]+, new best checkpoint', tdnn_dir['softmax'].stderr)
    stderr = tdnn_dir['triplet'].stderr
    assert f'Initialising from the softmax checkpoint {softmax}' in stderr
    assert 'Mining (hard)' in stderr and '60 crops' in stderr


def test_cli_tdnn_test_model_prints_the_four_metrics(tdnn_dir):
    result = run('test-model', '--working_dir', str(tdnn_dir['wd']), '--model', 'tdnn')
    match = METRICS_LINE.search(result.stdout)
    assert match, result.stdout
    assert all(0.0 <= float(value) <= 1.0 for value in match.groups())


def test_cli_tdnn_eval_trials_prints_eer_and_min_dcf(tdnn_dir, tmp_path):
    scores_file = tmp_path / 'scores.csv'
    result = eval_trials('--trials', str(write_trials(tmp_path / 'trials.txt')), '--audio_root',
                 str(AUDIO_DIR), '--checkpoint_file', str(tdnn_dir['wd'] / 'checkpoints-triplets' / 'TDNN_best.keras'),
                 '--model', 'tdnn', '--scores_file', str(scores_file))
    assert_eval_trials_line_matches_its_scores(result, scores_file)


@pytest.fixture(scope='module')
def gru_dir(tdnn_dir, tmp_path_factory) -> Path:
    """A working dir with the TDNN dir's cache and inputs and one GRU softmax step."""
    wd = tmp_path_factory.mktemp('gru-wd')
    for subdir in ('audio-fbanks', 'keras-inputs'):
        shutil.copytree(tdnn_dir['wd'] / subdir, wd / subdir)
    run('train-model', '--working_dir', str(wd), '--model', 'gru', '--pre_training_phase', '--epochs', '1',
        '--steps_per_epoch', '1', *TINY)
    return wd


def test_cli_gru_softmax_checkpoint_is_evaluated_on_trials(gru_dir, tmp_path):
    checkpoint = gru_dir / 'checkpoints-softmax' / 'GRU_best.keras'
    assert checkpoint_architecture(str(checkpoint)) == ('gru', {'width': SMALL_WIDTH})
    assert 'softmax_layer' in config_layer_names(checkpoint)
    scores_file = tmp_path / 'scores.csv'
    result = eval_trials('--trials', str(write_trials(tmp_path / 'trials.txt')), '--audio_root',
                 str(AUDIO_DIR), '--checkpoint_file', str(checkpoint), '--scores_file', str(scores_file))
    assert_eval_trials_line_matches_its_scores(result, scores_file)
