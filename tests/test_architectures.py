"""Tests of the model registry and the TDNN (x-vector) and GRU architectures: heads and inputs, the documented sizes,
the TDNN's layer structure and padding-invariant statistics pooling, .keras checkpoints that name their own
architecture, and the train / test / eval-trials commands with --model tdnn and --model gru."""

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
from keras import layers  # noqa: E402
from model_helpers import randomise  # noqa: E402

from checkpoints import AtomicCheckpoint  # noqa: E402
from cli import cli  # noqa: E402
from constants import (  # noqa: E402
    EMBEDDING_SIZE,
    GRU_LAYERS,
    GRU_UNITS,
    NUM_FBANKS,
    RESCNN_FILTERS,
    STATS_POOLING_EPSILON,
    TDNN_FRAME_LAYERS,
)
from conv_models import (  # noqa: E402
    MODELS,
    CheckpointError,
    DeepSpeakerModel,
    FrameMask,
    GruModel,
    StatsPooling,
    TdnnModel,
    build_model,
    checkpoint_architecture,
    load_checkpoint,
)
from eval_metrics import equal_error_rate, min_dcf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
SMALL_WIDTH = 0.125
ANY_FRAMES = (None, None, NUM_FBANKS, 1)
TDNN_FULL_PARAMS = 4_321_100  # documented in TdnnModel's docstring (width 1.0, embedding head).
GRU_FULL_PARAMS = 22_565_248  # documented in GruModel's docstring (width 1.0, embedding head).
# Embeddings are unit vectors computed in float32; the same computation on the same frames agrees far closer.
EMBEDDING_TOLERANCE = 1e-5
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


def features(rng: np.random.Generator, batch: int, frames: int) -> np.ndarray:
    return rng.standard_normal((batch, frames, NUM_FBANKS, 1)).astype(np.float32)


def predict(model: keras.Model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


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


# --- Registry, heads and inputs -----------------------------------------------------------------------------------


def test_registry_holds_the_three_architectures_under_their_cli_names():
    assert MODELS == {'rescnn': DeepSpeakerModel, 'tdnn': TdnnModel, 'gru': GruModel}
    assert [cls.name for cls in MODELS.values()] == ['ResCNN', 'TDNN', 'GRU']
    for command in ('train-model', 'test-model', 'eval-trials'):
        option = next(p for p in cli.commands[command].params if p.name == 'model')
        assert list(option.type.choices) == list(MODELS), command
        assert option.default == 'rescnn'


@pytest.mark.parametrize('include_softmax', [False, True], ids=['embedding', 'softmax'])
@pytest.mark.parametrize('name', ['rescnn', 'tdnn', 'gru'])
def test_every_model_builds_both_heads_on_any_number_of_frames(name, include_softmax):
    num_speakers = 5
    speaker_model = MODELS[name](batch_input_shape=ANY_FRAMES, include_softmax=include_softmax,
                                 num_speakers_softmax=num_speakers if include_softmax else None, width=SMALL_WIDTH)
    model = speaker_model.m
    assert model.name == MODELS[name].name
    assert tuple(model.input_shape) == ANY_FRAMES
    assert tuple(model.output_shape) == (None, num_speakers if include_softmax else EMBEDDING_SIZE)
    rng = np.random.default_rng(1)
    for frames in (37, 160, 400):
        out = predict(model, features(rng, 2, frames))
        if include_softmax:
            assert out.shape == (2, num_speakers), frames
            assert np.all(out >= 0), frames
            np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5, err_msg=str(frames))
        else:
            assert out.shape == (2, EMBEDDING_SIZE), frames
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5, err_msg=str(frames))
            assert not np.allclose(out[0], out[1], atol=1e-4), frames  # different inputs, different embeddings.


@pytest.mark.parametrize('name', ['tdnn', 'gru'])
@pytest.mark.parametrize('num_speakers', [None, 1])
def test_softmax_head_of_tdnn_and_gru_needs_two_speakers(name, num_speakers):
    with pytest.raises(ValueError, match='num_speakers_softmax'):
        MODELS[name](include_softmax=True, num_speakers_softmax=num_speakers, width=SMALL_WIDTH)


# --- Documented sizes ---------------------------------------------------------------------------------------------


