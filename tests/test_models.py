"""Tests of conv_models: the ResCNN's size and layer names, its heads and inputs, and checkpoint loading."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402
from model_helpers import randomise  # noqa: E402

import audio  # noqa: E402
import conv_models  # noqa: E402
from conv_models import CheckpointError, DeepSpeakerModel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FLAC = REPO_ROOT / 'samples/LibriSpeech/test-other/3005/163389/3005-163389-0005.flac'

FULL_MODEL_PARAMS = 24_185_728  # documented size of the paper's ResCNN (width 1.0, triplet head).
SMALL_WIDTH = 0.125
# The in-graph fbank (float32 TensorFlow ops) and audio.mfcc_fbank (numpy) compute the same per-frame normalised
# features in a different order of float operations; normalised features are O(1), so they agree to ~1e-5.
FBANK_TOLERANCE = 1e-4
# Embeddings are unit vectors; rounding differences of the features above move them by far less than this.
EMBEDDING_TOLERANCE = 1e-4


def expected_weighted_layer_names() -> list[str]:
    """The original implementation's names of the weighted layers, in order, built from its naming pattern."""
    names = []
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        names += [f'conv{filters}-s', f'conv{filters}-s_bn']
        for block in range(3):
            prefix = f'res{stage}_{block}_branch'
            names += [f'{prefix}_2a', f'{prefix}_2a_bn', f'{prefix}_2b', f'{prefix}_2b_bn']
    return names + ['affine']


def weighted_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if layer.weights]


def layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray], name: str) -> None:
    assert len(actual) == len(expected), name
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e, err_msg=name)


def random_fbank(rng: np.random.Generator, batch: int, frames: int) -> np.ndarray:
    return rng.standard_normal((batch, frames, 64, 1)).astype(np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def full_model() -> DeepSpeakerModel:
    return DeepSpeakerModel()


@pytest.fixture(scope='module')
def trimmed_audio() -> np.ndarray:
    samples = audio.trim_silence(audio.read_audio(str(SAMPLE_FLAC)))[:32000]
    assert len(samples) == 32000
    return samples


@pytest.fixture(scope='module')
def other_audio() -> np.ndarray:
    """Another 2 s of speech: samples 40000 to 72000 of the same trimmed file."""
    samples = audio.trim_silence(audio.read_audio(str(SAMPLE_FLAC)))[40000:72000]
    assert len(samples) == 32000
    return samples


# --- Architecture -----------------------------------------------------------------------------------------------


def test_full_model_has_the_documented_number_of_parameters(full_model):
    assert full_model.m.count_params() == FULL_MODEL_PARAMS


def test_full_model_outputs_512_dimensional_embeddings(full_model):
    assert tuple(full_model.m.output_shape) == (None, 512)
    assert tuple(full_model.m.input_shape) == (None, 160, 64, 1)


def test_keras_model_of_the_original_api_is_the_model(full_model):
    assert isinstance(full_model.keras_model(), keras.Model)
    assert full_model.keras_model() is full_model.m


def test_full_model_has_the_original_layer_names(full_model):
    names = {layer.name for layer in full_model.m.layers}
    for name in ('input', 'conv64-s', 'conv64-s_bn', 'res1_0_branch_2a', 'res1_0_branch_2a_bn',
                 'res1_2_branch_2b_bn', 'conv128-s', 'conv256-s', 'conv512-s', 'res4_2_branch_2b', 'affine'):
        assert name in names


def test_full_model_weighted_layers_follow_the_original_pattern_in_order(full_model):
    assert weighted_names(full_model.m) == expected_weighted_layer_names()
    assert conv_models.weighted_layer_names(full_model.m) == expected_weighted_layer_names()


def test_full_model_stage_filters(full_model):
    for filters in (64, 128, 256, 512):
        assert full_model.m.get_layer(f'conv{filters}-s').filters == filters
    assert full_model.m.get_layer('res4_2_branch_2b').filters == 512


def test_narrow_model_keeps_the_layer_names_with_far_fewer_parameters(full_model):
    narrow = DeepSpeakerModel(width=0.25)
    assert weighted_names(narrow.m) == expected_weighted_layer_names()
    # Every layer but the auto-named `add` ones (their suffix counts models built so far) has the same name.
    def named(model):
        return [layer.name for layer in model.layers if not layer.name.startswith('add')]

    assert named(narrow.m) == named(full_model.m)
    assert narrow.m.get_layer('conv64-s').filters == 16
    assert narrow.m.get_layer('conv512-s').filters == 128
    assert narrow.m.count_params() < FULL_MODEL_PARAMS / 10
    assert tuple(narrow.m.output_shape) == (None, 512)


def test_embeddings_are_l2_normalised():
    model = DeepSpeakerModel(width=SMALL_WIDTH)
    randomise(model.m, seed=1)
    x = random_fbank(np.random.default_rng(0), batch=4, frames=160)
    embeddings = keras.ops.convert_to_numpy(model.m(x, training=False))
    assert embeddings.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])  # different inputs, different embeddings.


