"""The model registry and the TDNN (x-vector) and GRU architectures: heads and inputs, the documented sizes, the
TDNN's layer structure and padding-invariant statistics pooling."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402
from model_helpers import features, predict, randomise  # noqa: E402

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
    DeepSpeakerModel,
    EcapaModel,
    FrameMask,
    GruModel,
    StatsPooling,
    TdnnModel,
    build_model,
    checkpoint_architecture,
)

SMALL_WIDTH = 0.125
ANY_FRAMES = (None, None, NUM_FBANKS, 1)
TDNN_FULL_PARAMS = 4_321_100  # documented in TdnnModel's docstring (width 1.0, embedding head).
GRU_FULL_PARAMS = 22_565_248  # documented in GruModel's docstring (width 1.0, embedding head).
# Embeddings are unit vectors computed in float32; the same computation on the same frames agrees far closer.
EMBEDDING_TOLERANCE = 1e-5



def scaled(units: int, width: float) -> int:
    return max(1, round(units * width))


# --- Registry, heads and inputs -----------------------------------------------------------------------------------


def test_registry_holds_the_four_architectures_under_their_cli_names():
    assert MODELS == {'rescnn': DeepSpeakerModel, 'tdnn': TdnnModel, 'gru': GruModel, 'ecapa': EcapaModel}
    assert [cls.name for cls in MODELS.values()] == ['ResCNN', 'TDNN', 'GRU', 'ECAPA']
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