def test_full_tdnn_has_the_documented_number_of_parameters():
    model = TdnnModel().m
    assert model.count_params() == TDNN_FULL_PARAMS
    # The same number from the layer arithmetic: Conv1D in * kernel * units + units, BatchNormalization 4 * units
    # (gamma, beta, moving mean and variance), then the affine layer on [mean, std] of the last frame layer.
    total, channels = 0, NUM_FBANKS
    for number, (units, kernel, _) in enumerate(TDNN_FRAME_LAYERS, start=1):
        conv, batch_norm = channels * kernel * units + units, 4 * units
        assert model.get_layer(f'tdnn{number}').count_params() == conv
        assert model.get_layer(f'tdnn{number}_bn').count_params() == batch_norm
        total += conv + batch_norm
        channels = units
    affine = 2 * channels * EMBEDDING_SIZE + EMBEDDING_SIZE
    assert model.get_layer('affine').count_params() == affine
    assert total + affine == TDNN_FULL_PARAMS


def test_full_gru_has_the_documented_number_of_parameters():
    model = GruModel().m
    assert model.count_params() == GRU_FULL_PARAMS
    filters = RESCNN_FILTERS[0]
    total = (5 * 5 * 1 * filters + filters) + 4 * filters  # 5x5 convolution and its batch norm.
    inputs = (NUM_FBANKS // 2) * filters  # the stride-2 convolution halves the 64 fbanks.
    for number in range(1, GRU_LAYERS + 1):
        gru = model.get_layer(f'gru{number}')
        assert gru.units == GRU_UNITS and gru.reset_after
        # Three gates, each with an input kernel, a recurrent kernel and (reset_after) two biases.
        params = 3 * (inputs * GRU_UNITS + GRU_UNITS * GRU_UNITS + 2 * GRU_UNITS)
        assert gru.count_params() == params
        total += params
        inputs = GRU_UNITS
    total += GRU_UNITS * EMBEDDING_SIZE + EMBEDDING_SIZE
    assert total == GRU_FULL_PARAMS


# --- TDNN structure -----------------------------------------------------------------------------------------------


def conv1d_layers(model: keras.Model) -> list[layers.Conv1D]:
    return [layer for layer in model.layers if isinstance(layer, layers.Conv1D)]


def feeds(layer: layers.Layer, consumer: layers.Layer) -> bool:
    """Whether `layer`'s output is one of `consumer`'s inputs (by identity: KerasTensor == is symbolic)."""
    inputs = consumer.input if isinstance(consumer.input, list) else [consumer.input]
    return any(tensor is layer.output for tensor in inputs)


def test_tdnn_frame_layers_are_dilated_relu_convolutions_each_followed_by_batch_norm():
    model = TdnnModel(width=SMALL_WIDTH).m
    convs = conv1d_layers(model)
    assert [c.name for c in convs] == ['tdnn1', 'tdnn2', 'tdnn3', 'tdnn4', 'tdnn5']
    assert [c.kernel_size for c in convs] == [(5,), (3,), (3,), (1,), (1,)]
    assert [c.dilation_rate for c in convs] == [(1,), (2,), (3,), (1,), (1,)]
    assert [c.filters for c in convs] == [scaled(units, SMALL_WIDTH) for units, _, _ in TDNN_FRAME_LAYERS]
    for conv in convs:
        assert conv.get_config()['activation'] == 'relu', conv.name  # ReLU inside the convolution: BN after it.
        assert conv.padding == 'same', conv.name
        batch_norm = model.get_layer(f'{conv.name}_bn')
        assert isinstance(batch_norm, layers.BatchNormalization)
        assert batch_norm.input is conv.output, conv.name
        assert feeds(batch_norm, model.get_layer(f'{conv.name}_masked')), conv.name
    assert not [layer for layer in model.layers if isinstance(layer, layers.Dropout)]
    pooling = model.get_layer('stats_pooling')
    assert isinstance(pooling, StatsPooling)
    assert pooling.input[0] is model.get_layer('tdnn5_masked').output
    assert tuple(pooling.output.shape) == (None, 2 * convs[-1].filters)
    assert model.get_layer('affine').input is pooling.output


def test_tdnn_frame_layers_option_sets_the_number_kernels_and_dilations_of_the_frame_layers():
    frame_layers = ((32, 3, 1), (48, 3, 4), (64, 1, 1))
    model = TdnnModel(batch_input_shape=ANY_FRAMES, frame_layers=frame_layers).m
    convs = conv1d_layers(model)
    assert [c.name for c in convs] == ['tdnn1', 'tdnn2', 'tdnn3']
    assert [(c.filters, c.kernel_size[0], c.dilation_rate[0]) for c in convs] == list(frame_layers)
    assert 'tdnn4' not in {layer.name for layer in model.layers}
    assert tuple(model.get_layer('stats_pooling').output.shape) == (None, 2 * 64)
    embeddings = predict(model, features(np.random.default_rng(2), 2, 50))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # The width scales the overridden units too.
    narrow = TdnnModel(frame_layers=frame_layers, width=0.5).m
    assert [c.filters for c in conv1d_layers(narrow)] == [16, 24, 32]


def test_tdnn_dropout_option_adds_a_dropout_after_each_batch_norm_inactive_at_inference():
    model = TdnnModel(batch_input_shape=ANY_FRAMES, dropout=0.3, width=SMALL_WIDTH).m
    dropouts = [layer for layer in model.layers if isinstance(layer, layers.Dropout)]
    assert [d.name for d in dropouts] == [f'tdnn{n}_dropout' for n in range(1, 6)]
    for number, dropout in enumerate(dropouts, start=1):
        assert dropout.rate == 0.3
        assert dropout.input is model.get_layer(f'tdnn{number}_bn').output
        assert feeds(dropout, model.get_layer(f'tdnn{number}_masked'))
    plain = TdnnModel(batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH).m
    assert [layer.name for layer in model.layers if layer.weights] == [layer.name for layer in plain.layers
                                                                       if layer.weights]
    randomise(model, seed=3)
    plain.set_weights(model.get_weights())
    x = features(np.random.default_rng(3), 2, 90)
    np.testing.assert_allclose(predict(model, x), predict(plain, x), atol=EMBEDDING_TOLERANCE)
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.max(np.abs(trained - predict(plain, x))) > 1e-3  # dropout is really there in training.


def test_tdnn_bn_before_relu_puts_batch_norm_between_a_linear_convolution_and_its_relu():
    model = TdnnModel(batch_input_shape=ANY_FRAMES, bn_before_relu=True, width=SMALL_WIDTH).m
    for number, conv in enumerate(conv1d_layers(model), start=1):
        assert conv.get_config()['activation'] == 'linear', conv.name
        batch_norm, relu = model.get_layer(f'tdnn{number}_bn'), model.get_layer(f'tdnn{number}_relu')
        assert batch_norm.input is conv.output
        assert isinstance(relu, layers.ReLU) and relu.input is batch_norm.output
        assert feeds(relu, model.get_layer(f'tdnn{number}_masked'))
    plain = TdnnModel(batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH).m
    assert model.count_params() == plain.count_params()
    randomise(model, seed=4)
    plain.set_weights(model.get_weights())
    x = features(np.random.default_rng(4), 2, 90)
    assert np.max(np.abs(predict(model, x) - predict(plain, x))) > 1e-3  # another function of the same weights.


def test_tdnn_checkpoint_with_its_own_frame_layers_and_bn_order_rebuilds_the_same_model(tmp_path):
    original = TdnnModel(batch_input_shape=ANY_FRAMES, frame_layers=((40, 3, 1), (24, 3, 3), (72, 1, 1)),
                         bn_before_relu=True, dropout=0.2, width=0.5)
    randomise(original.m, seed=5)
    path = str(tmp_path / 'TDNN_best.keras')
    original.m.save(path)
    saved_layers = ((20, 3, 1), (12, 3, 3), (36, 1, 1))  # width 0.5 of the given units.
    assert checkpoint_architecture(path) == ('tdnn', {'width': 1.0, 'frame_layers': saved_layers,
                                                      'bn_before_relu': True})
    rebuilt = build_model(path, batch_input_shape=ANY_FRAMES)
    x = features(np.random.default_rng(5), 2, 70)
    np.testing.assert_allclose(predict(rebuilt.m, x), predict(original.m, x), atol=EMBEDDING_TOLERANCE)


# --- Masked statistics pooling ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tdnn() -> TdnnModel:
    model = TdnnModel(batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH)
    randomise(model.m, seed=4)
    return model


def pad(x: np.ndarray, frames: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((x.shape[0], frames - x.shape[1], *x.shape[2:]), x.dtype)], axis=1)


