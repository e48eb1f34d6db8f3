"""tf.distribute training (distribute.py, train-model --distribute): one step on 2 logical CPU devices against one
step on one device, for both phases (a process: logical devices must be set before TensorFlow initialises);
checkpoints moved between strategies and replica counts; mixed precision and XLA against float32; the one-line
errors of bad distribution options. Two multi-worker processes on 127.0.0.1: test_multiworker.py."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cli import cli  # noqa: E402
from conv_models import DeepSpeakerModel, TdnnModel  # noqa: E402
from distribute import ClusterConfigError, cluster_spec, precision  # noqa: E402
from triplet_loss import deep_speaker_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_TOLERANCE = 1e-6  # |distributed update - single-device update| / |single-device update|, in float64.
MIXED_TOLERANCE = 2e-3  # largest |mixed_float16 - float32| coordinate of the unit-length embeddings.
XLA_TOLERANCE = 1e-4  # |XLA update - plain update| / |plain update|, float32.
SHORT_FRAMES = 32  # crop length of the mixed precision test.
STEPS_TIMEOUT_S = 600  # a hung process fails the test instead of CI.


# --- One step on 2 logical devices against one on a single device ------------------------------------------------


@pytest.fixture(scope='module')
def steps(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp('steps') / 'steps'
    result = subprocess.run([sys.executable, str(ROOT / 'tests' / 'distributed_steps.py'), str(out)], cwd=ROOT,
                            env={**os.environ, 'PYTHONPATH': str(ROOT), 'CUDA_VISIBLE_DEVICES': ''},
                            capture_output=True, text=True, timeout=STEPS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(f'{out}.npz') as data:
        arrays = dict(data)
    weights = {}
    for key, value in arrays.items():
        name, _, index = key.partition('/')
        if index:
            weights.setdefault(name, {})[int(index)] = value
    return {**{k: [v[i] for i in range(len(v))] for k, v in weights.items()},
            **{k: v for k, v in arrays.items() if '/' not in k}}


def relative_difference(a: list[np.ndarray], b: list[np.ndarray], initial: list[np.ndarray]) -> float:
    """|a - b| / |a - initial| over all weights: how far two updates from `initial` differ, relative to one."""
    difference = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True)))
    update = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, initial, strict=True)))
    assert update > 1e-3, update  # the step changed the weights.
    return float(difference / update)


@pytest.mark.parametrize('phase', ['softmax', 'triplet'])
def test_one_mirrored_step_on_two_devices_equals_one_step_on_one(steps, phase):
    difference = relative_difference(steps[f'{phase}_single'], steps[f'{phase}_mirrored'], steps[f'{phase}_initial'])
    assert difference < DISTRIBUTED_TOLERANCE


def test_checkpoints_load_across_strategies_and_resume_with_another_replica_count(steps):
    for loaded, saved in (('mirrored_loaded_single', 'softmax_mirrored'),
                          ('single_loaded_mirrored', 'softmax_initial')):
        for x, y in zip(steps[loaded], steps[saved], strict=True):
            np.testing.assert_array_equal(x, y)
    # The mirrored softmax step (test above) is the single-device checkpoint resumed under 2 replicas: it took the
    # step the single-device model takes.
    assert relative_difference(steps['softmax_single'], steps['softmax_mirrored'],
                               steps['softmax_initial']) < DISTRIBUTED_TOLERANCE


@pytest.fixture(scope='module')
def crops() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(6, 160, 64, 1)).astype(np.float32)


def test_mixed_precision_embeddings_are_close_to_float32_and_train_with_loss_scaling(crops):
    crops = crops[:, :SHORT_FRAMES]  # float16 is slow on a CPU; the ResCNN takes any number of frames.
    float32 = DeepSpeakerModel((None, SHORT_FRAMES, 64, 1), width=0.0625).m
    with precision(True):
        mixed = DeepSpeakerModel((None, SHORT_FRAMES, 64, 1), width=0.0625).m
    assert keras.mixed_precision.global_policy().name == 'float32'  # restored after the block.
    mixed.set_weights(float32.get_weights())
    expected, embeddings = float32.predict_on_batch(crops), mixed.predict_on_batch(crops)
    assert mixed.get_layer('affine').compute_dtype == 'float16'
    assert expected.dtype == embeddings.dtype == np.float32  # the L2 normalisation stays in float32.
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert 0 < np.abs(embeddings - expected).max() < MIXED_TOLERANCE
    mixed.compile(optimizer=keras.optimizers.SGD(0.1), loss=deep_speaker_loss)
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    before = mixed.get_weights()
    assert np.isfinite(mixed.train_on_batch(crops, np.zeros(len(crops))))
    assert any(not np.array_equal(a, b) for a, b in zip(before, mixed.get_weights(), strict=True))


def test_xla_step_equals_the_plain_step(crops):
    updates = []
    initial = None
    for jit in (False, True):
        model = TdnnModel(width=1.0, frame_layers=((8, 3, 1), (8, 1, 1))).m
        initial = initial or model.get_weights()
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=deep_speaker_loss, jit_compile=jit)
        model.train_on_batch(crops, np.zeros(len(crops)))
        updates.append(model.get_weights())
    assert relative_difference(updates[0], updates[1], initial) < XLA_TOLERANCE


# --- Bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tf_config, expected', [
    (None, 'TF_CONFIG is not set'),
    ('{"cluster": ', 'TF_CONFIG is not JSON'),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', 'no "task"'),
])
def test_malformed_tf_config_is_one_line_naming_the_option(monkeypatch, tmp_path, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv('TF_CONFIG', raising=False)
    else:
        monkeypatch.setenv('TF_CONFIG', tf_config)
    with pytest.raises(ClusterConfigError, match=expected):
        cluster_spec()
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(tmp_path), '--pre_training_phase',
                                      '--distribute', 'multiworker'])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: --distribute multiworker: ') and expected in lines[0]
    assert 'TF_CONFIG' in lines[0]


def test_a_triplet_batch_not_divisible_by_three_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(tmp_path), '--batch_size', '100'])
    assert result.exit_code == 1
    assert result.stderr.strip() == ('Error: --batch_size 100: a per-replica triplet batch of 100 crops is not a whole '
                                     'number of [anchor, positive, negative] triplets. Use a multiple of 3, e.g. 96.')


# --- The GPU build of ./deep-speaker setup ------------------------------------------------------------------------


@pytest.mark.parametrize('args, gpu_env, expected', [
    ([], None, 'tensorflow-cpu==2.21.0'),
    (['--gpu'], None, 'tensorflow[and-cuda]==2.21.0'),
    ([], '1', 'tensorflow[and-cuda]==2.21.0'),
    (['--gpu'], '0', 'tensorflow-cpu==2.21.0'),
])
def test_setup_installs_the_cuda_build_when_asked(tmp_path, args, gpu_env, expected):
    env = {key: value for key, value in os.environ.items() if key != 'DEEP_SPEAKER_GPU'}
    env['VENV'] = str(tmp_path / 'venv')  # no venv there: the requirements come from the files alone.
    if gpu_env is not None:
        env['DEEP_SPEAKER_GPU'] = gpu_env
    result = subprocess.run([str(ROOT / 'deep-speaker'), 'requirements', *args], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith('tensorflow') and 'board' not in line] == [expected]
    assert not any(line.startswith('-r ') for line in lines) and 'keras==3.15.1' in lines and 'pytest==9.2.0' in lines
