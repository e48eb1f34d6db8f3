"""Times a model on this machine: embeddings per second (forward, batch 64) and seconds per training step
(softmax over 251 speakers, batch 96), at the published width and the reduced demo width.

    .venv/bin/python bench/bench_model.py [--model rescnn] [--width 1.0 --width 0.25] [--steps 3]
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import click  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constants import BATCH_SIZE, NUM_FBANKS, NUM_FRAMES  # noqa: E402
from conv_models import MODELS  # noqa: E402


def embeddings_per_second(model: keras.Model, crops: np.ndarray) -> float:
    model.predict(crops[:64], batch_size=64, verbose=0)
    start = time.perf_counter()
    model.predict(crops, batch_size=64, verbose=0)
    return len(crops) / (time.perf_counter() - start)


def seconds_per_step(model_name: str, width: float, crops: np.ndarray, steps: int) -> float:
    dsm = MODELS[model_name](include_softmax=True, num_speakers_softmax=251, width=width)
    dsm.m.compile(optimizer='adam', loss='sparse_categorical_crossentropy')
    labels = np.random.default_rng(0).integers(251, size=len(crops))
    dsm.m.train_on_batch(crops, labels)
    start = time.perf_counter()
    for _ in range(steps):
        dsm.m.train_on_batch(crops, labels)
    return (time.perf_counter() - start) / steps


@click.command()
@click.option('--model', 'model_name', default='rescnn', type=click.Choice(sorted(MODELS)), show_default=True)
@click.option('--width', 'widths', multiple=True, type=float, default=(1.0, 0.25), show_default=True)
@click.option('--steps', default=3, show_default=True)
@click.option('--crops', 'num_crops', default=256, show_default=True)
def main(model_name, widths, steps, num_crops):
    crops = np.random.default_rng(0).standard_normal((num_crops, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32)
    for width in widths:
        model = MODELS[model_name](width=width).m
        rate = embeddings_per_second(model, crops)
        step = seconds_per_step(model_name, width, crops[:BATCH_SIZE], steps)
        click.echo(f'{model.name} width {width:g}: {model.count_params():,} parameters, {rate:.1f} embeddings/s, '
                   f'{step:.2f} s per training step of {BATCH_SIZE}')


if __name__ == '__main__':
    main()
