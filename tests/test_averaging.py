"""Checkpoint averaging (train-model --average_last): the mean of hand-made checkpoints' weights, the epoch
checkpoints AtomicCheckpoint keeps, and the errors when fewer are kept than asked."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from model_helpers import randomise  # noqa: E402

from checkpoints import (  # noqa: E402
    AtomicCheckpoint,
    AveragingError,
    CheckpointError,
    average_checkpoints,
    average_last_epochs,
    read_keras_checkpoint,
)
from cli import cli  # noqa: E402
from workdir import epoch_checkpoint  # noqa: E402


def tiny_model(units: int = 4) -> keras.Model:
    """Dense, batch norm (moving statistics are weights too) and dense: the layer kinds that averaging meets."""
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(units), keras.layers.BatchNormalization(),
                             keras.layers.Dense(2)], name='Tiny')


@pytest.fixture(scope='module')
def hand_made(tmp_path_factory) -> tuple[Path, list[list[np.ndarray]]]:
    """Two epoch checkpoints of one model with different random weights, and their weights."""
    directory = tmp_path_factory.mktemp('averaging')
    model = tiny_model()
    weights = []
    for epoch in (1, 2):
        randomise(model, seed=epoch)
        model.save(epoch_checkpoint(directory, model.name, epoch))
        weights.append([np.array(w) for w in model.get_weights()])
    return directory, weights


def test_averaging_two_checkpoints_gives_the_arithmetic_mean_of_every_weight(hand_made):
    directory, (first, second) = hand_made
    out = directory / 'mean.keras'
    average_checkpoints([epoch_checkpoint(directory, 'Tiny', 1), epoch_checkpoint(directory, 'Tiny', 2)], out)
    averaged = read_keras_checkpoint(str(out)).get_weights()
    assert len(averaged) == len(first) == 8
    for mean, a, b in zip(averaged, first, second, strict=True):
        np.testing.assert_allclose(mean, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-7)


def test_averaging_more_epochs_than_kept_names_the_number_kept(hand_made):
    directory, _ = hand_made
    with pytest.raises(AveragingError) as error:
        average_last_epochs(directory, 'Tiny', 3)
    assert (error.value.count, error.value.kept) == (3, 2)
    assert average_last_epochs(directory, 'Tiny', 2) == directory / 'Tiny_averaged.keras'


def test_checkpoints_of_another_architecture_are_not_averaged(hand_made, tmp_path):
    directory, _ = hand_made
    other = tmp_path / 'wider.keras'
    tiny_model(units=5).save(other)
    with pytest.raises(CheckpointError, match='weights of another architecture'):
        average_checkpoints([epoch_checkpoint(directory, 'Tiny', 1), other], tmp_path / 'out.keras')
    assert not (tmp_path / 'out.keras').exists()


def test_atomic_checkpoint_keeps_only_the_last_epoch_checkpoints(tmp_path):
    model = tiny_model()
    model.compile(optimizer='sgd', loss='mse')
    x, y = np.ones((4, 3), dtype=np.float32), np.zeros((4, 2), dtype=np.float32)
    model.fit(x, y, epochs=4, verbose=0, validation_data=(x, y),
              callbacks=[AtomicCheckpoint(tmp_path, 'Tiny', 'val_loss', 'min', keep_epochs=2)])
    assert sorted(p.name for p in tmp_path.glob('Tiny_epoch*.keras')) == ['Tiny_epoch0003.keras',
                                                                          'Tiny_epoch0004.keras']
    np.testing.assert_array_equal(read_keras_checkpoint(str(tmp_path / 'Tiny_epoch0004.keras')).get_weights()[0],
                                  model.get_weights()[0])


def test_cli_averaging_more_epochs_than_trained_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(tmp_path / 'wd'), '--epochs', '3',
                                      '--average_last', '4'])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        'Error: --average_last 4: at most --epochs 3 epoch checkpoints are kept; give at most 3.']
    assert not (tmp_path / 'wd').exists()
