"""Interruptions and reproducibility through the command line, with real processes really killed (SIGKILL to the
whole process group, pool workers included): the feature cache, the model inputs and training resume whole and
identical to uninterrupted runs; the same seed gives the same pipeline; bad input gives a one-line error."""

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ['1688', '2033', '3005']  # 10 utterances each in samples/LibriSpeech/test-other.
NUM_UTTERANCES = 30
TINY = ['--width', '0.125', '--batch_size', '24']
METRICS_LINE = re.compile(r'f-measure = [\d.]+, true positive rate = [\d.]+, accuracy = [\d.]+, '
                          r'equal error rate = [\d.]+')
TIMEOUT = 600


def cli(*args: str) -> list[str]:
    return [sys.executable, 'cli.py', *map(str, args)]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} exited {result.returncode}:\n{result.stderr[-3000:]}')
    return result


class Job:
    """A cli.py command running in its own session (process group), its output in files."""

    def __init__(self, log_dir: Path, *args: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.stdout_path = log_dir / f'{time.monotonic_ns()}.out'
        self.stderr_path = self.stdout_path.with_suffix('.err')
        with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
            self.process = subprocess.Popen(cli(*args), cwd=ROOT, stdout=out, stderr=err, start_new_session=True)

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> bool:
        """SIGKILLs the whole process group; returns whether the command was still running."""
        was_running = self.running()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone: the command had finished, workers included.
            pass
        self.process.wait(timeout=60)
        return was_running

    def wait(self) -> int:
        return self.process.wait(timeout=TIMEOUT)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def check(self) -> 'Job':
        returncode = self.wait()
        assert returncode == 0, f'{self.args} exited {returncode}:\n{self.stderr[-3000:]}'
        return self


@pytest.fixture
def jobs(tmp_path):
    """Starts Jobs and kills whatever is left of them when the test ends (also when it fails)."""
    started: list[Job] = []

    def start(*args: str) -> Job:
        job = Job(tmp_path / 'logs', *args)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()


def wait_until(condition: Callable[[], bool], job: Job, timeout: float = TIMEOUT, poll: float = 0.002) -> bool:
    """Polls `condition` until it holds (True) or `job` ends or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not job.running():
            return condition()
        time.sleep(poll)
    return False


def temp_files(directory: Path) -> list[Path]:
    """Files whose name starts with '.' (the temporary files of atomic writes) anywhere under `directory`."""
    return sorted(p for p in directory.rglob('.*') if p.is_file())


def cached_files(cache: Path) -> list[Path]:
    """The feature files in place in a cache (temporary files left out)."""
    return sorted(p for p in cache.glob('*/*.npy') if not p.name.startswith('.'))


def cache_arrays(working_dir: Path) -> dict[str, np.ndarray]:
    """Every cached feature file, by path relative to the cache."""
    cache = working_dir / 'audio-fbanks'
    return {str(p.relative_to(cache)): np.load(p) for p in cached_files(cache)}


def assert_same_cache(working_dir: Path, reference: Path) -> None:
    got, expected = cache_arrays(working_dir), cache_arrays(reference)
    assert sorted(got) == sorted(expected) and len(got) == NUM_UTTERANCES
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name


def check_npy(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Asserts `path` is a whole .npy file (its size is the header plus the data its header declares) that loads
    memory-mapped; returns its shape and dtype."""
    with open(path, 'rb') as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        data_offset = f.tell()
    assert path.stat().st_size == data_offset + int(np.prod(shape)) * dtype.itemsize, f'{path} is truncated'
    array = np.load(path, mmap_mode='r')
    assert array.shape == shape and array.dtype == dtype
    return shape, dtype


def copy_cache(source: Path, working_dir: Path) -> Path:
    shutil.copytree(source / 'audio-fbanks', working_dir / 'audio-fbanks')
    return working_dir


@pytest.fixture(scope='module')
def audio_dir(tmp_path_factory, librispeech_dir, copy_librispeech) -> Path:
    """3 speakers x 10 utterances in the LibriSpeech layout."""
    ids = [p.stem for speaker in SPEAKERS for p in sorted((librispeech_dir / speaker).rglob('*.flac'))]
    directory = tmp_path_factory.mktemp('audio')
    copy_librispeech(directory, ids)
    assert len(ids) == NUM_UTTERANCES
    return directory


@pytest.fixture(scope='module')
def clean_cache(tmp_path_factory, audio_dir) -> Path:
    """A working dir whose cache was built in one uninterrupted run: the reference."""
    working_dir = tmp_path_factory.mktemp('clean')
    run('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', '2')
    assert len(cache_arrays(working_dir)) == NUM_UTTERANCES and not temp_files(working_dir)
    return working_dir


# Feature cache.


def test_cache_build_killed_at_random_points_then_rerun_equals_a_clean_build(tmp_path, jobs, audio_dir,
                                                                               clean_cache):
    rng = random.Random(20240611)
    working_dir, cache = tmp_path / 'wd', tmp_path / 'wd' / 'audio-fbanks'
    kills = []
    for _ in range(3):
        # Kill points: once the run has cached a random number of new files (up to a third of what is left), a
        # random moment later: the pool workers are reading, computing or writing.
        target = len(cached_files(cache)) + rng.randint(1, (NUM_UTTERANCES - len(cached_files(cache))) // 3)
        job = jobs('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', '2')
        wait_until(lambda target=target: len(cached_files(cache)) >= target, job)
        time.sleep(rng.uniform(0.0, 0.05))
        was_running = job.kill()
        kills.append((was_running, len(cached_files(cache))))
        for path in cached_files(cache):  # every file in place is whole; temp files may be left over.
            check_npy(path)
    assert all(was_running and count < NUM_UTTERANCES for was_running, count in kills), \
        f'a kill did not land mid-build (still running, files cached): {kills}'

    run('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', '2')
    assert_same_cache(working_dir, clean_cache)
    assert temp_files(working_dir) == []
    assert not (working_dir / 'skipped-files.txt').exists()


def plant_temp_file(cache: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """A real process, in its own process group, whose forked child (as a pool worker is) starts writing
    `.<name>.<child pid>-<random>.tmp.npy` into the cache and stays alive; returns the parent and the file."""
    code = ('import os, time, uuid; from pathlib import Path\n'
            'if os.fork() == 0:\n'
            f'    p = Path({str(cache)!r}) / f".{name}.{{os.getpid()}}-{{uuid.uuid4().hex}}.tmp.npy"\n'
            '    p.write_bytes(b"\\x93NUMPY partial"); print(p, flush=True)\n'
            'time.sleep(600)\n')
    writer = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return writer, Path(writer.stdout.readline().strip())


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_rebuild_removes_the_temp_files_of_killed_writers_only(tmp_path, audio_dir, clean_cache):
    """The killed writer is a worker whose parent was killed with it: nobody may have reaped it yet (a zombie,
    until the init process gets to it), and it is dead all the same."""
    working_dir = copy_cache(clean_cache, tmp_path / 'wd')
    speaker_dir = working_dir / 'audio-fbanks' / SPEAKERS[0]
    dead, dead_file = plant_temp_file(speaker_dir, 'dead')
    live, live_file = plant_temp_file(speaker_dir, 'live')
    try:
        kill_group(dead)
        assert dead_file.exists() and live_file.exists()
        run('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', '2')
        assert not dead_file.exists(), 'the temp file of a killed writer was left behind'
        assert live_file.exists(), 'the temp file of a running writer was deleted'
        assert_same_cache(working_dir, clean_cache)
    finally:
        kill_group(live)


def test_two_concurrent_cache_builds_of_one_working_dir(tmp_path, jobs, audio_dir, clean_cache):
    working_dir = tmp_path / 'wd'
    both = [jobs('build-mfcc-cache', '--working_dir', working_dir, '--audio_dir', audio_dir, '--workers', '2')
            for _ in range(2)]
    for job in both:
        job.check()
    assert_same_cache(working_dir, clean_cache)
    assert temp_files(working_dir) == []


# Model inputs.


def test_model_inputs_killed_mid_write_then_rerun_are_whole_and_equal_a_clean_build(tmp_path, jobs, clean_cache):
    counts, num_speakers = (1000, 200), len(SPEAKERS)
    args = ['--counts_per_speaker', ','.join(map(str, counts)), '--seed', '7']
    reference = copy_cache(clean_cache, tmp_path / 'reference')
    run('build-keras-inputs', '--working_dir', reference, *args)
    working_dir = copy_cache(clean_cache, tmp_path / 'wd')
    inputs = working_dir / 'keras-inputs'
    rng = random.Random(3)
    job = jobs('build-keras-inputs', '--working_dir', working_dir, *args)
    wait_until(lambda: (inputs / '.kx_train.npy.tmp').exists(), job)
    time.sleep(rng.uniform(0.0, 0.1))
    job.kill()
    # Whatever the moment of the kill: the files in place are whole, and inputs without meta.json are not used.
    for path in inputs.glob('*.npy'):
        check_npy(path)
    if (inputs / 'meta.json').exists():
        assert len(list(inputs.glob('*.npy'))) == 4
    else:
        from batcher import KerasFormatConverter
        with pytest.raises(FileNotFoundError, match='build-keras-inputs'):
            KerasFormatConverter(str(working_dir)).load('train')

    run('build-keras-inputs', '--working_dir', working_dir, *args)
    assert json.loads((inputs / 'meta.json').read_text())['counts_per_speaker'] == list(counts)
    for phase, count in zip(('train', 'test'), counts, strict=True):
        assert check_npy(inputs / f'kx_{phase}.npy') == ((num_speakers * count, 160, 64, 1), np.float32)
        assert check_npy(inputs / f'ky_{phase}.npy') == ((num_speakers * count,), np.int32)
        for name in (f'kx_{phase}.npy', f'ky_{phase}.npy'):
            assert np.array_equal(np.load(inputs / name, mmap_mode='r'),
                                  np.load(reference / 'keras-inputs' / name, mmap_mode='r')), name
    assert temp_files(inputs) == []


# Training.


@pytest.fixture(scope='module')
def inputs_dir(tmp_path_factory, clean_cache) -> Path:
    """A working dir with the cache and small model inputs (8 training and 4 test crops per speaker)."""
    working_dir = copy_cache(clean_cache, tmp_path_factory.mktemp('inputs'))
    run('build-keras-inputs', '--working_dir', working_dir, '--counts_per_speaker', '8,4')
    return working_dir


def load_keras(path: Path):
    import keras

    import triplet_loss
    return keras.saving.load_model(path, custom_objects={'deep_speaker_loss': triplet_loss.deep_speaker_loss})


def state_epoch(directory: Path) -> int:
    """Epochs the ResCNN's phase in `directory` has finished, by its state file."""
    state = directory / 'ResCNN_state.json'
    return json.loads(state.read_text())['epoch'] if state.exists() else 0


def test_training_killed_mid_epoch_and_mid_checkpoint_resumes_where_it_stopped(tmp_path, jobs, inputs_dir):
    """Softmax phase of 3 epochs: killed in an epoch, resumed and killed in a checkpoint write, resumed to the end:
    each resume starts after the last recorded epoch, with the optimizer's step count and learning rate."""
    steps, epochs, resumed_learning_rate = 16, 3, 2.5e-4
    working_dir = copy_cache(inputs_dir, tmp_path / 'wd')
    shutil.copytree(inputs_dir / 'keras-inputs', working_dir / 'keras-inputs')
    checkpoints = working_dir / 'checkpoints-softmax'
    args = ['train-model', '--working_dir', working_dir, '--pre_training_phase', '--epochs', epochs,
            '--steps_per_epoch', steps, *TINY]
    rng = random.Random(11)

    # 1. Killed at a random moment of the epoch after the first checkpoint.
    first = jobs(*args)
    assert wait_until(lambda: state_epoch(checkpoints) >= 1, first, poll=0.05), first.stderr[-3000:]
    time.sleep(rng.uniform(0.1, 0.6))
    assert first.kill(), 'training finished before it was killed'
    killed_after = state_epoch(checkpoints)
    assert 1 <= killed_after < epochs
    assert int(load_keras(checkpoints / 'ResCNN_last.keras').optimizer.iterations) == killed_after * steps

    # 2. Resumed, then killed while it writes a checkpoint (a temporary .keras file exists).
    left_over = set(checkpoints.glob('.*.tmp.keras'))
    second = jobs(*args)
    assert wait_until(lambda: bool(set(checkpoints.glob('.*.tmp.keras')) - left_over), second), \
        'no checkpoint write was seen'
    assert second.kill(), 'training finished before it was killed'
    assert 'Resuming from' in second.stderr and f'after epoch {killed_after}' in second.stderr
    killed_after = state_epoch(checkpoints)
    assert killed_after < epochs
    # The half-written temporary file is never a checkpoint: the last one loads and is the state's epoch.
    last = load_keras(checkpoints / 'ResCNN_last.keras')
    assert int(last.optimizer.iterations) == killed_after * steps
    # A learning rate changed in the checkpoint (as ReduceLROnPlateau does) must be the one training goes on with.
    last.optimizer.learning_rate.assign(resumed_learning_rate)
    last.save(checkpoints / '.edited.keras')
    os.replace(checkpoints / '.edited.keras', checkpoints / 'ResCNN_last.keras')

    # 3. Resumed to the end.
    third = jobs(*args).check()
    assert 'Resuming from' in third.stderr and f'after epoch {killed_after}' in third.stderr
    assert state_epoch(checkpoints) == epochs
    with open(checkpoints / 'history.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(row['epoch']) for row in rows] == list(range(epochs)), 'one row per epoch, in order'
    resumed_rows = rows[killed_after:]
    assert all(float(row['learning_rate']) == pytest.approx(resumed_learning_rate) for row in resumed_rows)
    final = load_keras(checkpoints / 'ResCNN_last.keras')
    assert int(final.optimizer.iterations) == epochs * steps
    assert float(final.optimizer.learning_rate) == pytest.approx(resumed_learning_rate)
    assert list(checkpoints.glob('.*.tmp.keras')) == [], 'the temporary files of the killed runs were left behind'


# Reproducibility.


def test_same_seed_same_pipeline_different_seed_different_inputs(tmp_path, jobs, audio_dir):
    """Two working dirs, one seed: the same crops, bit-identical trained weights (TensorFlow on CPU is
    deterministic here without enable_op_determinism) and the same metrics."""
    seed = '5'
    working_dirs = [tmp_path / 'a', tmp_path / 'b']
    stages = [
        ['build-mfcc-cache', '--audio_dir', audio_dir, '--workers', '2'],
        ['build-keras-inputs', '--counts_per_speaker', '16,4', '--seed', seed],  # 2 batches of 24 of 48 crops.
        ['train-model', '--pre_training_phase', '--epochs', '1', '--steps_per_epoch', '2', *TINY, '--seed', seed],
        ['train-model', '--epochs', '1', '--steps_per_epoch', '2', '--triplet_mining', 'random', *TINY,
         '--seed', seed],
        ['test-model', '--seed', seed],
    ]
    for stage in stages:  # both pipelines side by side, one stage at a time.
        running = [jobs(stage[0], '--working_dir', working_dir, *stage[1:]) for working_dir in working_dirs]
        finished = [job.check() for job in running]
    metrics = [METRICS_LINE.search(job.stdout) for job in finished]
    assert metrics[0] and metrics[1], finished[0].stdout
    assert metrics[0].group() == metrics[1].group()
    a, b = (working_dir / 'keras-inputs' / 'kx_train.npy' for working_dir in working_dirs)
    assert np.array_equal(np.load(a), np.load(b))
    weights = [load_keras(working_dir / 'checkpoints-triplets' / 'ResCNN_last.keras').get_weights()
               for working_dir in working_dirs]
    assert all(np.array_equal(x, y) for x, y in zip(*weights, strict=True)), 'training is not deterministic'

    other = copy_cache(working_dirs[0], tmp_path / 'c')
    run('build-keras-inputs', '--working_dir', other, '--counts_per_speaker', '16,4', '--seed', '6')
    assert not np.array_equal(np.load(other / 'keras-inputs' / 'kx_train.npy'), np.load(a))


# Bad input: one line, no traceback.


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('Error:') and all(word in last for word in words), last
    return last


def test_train_model_without_model_inputs_names_build_keras_inputs(tmp_path, clean_cache):
    working_dir = copy_cache(clean_cache, tmp_path / 'wd')
    result = run('train-model', '--working_dir', working_dir, '--pre_training_phase', '--epochs', '1', *TINY,
                 check=False)
    assert_one_line_error(result, 'build-keras-inputs', str(working_dir))


def test_weights_file_of_another_width_names_width_and_model(tmp_path, librispeech_dir):
    from conv_models import MODELS
    weights = tmp_path / 'narrow.weights.h5'
    MODELS['rescnn'](width=0.125).m.save_weights(weights)
    a1, a2, b1 = (sorted((librispeech_dir / speaker).rglob('*.flac'))[i] for speaker, i in
                  (('1688', 0), ('1688', 1), ('2033', 0)))
    trials = tmp_path / 'trials.txt'
    trials.write_text(''.join(f'{label} {x.relative_to(librispeech_dir)} {y.relative_to(librispeech_dir)}\n'
                              for label, x, y in ((1, a1, a2), (0, a1, b1))))
    result = run('eval-trials', '--trials', trials, '--audio_root', librispeech_dir, '--checkpoint_file', weights,
                 '--model', 'rescnn', '--scores_file', tmp_path / 'scores.csv', check=False)
    assert_one_line_error(result, str(weights), '--width', '--model')
    assert not (tmp_path / 'scores.csv').exists()


@pytest.mark.parametrize('command', ['build-mfcc-cache', 'build-keras-inputs'])
def test_working_dir_inside_a_file_is_a_one_line_error(tmp_path, audio_dir, command):
    a_file = tmp_path / 'a-file'
    a_file.write_text('not a directory')
    extra = ['--audio_dir', audio_dir] if command == 'build-mfcc-cache' else []
    result = run(command, '--working_dir', a_file / 'wd', *extra, check=False)
    assert_one_line_error(result, str(a_file))


def test_resuming_softmax_with_another_number_of_speakers_says_so(tmp_path, copy_librispeech):
    """A softmax checkpoint of 2 speakers, then model inputs of 3: resuming names both counts."""
    audio_dir, wd = tmp_path / 'audio', tmp_path / 'wd'
    tiny = ['--width', '0.125', '--batch_size', '6']
    copy_librispeech(audio_dir, [f'{s}-{c}' for s, c in (('1688', '142285-0000'), ('1688', '142285-0001'),
                                                          ('2033', '164914-0000'), ('2033', '164914-0001'))])
    run('build-mfcc-cache', '--working_dir', wd, '--audio_dir', audio_dir)
    run('build-keras-inputs', '--working_dir', wd, '--counts_per_speaker', '4,2')
    run('train-model', '--working_dir', wd, '--pre_training_phase', '--epochs', '1', '--steps_per_epoch', '1', *tiny)
    copy_librispeech(audio_dir, ['3005-163389-0000', '3005-163389-0001'])
    run('build-mfcc-cache', '--working_dir', wd, '--audio_dir', audio_dir)
    run('build-keras-inputs', '--working_dir', wd, '--counts_per_speaker', '4,2')
    result = run('train-model', '--working_dir', wd, '--pre_training_phase', '--epochs', '2', *tiny, check=False)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('Error: ') and 'trained on 2 speakers' in last and 'have 3' in last
