"""clustering.py: agglomerative clustering of a hand-built set of unit vectors (three well-separated speakers),
by number of speakers and by similarity threshold, the refusals, and purity / ARI / NMI of a contingency table
worked out by hand."""

import math

import numpy as np
import pytest

from clustering import ClusteringError, cluster_embeddings, clustering_scores

SPEAKERS = np.repeat([0, 1, 2], [4, 3, 5])  # 12 recordings: 4, 3 and 5 per speaker.


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the items identically (equal up to renaming the labels)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope='module')
def embeddings() -> np.ndarray:
    """Three speakers on three orthogonal axes of a 512-d space, each recording its axis plus a little noise
    (cosine about 0.99 within a speaker, about 0 between), shuffled; unit rows."""
    rng = np.random.default_rng(0)
    vectors = np.eye(512)[SPEAKERS * 100] + 0.01 * rng.standard_normal((len(SPEAKERS), 512))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_same_partition_helper_tells_partitions_apart():
    assert same_partition(np.array([0, 0, 1]), np.array([5, 5, 2]))
    assert not same_partition(np.array([0, 0, 1]), np.array([5, 2, 2]))
    assert not same_partition(np.array([0, 0, 1]), np.array([0, 0, 0]))


def test_known_number_of_speakers_recovers_them(embeddings):
    labels = cluster_embeddings(embeddings, num_speakers=3)
    assert labels.shape == (12,) and set(labels.tolist()) == {0, 1, 2}
    assert same_partition(labels, SPEAKERS)
    assert len(set(cluster_embeddings(embeddings, num_speakers=2).tolist())) == 2
    order = np.random.default_rng(1).permutation(12)
    assert same_partition(cluster_embeddings(embeddings[order], num_speakers=3), SPEAKERS[order])


def test_similarity_threshold_sets_how_far_clusters_merge(embeddings):
    assert same_partition(cluster_embeddings(embeddings, threshold=0.5), SPEAKERS)
    assert set(cluster_embeddings(embeddings, threshold=-1.0).tolist()) == {0}  # everything merges.
    assert len(set(cluster_embeddings(embeddings, threshold=0.9999).tolist())) == 12  # nothing merges.


@pytest.mark.parametrize('count, options, message', [
    (1, {'num_speakers': 1}, 'at least 2'),
    (5, {'num_speakers': 6}, 'between 1 and the number of recordings'),
    (5, {'num_speakers': 0}, 'between 1 and the number of recordings'),
    (5, {}, 'exactly one'),
    (5, {'num_speakers': 2, 'threshold': 0.5}, 'exactly one'),
    (5, {'threshold': 1.5}, '[-1, 1]'),
])
def test_refusals_say_what_to_change(count, options, message):
    vectors = np.eye(8, dtype=np.float32)[:count]
    with pytest.raises(ClusteringError, match=message.replace('[', r'\[').replace(']', r'\]')):
        cluster_embeddings(vectors, **options)
    assert issubclass(ClusteringError, ValueError)


def test_scores_of_a_hand_worked_contingency():
    # Speakers a a a b b b; clusters 0 0 1 1 1 1: contingency [[2, 1], [0, 3]].
    true, predicted = np.array(['a', 'a', 'a', 'b', 'b', 'b']), np.array([0, 0, 1, 1, 1, 1])
    purity = (2 + 3) / 6  # each cluster's majority speaker: 2 of cluster 0, 3 of cluster 1.
    pairs_together, pairs_true, pairs_predicted, pairs = 1 + 0 + 0 + 3, 3 + 3, 1 + 6, 15
    expected = pairs_true * pairs_predicted / pairs
    ari = (pairs_together - expected) / ((pairs_true + pairs_predicted) / 2 - expected)  # 1.2 / 3.7
    mutual = (2 / 6) * math.log(2) + (1 / 6) * math.log(1 / 2) + (3 / 6) * math.log(3 / 2)
    entropy_true = math.log(2)
    entropy_predicted = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    nmi = mutual / ((entropy_true + entropy_predicted) / 2)
    scores = clustering_scores(true, predicted)
    assert scores == pytest.approx({'purity': purity, 'ari': ari, 'nmi': nmi}, abs=1e-12)
    assert scores['ari'] == pytest.approx(1.2 / 3.7, abs=1e-12)


def test_perfect_and_single_cluster_scores():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_scores(true, np.array([7, 7, 3, 3, 5, 5])) == pytest.approx({'purity': 1, 'ari': 1, 'nmi': 1})
    lumped = clustering_scores(true, np.zeros(6, dtype=int))
    assert lumped['purity'] == pytest.approx(1 / 3) and lumped['ari'] == pytest.approx(0) and lumped['nmi'] == 0
