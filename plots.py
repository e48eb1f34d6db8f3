"""Pictures of embeddings: reading an embeddings `.npz` (as `embed` writes it) and a t-SNE map of it coloured by
speaker, drawn with matplotlib's Agg backend to a PNG.

Imports numpy, scikit-learn, matplotlib and constants (t-SNE settings) only.
"""

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from constants import TSNE_PERPLEXITY, TSNE_SEED

UNLABELLED = '(no speaker)'
TITLE_FINGERPRINT_CHARS = 60


class EmbeddingsFileError(ValueError):
    """An embeddings file that cannot be read; the message names the file and the fix."""


class PlotError(ValueError):
    """Embeddings that cannot be drawn (too few); the message says how many are needed."""


class EmbeddingSet(NamedTuple):
    """What an embeddings .npz holds: names (n,) str, embeddings (n, dims) float32, speakers (n,) str ('' when
    unknown) and the fingerprint of the model that made them."""

    names: np.ndarray
    embeddings: np.ndarray
    speakers: np.ndarray
    fingerprint: str


def read_embeddings(path: str | Path) -> EmbeddingSet:
    """The arrays of an embeddings .npz (keys names, embeddings, speakers, fingerprint; no pickled objects).
    EmbeddingsFileError when the file is missing, not an .npz of those arrays, or their lengths differ."""
    fix = 'write it with the embed command'
    keys = ('names', 'embeddings', 'speakers', 'fingerprint')
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in keys if key not in npz.files]
            arrays = {key: npz[key] for key in keys if key not in missing}
    except FileNotFoundError:
        raise EmbeddingsFileError(f'{path}: no such file; {fix}.') from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EmbeddingsFileError(f'{path}: not a readable .npz ({type(e).__name__}); {fix}.') from None
    if missing:
        raise EmbeddingsFileError(f'{path}: lacks {", ".join(missing)}; not an embeddings file, {fix}.')
    embeddings = arrays['embeddings']
    if embeddings.ndim != 2 or not len(arrays['names']) == len(arrays['speakers']) == len(embeddings):
        raise EmbeddingsFileError(f'{path}: embeddings {embeddings.shape} do not match {len(arrays["names"])} names '
                                  f'and {len(arrays["speakers"])} speakers; {fix}.')
    return EmbeddingSet(arrays['names'].astype(str), embeddings.astype(np.float32), arrays['speakers'].astype(str),
                        str(arrays['fingerprint']))


def tsne_map(embeddings: np.ndarray, perplexity: float = TSNE_PERPLEXITY) -> np.ndarray:
    """2-D t-SNE coordinates (n, 2) of embeddings (n, dims), cosine distance, perplexity clipped below n (t-SNE
    needs it smaller than the number of points), fixed seed: the same input gives the same map."""
    from sklearn.manifold import TSNE
    if len(embeddings) < 3:
        raise PlotError(f'{len(embeddings)} embeddings: a t-SNE map needs at least 3.')
    perplexity = min(perplexity, len(embeddings) - 1.0)
    return TSNE(n_components=2, perplexity=perplexity, metric='cosine', init='pca',
                random_state=TSNE_SEED).fit_transform(np.asarray(embeddings, dtype=np.float64))


def plot_embeddings(embedding_set: EmbeddingSet, path: str | Path, perplexity: float = TSNE_PERPLEXITY) -> None:
    """Draws the t-SNE map of the embeddings to a PNG: one colour (and marker, past 10 speakers) per speaker, a
    legend, a title with the number of utterances and speakers and the model fingerprint."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points = tsne_map(embedding_set.embeddings, perplexity)
    speakers = np.where(embedding_set.speakers == '', UNLABELLED, embedding_set.speakers)
    names = sorted(set(speakers.tolist()))
    colours, markers = plt.get_cmap('tab10').colors, 'os^Dv<>p*hX'
    fig, ax = plt.subplots(figsize=(7, 5))
    for number, speaker in enumerate(names):
        chosen = speakers == speaker
        ax.scatter(points[chosen, 0], points[chosen, 1], s=22, color=colours[number % 10],
                   marker=markers[(number // 10) % len(markers)], label=f'{speaker} ({chosen.sum()})')
    fingerprint = embedding_set.fingerprint
    if len(fingerprint) > TITLE_FINGERPRINT_CHARS:
        fingerprint = '...' + fingerprint[-TITLE_FINGERPRINT_CHARS:]
    ax.set_title(f't-SNE of {len(points)} utterance embeddings, {len(names)} speakers\n{fingerprint}', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title='speaker (utterances)', fontsize=7, title_fontsize=7, loc='center left',
              bbox_to_anchor=(1.0, 0.5), ncols=1 + len(names) // 25)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format='png')
    plt.close(fig)
