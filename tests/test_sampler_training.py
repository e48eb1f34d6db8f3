"""Training on fresh windows of the packed store (train-model --sampler windows), in-process on the cache of
samples/ at width 0.0625: one softmax step, and the triplet phase's inputs (mined windows through
train.triplet_dataset)."""

import csv
from pathlib import Path

import keras
import numpy as np
import pytest

from audio import Audio
from batcher import HardNegativeMiner
from store import pack_store
from train import TrainConfig, train_softmax, triplet_data, triplet_dataset
from validation import recorded_held_out
from workdir import WorkingDir


@pytest.fixture(scope='module')
def working_dir(tmp_path_factory, librispeech_dir) -> Path:
    """A working dir with the cache and the packed store of samples/LibriSpeech/test-other."""
    root = tmp_path_factory.mktemp('windows')
    Audio(str(root), str(librispeech_dir), workers=2)
    pack_store(root)
    return root


def test_softmax_phase_trains_on_the_store_speakers_and_scores_held_out_ones(working_dir):
    best = train_softmax(TrainConfig(working_dir=str(working_dir), epochs=1, steps_per_epoch=1, width=0.0625,
                                     batch_size=12, sampler='windows', speaker_sampling='proportional',
                                     val_speakers=3))
    assert keras.saving.load_model(best, compile=False).output_shape[-1] == 10  # samples/: 10 speakers.
    with open(working_dir / 'checkpoints-softmax' / 'history.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0 <= float(rows[0]['val_accuracy']) <= 1 and 0 <= float(rows[0]['val_eer']) <= 1
    assert len(recorded_held_out(working_dir / 'checkpoints-softmax')) == 3


def test_triplet_phase_reads_triplets_of_store_windows_through_its_dataset(working_dir):
    config = TrainConfig(working_dir=str(working_dir), sampler='windows', mining='hard', history_size=40)
    wd = WorkingDir.of(working_dir)
    data = triplet_data(config, wd, None, wd.checkpoints_dir('triplet'), 'ResCNN')
    assert data.num_speakers == 10 and set(np.unique(data.ky_test)) <= set(np.unique(data.ky_train))
    miner = data.miner(data.ky_train, config.mining, config.history_size, seed=0)
    assert isinstance(miner, HardNegativeMiner)
    miner.refresh(data.kx_train, lambda crops: crops[..., 0].mean(axis=1), 16)
    x, y = next(iter(triplet_dataset(data.batcher(data.kx_train, data.ky_train, seed=0, selector=miner), 12)))
    assert x.shape == (12, 160, 64, 1) and not y.numpy().any()
    history = data.kx_train[miner.history[0]]
    assert all(np.isclose(history, row).all(axis=(1, 2, 3)).any() for row in x.numpy())
