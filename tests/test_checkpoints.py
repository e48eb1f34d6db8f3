"""The training state AtomicCheckpoint keeps inside `<name>_last.keras`: a resume trusts the checkpoint it loads
over a state file left one epoch behind, and ReduceLROnPlateau / EarlyStopping counters survive a resume."""

import json
import os
import shutil
import subprocess
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import h5py  # noqa: E402
import keras  # noqa: E402
import pytest  # noqa: E402

from checkpoints import (  # noqa: E402
    AtomicCheckpoint,
    CheckpointError,
    build_model,
    checkpoint_architecture,
    load_checkpoint,
    read_state,
    resumed_or_new,
    weighted_layer_names,
)
from conv_models import DeepSpeakerModel  # noqa: E402
from train import phase_callbacks  # noqa: E402

SMALL_WIDTH = 0.125


@pytest.fixture(scope='module')
def model() -> keras.Model:
    model = DeepSpeakerModel(include_softmax=True, num_speakers_softmax=3, width=SMALL_WIDTH).m
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='sparse_categorical_crossentropy')
    return model


def schedules() -> tuple[keras.callbacks.Callback, ...]:
    return (keras.callbacks.ReduceLROnPlateau(monitor='val_loss', patience=10),
            keras.callbacks.EarlyStopping(monitor='val_loss', patience=20))


def test_resume_reads_the_epoch_of_the_last_checkpoint_when_the_state_file_lags_behind(tmp_path, model):
    """A kill between the rename of `_last.keras` and that of `_state.json` leaves the file one epoch behind."""
    checkpoint = AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min')
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {'val_loss': 2.0})
    shutil.copy(tmp_path / 'ResCNN_state.json', tmp_path / 'epoch1.json')
    checkpoint.on_epoch_end(1, {'val_loss': 1.5})
    assert json.loads((tmp_path / 'ResCNN_state.json').read_text())['epoch'] == 2
    os.replace(tmp_path / 'epoch1.json', tmp_path / 'ResCNN_state.json')

    assert read_state(tmp_path, 'ResCNN')['epoch'] == 2
    assert read_state(tmp_path, 'ResCNN')['best'] == 1.5
    resumed, epoch = resumed_or_new(tmp_path, 'ResCNN', new_model=lambda: pytest.fail('a new model was built'))
    assert epoch == 2
    assert resumed.count_params() == model.count_params()


def test_state_file_is_the_fallback_for_a_checkpoint_without_state(tmp_path, model):
    model.save(tmp_path / 'ResCNN_last.keras')  # as a user's own save would be.
    (tmp_path / 'ResCNN_state.json').write_text(json.dumps({'epoch': 3, 'best': 0.5}))
    assert read_state(tmp_path, 'ResCNN') == {'epoch': 3, 'best': 0.5}


def test_schedule_counters_are_restored_after_the_schedules_reset_them(tmp_path, model):
    first = schedules()
    checkpoint = AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min', counted=first)
    for callback in (*first, checkpoint):
        callback.set_model(model)
        callback.on_train_begin()
    for epoch, val_loss in enumerate([1.0, 1.2, 1.3, 1.1]):  # three epochs without improvement on 1.0.
        for callback in (*first, checkpoint):
            callback.on_epoch_end(epoch, {'val_loss': val_loss})
    assert [c.wait for c in first] == [3, 3]
    saved = read_state(tmp_path, 'ResCNN')['counters']
    assert saved == {'ReduceLROnPlateau': {'wait': 3, 'best': 1.0}, 'EarlyStopping': {'wait': 3, 'best': 1.0}}
    assert json.loads((tmp_path / 'ResCNN_state.json').read_text())['counters'] == saved

    second = schedules()
    callbacks = [c for c in phase_callbacks(tmp_path, tmp_path, 'ResCNN', 'softmax', 'val_loss', 'min')
                 if isinstance(c, keras.callbacks.ReduceLROnPlateau | keras.callbacks.EarlyStopping | AtomicCheckpoint)]
    assert isinstance(callbacks[-1], AtomicCheckpoint), 'the checkpoint must come after the schedules it counts'
    resumed = AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min', counted=second)
    for callback in (*second, resumed):
        callback.set_model(model)
        callback.on_train_begin()
    assert [(c.wait, c.best) for c in second] == [(3, 1.0), (3, 1.0)]
    for callback in (*second, resumed):
        callback.on_epoch_end(4, {'val_loss': 0.9})
    assert [(c.wait, c.best) for c in second] == [(0, 0.9), (0, 0.9)]


def test_a_keras_file_of_another_project_is_a_checkpoint_error(tmp_path):
    path = str(tmp_path / 'other.keras')
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name='dense')], name='classifier').save(path)
    with pytest.raises(CheckpointError, match="other.keras: a model named 'classifier', not one of deep-speaker's"):
        checkpoint_architecture(path)
    with pytest.raises(CheckpointError, match='other.keras: '):
        build_model(path)


