"""End to end through the command line: the whole pipeline on samples/ at a tiny width, resuming, the
README's example and the one-line errors of bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
TINY = ['--width', '0.125', '--batch_size', '24']
METRICS_LINE = re.compile(r'f-measure = ([\d.]+), true positive rate = ([\d.]+), accuracy = ([\d.]+), '
                          r'equal error rate = ([\d.]+)')


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} exited {result.returncode}:\n{result.stderr[-3000:]}')
    return result


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`./deep-speaker demo --model=tdnn` with one softmax and one triplet epoch of two steps at a tiny width: the
    whole pipeline (cache, inputs, both phases, test-model) in a working dir, and the demo's output."""
    demo_dir = tmp_path_factory.mktemp('demo')
    result = subprocess.run([str(ROOT / 'deep-speaker'), 'demo', '--model=tdnn', '--epochs', '1', '--steps_per_epoch',
                             '2', *TINY], capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'DEMO_DIR': str(demo_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return demo_dir, result


@pytest.fixture(scope='module')
def trained_dir(demo) -> Path:
    """The demo's working dir (read only: tests that train copy it)."""
    return demo[0]


def test_pipeline_writes_every_stage(trained_dir):
    assert len(list((trained_dir / 'audio-fbanks').glob('*/*.npy'))) == 100
    for name in ('kx_train.npy', 'ky_train.npy', 'kx_test.npy', 'ky_test.npy', 'categorical_speakers.pkl'):
        assert (trained_dir / 'keras-inputs' / name).is_file()
    for phase in ('checkpoints-softmax', 'checkpoints-triplets'):
        assert (trained_dir / phase / 'TDNN_best.keras').is_file()
        assert json.loads((trained_dir / phase / 'TDNN_state.json').read_text())['epoch'] == 1
        assert (trained_dir / phase / 'history.csv').read_text().count('\n') == 2


def test_demo_with_another_model_trains_and_evaluates_that_model(demo):
    """`./deep-speaker demo` passes its options to both training phases and evaluates the model they name."""
    demo_dir, result = demo
    for phase in ('checkpoints-softmax', 'checkpoints-triplets'):
        assert sorted(p.name for p in (demo_dir / phase).glob('*.keras')) == ['TDNN_best.keras', 'TDNN_last.keras']
    assert METRICS_LINE.search(result.stdout), result.stdout


def test_test_model_prints_the_four_metrics_and_tensorflow_notices_only_with_verbose(demo):
    """TensorFlow's C++ libraries print absl / oneDNN notices while it is imported: only --verbose shows them (the
    demo's stages run without it)."""
    from constants import TENSORFLOW_STARTUP_NOTICES
    trained_dir, result = demo
    match = METRICS_LINE.search(result.stdout)
    assert match, result.stdout
    assert all(0.0 <= float(value) <= 1.0 for value in match.groups())
    again = run('cli.py', '--verbose', 'test-model', '--working_dir', str(trained_dir), '--model', 'tdnn')
    assert METRICS_LINE.search(again.stdout).groups() == match.groups()
    assert [notice for notice in TENSORFLOW_STARTUP_NOTICES if notice in result.stderr] == []
    assert [notice for notice in TENSORFLOW_STARTUP_NOTICES if notice in again.stderr] == list(
        TENSORFLOW_STARTUP_NOTICES)


def test_triplet_phase_resumes_from_its_last_epoch(trained_dir, tmp_path):
    wd = tmp_path / 'wd'
    shutil.copytree(trained_dir, wd)
    train = ('cli.py', 'train-model', '--working_dir', str(wd), '--model', 'tdnn', '--epochs', '2', *TINY)
    result = run(*train, '--steps_per_epoch', '2')
    assert 'Resuming from' in result.stderr and 'after epoch 1' in result.stderr
    assert 'Epoch 2/2' in result.stdout and 'Epoch 1/2' not in result.stdout
    state = json.loads((wd / 'checkpoints-triplets' / 'TDNN_state.json').read_text())
    assert state['epoch'] == 2
    done = run(*train)
    assert 'nothing to do' in done.stderr


def test_example_compares_the_sample_speakers(trained_dir):
    result = run('example.py', str(trained_dir / 'checkpoints-triplets' / 'TDNN_best.keras'))
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] + ' ' + line.split()[1] for line in lines] == ['SAME SPEAKER'] * 3 + ['DIFF SPEAKER']
    assert all(-1.0 <= float(line.rsplit(' ', 1)[1]) <= 1.0 for line in lines)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run('cli.py', 'test-model', '--working_dir', str(tmp_path), '--checkpoint_file',
                 str(tmp_path / 'nope.h5'), check=False)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f'Error: {tmp_path / "nope.h5"}: no such checkpoint file; '
                                                      f'train a model first or fix the path.')


def test_stage_without_its_inputs_names_the_stage_to_run_first(tmp_path):
    result = run('cli.py', 'build-keras-inputs', '--working_dir', str(tmp_path), check=False)
    assert result.returncode == 1 and 'build-mfcc-cache' in result.stderr
    assert 'Traceback' not in result.stderr


