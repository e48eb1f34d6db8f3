"""The two floors of the mining table on a trial list: no model at all (cosine of each utterance's mean
normalised fbank) and the untrained, randomly initialised ResCNN.

    .venv/bin/python recipes/floors.py --trials T --audio_root DIR [--width 0.25] [--seed 123]
"""

import os
import sys
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import click  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constants import DEFAULT_SEED  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder  # noqa: E402
from eval_metrics import equal_error_rate, min_dcf  # noqa: E402
from features import read_features  # noqa: E402
from test import read_trials, score_trials  # noqa: E402


def mean_fbank_embeddings(files: list[Path]) -> np.ndarray:
    """Each file's mean normalised fbank frame, L2-normalised: (files, 64)."""
    means = np.stack([read_features(str(f)).mean(axis=0) for f in files])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


@click.command()
@click.option('--trials', 'trials_file', required=True, type=click.Path(exists=True, dir_okay=False))
@click.option('--audio_root', required=True, type=click.Path(exists=True, file_okay=False))
@click.option('--width', default=0.25, show_default=True)
@click.option('--seed', default=DEFAULT_SEED, show_default=True)
def main(trials_file, audio_root, width, seed):
    trials = read_trials(trials_file, audio_root)
    keras.utils.set_random_seed(seed)
    floors = {'no model (mean fbank)': mean_fbank_embeddings(trials.files),
              f'untrained ResCNN (width {width:g}, seed {seed})':
                  Embedder(DeepSpeakerModel(width=width)).embed_files(trials.files)}
    for name, embeddings in floors.items():
        scores = score_trials(embeddings, trials)
        click.echo(f'{name}: EER = {100 * equal_error_rate(scores, trials.labels):.2f} %, '
                   f'minDCF(p_target=0.01) = {min_dcf(scores, trials.labels):.4f}')


if __name__ == '__main__':
    main()
