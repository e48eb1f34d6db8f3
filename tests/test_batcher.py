"""batcher.py: crops, the per-speaker train/test split, the Keras input files and the triplet batcher."""

import os
import shutil
import subprocess
from pathlib import Path

import dill
import numpy as np
import pytest

import audio
import batcher
from batcher import InputsError, KerasFormatConverter, Source, TripletBatcher, random_triplets, sample_from_mfcc
from constants import NUM_FRAMES
from workdir import NotBuiltError

COUNTS = (6, 3)
# 1688: two utterances of >= 189 frames (random crops); 3005: two of 136 and 105 frames (zero-padded crops);
# 2033: a single utterance of 232 frames, split in time.
UTTERANCES = ['1688-142285-0002', '1688-142285-0009', '3005-163389-0004', '3005-163389-0007',
              '2033-164914-0005']
SPEAKERS = ['1688', '2033', '3005']
OUTPUTS = ['kx_train.npy', 'ky_train.npy', 'kx_test.npy', 'ky_test.npy', 'categorical_speakers.pkl', 'meta.json']


def numbered(frames: int, width: int = 64) -> np.ndarray:
    """Features whose every value is distinct, so a crop's position is unambiguous."""
    return np.arange(frames * width, dtype=np.float32).reshape(frames, width)


def crop_position(crop: np.ndarray, features: np.ndarray) -> int | None:
    """Start s such that crop == features[s:s + len(crop)], or None."""
    for s in np.flatnonzero((features == crop[0]).all(axis=1)):
        if s + len(crop) <= len(features) and np.array_equal(features[s:s + len(crop)], crop):
            return int(s)
    return None


def is_crop_of(crop: np.ndarray, features: np.ndarray) -> bool:
    """A contiguous slice of `features`, or (when `features` is shorter) all of it followed by zero rows."""
    if len(features) >= len(crop):
        return crop_position(crop, features) is not None
    return np.array_equal(crop[:len(features)], features) and not crop[len(features):].any()


def stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


# ---------------------------------------------------------------- sample_from_mfcc


def test_centre_crop_without_rng():
    features = numbered(11)
    crop = sample_from_mfcc(features, 4)
    assert crop.shape == (4, 64, 1) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop[..., 0], features[3:7])  # excess 7: 3 rows dropped before, 4 after.
    np.testing.assert_array_equal(sample_from_mfcc(features, 4), crop)
    np.testing.assert_array_equal(sample_from_mfcc(numbered(10), 4)[..., 0], numbered(10)[3:7])


def test_exact_length_is_returned_whole():
    features = numbered(160)
    np.testing.assert_array_equal(sample_from_mfcc(features, 160)[..., 0], features)
    np.testing.assert_array_equal(sample_from_mfcc(features, 160, np.random.default_rng(0))[..., 0], features)


def test_random_crop_is_a_contiguous_slice_and_reaches_every_start():
    features = numbered(8)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        crop = sample_from_mfcc(features, 5, rng)
        assert crop.shape == (5, 64, 1) and crop.dtype == np.float32
        start = crop_position(crop[..., 0], features)
        assert start is not None
        starts.add(start)
    assert starts == {0, 1, 2, 3}


def test_random_crop_is_reproducible_with_the_same_seed():
    features = np.random.default_rng(1).standard_normal((500, 64)).astype(np.float32)
    first = [sample_from_mfcc(features, 160, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])


@pytest.mark.parametrize('rng', [None, np.random.default_rng(0)])
def test_short_features_are_zero_padded_at_the_end(rng):
    features = numbered(3) + 1  # no zero value in the features themselves.
    crop = sample_from_mfcc(features, 5, rng)
    assert crop.shape == (5, 64, 1) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop[:3, :, 0], features)
    np.testing.assert_array_equal(crop[3:], np.zeros((2, 64, 1)))


# ---------------------------------------------------------------- train_test_sources


def write_utterances(directory: Path, frames: list[int]) -> list[Path]:
    paths = []
    for i, n in enumerate(frames):
        path = directory / f'utt-{i:02d}.npy'
        np.save(path, numbered(n))
        paths.append(path)
    return paths


