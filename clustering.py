"""Grouping embeddings by speaker: scikit-learn's agglomerative clustering on cosine distance (average linkage),
with a known number of speakers or a cosine-similarity threshold, and the purity, adjusted Rand index and NMI of
a clustering against known speakers.

Imports numpy and scikit-learn only.
"""

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix


class ClusteringError(ValueError):
    """Embeddings or settings that cannot be clustered; the message says what to change."""


def clustering_settings(count: int, num_speakers: int | None, threshold: float | None) -> dict:
    """AgglomerativeClustering's n_clusters / distance_threshold for `count` embeddings; ClusteringError when
    there are fewer than 2 embeddings, not exactly one of `num_speakers` and `threshold`, or either is out of
    range."""
    if count < 2:
        raise ClusteringError(f'{count} embedding(s): clustering needs at least 2 recordings.')
    if (num_speakers is None) == (threshold is None):
        raise ClusteringError('give exactly one of the number of speakers and the similarity threshold.')
    if num_speakers is not None and not 1 <= num_speakers <= count:
        raise ClusteringError(f'{num_speakers} speakers for {count} recordings: the number of speakers must be '
                              f'between 1 and the number of recordings.')
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ClusteringError(f'similarity threshold {threshold}: a cosine similarity lies in [-1, 1].')
    if num_speakers is not None:
        return {'n_clusters': num_speakers}
    return {'n_clusters': None, 'distance_threshold': 1.0 - threshold}


def cluster_embeddings(embeddings: np.ndarray, num_speakers: int | None = None,
                       threshold: float | None = None) -> np.ndarray:
    """Speaker labels 0..k-1 of unit embeddings (n, dims), shape (n,) int: average-linkage agglomerative
    clustering on cosine distance, into `num_speakers` clusters, or merging while the average cosine similarity
    of two clusters is at least `threshold` (in [-1, 1]; distance threshold 1 - threshold). Deterministic."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    settings = clustering_settings(len(embeddings), num_speakers, threshold)
    clustering = AgglomerativeClustering(metric='cosine', linkage='average', **settings)
    return clustering.fit_predict(embeddings).astype(np.int64)


def purity(true_labels: np.ndarray, predicted: np.ndarray) -> float:
    """Fraction of items whose cluster's most common true label is their own (1.0: no cluster mixes speakers)."""
    contingency = contingency_matrix(true_labels, predicted)  # (true classes, clusters)
    return float(contingency.max(axis=0).sum() / contingency.sum())


def clustering_scores(true_labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Purity, adjusted Rand index and normalised mutual information of cluster labels `predicted` (n,) against
    the speakers `true_labels` (n,) (any hashable labels): {'purity', 'ari', 'nmi'}."""
    return {'purity': purity(true_labels, predicted),
            'ari': float(adjusted_rand_score(true_labels, predicted)),
            'nmi': float(normalized_mutual_info_score(true_labels, predicted))}
