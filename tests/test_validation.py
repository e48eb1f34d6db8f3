"""Speaker-level validation (train-model --val_speakers): the fixed choice of held-out speakers, the training
inputs without them, the segments of a lone utterance, the callback's EER against eval-trials-style embeddings,
and both training phases on a small synthetic feature cache (best checkpoint by val_eer, resume checks, the
one-line errors)."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from batcher import KerasFormatConverter  # noqa: E402
from checkpoints import read_keras_checkpoint  # noqa: E402
from cli import cli  # noqa: E402
from constants import NUM_FBANKS, NUM_FRAMES  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder, utterance_windows  # noqa: E402
from eval_metrics import equal_error_rate, min_dcf  # noqa: E402
from train import TrainConfig, train_softmax, train_triplet  # noqa: E402
from validation import (  # noqa: E402
    SpeakerValidation,
    ValidationError,
    held_out_speakers,
    speaker_targets,
    training_subset,
)

TINY = {'width': 0.0625, 'batch_size': 6, 'steps_per_epoch': 1}


def test_held_out_speakers_are_fixed_nested_and_take_their_augmented_copies_along():
    speakers = [f's{i:02d}' for i in range(12)] + ['s03~sp0.9', 's07~sp1.1']
    five = held_out_speakers(speakers, 5)
    assert five == held_out_speakers(list(reversed(speakers)), 5)
    assert len(five) == 5 and set(five) <= {f's{i:02d}' for i in range(12)}
    assert set(held_out_speakers(speakers, 3)) < set(five)
    assert held_out_speakers(speakers, 0) == []


def test_holding_out_too_many_speakers_says_the_limit():
    with pytest.raises(ValidationError) as error:
        held_out_speakers(['a', 'b', 'c', 'c~sp0.9', 'd'], 3)
    assert (error.value.count, error.value.limit, error.value.available) == (3, 2, 4)


def test_training_subset_drops_the_held_out_crops_and_their_copies_and_renumbers_the_labels():
    speakers = ['a', 'a~sp0.9', 'b', 'c']
    ky = np.repeat(np.arange(4, dtype=np.int32), 3)
    kx = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1) * np.ones((1, 2, 2, 1), dtype=np.float32)
    view, labels, count = training_subset(kx, ky, speakers, ['a'])
    assert count == 2 and len(view) == 6 and view.shape == (6, 2, 2, 1)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(view[np.array([0, 4])][:, 0, 0, 0], [6, 10])
    np.testing.assert_array_equal(view[2:4][:, 0, 0, 0], [8, 9])


@pytest.mark.parametrize(('frames', 'sizes'), [(1250, [313, 313, 312, 312]), (700, [350, 350]), (299, [299])])
def test_a_lone_utterance_is_cut_into_consecutive_segments_of_at_least_the_segment_length(frames, sizes):
    features = np.arange(frames * 2, dtype=np.float32).reshape(frames, 2)
    segments = speaker_targets([features], per_speaker=4, segment_frames=300)
    assert [len(s) for s in segments] == sizes
    np.testing.assert_array_equal(np.concatenate(segments), features)


def test_several_utterances_are_the_targets_themselves_up_to_the_limit():
    utterances = [np.full((50 + i, 2), i, dtype=np.float32) for i in range(6)]
    assert [len(t) for t in speaker_targets(utterances, per_speaker=4)] == [50, 51, 52, 53]


def test_the_callback_scores_all_pairs_of_targets_as_eval_trials_embeds_them():
    """The softmax model's validation EER is that of the unit embeddings the same weights give without the head."""
    keras.utils.set_random_seed(3)
    softmax = DeepSpeakerModel(include_softmax=True, num_speakers_softmax=3, width=0.0625)
    embedder = DeepSpeakerModel(width=0.0625)
    for layer in embedder.m.layers:
        if layer.weights:
            layer.set_weights(softmax.m.get_layer(layer.name).get_weights())
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((frames, NUM_FBANKS)).astype(np.float32) for frames in (170, 300, 160, 250, 400)]
    speakers = np.array([0, 0, 1, 1, 2])
    callback = SpeakerValidation([utterance_windows(f) for f in features], speakers)
    callback.set_model(softmax.m)
    logs = {}
    callback.on_epoch_end(0, logs)
    embeddings = np.stack([Embedder(embedder).embed_features(f) for f in features])
    first, second = np.triu_indices(5, k=1)
    scores = np.sum(embeddings[first] * embeddings[second], axis=1)
    labels = (speakers[first] == speakers[second]).astype(int)
    assert logs['val_eer'] == pytest.approx(equal_error_rate(scores, labels), abs=1e-9)
    assert logs['val_min_dcf'] == pytest.approx(min_dcf(scores, labels, 0.01), abs=1e-9)