def test_single_utterance_is_split_in_time(tmp_path):
    [path] = write_utterances(tmp_path, [101])
    train, test = batcher.train_test_sources([path])
    assert train == [Source(path, 0, 80)]  # int(101 * 0.8) = 80.
    assert test == [Source(path, 80, None)]
    parts = [batcher.load_source(s) for s in train + test]
    assert [len(p) for p in parts] == [80, 21]
    np.testing.assert_array_equal(np.concatenate(parts), numbered(101))


@pytest.mark.parametrize(('count', 'num_train'), [(2, 1), (3, 2), (5, 4), (10, 8)])
def test_utterances_are_split_by_count(tmp_path, count, num_train):
    paths = write_utterances(tmp_path, [50] * count)
    train, test = batcher.train_test_sources(list(reversed(paths)))  # order of the input does not matter.
    assert train == [Source(p) for p in paths[:num_train]]
    assert test == [Source(p) for p in paths[num_train:]]
    np.testing.assert_array_equal(batcher.load_source(train[0]), numbered(50))


# ---------------------------------------------------------------- KerasFormatConverter


@pytest.fixture(scope='module')
def working_dir(tmp_path_factory, copy_librispeech) -> Path:
    """A working dir whose cache was built from the small tree (real files, real pool)."""
    root = tmp_path_factory.mktemp('batcher')
    copy_librispeech(root / 'audio', UTTERANCES)
    audio.Audio(str(root / 'wd'), str(root / 'audio'), workers=2)
    return root / 'wd'


@pytest.fixture(scope='module')
def generated(working_dir) -> KerasFormatConverter:
    converter = KerasFormatConverter(str(working_dir))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    return converter


def copy_cache(working_dir: Path, dest: Path) -> Path:
    """A fresh working dir holding only the feature cache of `working_dir`."""
    shutil.copytree(working_dir / 'audio-fbanks', dest / 'audio-fbanks')
    return dest


def speaker_features(working_dir: Path, speaker: str) -> list[np.ndarray]:
    """The speaker's cached features, one array per utterance, sorted by file name (read directly)."""
    return [np.load(p) for p in sorted((working_dir / 'audio-fbanks' / speaker).glob('*.npy'))]


def test_generated_arrays_shapes_and_labels(generated):
    output = generated.output_dir
    assert sorted(p.name for p in output.iterdir()) == sorted(OUTPUTS)
    for phase, count in zip(('train', 'test'), COUNTS, strict=True):
        kx, ky = np.load(output / f'kx_{phase}.npy'), np.load(output / f'ky_{phase}.npy')
        assert kx.shape == (len(SPEAKERS) * count, 160, 64, 1) and kx.dtype == np.float32
        assert ky.shape == (len(SPEAKERS) * count,) and ky.dtype == np.int32
        np.testing.assert_array_equal(ky, [0] * count + [1] * count + [2] * count)
        assert np.isfinite(kx).all()
    kx, ky = generated.load('train')
    assert isinstance(kx, np.memmap) and kx.shape == (18, 160, 64, 1)
    assert generated.num_speakers == 3


def test_every_crop_comes_from_its_speaker_and_split(generated, working_dir):
    output = generated.output_dir
    expected_split = {}
    for speaker in SPEAKERS:
        features = speaker_features(working_dir, speaker)
        if len(features) == 1:  # split in time, first 80 % of frames for training.
            split = int(len(features[0]) * 0.8)
            expected_split[speaker] = ([features[0][:split]], [features[0][split:]])
        else:  # first utterance trains, second tests.
            expected_split[speaker] = ([features[0]], [features[1]])
    padded = 0
    for phase_index, phase in enumerate(('train', 'test')):
        kx, ky = np.load(output / f'kx_{phase}.npy'), np.load(output / f'ky_{phase}.npy')
        for row, label in zip(kx, ky, strict=True):
            sources = expected_split[SPEAKERS[label]][phase_index]
            assert any(is_crop_of(row[..., 0], f) for f in sources), f'{phase} row of {SPEAKERS[label]}'
            padded += int(not row[-1].any())
    # 3005's utterances and 2033's test span are shorter than 160 frames: those crops are zero-padded.
    assert padded == COUNTS[0] + 2 * COUNTS[1]


