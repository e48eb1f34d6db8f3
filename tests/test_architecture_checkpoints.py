""".keras checkpoints of every architecture: they name their own architecture and rebuild the same model, refuse
another architecture, initialise a triplet model from a softmax one, and get their own names in a shared phase dir."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from model_helpers import features, predict, randomise  # noqa: E402

from checkpoints import AtomicCheckpoint  # noqa: E402
from constants import (  # noqa: E402
    NUM_FBANKS,
    TDNN_FRAME_LAYERS,
)
from conv_models import (  # noqa: E402
    MODELS,
    CheckpointError,
    TdnnModel,
    build_model,
    checkpoint_architecture,
    load_checkpoint,
)

SMALL_WIDTH = 0.125
ANY_FRAMES = (None, None, NUM_FBANKS, 1)
# Embeddings are unit vectors computed in float32; the same computation on the same frames agrees far closer.
EMBEDDING_TOLERANCE = 1e-5



def weighted_layers(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def assert_same_layer_weights(actual: list[np.ndarray], expected: list[np.ndarray], name: str) -> None:
    assert len(actual) == len(expected) > 0, name
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e, err_msg=name)


def scaled(units: int, width: float) -> int:
    return max(1, round(units * width))


def small_architecture(name: str) -> dict:
    """checkpoint_architecture's options for MODELS[name](width=SMALL_WIDTH): a TDNN reads back as its frame
    layers at width 1.0."""
    if name != 'tdnn':
        return {'width': SMALL_WIDTH}
    frame_layers = tuple((scaled(units, SMALL_WIDTH), kernel, dilation)
                         for units, kernel, dilation in TDNN_FRAME_LAYERS)
    return {'width': 1.0, 'frame_layers': frame_layers, 'bn_before_relu': False}


# --- .keras checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['rescnn', 'tdnn', 'gru'])
def test_keras_checkpoint_names_its_architecture_and_rebuilds_the_same_model(tmp_path, name):
    original = MODELS[name](batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH)
    randomise(original.m, seed=8)
    path = str(tmp_path / f'{MODELS[name].name}.keras')
    original.m.save(path)
    assert checkpoint_architecture(path) == (name, small_architecture(name))
    other = 'tdnn' if name == 'rescnn' else 'rescnn'
    assert checkpoint_architecture(path, model=other) == (name, small_architecture(name))  # the file says its own.

    rebuilt = build_model(path, model=other, batch_input_shape=ANY_FRAMES)
    assert type(rebuilt) is MODELS[name]
    expected = weighted_layers(original.m)
    actual = weighted_layers(rebuilt.m)
    assert list(actual) == list(expected)
    for layer, weights in expected.items():
        assert_same_layer_weights(actual[layer], weights, layer)
    x = features(np.random.default_rng(9), 2, 120)
    np.testing.assert_allclose(predict(rebuilt.m, x), predict(original.m, x), atol=1e-6)
    fresh = MODELS[name](batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH)
    assert np.max(np.abs(predict(fresh.m, x) - predict(original.m, x))) > 1e-3


@pytest.mark.parametrize('width', [0.2, 0.3])
def test_tdnn_checkpoint_of_a_width_not_a_multiple_of_1_512_rebuilds(tmp_path, width):
    """tdnn1 has round(512 w) units and the later layers are scaled by the ratio tdnn1 was rounded to: the rebuilt
    model must give tdnn5 the units it was saved with."""
    original = TdnnModel(width=width)
    path = str(tmp_path / 'TDNN.keras')
    original.m.save(path)
    name, _ = checkpoint_architecture(path)
    assert name == 'tdnn'
    rebuilt = build_model(path)
    assert rebuilt.m.get_layer('tdnn5').filters == original.m.get_layer('tdnn5').filters
    assert abs(original.m.get_layer('tdnn5').filters - 1500 * width) <= 1500 / 512
    x = features(np.random.default_rng(10), 1, 160)
    np.testing.assert_allclose(predict(rebuilt.m, x), predict(original.m, x), atol=1e-6)


@pytest.mark.parametrize('name', ['rescnn', 'tdnn', 'gru'])
def test_weights_h5_of_each_architecture_loads_into_a_fresh_model(tmp_path, name):
    """Keras keeps a GRU's weights under `layers/gru/cell/vars`, not the layer's own `vars`."""
    original = MODELS[name](width=SMALL_WIDTH)
    randomise(original.m, seed=12)
    path = str(tmp_path / f'{MODELS[name].name}.weights.h5')
    original.m.save_weights(path)
    fresh = MODELS[name](width=SMALL_WIDTH)
    assert load_checkpoint(fresh.m, path) == []
    for expected, actual in zip(original.m.get_weights(), fresh.m.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize('name', ['tdnn', 'gru'])
def test_weights_h5_of_another_width_is_refused_naming_a_layer(tmp_path, name):
    path = str(tmp_path / f'{MODELS[name].name}.weights.h5')
    MODELS[name](width=2 * SMALL_WIDTH).m.save_weights(path)
    with pytest.raises(CheckpointError, match='weights of another architecture: layer'):
        load_checkpoint(MODELS[name](width=SMALL_WIDTH).m, path)


@pytest.mark.parametrize(('saved', 'loaded'), [('tdnn', 'rescnn'), ('rescnn', 'tdnn'), ('gru', 'tdnn')])
def test_checkpoint_of_another_architecture_raises(tmp_path, saved, loaded):
    path = str(tmp_path / f'{saved}.keras')
    MODELS[saved](width=SMALL_WIDTH).m.save(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(MODELS[loaded](width=SMALL_WIDTH).m, path)
    assert path in str(error.value)


def test_softmax_tdnn_checkpoint_initialises_a_tdnn_triplet_model_by_name(tmp_path):
    softmax = TdnnModel(include_softmax=True, num_speakers_softmax=6, width=SMALL_WIDTH)
    randomise(softmax.m, seed=11)
    path = str(tmp_path / 'TDNN_best.keras')
    softmax.m.save(path)
    assert checkpoint_architecture(path) == ('tdnn', small_architecture('tdnn'))
    triplet = TdnnModel(width=SMALL_WIDTH)

    assert load_checkpoint(triplet.m, path) == []

    source, target = weighted_layers(softmax.m), weighted_layers(triplet.m)
    assert set(source) - set(target) == {'softmax_layer'}
    for layer, weights in target.items():
        assert_same_layer_weights(weights, source[layer], layer)
    # The triplet model's embedding is the softmax model's normalised `affine` output.
    x = features(np.random.default_rng(12), 2, 160)
    affine = predict(keras.Model(softmax.m.input, softmax.m.get_layer('affine').output), x)
    np.testing.assert_allclose(predict(triplet.m, x), affine / np.linalg.norm(affine, axis=1, keepdims=True),
                               atol=EMBEDDING_TOLERANCE)


def test_second_architecture_trained_in_the_same_phase_directory_gets_its_own_best_checkpoint(tmp_path):
    """A TDNN then a GRU softmax phase in one working dir: the GRU's first epoch is its best so far, whatever the
    TDNN's best val_accuracy was."""
    model = TdnnModel(width=SMALL_WIDTH).m
    first = AtomicCheckpoint(tmp_path, 'TDNN', 'val_accuracy', 'max')
    first.set_model(model)
    first.on_epoch_end(0, {'val_accuracy': 0.5})
    assert (tmp_path / 'TDNN_best.keras').is_file()

    second = AtomicCheckpoint(tmp_path, 'GRU', 'val_accuracy', 'max')
    second.set_model(model)
    second.on_epoch_end(0, {'val_accuracy': 0.25})

    assert (tmp_path / 'GRU_last.keras').is_file()
    assert (tmp_path / 'GRU_best.keras').is_file()