# --- training on a synthetic cache --------------------------------------------------------------------------------


def synthetic_working_dir(directory: Path) -> Path:
    """Five speakers, one utterance of 700 frames each (random features), and model inputs of 4 + 2 crops each."""
    rng = np.random.default_rng(0)
    for speaker in ('s1', 's2', 's3', 's4', 's5'):
        folder = directory / 'audio-fbanks' / speaker
        folder.mkdir(parents=True)
        np.save(folder / f'{speaker}-0001.flac.npy', rng.standard_normal((700, NUM_FBANKS)).astype(np.float32))
    KerasFormatConverter(directory).generate(NUM_FRAMES, (4, 2), seed=0)
    return directory


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """A softmax phase of 2 epochs holding out 2 of the 5 speakers, keeping every epoch checkpoint."""
    working_dir = synthetic_working_dir(tmp_path_factory.mktemp('validation'))
    train_softmax(TrainConfig(working_dir=str(working_dir), epochs=2, val_speakers=2, average_last=2, **TINY))
    return working_dir


def test_softmax_phase_holds_out_speakers_and_keeps_the_checkpoint_of_lowest_validation_eer(trained):
    directory = trained / 'checkpoints-softmax'
    history = np.genfromtxt(directory / 'history.csv', delimiter=',', names=True)
    assert len(history) == 2 and np.all((history['val_eer'] >= 0) & (history['val_eer'] <= 1))
    assert np.all(history['val_min_dcf'] >= 0)
    state = json.loads((directory / 'ResCNN_state.json').read_text())
    assert state['monitor'] == 'val_eer' and state['best'] == pytest.approx(history['val_eer'].min())
    held_out = json.loads((directory / 'validation-speakers.json').read_text())['held_out']
    assert held_out == held_out_speakers(['s1', 's2', 's3', 's4', 's5'], 2)
    best = read_keras_checkpoint(str(directory / 'ResCNN_best.keras'))
    assert best.output_shape[-1] == 3
    chosen = read_keras_checkpoint(str(directory / f'ResCNN_epoch{int(np.argmin(history["val_eer"])) + 1:04d}.keras'))
    for kept, expected in zip(best.get_weights(), chosen.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, expected)


def test_resuming_with_another_number_of_held_out_speakers_is_refused(trained):
    with pytest.raises(ValidationError, match='trained holding out 2 speakers, not 1'):
        train_softmax(TrainConfig(working_dir=str(trained), epochs=4, val_speakers=1, **TINY))


def test_triplet_phase_refuses_to_hold_out_speakers_its_softmax_checkpoint_was_trained_on(trained):
    with pytest.raises(ValidationError, match='trained on 1 of these 3 held-out speakers; give at most 2'):
        train_triplet(TrainConfig(working_dir=str(trained), epochs=1, val_speakers=3, mining='random', **TINY))
    assert not (trained / 'checkpoints-triplets' / 'ResCNN_last.keras').exists()


def test_cli_too_many_held_out_speakers_is_one_line_naming_the_option_and_the_limit(trained):
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(trained), '--pre_training_phase',
                                      '--val_speakers', '4'])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'Error: --val_speakers 4: at most 3 of the 5 training speakers can be held out (2 must remain to train); '
        'give at most 3.')