def test_any_number_of_frames_at_inference():
    model = DeepSpeakerModel(batch_input_shape=(None, None, 64, 1), width=SMALL_WIDTH)
    assert tuple(model.m.input_shape) == (None, None, 64, 1)
    rng = np.random.default_rng(2)
    for batch, frames in ((2, 37), (1, 160), (3, 301)):
        embeddings = keras.ops.convert_to_numpy(model.m(random_fbank(rng, batch, frames), training=False))
        assert embeddings.shape == (batch, 512)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


# --- Softmax head -------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def softmax_model() -> DeepSpeakerModel:
    return DeepSpeakerModel(include_softmax=True, num_speakers_softmax=7, width=SMALL_WIDTH)


def test_softmax_head_outputs_probabilities(softmax_model):
    x = random_fbank(np.random.default_rng(3), batch=3, frames=160)
    probabilities = keras.ops.convert_to_numpy(softmax_model.m(x, training=False))
    assert probabilities.shape == (3, 7)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert tuple(softmax_model.m.output_shape) == (None, 7)


def test_softmax_head_layers(softmax_model):
    names = [layer.name for layer in softmax_model.m.layers]
    assert 'softmax_layer' in names
    assert 'dropout' in names
    assert 'ln' not in names
    assert softmax_model.m.get_layer('softmax_layer').units == 7
    assert weighted_names(softmax_model.m) == expected_weighted_layer_names() + ['softmax_layer']


def test_get_weights_drops_the_softmax_kernel_and_bias(softmax_model):
    all_weights = softmax_model.m.get_weights()
    kept = softmax_model.get_weights()
    assert len(kept) == len(all_weights) - 2
    for k, w in zip(kept, all_weights[:-2], strict=True):
        np.testing.assert_array_equal(k, w)
    head = softmax_model.m.get_layer('softmax_layer').get_weights()
    assert [w.shape for w in all_weights[-2:]] == [w.shape for w in head] == [(512, 7), (7,)]
    # The kept weights are exactly those of a triplet model of the same width.
    triplet = DeepSpeakerModel(width=SMALL_WIDTH)
    assert [w.shape for w in kept] == [w.shape for w in triplet.get_weights()]


def test_get_weights_keeps_everything_without_softmax():
    model = DeepSpeakerModel(width=SMALL_WIDTH)
    assert len(model.get_weights()) == len(model.m.get_weights())


@pytest.mark.parametrize('num_speakers', [None, 0, 1])
def test_softmax_head_without_enough_speakers_raises(num_speakers):
    with pytest.raises(ValueError, match='num_speakers_softmax'):
        DeepSpeakerModel(include_softmax=True, num_speakers_softmax=num_speakers, width=SMALL_WIDTH)


# --- Raw audio input ----------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def pcm_model() -> DeepSpeakerModel:
    model = DeepSpeakerModel(pcm_input=True, width=SMALL_WIDTH)
    randomise(model.m, seed=4)
    return model


