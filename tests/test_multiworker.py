"""Multi-worker training (train-model --distribute multiworker): two worker processes on 127.0.0.1 (free ports),
each with its TF_CONFIG and its own working dir (two machines without a shared file system), train the softmax
phase of a tiny TDNN on samples/ with held-out validation speakers. Worker 1 is killed after the chief's first
checkpoint: the chief stops with a one-line error. Both are started again (the chief's checkpoints copied to
worker 1 first, as the README says) and go on from the chief's last checkpoint to the end, with identical weights
and the validation EER of the chief's checkpoint; only the chief writes checkpoints, the CSV history and
TensorBoard logs. Beside them, a lone worker whose partner never starts stops after --collective_timeout. The runs
are one module-scoped fixture shared by every test."""

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner

from cli import cli

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
COLLECTIVE_TIMEOUT_S = 10
LONE_TIMEOUT_S = 2  # --collective_timeout of the lone worker.
LONE_LIMIT_S = 90  # its start, wait and exit (TensorFlow's own default wait: an hour).
BATCH = 8
TRAIN = ['train-model', '--pre_training_phase', '--distribute', 'multiworker', '--model', 'tdnn', '--width', '0.0625',
         '--batch_size', str(BATCH), '--steps_per_epoch', '2', '--val_speakers', '2', '--collective_timeout',
         str(COLLECTIVE_TIMEOUT_S)]
KILLED_RUN_EPOCHS = 50  # far more than the killed run reaches: it must not end by itself.
START_TIMEOUT_S = 240  # a run that never checkpoints fails the test instead of CI.
CHECKPOINTS, STATE = 'checkpoints-softmax', 'TDNN_state.json'


