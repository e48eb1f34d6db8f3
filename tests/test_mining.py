"""Hard and semi-hard triplet mining: batcher.mined_pairs on hand-built and random embeddings (checked against a
brute-force loop), batcher.history_sample, batcher.HardNegativeMiner and train.MiningRefresh."""

from collections import Counter

import numpy as np
import pytest

from batcher import HardNegativeMiner, TripletBatcher, history_sample, mined_pairs

CROP_SHAPE = (160, 64, 1)


def unit_vectors(degrees) -> np.ndarray:
    """2-D unit vectors at the given angles: cosine similarity of two of them is the cosine of the angle between."""
    radians = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def mine_all(embeddings: np.ndarray, labels: np.ndarray, anchor_positions: np.ndarray, mode: str):
    """mined_pairs called the way HardNegativeMiner.select calls it."""
    sims = embeddings[anchor_positions] @ embeddings.T
    same = labels[anchor_positions][:, None] == labels[None, :]
    return mined_pairs(sims, same, anchor_positions, mode)


def brute_force(embeddings: np.ndarray, labels: np.ndarray, anchor_position: int, mode: str) -> tuple[int, int]:
    """(positive, negative) history positions of one anchor, by plain loops over the history."""
    anchor = embeddings[anchor_position]
    sim = [float(np.dot(anchor.astype(np.float64), e.astype(np.float64))) for e in embeddings]
    positive, negative = None, None
    for j in range(len(embeddings)):
        if j != anchor_position and labels[j] == labels[anchor_position]:
            if positive is None or sim[j] < sim[positive]:
                positive = j
    hardest = None
    for j in range(len(embeddings)):
        if labels[j] != labels[anchor_position] and (hardest is None or sim[j] > sim[hardest]):
            hardest = j
    if mode == 'hard':
        return positive, hardest
    for j in range(len(embeddings)):
        if labels[j] != labels[anchor_position] and sim[j] < sim[positive]:
            if negative is None or sim[j] > sim[negative]:
                negative = j
    return positive, (hardest if negative is None else negative)