def test_random_crops_vary(generated):
    kx = np.load(generated.output_dir / 'kx_train.npy')
    crops_1688 = kx[:COUNTS[0]].reshape(COUNTS[0], -1)
    assert len(np.unique(crops_1688, axis=0)) > 1


def test_categorical_speakers_pickle(generated):
    with open(generated.output_dir / 'categorical_speakers.pkl', 'rb') as f:
        speakers = dill.load(f)
    assert speakers.speaker_ids == SPEAKERS
    assert [speakers.get_index(s) for s in SPEAKERS] == [0, 1, 2]


def test_same_settings_rewrite_nothing(generated):
    paths = [generated.output_dir / name for name in OUTPUTS]
    before = stamps(paths)
    KerasFormatConverter(str(generated.working_dir)).generate(counts_per_speaker=COUNTS, seed=1)
    assert stamps(paths) == before


def test_same_seed_gives_the_same_arrays(generated, working_dir, tmp_path):
    other = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    other.generate(counts_per_speaker=COUNTS, seed=1)
    for name in OUTPUTS[:4]:
        np.testing.assert_array_equal(np.load(other.output_dir / name), np.load(generated.output_dir / name))


def test_different_seed_rebuilds(generated, working_dir, tmp_path):
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    kx_path = converter.path('kx_train.npy')
    before, seed_1 = stamps([kx_path]), np.load(kx_path)
    converter.generate(counts_per_speaker=COUNTS, seed=2)
    assert stamps([kx_path]) != before
    assert not np.array_equal(np.load(kx_path), seed_1)
    assert converter.is_built(converter.settings(NUM_FRAMES, COUNTS, 2))
    assert not converter.is_built(converter.settings(NUM_FRAMES, COUNTS, 1))


def test_different_counts_rebuild(working_dir, tmp_path):
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    converter.generate(counts_per_speaker=(4, 2), seed=1)
    assert np.load(converter.path('kx_train.npy')).shape[0] == 3 * 4
    assert np.load(converter.path('ky_test.npy')).shape == (3 * 2,)


def test_different_max_length_rebuilds(working_dir, tmp_path):
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    converter.generate(max_length=100, counts_per_speaker=COUNTS, seed=1)
    kx, _ = converter.load('train')
    assert kx.shape == (3 * COUNTS[0], 100, 64, 1)


def test_no_temporary_files_left(generated):
    assert [p for p in generated.working_dir.rglob('*') if p.name.startswith('.')] == []


def test_temporary_files_of_a_killed_build_are_removed(working_dir, tmp_path):
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    converter.output_dir.mkdir(parents=True)
    finished = subprocess.Popen(['true'])
    finished.wait()  # its pid is that of a writer that has gone.
    orphan = converter.path(f'.kx_train.{finished.pid}-0a1b2c.tmp.npy')
    live = converter.path(f'.kx_test.{os.getpid()}-0a1b2c.tmp.npy')
    orphan.write_bytes(b'partial')
    live.write_bytes(b'partial')
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    assert not orphan.exists()
    assert live.exists()


def test_empty_working_dir_raises(tmp_path):
    with pytest.raises(NotBuiltError, match='no cached features') as error:
        KerasFormatConverter(str(tmp_path))
    assert error.value.step == 'features'


def test_softmax_size_comes_from_the_built_inputs_not_from_a_cache_that_grew(working_dir, tmp_path):
    grown = copy_cache(working_dir, tmp_path)
    converter = KerasFormatConverter(str(grown))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    shutil.copytree(grown / 'audio-fbanks' / '1688', grown / 'audio-fbanks' / '9999')  # a speaker cached later.
    again = KerasFormatConverter(str(grown))
    assert len(again.audio.speaker_ids) == 4
    assert again.num_speakers == 3
    kx, ky = again.load('train')
    assert int(np.max(ky)) + 1 == again.num_speakers
    assert not again.is_built(again.settings(NUM_FRAMES, COUNTS, 1))  # build-keras-inputs would rebuild them.


def test_load_before_generate_raises(working_dir, tmp_path):
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    with pytest.raises(NotBuiltError, match='no model inputs') as error:
        converter.load('train')
    assert error.value.step == 'inputs'