def test_missing_audio_dir_is_a_one_line_error(tmp_path):
    result = run('cli.py', 'build-mfcc-cache', '--working_dir', str(tmp_path), '--audio_dir',
                 str(tmp_path / 'absent'), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f'Error: --audio_dir {tmp_path / "absent"}: no such directory.'


def test_unknown_pipeline_task_prints_usage_and_fails():
    result = subprocess.run([str(ROOT / 'deep-speaker'), 'no_such_task'], capture_output=True, text=True)
    assert result.returncode != 0
    assert 'Unknown task: no_such_task' in result.stderr and 'Usage: ./deep-speaker TASK' in result.stderr


def test_missing_required_option_names_it():
    result = run('cli.py', 'eval-trials', '--audio_root', str(AUDIO_DIR), '--checkpoint_file', 'x.keras', check=False)
    assert result.returncode == 2 and "Missing option '--trials'" in result.stderr


@pytest.mark.parametrize(('options', 'message'), [
    (['--dropout', '0.2'], '--tdnn_layers, --dropout and --bn_before_relu are options of --model tdnn, not --model '
                           'rescnn.'),
    (['--model', 'gru', '--bn_before_relu'], '--tdnn_layers, --dropout and --bn_before_relu are options of --model '
                                             'tdnn, not --model gru.'),
    (['--model', 'tdnn', '--tdnn_layers', '512:5'], '--tdnn_layers 512:5: expected UNITS:KERNEL:DILATION,... of '
                                                    'positive integers, e.g. 512:5:1,512:3:2,1500:1:1.'),
    (['--model', 'tdnn', '--tdnn_layers', '512:5:1,64:0:1'], '--tdnn_layers 512:5:1,64:0:1: expected '
                                                             'UNITS:KERNEL:DILATION,... of positive integers, e.g. '
                                                             '512:5:1,512:3:2,1500:1:1.'),
])
def test_bad_tdnn_options_are_one_line_errors_before_any_work(tmp_path, options, message):
    wd = tmp_path / 'wd'
    result = run('cli.py', 'train-model', '--working_dir', str(wd), '--pre_training_phase', *options, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'Error: {message}']
    assert not wd.exists()


def test_version_is_an_option_and_a_command():
    from cli import VERSION
    assert run('cli.py', '--version').stdout.strip() == VERSION
    assert run('cli.py', 'version').stdout.strip() == VERSION


TWO_SPEAKERS = ['3005-163389-0004', '3005-163389-0007', '367-130732-0000', '367-130732-0006']


@pytest.fixture(scope='module')
def inputs_dir(tmp_path_factory, copy_librispeech) -> Path:
    """A working dir with the cache and the model inputs of two speakers; nothing trained."""
    root = tmp_path_factory.mktemp('inputs')
    copy_librispeech(root / 'audio', TWO_SPEAKERS)
    run('cli.py', 'build-mfcc-cache', '--working_dir', str(root / 'wd'), '--audio_dir', str(root / 'audio'))
    run('cli.py', 'build-keras-inputs', '--working_dir', str(root / 'wd'), '--counts_per_speaker', '6,3')
    return root / 'wd'


def test_inputs_of_one_speaker_are_refused_with_the_numbers_found_and_needed(tmp_path, copy_librispeech):
    copy_librispeech(tmp_path / 'audio', TWO_SPEAKERS[:2])
    wd = tmp_path / 'wd'
    run('cli.py', 'build-mfcc-cache', '--working_dir', str(wd), '--audio_dir', str(tmp_path / 'audio'))
    result = run('cli.py', 'build-keras-inputs', '--working_dir', str(wd), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f'Error: {wd / "audio-fbanks"}: features of 1 speaker found, 2 needed (softmax and triplet training); cache '
        f'audio of more speakers, then build the model inputs again.')
    assert not (wd / 'keras-inputs').exists()


def test_triplet_phase_without_a_softmax_checkpoint_is_refused_naming_it_and_both_fixes(inputs_dir):
    result = run('cli.py', 'train-model', '--working_dir', str(inputs_dir), '--epochs', '1', *TINY, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f'Error: {inputs_dir / "checkpoints-softmax" / "ResCNN_best.keras"}: no softmax checkpoint to start the '
        f'triplet phase from; train the softmax phase first (train-model --pre_training_phase, ./deep-speaker '
        f'train_softmax) or add --from_scratch to start from random weights.')
    assert list((inputs_dir / 'checkpoints-triplets').glob('*.keras')) == []


HOLD_LOCK = """
import sys, time
from pathlib import Path
from workdir import training_lock
with training_lock(Path(sys.argv[1])):
    print('locked', flush=True)
    time.sleep(120)
"""


def test_a_second_training_run_is_refused_naming_the_first_and_a_killed_runs_lock_is_taken_over(inputs_dir):
    directory = inputs_dir / 'checkpoints-triplets'
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        train = ('cli.py', 'train-model', '--working_dir', str(inputs_dir), '--from_scratch', '--epochs', '1',
                 '--steps_per_epoch', '1', '--triplet_mining', 'random', *TINY)
        refused = run(*train, check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            f'Error: --working_dir {inputs_dir}: process {holder.pid} is training this phase '
            f'({directory / ".train.lock"}); wait for it to end or use another --working_dir.')
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    trained = run(*train)
    assert f'taking over the lock of process {holder.pid}, which is no longer running' in trained.stderr
    assert 'starts from random weights, as asked' in trained.stderr
    assert (directory / 'ResCNN_last.keras').is_file()

