"""Memory: embedding.embed_crops (the one inference function) and the triplet phase's peak resident memory with
hard-negative mining against the same phase with random triplets, each in its own process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conv_models import DeepSpeakerModel
from embedding import embed_crops

REPO_ROOT = Path(__file__).resolve().parents[1]
MINING_FACTOR = 1.5  # the mining triplet phase's peak RSS may be at most this times the random one's.
WIDTH = '0.125'
BATCH = '48'


def peak_rss_mb(args: list[str]) -> float:
    """Runs `cli.py ARGS` in a child process; its peak resident set size in MB (ru_maxrss from os.wait4)."""
    process = subprocess.Popen([sys.executable, 'cli.py', *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-2000:]
    return usage.ru_maxrss / 1024


@pytest.fixture(scope='module')
def working_dir(tmp_path_factory, librispeech_dir) -> Path:
    """Cache and model inputs of the 10 sample speakers: 40 training and 4 test crops each."""
    wd = tmp_path_factory.mktemp('memory') / 'wd'
    for args in (['build-mfcc-cache', '--audio_dir', str(librispeech_dir)],
                 ['build-keras-inputs', '--counts_per_speaker', '40,4']):
        subprocess.run([sys.executable, 'cli.py', args[0], '--working_dir', str(wd), *args[1:]], cwd=REPO_ROOT,
                       check=True, capture_output=True)
    return wd


def triplet_phase_peak_mb(working_dir: Path, mining: str) -> float:
    checkpoints = working_dir / 'checkpoints-triplets'
    if checkpoints.exists():
        for path in checkpoints.iterdir():
            path.unlink()
    return peak_rss_mb(['train-model', '--working_dir', str(working_dir), '--no_pre_training_phase', '--from_scratch',
                        '--epochs', '1', '--steps_per_epoch', '1', '--width', WIDTH, '--batch_size', BATCH,
                        '--triplet_mining', mining])


def test_triplet_phase_with_mining_stays_within_the_factor_of_random_triplets(working_dir):
    """The history refresh embeds all 400 training crops (history 6400 capped at kx_train) with the training model;
    it must not need much more than the training steps themselves."""
    random_peak = triplet_phase_peak_mb(working_dir, 'random')
    mining_peak = triplet_phase_peak_mb(working_dir, 'semihard')
    assert mining_peak <= MINING_FACTOR * random_peak, (
        f'semihard mining peaks at {mining_peak:.0f} MB, random triplets at {random_peak:.0f} MB '
        f'(allowed: {MINING_FACTOR}x)')


@pytest.fixture(scope='module')
def model():
    return DeepSpeakerModel(width=0.125).m


def test_embed_crops_matches_predict_whatever_the_batch_and_reads_a_memory_map(model, tmp_path):
    crops = np.random.default_rng(0).standard_normal((23, 160, 64, 1)).astype(np.float32)
    expected = model.predict(crops, batch_size=64, verbose=0)
    path = tmp_path / 'crops.npy'
    np.save(path, crops)
    mapped = np.load(path, mmap_mode='r')
    np.testing.assert_array_equal(embed_crops(model, mapped), expected)  # the same batch of 64: the same numbers.
    for batch_size in (1, 5, 23, 100):  # oneDNN picks its kernels by batch size: float round-off only.
        embeddings = embed_crops(model, mapped, batch_size)
        assert embeddings.dtype == np.float32 and embeddings.shape == (23, 512)
        np.testing.assert_allclose(embeddings, expected, atol=1e-6)


def test_embed_crops_of_no_crops_is_an_empty_matrix(model):
    embeddings = embed_crops(model, np.zeros((0, 160, 64, 1), dtype=np.float32))
    assert embeddings.shape == (0, 512) and embeddings.dtype == np.float32


def test_inference_batch_must_be_positive():
    result = subprocess.run([sys.executable, 'cli.py', 'train-model', '--inference_batch', '0'], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and '--inference_batch' in result.stderr