def test_tdnn_embedding_ignores_zero_padding(tdnn):
    x = features(np.random.default_rng(5), 1, 90)
    padded = pad(x, 90 + 45)
    alone, with_padding = predict(tdnn.m, x), predict(tdnn.m, padded)
    assert np.max(np.abs(alone - with_padding)) < EMBEDDING_TOLERANCE
    # The mask is what makes it so: pooling the same frame outputs over every frame, padding included, differs.
    frame_outputs = keras.Model(tdnn.m.input, tdnn.m.get_layer('tdnn5_masked').output)(padded, training=False)
    mask = np.concatenate([np.ones((1, 90)), np.zeros((1, 45))], axis=1).astype(np.float32)
    masked = keras.ops.convert_to_numpy(StatsPooling()([frame_outputs, mask]))
    unmasked = keras.ops.convert_to_numpy(StatsPooling()([frame_outputs, np.ones_like(mask)]))
    assert np.max(np.abs(masked - unmasked)) > 1e-2
    # So does a ResCNN's plain temporal average.
    rescnn = DeepSpeakerModel(batch_input_shape=ANY_FRAMES, width=SMALL_WIDTH)
    randomise(rescnn.m, seed=5)
    assert np.max(np.abs(predict(rescnn.m, x) - predict(rescnn.m, padded))) > 100 * EMBEDDING_TOLERANCE