def test_pcm_model_fbank_layer_matches_audio_mfcc_fbank(pcm_model, trimmed_audio):
    fbank_model = keras.Model(pcm_model.m.input, pcm_model.m.get_layer('fbank').output)
    in_graph = keras.ops.convert_to_numpy(fbank_model(trimmed_audio[np.newaxis], training=False))
    expected = audio.mfcc_fbank(trimmed_audio)
    assert expected.shape == (1 + int(np.ceil((32000 - 400) / 160)), 64)
    assert in_graph.shape == (1, *expected.shape, 1)
    assert np.max(np.abs(in_graph[0, ..., 0] - expected)) < FBANK_TOLERANCE


def test_pcm_model_fbank_layer_matches_audio_for_odd_lengths(pcm_model, trimmed_audio):
    fbank_model = keras.Model(pcm_model.m.input, pcm_model.m.get_layer('fbank').output)
    for length in (400, 401, 561, 12345):
        samples = trimmed_audio[:length]
        in_graph = keras.ops.convert_to_numpy(fbank_model(samples[np.newaxis], training=False))
        expected = audio.mfcc_fbank(samples)
        assert in_graph.shape == (1, *expected.shape, 1), length
        assert np.max(np.abs(in_graph[0, ..., 0] - expected)) < FBANK_TOLERANCE, length


def test_pcm_model_embedding_equals_fbank_model_embedding(pcm_model, trimmed_audio, other_audio):
    fbank_input_model = DeepSpeakerModel(batch_input_shape=(None, None, 64, 1), width=SMALL_WIDTH)
    assert weighted_names(fbank_input_model.m) == weighted_names(pcm_model.m)
    fbank_input_model.m.set_weights(pcm_model.m.get_weights())
    from_pcm = keras.ops.convert_to_numpy(pcm_model.m(trimmed_audio[np.newaxis], training=False))
    features = audio.mfcc_fbank(trimmed_audio)[np.newaxis, ..., np.newaxis]
    from_fbank = keras.ops.convert_to_numpy(fbank_input_model.m(features, training=False))
    assert from_pcm.shape == from_fbank.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(from_pcm, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(from_pcm - from_fbank)) < EMBEDDING_TOLERANCE
    # The tolerance is tight enough to tell another utterance's embedding apart.
    other = audio.mfcc_fbank(other_audio)[np.newaxis, ..., np.newaxis]
    from_other = keras.ops.convert_to_numpy(fbank_input_model.m(other, training=False))
    assert np.max(np.abs(from_pcm - from_other)) > 10 * EMBEDDING_TOLERANCE


# --- Keras-2 HDF5 checkpoints -------------------------------------------------------------------------------------

LEGACY_WEIGHT_NAMES = {
    layers.Conv2D: ['kernel', 'bias'],
    layers.Dense: ['kernel', 'bias'],
    layers.BatchNormalization: ['gamma', 'beta', 'moving_mean', 'moving_variance'],
}
OMITTED_LAYER = 'res2_1_branch_2b_bn'
FOREIGN_LAYER = 'speaker_classifier'  # in the file, not in the model: ignored.


