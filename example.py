"""The README's embedding example: embeds the sample files with a checkpoint and prints cosine similarities.

    python example.py CHECKPOINT   (a .keras checkpoint of ours, or the published Keras-2 ResCNN_*.h5)
"""

import os

from tf_startup import import_tensorflow

import_tensorflow()

import click  # noqa: E402
import numpy as np  # noqa: E402

from checkpoints import CheckpointError  # noqa: E402
from embedding import Embedder  # noqa: E402
from test import batch_cosine_similarity  # noqa: E402

SAMPLES = ['samples/PhilippeRemy/PhilippeRemy_001.wav', 'samples/PhilippeRemy/PhilippeRemy_002.wav',
           'samples/PhilippeRemy/PhilippeRemy_003.wav', 'samples/PhilippeRemy/PhilippeRemy_004.wav',
           'samples/1255-90413-0001.flac']


@click.command()
@click.argument('checkpoint', type=click.Path(dir_okay=False))
@click.option('--width', default=None, type=click.FloatRange(min=0.01),
              help='Filter multiplier of the checkpoint\'s model [default: read from a .keras file, else 1.0].')
def main(checkpoint, width):
    """Cosine similarity of PhilippeRemy_001 with the three other PhilippeRemy files (same speaker) and with a
    LibriSpeech speaker (different speaker)."""
    try:
        embedder = Embedder.from_checkpoint(checkpoint, width=width, crop=True)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    embeddings = embedder.embed_files(SAMPLES)  # the centre crop of each file.
    similarities = batch_cosine_similarity(np.repeat(embeddings[:1], len(SAMPLES) - 1, axis=0), embeddings[1:])
    for path, similarity in zip(SAMPLES[1:], similarities, strict=True):
        kind = 'SAME SPEAKER' if 'PhilippeRemy' in path else 'DIFF SPEAKER'
        click.echo(f'{kind} {os.path.basename(SAMPLES[0])} vs {os.path.basename(path)}: {similarity:.4f}')


if __name__ == '__main__':
    main()