@pytest.mark.parametrize(('name', 'message'), [
    ('ResCNN_best.keras', 'not a zip archive (a text file?); expected a .keras checkpoint (a zip archive written by '
                          'Keras 3).'),
    ('ResCNN.h5', 'not an HDF5 file (a text file?); expected a Keras-2 .h5 checkpoint (an HDF5 file).'),
    ('ResCNN.weights.h5', 'not an HDF5 file (a text file?); expected Keras 3 weights (.weights.h5, an HDF5 file).'),
])
def test_a_text_file_named_as_a_checkpoint_says_what_it_is_and_what_was_expected(tmp_path, name, message):
    path = tmp_path / name
    path.write_text('not a checkpoint\n')
    with pytest.raises(CheckpointError) as error:
        build_model(str(path), width=SMALL_WIDTH)
    assert str(error.value) == f'{path}: {message}'


def test_weights_of_another_width_name_the_layer_and_both_shapes_without_warnings(tmp_path):
    path = str(tmp_path / 'wide.weights.h5')
    DeepSpeakerModel(width=2 * SMALL_WIDTH).m.save_weights(path)
    narrow = DeepSpeakerModel(width=SMALL_WIDTH)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as error:
        warnings.simplefilter('always')
        load_checkpoint(narrow.m, path)
    assert str(error.value) == (f'{path}: weights of another architecture: layer conv64-s has (5,5,1,16), the model '
                                f'(5,5,1,8); check --width and --model (or the number of speakers of a softmax '
                                f'model).')
    assert [str(w.message) for w in caught] == []


def test_a_keras_2_h5_of_another_width_names_the_layer_and_both_shapes(tmp_path):
    path = str(tmp_path / 'wide.h5')
    wide = DeepSpeakerModel(width=2 * SMALL_WIDTH).m
    with h5py.File(path, 'w') as f:  # the layout of a Keras-2 weights file: layer_names, weight_names, datasets.
        names = weighted_layer_names(wide)
        f.attrs['layer_names'] = [n.encode() for n in names]
        for name in names:
            group = f.create_group(name)
            weights = wide.get_layer(name).weights
            group.attrs['weight_names'] = [f'{name}/{i}'.encode() for i in range(len(weights))]
            for i, w in enumerate(weights):
                group.create_dataset(f'{name}/{i}', data=w.numpy())
    with pytest.raises(CheckpointError, match=r'wide.h5: weights of another architecture: layer conv64-s has '
                                              r'\(5,5,1,16\), the model \(5,5,1,8\)'):
        load_checkpoint(DeepSpeakerModel(width=SMALL_WIDTH).m, path)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(['true'])
    process.wait()
    return process.pid


@pytest.mark.parametrize(('name', 'content'), [('ResCNN_last.keras', b'PK\x03\x04 cut short'),
                                               ('ResCNN_state.json', b'{"epoch": 3, "be')])
def test_a_damaged_training_checkpoint_or_state_file_names_it_and_says_to_delete_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    for read in (lambda: read_state(tmp_path, 'ResCNN'),
                 lambda: AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min'),
                 lambda: resumed_or_new(tmp_path, 'ResCNN', new_model=lambda: pytest.fail('a new model was built'))):
        with pytest.raises(CheckpointError) as error:
            read()
        assert str(error.value).startswith(f'{tmp_path / name}: damaged (')
        assert 'delete it' in str(error.value)


def test_temporary_files_of_dead_writers_are_removed_and_those_of_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getpid()
    orphans = [tmp_path / f'.ResCNN.{dead}-0a1b.tmp.keras', tmp_path / f'.ResCNN_state.{dead}-0a1b.tmp.json']
    kept = [tmp_path / f'.ResCNN.{live}-0a1b.tmp.keras', tmp_path / f'.ResCNN_state.{live}-0a1b.tmp.json',
            tmp_path / f'.TDNN.{dead}-0a1b.tmp.keras']
    for path in orphans + kept:
        path.write_bytes(b'partial')
    AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min')
    assert sorted(p for p in tmp_path.iterdir()) == sorted(kept)


def test_a_state_file_that_cannot_be_written_is_a_checkpoint_error_naming_it(tmp_path, model):
    checkpoint = AtomicCheckpoint(tmp_path, 'ResCNN', 'val_loss', 'min')
    checkpoint.set_model(model)
    (tmp_path / 'ResCNN_state.json').mkdir()  # the rename onto it fails.
    with pytest.raises(CheckpointError, match=f'^{tmp_path / "ResCNN_state.json"}: cannot be written'):
        checkpoint.on_epoch_end(0, {'val_loss': 2.0})
    assert list(tmp_path.glob('.*.tmp.*')) == []