def legacy_layer_contents(model: keras.Model, seed: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Random Keras-2 weights for every weighted layer of `model` but OMITTED_LAYER, plus FOREIGN_LAYER."""
    rng = np.random.default_rng(seed)
    contents = {}
    for layer in model.layers:
        if not layer.weights or layer.name == OMITTED_LAYER:
            continue
        suffixes = LEGACY_WEIGHT_NAMES[type(layer)]
        shapes = [tuple(w.shape) for w in layer.weights]
        assert len(shapes) == len(suffixes)
        contents[layer.name] = [
            (f'{layer.name}/{suffix}:0',
             (rng.uniform(0.5, 1.5, shape) if 'variance' in suffix else rng.normal(0, 0.1, shape)).astype(np.float32))
            for suffix, shape in zip(suffixes, shapes, strict=True)
        ]
    contents[FOREIGN_LAYER] = [(f'{FOREIGN_LAYER}/kernel:0', rng.normal(size=(3, 2)).astype(np.float32)),
                               (f'{FOREIGN_LAYER}/bias:0', rng.normal(size=(2,)).astype(np.float32))]
    return contents


def write_legacy_h5(path: Path, contents: dict[str, list[tuple[str, np.ndarray]]], full_model_layout: bool,
                    weightless_layers: tuple[str, ...] = ('input', 'clipped_relu_0')) -> None:
    """Writes `contents` as Keras 2.3 would: save_weights layout, or save (model) layout under 'model_weights'."""
    with h5py.File(path, 'w') as f:
        if full_model_layout:
            f.attrs['keras_version'] = b'2.3.1'
            f.attrs['backend'] = b'tensorflow'
            f.attrs['model_config'] = b'{"class_name": "Model"}'
            group = f.create_group('model_weights')
        else:
            group = f
        names = list(weightless_layers) + list(contents)
        group.attrs['layer_names'] = np.array([n.encode() for n in names])
        group.attrs['backend'] = b'tensorflow'
        group.attrs['keras_version'] = b'2.3.1'
        for name in weightless_layers:
            group.create_group(name).attrs['weight_names'] = np.array([], dtype='S1')
        for name, weights in contents.items():
            layer_group = group.create_group(name)
            layer_group.attrs['weight_names'] = np.array([weight_name.encode() for weight_name, _ in weights])
            for weight_name, value in weights:
                layer_group.create_dataset(weight_name, data=value)


@pytest.fixture
def small_model() -> DeepSpeakerModel:
    return DeepSpeakerModel(width=SMALL_WIDTH)


def assert_loaded_legacy(model: keras.Model, contents, before: dict[str, list[np.ndarray]]) -> None:
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name == OMITTED_LAYER:
            assert_same_weights(layer.get_weights(), before[layer.name], layer.name)
        else:
            assert_same_weights(layer.get_weights(), [value for _, value in contents[layer.name]], layer.name)


@pytest.mark.parametrize('full_model_layout', [False, True], ids=['save_weights-layout', 'model_weights-layout'])
def test_load_checkpoint_reads_keras2_h5_by_name(tmp_path, small_model, full_model_layout):
    contents = legacy_layer_contents(small_model.m, seed=5)
    path = tmp_path / 'ResCNN_checkpoint.h5'
    write_legacy_h5(path, contents, full_model_layout)
    before = layer_weights(small_model.m)

    missing = conv_models.load_checkpoint(small_model.m, str(path))

    assert missing == [OMITTED_LAYER]
    assert_loaded_legacy(small_model.m, contents, before)
    # The file's nested layout is the Keras 2 one: group[layer]['layer/kernel:0'] is group[layer]['layer']['kernel:0'].
    with h5py.File(path, 'r') as f:
        group = f['model_weights'] if full_model_layout else f
        assert 'kernel:0' in group['conv64-s']['conv64-s']


def test_plain_load_weights_by_name_reads_keras2_h5(tmp_path, small_model):
    contents = legacy_layer_contents(small_model.m, seed=6)
    path = tmp_path / 'weights.h5'
    write_legacy_h5(path, contents, full_model_layout=False)
    before = layer_weights(small_model.m)
    small_model.m.load_weights(str(path), by_name=True)
    assert_loaded_legacy(small_model.m, contents, before)


def test_legacy_h5_layer_names_lists_only_layers_with_weights(tmp_path, small_model):
    contents = legacy_layer_contents(small_model.m, seed=7)
    for layout in (False, True):
        path = tmp_path / f'layout{layout}.h5'
        write_legacy_h5(path, contents, full_model_layout=layout)
        assert conv_models.legacy_h5_layer_names(str(path)) == set(contents)


def test_keras2_h5_of_another_width_raises(tmp_path):
    contents = legacy_layer_contents(DeepSpeakerModel(width=SMALL_WIDTH).m, seed=8)
    path = tmp_path / 'narrow.h5'
    write_legacy_h5(path, contents, full_model_layout=False)
    with pytest.raises(CheckpointError, match=str(path)):
        conv_models.load_checkpoint(DeepSpeakerModel(width=0.25).m, str(path))


def test_keras2_h5_without_any_model_layer_raises(tmp_path, small_model):
    path = tmp_path / 'other_model.h5'
    write_legacy_h5(path, {FOREIGN_LAYER: [(f'{FOREIGN_LAYER}/bias:0', np.zeros(2, np.float32))]},
                    full_model_layout=False)
    with pytest.raises(CheckpointError, match='none of the model'):
        conv_models.load_checkpoint(small_model.m, str(path))


# --- Keras 3 checkpoints and errors -------------------------------------------------------------------------------


def test_keras3_weights_file_renamed_to_h5_raises_naming_the_file(tmp_path, small_model):
    native = tmp_path / 'x.weights.h5'
    small_model.m.save_weights(str(native))
    renamed = tmp_path / 'x.h5'
    shutil.move(native, renamed)
    with pytest.raises(CheckpointError) as error:
        conv_models.load_checkpoint(small_model.m, str(renamed))
    assert str(renamed) in str(error.value)


def test_missing_checkpoint_raises_naming_the_file(tmp_path, small_model):
    path = tmp_path / 'no_such_checkpoint.keras'
    with pytest.raises(CheckpointError) as error:
        conv_models.load_checkpoint(small_model.m, str(path))
    assert str(path) in str(error.value)


def test_unknown_checkpoint_extension_raises(tmp_path, small_model):
    path = tmp_path / 'weights.bin'
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='unknown checkpoint format'):
        conv_models.load_checkpoint(small_model.m, str(path))


def test_keras_checkpoint_of_another_width_raises(tmp_path, small_model):
    path = tmp_path / 'wide.keras'
    DeepSpeakerModel(width=0.25).m.save(str(path))
    assert conv_models.checkpoint_architecture(str(path))[1]['width'] == 0.25
    with pytest.raises(CheckpointError) as error:
        conv_models.load_checkpoint(small_model.m, str(path))
    assert str(path) in str(error.value)


@pytest.fixture(scope='module')
def softmax_checkpoint(tmp_path_factory) -> tuple[DeepSpeakerModel, Path]:
    """A softmax model (width 0.125, 5 speakers) with random weights everywhere, saved as .keras."""
    model = DeepSpeakerModel(include_softmax=True, num_speakers_softmax=5, width=SMALL_WIDTH)
    randomise(model.m, seed=9)
    path = tmp_path_factory.mktemp('checkpoints') / 'ResCNN_softmax.keras'
    model.m.save(str(path))
    return model, path


def test_keras_round_trip_into_a_triplet_model(softmax_checkpoint, small_model):
    source, path = softmax_checkpoint
    before = layer_weights(small_model.m)
    missing = conv_models.load_checkpoint(small_model.m, str(path))
    assert missing == []
    expected = layer_weights(source.m)
    loaded = layer_weights(small_model.m)
    assert set(loaded) == set(expected) - {'softmax_layer'}
    for name, weights in loaded.items():
        assert_same_weights(weights, expected[name], name)
        assert not all(np.array_equal(a, b) for a, b in zip(weights, before[name], strict=True)), name

    x = random_fbank(np.random.default_rng(10), batch=3, frames=160)
    affine = keras.Model(source.m.input, source.m.get_layer('affine').output)
    expected_embeddings = l2_normalise(keras.ops.convert_to_numpy(affine(x, training=False)))
    embeddings = keras.ops.convert_to_numpy(small_model.m(x, training=False))
    np.testing.assert_allclose(embeddings, expected_embeddings, atol=1e-6)
    assert np.max(np.abs(embeddings[0] - embeddings[1])) > 1e-3  # the embeddings depend on the input.


def test_checkpoint_width_reads_the_keras_file(softmax_checkpoint, tmp_path):
    _, path = softmax_checkpoint
    assert conv_models.checkpoint_architecture(str(path))[1]['width'] == SMALL_WIDTH
    assert conv_models.checkpoint_architecture(str(tmp_path / "absent.keras"))[1]['width'] == 1.0


def test_weights_h5_round_trip(tmp_path):
    source = DeepSpeakerModel(width=SMALL_WIDTH)
    randomise(source.m, seed=11)
    path = tmp_path / 'ResCNN.weights.h5'
    source.m.save_weights(str(path))
    target = DeepSpeakerModel(width=SMALL_WIDTH)
    before = layer_weights(target.m)
    assert conv_models.load_checkpoint(target.m, str(path)) == []
    expected = layer_weights(source.m)
    for name, weights in layer_weights(target.m).items():
        assert_same_weights(weights, expected[name], name)
        assert not all(np.array_equal(a, b) for a, b in zip(weights, before[name], strict=True)), name
    x = random_fbank(np.random.default_rng(12), batch=2, frames=160)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(target.m(x, training=False)),
                               keras.ops.convert_to_numpy(source.m(x, training=False)), atol=1e-6)


def test_copy_weights_by_name_between_widths_of_same_shape():
    source = DeepSpeakerModel(include_softmax=True, num_speakers_softmax=3, width=SMALL_WIDTH)
    randomise(source.m, seed=13)
    target = DeepSpeakerModel(pcm_input=True, width=SMALL_WIDTH)
    conv_models.copy_weights_by_name(source.m, target.m)
    expected = layer_weights(source.m)
    for name, weights in layer_weights(target.m).items():
        assert_same_weights(weights, expected[name], name)


@pytest.mark.parametrize('width', [0.25, 0.3, 0.7])
def test_checkpoint_width_rebuilds_the_saved_architecture(tmp_path, width):
    """cli test-model builds the model with the width checkpoint_architecture(file) reads and loads the file into it."""
    saved = DeepSpeakerModel(width=width)
    path = tmp_path / f'width{width}.keras'
    saved.m.save(str(path))
    read_width = conv_models.checkpoint_architecture(str(path))[1]['width']
    assert read_width == pytest.approx(width, abs=0.01)
    rebuilt = DeepSpeakerModel(width=read_width)
    assert rebuilt.filters == saved.filters
    assert conv_models.load_checkpoint(rebuilt.m, str(path)) == []


def test_file_that_is_not_hdf5_named_h5_raises_checkpoint_error(tmp_path, small_model):
    path = tmp_path / 'truncated.h5'
    path.write_bytes(b'this is not an HDF5 file')
    with pytest.raises(CheckpointError) as error:
        conv_models.load_checkpoint(small_model.m, str(path))
    assert str(path) in str(error.value)


def test_pcm_model_keras_round_trip(tmp_path, trimmed_audio):
    source = DeepSpeakerModel(pcm_input=True, width=SMALL_WIDTH)
    randomise(source.m, seed=14)
    path = tmp_path / 'pcm.keras'
    source.m.save(str(path))
    assert conv_models.checkpoint_architecture(str(path))[1]['width'] == SMALL_WIDTH
    target = DeepSpeakerModel(pcm_input=True, width=SMALL_WIDTH)
    assert conv_models.load_checkpoint(target.m, str(path)) == []
    x = trimmed_audio[np.newaxis, :8000]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(target.m(x, training=False)),
                               keras.ops.convert_to_numpy(source.m(x, training=False)), atol=1e-6)
    # The fbank layer has no weights: the same file also fits a model fed with features.
    fbank_input_model = DeepSpeakerModel(batch_input_shape=(None, None, 64, 1), width=SMALL_WIDTH)
    assert conv_models.load_checkpoint(fbank_input_model.m, str(path)) == []
    assert_same_weights(fbank_input_model.m.get_weights(), source.m.get_weights(), 'all')