# ---------------------------------------------------------------- TripletBatcher


def labelled_crops(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """kx rows filled with their own index (so a row identifies itself), ky with speaker labels 0, 1, ..."""
    ky = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    kx = np.broadcast_to(np.arange(len(ky), dtype=np.float32)[:, None, None, None], (len(ky), 5, 4, 1)).copy()
    return kx, ky


def test_random_triplets_respect_labels():
    kx, ky = labelled_crops([2, 3, 7, 20])
    b = TripletBatcher(kx, ky, seed=0)
    anchors, positives, negatives = random_triplets(b, 2000)
    assert anchors.shape == positives.shape == negatives.shape == (2000,)
    for indices in (anchors, positives, negatives):
        assert indices.min() >= 0 and indices.max() < len(ky)
    assert (ky[anchors] == ky[positives]).all()
    assert (anchors != positives).all()
    assert (ky[negatives] != ky[anchors]).all()
    assert set(ky[anchors]) == {0, 1, 2, 3}  # every speaker gets picked, even the one with 2 crops.
    assert set(negatives) == set(range(len(ky)))  # negatives come from everywhere.


def test_get_batch_layout_is_anchors_positives_negatives(generated):
    kx, ky = generated.load('train')
    chosen = []

    def recording_selector(b, n):
        triplet = random_triplets(b, n)
        chosen.append(triplet)
        return triplet

    b = TripletBatcher(kx, ky, seed=3, selector=recording_selector)
    x, y = b.get_batch(96)
    [(anchors, positives, negatives)] = chosen
    assert len(anchors) == 32
    assert x.shape == (96, 160, 64, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.zeros(96))
    np.testing.assert_array_equal(x, np.asarray(kx)[np.concatenate([anchors, positives, negatives])])
    assert (ky[anchors] == ky[positives]).all() and (anchors != positives).all()
    assert (ky[negatives] != ky[anchors]).all()


def test_get_batch_rows_are_the_selected_rows():
    kx, ky = labelled_crops([4, 4, 4])
    b = TripletBatcher(kx, ky, seed=5)
    x, y = b.get_batch(100)  # 33 triplets.
    assert x.shape == (99, 5, 4, 1) and y.shape == (99,)
    rows = x[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(x, kx[rows])
    anchors, positives, negatives = rows[:33], rows[33:66], rows[66:]
    assert (ky[anchors] == ky[positives]).all() and (anchors != positives).all()
    assert (ky[negatives] != ky[anchors]).all()


def test_same_seed_same_batches():
    kx, ky = labelled_crops([5, 5, 5])
    first, second = TripletBatcher(kx, ky, seed=9), TripletBatcher(kx, ky, seed=9)
    for _ in range(3):
        np.testing.assert_array_equal(first.get_batch(30)[0], second.get_batch(30)[0])
    other_seed = TripletBatcher(kx, ky, seed=10).get_batch(30)[0]
    assert not np.array_equal(other_seed, TripletBatcher(kx, ky, seed=9).get_batch(30)[0])


def test_one_speaker_raises():
    kx, ky = labelled_crops([6])
    with pytest.raises(ValueError, match='2 speakers'):
        TripletBatcher(kx, ky, seed=0)


def test_speaker_with_a_single_crop_raises():
    kx, ky = labelled_crops([3, 1, 3])
    with pytest.raises(ValueError, match=r'\[1\]'):
        TripletBatcher(kx, ky, seed=0)


def test_inputs_of_one_speaker_are_refused_when_loaded(working_dir, tmp_path):
    """Inputs built by an earlier version from a one-speaker cache: training refuses them before it starts."""
    converter = KerasFormatConverter(str(copy_cache(working_dir, tmp_path)))
    converter.generate(counts_per_speaker=COUNTS, seed=1)
    np.save(converter.path('ky_train.npy'), np.zeros(COUNTS[0] * 3, dtype=np.int32))
    with pytest.raises(InputsError, match=r'ky_train.npy: crops of 1 speaker found, 2 needed'):
        converter.load('train')
    assert len(converter.load('test')) == 2