# Speaker 0 at 0, 10 and 35 degrees; speaker 1 at 20 and 90; speaker 2 at 180 and 5 (no two distances tie where
# it matters).
HAND_ANGLES = [0, 10, 35, 20, 90, 180, 5]
HAND_LABELS = np.array([0, 0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize('anchor, positive, hard, semihard', [
    # 0 deg: farthest same-speaker crop 35 deg; closest other speaker 5 deg; closest beyond 35 away: 90 deg.
    (0, 2, 6, 4),
    # 10 deg: positive 35 deg (25 away, 0 deg is 10 away); hardest 5 deg; closest beyond 25 away: 90 deg.
    (1, 2, 6, 4),
    # 35 deg: positive 0 deg (35 away); hardest 20 deg (15 away); closest beyond 35 away: 90 deg (55 away).
    (2, 0, 3, 4),
    # 20 deg (speaker 1): positive 90 deg (70 away); hardest 10 deg (10 away); beyond 70 away: only 180 deg.
    (3, 4, 1, 5),
    # 90 deg: positive 20 deg (70 away); hardest 35 deg (55 away); closest beyond 70 away: 10 deg (80 away).
    (4, 3, 2, 1),
    # 180 deg (speaker 2): positive 5 deg (175 away); hardest 90 deg; the only crop farther than 175 deg: 0 deg.
    (5, 6, 4, 0),
])
def test_hand_built_angles(anchor, positive, hard, semihard):
    embeddings = unit_vectors(HAND_ANGLES)
    positions = np.array([anchor])
    hard_pair = mine_all(embeddings, HAND_LABELS, positions, 'hard')
    semihard_pair = mine_all(embeddings, HAND_LABELS, positions, 'semihard')
    assert (int(hard_pair[0][0]), int(hard_pair[1][0])) == (positive, hard)
    assert (int(semihard_pair[0][0]), int(semihard_pair[1][0])) == (positive, semihard)


def test_semihard_falls_back_to_the_hardest_negative_when_none_is_easier():
    # Speaker 0 at 0 and 170 degrees, speaker 1 at 40 and 60: both negatives are closer to the anchor than its
    # positive.
    embeddings = unit_vectors([0, 170, 40, 60])
    labels = np.array([0, 0, 1, 1])
    positives, negatives = mine_all(embeddings, labels, np.array([0]), 'semihard')
    assert (int(positives[0]), int(negatives[0])) == (1, 2)


def test_positive_is_never_the_anchor_even_when_a_duplicate_exists():
    # Three identical crops of speaker 0 (all similarities tie at 1) and one of speaker 1.
    embeddings = unit_vectors([0, 0, 0, 90])
    labels = np.array([0, 0, 0, 1])
    for mode in ('hard', 'semihard'):
        for anchor in range(3):
            positives, negatives = mine_all(embeddings, labels, np.array([anchor]), mode)
            assert int(positives[0]) != anchor and labels[positives[0]] == 0
            assert int(negatives[0]) == 3


def test_lone_duplicate_is_the_positive():
    # A speaker whose two history crops are the same crop sampled twice: the positive is the other copy.
    embeddings = unit_vectors([30, 30, 0, 80])
    labels = np.array([0, 0, 1, 1])
    positives, _ = mine_all(embeddings, labels, np.array([0, 1]), 'hard')
    assert positives.tolist() == [1, 0]


@pytest.mark.parametrize('mode', ['hard', 'semihard'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_brute_force_on_random_embeddings(mode, seed):
    rng = np.random.default_rng(seed)
    counts = [2, 3, 5, 8, 4, 6]
    labels = np.repeat(np.arange(len(counts)), counts)
    # Low dimension and speakers spread at random: both semi-hard branches occur.
    embeddings = rng.standard_normal((len(labels), 3))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    anchor_positions = rng.integers(len(labels), size=300)
    positives, negatives = mine_all(embeddings, labels, anchor_positions, mode)
    fallbacks = 0
    for k, anchor in enumerate(anchor_positions):
        expected = brute_force(embeddings, labels, int(anchor), mode)
        assert (int(positives[k]), int(negatives[k])) == expected, f'anchor {anchor}'
        if mode == 'semihard':
            fallbacks += expected[1] == brute_force(embeddings, labels, int(anchor), 'hard')[1]
    if mode == 'semihard':
        assert 0 < fallbacks < len(anchor_positions)


def test_history_sample_takes_equal_counts_from_every_speaker():
    labels = np.repeat(np.arange(5), [3, 10, 7, 20, 4])
    picks = history_sample(labels, 20, np.random.default_rng(0))
    assert picks.dtype.kind == 'i' and np.all((picks >= 0) & (picks < len(labels)))
    counts = Counter(labels[picks].tolist())
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert set(counts.values()) == {20 // 5}


def test_history_sample_takes_at_least_two_per_speaker():
    labels = np.repeat(np.arange(3), 5)
    picks = history_sample(labels, 3, np.random.default_rng(0))
    counts = Counter(labels[picks].tolist())
    assert len(counts) >= 2
    assert all(count >= 2 for count in counts.values())
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize('seed', range(5))
def test_history_sample_subsets_speakers_when_there_are_too_many(seed):
    labels = np.repeat(np.arange(10), 6)
    picks = history_sample(labels, 8, np.random.default_rng(seed))
    counts = Counter(labels[picks].tolist())
    assert len(counts) == 8 // 2
    assert set(counts.values()) == {2}
    # Without replacement here (6 crops per speaker, 2 wanted): distinct crops.
    assert len(set(picks.tolist())) == len(picks)


def test_history_sample_reaches_every_speaker_over_seeds():
    labels = np.repeat(np.arange(10), 6)
    seen = set()
    for seed in range(30):
        seen |= set(labels[history_sample(labels, 8, np.random.default_rng(seed))].tolist())
    assert seen == set(range(10))


def test_history_sample_keeps_two_distinct_crops_of_a_two_crop_speaker():
    """A speaker with two crops (sampled with replacement, 4 per speaker here) must still offer an anchor and a
    different positive: the history needs both of its crops."""
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    degenerate = []
    for seed in range(20):
        picks = history_sample(labels, 12, np.random.default_rng(seed))
        if len(set(picks[labels[picks] == 2].tolist())) < 2:
            degenerate.append((seed, picks.tolist()))
    assert degenerate == [], f'{len(degenerate)} of 20 seeds keep a single crop of speaker 2: {degenerate[:2]}'


def random_crops(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(labels), *CROP_SHAPE)).astype(np.float32)


def make_embed(dims: int = 16, seed: int = 1):
    """A deterministic embedder: a fixed random projection of the flattened crop, L2-normalised."""
    projection = np.random.default_rng(seed).standard_normal((int(np.prod(CROP_SHAPE)), dims))
    calls = []

    def embed(crops: np.ndarray) -> np.ndarray:
        # One crop at a time, so a crop's embedding does not depend on the rest of the batch (bit for bit).
        calls.append(len(crops))
        out = np.stack([np.asarray(crop, dtype=np.float64).ravel() @ projection for crop in crops])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    embed.calls = calls
    return embed


def expected_triplet(anchor: int, history: np.ndarray, all_embeddings: np.ndarray, labels: np.ndarray,
                     mode: str) -> tuple[int, int]:
    """Brute force over the history crops (kx indices, possibly repeated): one copy of the anchor left out."""
    others = list(history)
    others.remove(anchor)
    others = np.array(others)
    sims = all_embeddings[others].astype(np.float64) @ all_embeddings[anchor].astype(np.float64)
    same = labels[others] == labels[anchor]
    positive_slot = min(np.flatnonzero(same), key=lambda j: sims[j])
    negatives = np.flatnonzero(~same)
    hardest = max(negatives, key=lambda j: sims[j])
    if mode == 'hard':
        return int(others[positive_slot]), int(others[hardest])
    easier = [j for j in negatives if sims[j] < sims[positive_slot]]
    negative = max(easier, key=lambda j: sims[j]) if easier else hardest
    return int(others[positive_slot]), int(others[negative])


def test_miner_falls_back_to_random_triplets_before_the_first_refresh():
    labels = np.repeat(np.arange(4), 5)
    kx = random_crops(labels)
    miner = HardNegativeMiner(labels, 'hard', history_size=12, seed=0)
    batcher = TripletBatcher(kx, labels, seed=0, selector=miner)
    anchors, positives, negatives = miner(batcher, 50)
    assert len(anchors) == len(positives) == len(negatives) == 50
    assert np.all(labels[anchors] == labels[positives]) and np.all(anchors != positives)
    assert np.all(labels[negatives] != labels[anchors])
    assert miner.history is None and miner.selection_seconds == []
    x, y = batcher.get_batch(9)
    assert x.shape == (9, *CROP_SHAPE) and y.shape == (9,)


@pytest.mark.parametrize('mode', ['hard', 'semihard'])
@pytest.mark.parametrize('counts', [[6, 6, 6, 6], [2, 9, 4, 7, 3]], ids=['even', 'uneven-with-a-lone-utterance'])
def test_miner_selects_what_brute_force_over_the_history_gives(mode, counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    kx = random_crops(labels)
    embed = make_embed()
    all_embeddings = embed(kx)
    miner = HardNegativeMiner(labels, mode, history_size=16, seed=3)
    miner.refresh(kx, embed, chunk=5)
    positions, embeddings, history_labels = miner.history
    assert len(embed.calls) == 1 + -(-len(positions) // 5) and max(embed.calls[1:]) <= 5
    np.testing.assert_array_equal(embeddings, all_embeddings[positions])
    np.testing.assert_array_equal(history_labels, labels[positions])
    assert set(labels[positions].tolist()) == set(range(len(counts)))

    batcher = TripletBatcher(kx, labels, seed=0, selector=miner)
    anchors, positives, negatives = miner(batcher, 40)
    assert len(miner.selection_seconds) == 1 and miner.selection_seconds[0] >= 0
    assert np.all(np.isin(anchors, positions)) and np.all(np.isin(positives, positions))
    assert np.all(np.isin(negatives, positions))
    assert np.all(labels[anchors] == labels[positives]) and np.all(labels[negatives] != labels[anchors])
    for a, p, n in zip(anchors, positives, negatives, strict=True):
        assert (int(p), int(n)) == expected_triplet(int(a), positions, all_embeddings, labels, mode)

    x, _ = batcher.get_batch(12)
    assert len(miner.selection_seconds) == 2
    assert x.shape == (12, *CROP_SHAPE)


def test_miner_never_pairs_a_crop_with_itself_for_a_two_crop_speaker():
    """Speaker 2 has a single utterance, hence only two crops in kx: its anchor and positive must differ."""
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    self_pairs = []
    for seed in range(12):
        miner = HardNegativeMiner(labels, 'hard', history_size=12, seed=seed)
        miner.refresh(random_crops(labels, seed), make_embed())
        anchors, positives, _ = miner.select(60)
        assert np.all(labels[anchors] == labels[positives])
        lone = labels[anchors] == 2
        if np.any(anchors[lone] == positives[lone]):
            self_pairs.append((seed, miner.history[0].tolist()))
    assert self_pairs == [], f'{len(self_pairs)} of 12 seeds mine anchor == positive: {self_pairs[:2]}'


def test_miner_with_history_larger_than_kx_still_mines_valid_triplets():
    labels = np.repeat(np.arange(3), [2, 3, 2])
    kx = random_crops(labels)
    miner = HardNegativeMiner(labels, 'semihard', history_size=30, seed=0)
    miner.refresh(kx, make_embed())
    anchors, positives, negatives = miner.select(25)
    assert np.all(labels[anchors] == labels[positives]) and np.all(labels[negatives] != labels[anchors])


def test_miner_refresh_resamples_the_history():
    labels = np.repeat(np.arange(8), 10)
    kx = random_crops(labels)
    miner = HardNegativeMiner(labels, 'hard', history_size=16, seed=0)
    miner.refresh(kx, make_embed())
    first = miner.history[0].copy()
    miner.refresh(kx, make_embed())
    assert not np.array_equal(first, miner.history[0])
    assert np.all(np.diff(miner.history[0]) >= 0)


@pytest.mark.parametrize('mode', ['random', 'hardest', ''])
def test_miner_rejects_an_unknown_mode(mode):
    with pytest.raises(ValueError, match='--triplet_mining'):
        HardNegativeMiner(np.repeat(np.arange(2), 3), mode, history_size=8, seed=0)


def test_mining_refresh_callback_embeds_the_history_with_the_model():
    from conv_models import DeepSpeakerModel
    from train import MiningRefresh

    labels = np.repeat(np.arange(3), 4)
    kx = random_crops(labels)
    model = DeepSpeakerModel(width=0.125).m
    miner = HardNegativeMiner(labels, 'hard', history_size=6, seed=0)
    callback = MiningRefresh(miner, kx, every=2, inference_batch=4)
    callback.set_model(model)
    for batch in range(5):
        callback.on_train_batch_begin(batch)
    assert len(callback.refresh_seconds) == 3  # batches 0, 2 and 4.
    positions, embeddings, _ = miner.history
    expected = model.predict(kx[positions], verbose=0)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    miner.select(4)
    miner.selection_seconds.append(0.0)
    callback.on_epoch_end(0)
    assert callback.refresh_seconds == [] and miner.selection_seconds == []
