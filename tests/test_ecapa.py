"""ECAPA-TDNN (conv_models.EcapaModel): heads and shapes on any number of frames, the parameter count against a
formula checked on the paper's published sizes, padding invariance, the architecture read back from a checkpoint,
and one training step with AAM-softmax."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from model_helpers import features, predict, randomise  # noqa: E402

from constants import EMBEDDING_SIZE, NUM_FBANKS, NUM_FRAMES  # noqa: E402
from conv_models import MODELS, EcapaModel, build_model, checkpoint_architecture  # noqa: E402
from losses import AamSoftmaxLoss  # noqa: E402

TINY_WIDTH = 0.0625  # C = 64, MFA 96, bottlenecks 8.
ANY_FRAMES = (None, None, NUM_FBANKS, 1)
EMBEDDING_TOLERANCE = 1e-5



def ecapa_trainable_parameters(channels: int, inputs: int, embedding: int, embedding_bn: bool, mfa: int = 1536,
                               bottleneck: int = 128, scale: int = 8) -> int:
    """Trainable parameters of ECAPA-TDNN by layer arithmetic: a Conv1D has in * kernel * out + out, a batch norm
    2 * channels (gamma, beta), a dense layer in * out + out."""
    def conv(c_in, kernel, c_out):
        return c_in * kernel * c_out + c_out

    group = channels // scale
    block = (conv(channels, 1, channels) + 2 * channels  # 1x1 in, batch norm.
             + (scale - 1) * (conv(group, 3, group) + 2 * group)  # Res2Net: 7 dilated convolutions, batch norms.
             + conv(channels, 1, channels) + 2 * channels  # 1x1 out, batch norm.
             + conv(channels, 1, bottleneck) + conv(bottleneck, 1, channels))  # squeeze-excitation.
    return (conv(inputs, 5, channels) + 2 * channels + 3 * block
            + conv(3 * channels, 1, mfa) + 2 * mfa  # multi-layer feature aggregation.
            + conv(3 * mfa, 1, bottleneck) + conv(bottleneck, 1, mfa)  # attention on frames + global context.
            + 2 * (2 * mfa)  # batch norm of the pooled mean and std.
            + conv(2 * mfa, 1, embedding) + (2 * embedding if embedding_bn else 0))


def test_the_formula_gives_the_papers_published_sizes():
    # Desplanques et al. 2020, table 1: 6.2M parameters at C=512, 14.7M at C=1024 (80 MFCCs, 192-d embedding).
    assert round(ecapa_trainable_parameters(512, 80, 192, True) / 1e6, 1) == 6.2
    assert round(ecapa_trainable_parameters(1024, 80, 192, True) / 1e6, 1) == 14.7


def test_full_ecapa_has_the_formulas_number_of_parameters():
    model = EcapaModel().m
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == ecapa_trainable_parameters(1024, NUM_FBANKS, EMBEDDING_SIZE, False) == 15_561_600
    batch_norm_channels = sum(layer.gamma.shape[0] for layer in model.layers
                              if isinstance(layer, keras.layers.BatchNormalization))
    assert model.count_params() == trainable + 2 * batch_norm_channels == 15_590_528  # + moving mean and variance.
    assert model.get_layer('conv1').filters == 1024 and model.get_layer('mfa').filters == 1536
    assert [model.get_layer(f'block{n}_res2_1').dilation_rate[0] for n in (1, 2, 3)] == [2, 3, 4]


@pytest.fixture(scope='module')
def ecapa() -> EcapaModel:
    model = EcapaModel(batch_input_shape=ANY_FRAMES, width=TINY_WIDTH)
    randomise(model.m, seed=3)
    return model


def test_registry_and_shapes_on_any_number_of_frames(ecapa):
    assert MODELS['ecapa'] is EcapaModel and ecapa.m.name == 'ECAPA'
    rng = np.random.default_rng(1)
    for frames in (37, NUM_FRAMES, 300):
        out = predict(ecapa.m, features(rng, 2, frames))
        assert out.shape == (2, EMBEDDING_SIZE), frames
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(out[0], out[1], atol=1e-4)
    cosine = EcapaModel(include_softmax=True, num_speakers_softmax=4, width=TINY_WIDTH, head='cosine', channels=512)
    assert cosine.m.output_shape == (None, 4) and cosine.m.get_layer('conv1').filters == 32


def pad(x: np.ndarray, frames: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((x.shape[0], frames - x.shape[1], *x.shape[2:]), x.dtype)], axis=1)


def test_ecapa_embedding_ignores_zero_padding(ecapa):
    rng = np.random.default_rng(5)
    short, long = features(rng, 1, 60), features(rng, 1, 110)
    alone = predict(ecapa.m, short)
    assert np.max(np.abs(alone - predict(ecapa.m, pad(short, 150)))) < EMBEDDING_TOLERANCE
    together = predict(ecapa.m, np.concatenate([pad(short, 110), long]))
    assert np.max(np.abs(together[0] - alone[0])) < EMBEDDING_TOLERANCE
    assert np.max(np.abs(together[1] - predict(ecapa.m, long)[0])) < EMBEDDING_TOLERANCE
    # Without the mask the padding would count: the same frames with a last real frame of zeros but one value.
    nudged = pad(short, 150)
    nudged[0, -1, 0, 0] = 1e-3
    assert np.max(np.abs(alone - predict(ecapa.m, nudged))) > 100 * EMBEDDING_TOLERANCE


def test_checkpoint_says_its_channels_and_rebuilds_the_same_model(ecapa, tmp_path):
    path = str(tmp_path / 'ECAPA.keras')
    ecapa.m.save(path)
    assert checkpoint_architecture(path) == ('ecapa', {'width': 1.0, 'channels': 64, 'mfa_channels': 96,
                                                       'bottleneck': 8})
    rebuilt = build_model(path)
    x = features(np.random.default_rng(2), 2, NUM_FRAMES)
    np.testing.assert_allclose(predict(rebuilt.m, x), predict(ecapa.m, x), atol=1e-6)


def test_one_training_step_with_aam_softmax_changes_the_layers_from_first_to_head():
    """One SGD step (Adam's first step builds a graph of this many variables for about 40 s on a 2-core CPU; the
    train-model phases with Adam are tested on the TDNN in test_losses.py)."""
    classifier = EcapaModel(include_softmax=True, num_speakers_softmax=4, width=TINY_WIDTH, head='cosine')
    classifier.m.compile(optimizer=keras.optimizers.SGD(0.5), loss=AamSoftmaxLoss())
    rng = np.random.default_rng(4)
    x, y = features(rng, 8, NUM_FRAMES), rng.integers(0, 4, 8)
    before = [w.copy() for w in classifier.m.get_weights()]
    first = float(classifier.m.train_on_batch(x, y))
    assert np.isfinite(first)
    changed = {v.path.split('/')[0] for v, b in zip(classifier.m.weights, before, strict=True)
               if v.trainable and not np.allclose(keras.ops.convert_to_numpy(v), b)}
    assert {'conv1', 'block3_res2_7', 'block1_se_excite', 'mfa', 'attention_logits', 'affine',
            'cosine_layer'} <= changed