def test_tdnn_embeddings_of_a_padded_batch_equal_each_utterance_alone(tdnn):
    rng = np.random.default_rng(6)
    short, long = features(rng, 1, 60), features(rng, 1, 110)
    batch = np.concatenate([pad(short, 110), long])
    together = predict(tdnn.m, batch)
    assert np.max(np.abs(together[0] - predict(tdnn.m, short)[0])) < EMBEDDING_TOLERANCE
    assert np.max(np.abs(together[1] - predict(tdnn.m, long)[0])) < EMBEDDING_TOLERANCE
    assert np.max(np.abs(together[0] - together[1])) > 1e-2


def test_stats_pooling_is_the_mean_and_std_of_the_unmasked_frames():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], np.float32)
    pooled = keras.ops.convert_to_numpy(StatsPooling()([x, mask]))
    assert pooled.shape == (2, 6)
    for row in range(2):
        kept = x[row][mask[row] == 1]
        expected = np.concatenate([kept.mean(axis=0), np.sqrt(kept.var(axis=0) + STATS_POOLING_EPSILON)])
        np.testing.assert_allclose(pooled[row], expected, rtol=1e-5, atol=1e-6)
    # Masked frames do not count whatever they hold.
    noisy = np.where(mask[..., None] == 1, x, 1000.0).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(StatsPooling()([noisy, mask])), pooled, atol=1e-5)
    assert StatsPooling().compute_output_shape(((None, None, 7), (None, None))) == (None, 14)


def test_stats_pooling_hand_computed():
    x = np.array([[[1.0, 10.0], [3.0, 10.0], [100.0, -7.0]]], np.float32)
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    pooled = keras.ops.convert_to_numpy(StatsPooling()([x, mask]))
    # mean (2, 10); variance (1, 0).
    np.testing.assert_allclose(pooled, [[2.0, 10.0, np.sqrt(1.0 + STATS_POOLING_EPSILON),
                                         np.sqrt(STATS_POOLING_EPSILON)]], rtol=1e-6)


def test_frame_mask_marks_all_zero_frames_zero():
    frames = np.array([[[1, 0, 0], [0, 0, 0], [-2, 0, 0], [0, 0, 1e-6]],
                       [[0, 0, 0], [0, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0]]], np.float32)
    mask = keras.ops.convert_to_numpy(FrameMask()(frames))
    np.testing.assert_array_equal(mask, [[1, 0, 1, 1], [0, 0, 1, 0]])
    assert mask.dtype == np.float32
    assert FrameMask().compute_output_shape((None, 100, NUM_FBANKS)) == (None, 100)


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
