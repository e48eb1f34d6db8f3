"""The classification losses (losses.py): softmax, AM-softmax and AAM-softmax logits and losses against numbers
worked out here with plain numpy formulas, the cosine head, range checks, and a checkpoint round trip from a
margin-loss classifier to the embedding model the triplet phase starts from."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from batcher import KerasFormatConverter  # noqa: E402
from checkpoints import build_model, resumed_or_new  # noqa: E402
from cli import cli  # noqa: E402
from constants import NUM_FBANKS, NUM_FRAMES  # noqa: E402
from conv_models import TdnnModel  # noqa: E402
from losses import (  # noqa: E402
    LOSSES,
    AamSoftmaxLoss,
    AmSoftmaxLoss,
    CosineHead,
    LossOptionError,
    classification_loss,
    head_of,
)
from train import TrainConfig, train_softmax, train_triplet  # noqa: E402
from workdir import WorkingDir  # noqa: E402

# Cosines of 3 embeddings with 4 classes; the third row's target cosine (-0.99) lies past cos(pi - 0.2) = -0.980,
# where AAM-softmax switches to its linear fallback.
COSINES = np.array([[0.8, 0.1, -0.3, 0.5],
                    [0.2, 0.6, 0.4, -0.1],
                    [0.3, 0.2, 0.1, -0.99]], dtype=np.float32)
LABELS = np.array([0, 2, 3])
MARGIN, SCALE = 0.2, 30.0


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    log_norm = np.log(np.sum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)) + logits.max(axis=1)
    return log_norm - logits[np.arange(len(labels)), labels]


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def test_registry_names_the_three_losses_and_their_heads():
    assert list(LOSSES) == ['softmax', 'amsoftmax', 'aamsoftmax']
    assert [head_of(name) for name in LOSSES] == ['softmax', 'cosine', 'cosine']
    assert type(classification_loss('softmax')) is keras.losses.SparseCategoricalCrossentropy  # the original's.


def test_am_softmax_subtracts_the_margin_from_the_target_cosine_only():
    loss = AmSoftmaxLoss(MARGIN, SCALE)
    expected = SCALE * COSINES.astype(np.float64)
    expected[0, 0] = SCALE * (0.8 - 0.2)
    expected[1, 2] = SCALE * (0.4 - 0.2)
    expected[2, 3] = SCALE * (-0.99 - 0.2)
    np.testing.assert_allclose(numpy(loss.logits(LABELS, COSINES)), expected, rtol=1e-6, atol=1e-5)
    per_row = numpy_cross_entropy(expected, LABELS)
    assert float(numpy(loss(LABELS, COSINES))) == pytest.approx(per_row.mean(), rel=1e-5)


def test_aam_softmax_adds_the_margin_to_the_target_angle_only():
    loss = AamSoftmaxLoss(MARGIN, SCALE)
    expected = SCALE * COSINES.astype(np.float64)
    expected[0, 0] = SCALE * np.cos(np.arccos(0.8) + 0.2)
    expected[1, 2] = SCALE * np.cos(np.arccos(0.4) + 0.2)
    assert -0.99 < np.cos(np.pi - 0.2)  # past pi - m: the fallback cos - m sin(m) keeps the logit decreasing.
    expected[2, 3] = SCALE * (-0.99 - 0.2 * np.sin(0.2))
    np.testing.assert_allclose(numpy(loss.logits(LABELS, COSINES)), expected, rtol=1e-5, atol=1e-4)
    assert float(numpy(loss(LABELS, COSINES))) == pytest.approx(numpy_cross_entropy(expected, LABELS).mean(),
                                                                rel=1e-5)


def test_a_margin_makes_the_loss_larger_and_zero_margin_is_scaled_softmax():
    plain = numpy_cross_entropy(SCALE * COSINES, LABELS).mean()
    for cls in (AmSoftmaxLoss, AamSoftmaxLoss):
        assert float(numpy(cls(0.0, SCALE)(LABELS, COSINES))) == pytest.approx(plain, rel=1e-5)
        assert float(numpy(cls(MARGIN, SCALE)(LABELS, COSINES))) > plain + 1.0


def test_softmax_loss_is_the_cross_entropy_of_the_probabilities():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    expected = -np.mean(np.log([0.7, 0.6]))
    loss = classification_loss('softmax')
    assert float(numpy(loss(np.array([0, 2]), probabilities))) == pytest.approx(expected, rel=1e-5)


def test_cosine_head_gives_the_cosines_of_the_embeddings_with_each_class_weight():
    rng = np.random.default_rng(0)
    embeddings, kernel = rng.standard_normal((4, 6)), rng.standard_normal((6, 3))
    head = CosineHead(3)
    head.build((None, 6))
    head.kernel.assign(kernel.astype(np.float32))
    expected = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)) @ (
        kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
    np.testing.assert_allclose(numpy(head(embeddings.astype(np.float32))), expected, atol=1e-6)


def test_defaults_are_the_literature_values():
    assert (AmSoftmaxLoss().margin, AmSoftmaxLoss().scale) == (0.2, 30.0)
    assert (AamSoftmaxLoss().margin, AamSoftmaxLoss().scale) == (0.2, 30.0)
    with pytest.raises(LossOptionError, match='plain softmax has no margin'):
        classification_loss('softmax', margin=0.2)


@pytest.mark.parametrize('name', ['amsoftmax', 'aamsoftmax'])
@pytest.mark.parametrize('option, value', [('margin', -0.1), ('margin', 1.0), ('scale', 0.5), ('scale', 101.0),
                                           ('margin', float('nan'))])
def test_margin_and_scale_out_of_range_are_domain_errors_naming_the_option(name, option, value):
    with pytest.raises(LossOptionError, match=f'^{option} nan|^{option} {value:g} out of range') as caught:
        classification_loss(name, **{option: value})
    assert caught.value.option == option


@pytest.mark.parametrize('args, message', [
    (['--loss', 'aamsoftmax', '--margin', '1.5'], 'Error: --margin 1.5: out of range for --loss aamsoftmax; '
                                                  'expected 0 <= margin < 1.'),
    (['--loss', 'amsoftmax', '--scale', '0'], 'Error: --scale 0: out of range for --loss amsoftmax; expected '
                                              '1 <= scale <= 100.'),
    (['--margin', '0.3'], 'Error: --margin and --scale are options of --loss amsoftmax and aamsoftmax'),
    (['--model', 'tdnn', '--channels', '512'], 'Error: --channels is an option of --model ecapa'),
])
def test_cli_names_the_option_and_its_limit(tmp_path, args, message):
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(tmp_path), '--pre_training_phase', *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written.


def test_margin_classifier_checkpoint_round_trip(tmp_path):
    """A TDNN with a cosine head, compiled with AAM-softmax: its .keras checkpoint reloads (model, loss with its
    margin and scale) for a resume, and build_model gives the embedding model of the triplet phase."""
    rng = np.random.default_rng(1)
    classifier = TdnnModel(include_softmax=True, num_speakers_softmax=5, width=0.0625, head='cosine')
    classifier.m.compile(optimizer='adam', loss=AamSoftmaxLoss(0.3, 20.0), metrics=['accuracy'])
    classifier.m.optimizer.build(classifier.m.trainable_variables)  # as after a training step.
    x = rng.standard_normal((8, 160, 64, 1)).astype(np.float32)
    assert len(classifier.get_weights()) == len(classifier.m.get_weights()) - 1  # the head's one kernel left out.
    path = tmp_path / 'checkpoints' / 'TDNN_last.keras'
    path.parent.mkdir()
    classifier.m.save(path)
    (tmp_path / 'checkpoints' / 'TDNN_state.json').write_text('{"epoch": 1}')

    resumed, epoch = resumed_or_new(path.parent, 'TDNN', lambda: None)
    assert epoch == 1 and isinstance(resumed.loss, AamSoftmaxLoss)
    assert (resumed.loss.margin, resumed.loss.scale) == (0.3, 20.0)
    cosines = numpy(resumed(x, training=False))
    np.testing.assert_allclose(cosines, numpy(classifier.m(x, training=False)), atol=1e-6)
    assert cosines.shape == (8, 5) and np.all(np.abs(cosines) <= 1 + 1e-6)

    embedder = build_model(str(path))
    assert isinstance(embedder, TdnnModel) and 'cosine_layer' not in [layer.name for layer in embedder.m.layers]
    affine = keras.Model(classifier.m.input, classifier.m.get_layer('affine').output)
    expected = numpy(affine(x, training=False))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(numpy(embedder.m(x, training=False)), expected, atol=1e-5)


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> dict:
    """A working dir of random features (4 speakers); one softmax step of a tiny TDNN with AM-softmax and
    SpecAugment, then one triplet step (SpecAugment) from its checkpoint, through train.py."""
    wd = WorkingDir.of(tmp_path_factory.mktemp('margin-wd'))
    rng = np.random.default_rng(0)
    for speaker in range(4):
        for utterance in range(3):
            path = wd.cache_dir / f's{speaker}' / f'u{utterance}.npy'
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, rng.standard_normal((NUM_FRAMES + 40, NUM_FBANKS)).astype(np.float32))
    KerasFormatConverter(wd).generate(NUM_FRAMES, (6, 3), seed=0)
    common = dict(working_dir=str(wd.root), epochs=1, steps_per_epoch=1, width=0.0625, batch_size=12,
                  model_name='tdnn', spec_augment=True, mining='random')
    return {'softmax': train_softmax(TrainConfig(**common, loss='amsoftmax', margin=0.25, scale=20.0)),
            'triplet': train_triplet(TrainConfig(**common))}


def test_train_model_phases_with_a_margin_loss_and_spec_augment(trained):
    softmax, triplet = trained['softmax'], trained['triplet']
    last = keras.saving.load_model(softmax.parent / 'TDNN_last.keras', safe_mode=True)
    assert isinstance(last.loss, AmSoftmaxLoss) and (last.loss.margin, last.loss.scale) == (0.25, 20.0)
    assert last.get_layer('cosine_layer').kernel.shape == (512, 4)
    assert json.loads((triplet.parent / 'TDNN_state.json').read_text())['epoch'] == 1
    # The triplet phase started from the margin classifier's embedding layers: one SGD step moved them a little.
    start, after = (build_model(str(path)).m.get_layer('tdnn1').get_weights()[0] for path in (softmax, triplet))
    assert 0 < np.max(np.abs(start - after)) < 0.05