class Worker(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


class Runs(NamedTuple):
    chief_dir: Path
    worker_dir: Path
    killed: Worker  # the chief of the run whose worker 1 was killed.
    stop_seconds: float  # from the kill to the chief's exit.
    killed_epoch: int  # the chief's last checkpointed epoch then.
    worker_checkpoints_after_kill: dict[str, str]
    worker_files_before_resume: dict[str, str]
    resumed: list[Worker]  # chief, worker 1.
    lone: Worker  # the worker whose partner never started.
    lone_seconds: float  # from its start to its exit.


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_worker(hosts: list[str], index: int, args: list[str]) -> subprocess.Popen:
    tf_config = json.dumps({'cluster': {'worker': hosts}, 'task': {'type': 'worker', 'index': index}})
    env = {**os.environ, 'TF_CONFIG': tf_config, 'CUDA_VISIBLE_DEVICES': '', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, 'cli.py', *TRAIN, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_workers(hosts: list[str], dirs: list[Path], epochs: int) -> list[subprocess.Popen]:
    return [start_worker(hosts, index, ['--working_dir', str(wd), '--epochs', str(epochs)])
            for index, wd in enumerate(dirs)]


def finished(process: subprocess.Popen, timeout: float) -> Worker:
    stdout, stderr = process.communicate(timeout=timeout)
    return Worker(process.returncode, stdout, stderr)


def checkpointed_epoch(wd: Path) -> int:
    path = wd / CHECKPOINTS / STATE
    return json.loads(path.read_text())['epoch'] if path.is_file() else 0


def file_digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> Runs:
    chief_dir, worker_dir = tmp_path_factory.mktemp('chief'), tmp_path_factory.mktemp('worker1')
    for args in (['build-mfcc-cache', '--audio_dir', str(AUDIO_DIR)], ['build-keras-inputs', '--counts_per_speaker',
                                                                      '8,4']):
        result = CliRunner().invoke(cli, [args[0], '--working_dir', str(chief_dir), *args[1:]])
        assert result.exit_code == 0, result.output
    shutil.copytree(chief_dir, worker_dir, dirs_exist_ok=True)
    hosts = [f'127.0.0.1:{port}' for port in free_ports(6)]
    lone_hosts, killed_hosts, resumed_hosts = (hosts[i:i + 2] for i in range(0, 6, 2))
    started = []
    try:
        lone_started, lone_ended = time.monotonic(), []  # worker 1 of a cluster whose worker 0 never starts.
        started.append(start_worker(lone_hosts, 1, ['--working_dir', str(tmp_path_factory.mktemp('lone')),
                                                    '--collective_timeout', str(LONE_TIMEOUT_S)]))
        waiting = threading.Thread(target=lambda: lone_ended.extend([finished(started[0], START_TIMEOUT_S),
                                                                     time.monotonic()]))
        waiting.start()

        chief, worker = start_workers(killed_hosts, [chief_dir, worker_dir], KILLED_RUN_EPOCHS)
        started += [chief, worker]
        deadline = time.monotonic() + START_TIMEOUT_S
        while checkpointed_epoch(chief_dir) < 1 and chief.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        worker.kill()
        killed_at = time.monotonic()
        killed = finished(chief, COLLECTIVE_TIMEOUT_S + START_TIMEOUT_S)
        stop_seconds = time.monotonic() - killed_at
        worker.communicate()
        killed_epoch = checkpointed_epoch(chief_dir)
        assert killed_epoch >= 1, killed.stderr[-3000:]
        waiting.join()

        worker_checkpoints = file_digests(worker_dir / CHECKPOINTS)
        shutil.copytree(chief_dir / CHECKPOINTS, worker_dir / CHECKPOINTS, dirs_exist_ok=True)
        before = file_digests(worker_dir)
        started += start_workers(resumed_hosts, [chief_dir, worker_dir], killed_epoch + 1)
        resumed = [finished(process, START_TIMEOUT_S) for process in started[-2:]]
    finally:
        for process in started:  # none left running when a run fails or hangs.
            if process.poll() is None:
                process.kill()
                process.communicate()
    lone, lone_exit = lone_ended
    return Runs(chief_dir, worker_dir, killed, stop_seconds, killed_epoch, worker_checkpoints, before, resumed, lone,
                lone_exit - lone_started)


def test_killing_a_worker_stops_the_other_with_one_line(runs):
    assert runs.killed.returncode == 1
    errors = [line for line in runs.killed.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1, runs.killed.stderr[-3000:]  # TensorFlow's own C++ log lines may follow it.
    assert errors[0].startswith('Error: --distribute multiworker: a collective operation failed (')
    assert '--collective_timeout 10 s' in errors[0] and 'Traceback' not in runs.killed.stderr
    assert runs.stop_seconds < COLLECTIVE_TIMEOUT_S + 30


def test_a_worker_whose_partner_never_starts_stops_after_the_collective_timeout(runs):
    assert runs.lone.returncode == 1
    errors = [line for line in runs.lone.stderr.splitlines() if line.startswith('Error: ')]
    assert errors == [f'Error: --distribute multiworker: not every task of TF_CONFIG started within {LONE_TIMEOUT_S} '
                      f's; another worker stopped or does not answer within --collective_timeout {LONE_TIMEOUT_S} s. '
                      f'Start every worker again with the same command: training resumes from the chief\'s last '
                      f'checkpoint.'], runs.lone.stderr[-3000:]
    assert runs.lone_seconds < LONE_LIMIT_S


def test_both_workers_resume_from_the_chiefs_last_checkpoint_at_the_right_epoch(runs):
    last = runs.killed_epoch + 1
    for worker in runs.resumed:
        assert worker.returncode == 0, worker.stderr[-3000:]
        epochs = [line.split()[1] for line in worker.stdout.splitlines() if line.startswith('Epoch ')]
        assert epochs == [f'{last}/{last}']
    assert checkpointed_epoch(runs.chief_dir) == last
    history = (runs.chief_dir / CHECKPOINTS / 'history.csv').read_text().splitlines()
    assert [row.split(',')[0] for row in history[1:]] == [str(epoch) for epoch in range(last)]


def test_workers_end_with_identical_weights_which_the_chief_saved(runs):
    from checkpoints import read_keras_checkpoint
    from distribute import weights_digest
    digests = []
    for index, worker in enumerate(runs.resumed):
        lines = [line for line in worker.stderr.splitlines() if f'Worker {index}: weights ' in line]
        assert len(lines) == 1, worker.stderr[-3000:]
        digests.append(lines[0].split('weights ')[1].split()[0])
    assert digests[0] == digests[1]
    saved = read_keras_checkpoint(str(runs.chief_dir / CHECKPOINTS / 'TDNN_last.keras'))
    assert weights_digest(saved) == digests[0]


def test_only_the_chief_writes_checkpoints_history_and_tensorboard_logs(runs):
    assert runs.worker_checkpoints_after_kill == {}  # worker 1 wrote nothing in the killed run,
    assert file_digests(runs.worker_dir) == runs.worker_files_before_resume  # nor in the resumed one.
    assert not (runs.worker_dir / 'logs').exists()
    assert {p.name for p in (runs.chief_dir / CHECKPOINTS).iterdir()} >= {'TDNN_best.keras', 'TDNN_last.keras',
                                                                          STATE, 'history.csv'}
    for split in ('train', 'validation'):  # one event file per run: the killed one and the resumed one.
        assert len(list((runs.chief_dir / 'logs' / 'softmax' / split).glob('events.out.tfevents.*'))) == 2


def test_the_validation_eer_is_the_one_of_the_chiefs_checkpoint_embedded_by_one_process(runs):
    """Each worker embeds the held-out targets on its own (Keras' multi-worker predict concatenates every worker's
    embeddings: twice as many rows as crops, which would pair the wrong windows)."""
    from checkpoints import read_keras_checkpoint
    from validation import SpeakerValidation, validation_targets
    directory = runs.chief_dir / CHECKPOINTS
    held_out = json.loads((directory / 'validation-speakers.json').read_text())['held_out']
    validation = SpeakerValidation(*validation_targets(runs.chief_dir, held_out), BATCH)
    validation.set_model(read_keras_checkpoint(str(directory / 'TDNN_last.keras')))
    expected = {}
    validation.on_epoch_end(runs.killed_epoch, expected)
    with open(directory / 'history.csv') as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last['val_eer']) == pytest.approx(expected['val_eer'], abs=1e-9)
    assert float(last['val_min_dcf']) == pytest.approx(expected['val_min_dcf'], abs=1e-9)
