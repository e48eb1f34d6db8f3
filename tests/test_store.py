"""The packed feature store (store.py) and the window sampler (sampler.py) on small generated caches: round trip,
resume of an interrupted pack, refusal of another cache's store, speaker balance, determinism under the seed,
windows inside their utterances, validation fixed once, and mined triplets reading the windows they were mined on."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import store as packed_store
from audio import CacheError
from cli import cli
from constants import CACHE_FORMAT, CACHE_FORMAT_FILE, NUM_FBANKS, NUM_FRAMES
from sampler import (
    WindowCrops,
    WindowMiner,
    WindowSampler,
    WindowTripletBatcher,
    held_out_split,
    training_split,
    validation_windows,
    window_starts,
)
from store import PackedStore, StoreError, open_for_training, pack_store
from workdir import NotBuiltError

UTTERANCES_PER_SPEAKER = {'alice': 24, 'bob': 8, 'carol': 4, 'dave': 2, 'eve': 1}
LENGTHS = (60, 420)  # frames, some shorter than the NUM_FRAMES window.


def fake_cache(working_dir: Path, seed: int = 0) -> Path:
    """A feature cache of random float32 arrays with the names, layout and format file build-mfcc-cache writes."""
    rng = np.random.default_rng(seed)
    cache = working_dir / 'audio-fbanks'
    for speaker, count in UTTERANCES_PER_SPEAKER.items():
        (cache / speaker).mkdir(parents=True)
        for k in range(count):
            frames = rng.standard_normal((int(rng.integers(*LENGTHS)), NUM_FBANKS)).astype(np.float32)
            np.save(cache / speaker / f'ch1%2Futt{k:02d}.flac.npy', frames)
    (cache / CACHE_FORMAT_FILE).write_text(CACHE_FORMAT + '\n')
    return working_dir


def cached_arrays(working_dir: Path) -> dict[str, np.ndarray]:
    """'<speaker>/<utterance>' -> the cached array, read with numpy alone."""
    files = sorted((working_dir / 'audio-fbanks').glob('*/*.npy'))
    return {f'{p.parent.name}/{p.name[:-len(".npy")]}': np.load(p) for p in files}


def stored_arrays(store: PackedStore) -> dict[str, np.ndarray]:
    frames = store.frames
    return {name: frames[offset:offset + length] for name, offset, length in
            zip(store.utterance_ids(), store.offsets, store.lengths, strict=True)}


@pytest.fixture(scope='module')
def packed(tmp_path_factory) -> PackedStore:
    """A float32 store of a generated cache."""
    return pack_store(fake_cache(tmp_path_factory.mktemp('packed')), 'float32')


def test_round_trip_gives_back_every_cached_array_with_its_speaker(packed):
    cached, stored = cached_arrays(packed.directory.parent), stored_arrays(packed)
    assert list(stored) == list(cached)
    for name, array in cached.items():
        np.testing.assert_array_equal(stored[name], array)
    assert packed.speakers == sorted(UTTERANCES_PER_SPEAKER)
    assert [packed.speakers[label] for label in packed.labels] == [name.split('/')[0] for name in cached]


def test_float16_store_holds_the_float16_values_of_the_cache(tmp_path):
    store = pack_store(fake_cache(tmp_path, seed=1))
    assert store.dtype == np.float16
    cached = cached_arrays(tmp_path)
    for name, array in stored_arrays(store).items():
        np.testing.assert_array_equal(array, cached[name].astype(np.float16))
    utterances, starts = np.arange(store.num_utterances), np.zeros(store.num_utterances, dtype=np.int64)
    crops = store.read_windows(utterances, starts, NUM_FRAMES)
    assert crops.dtype == np.float32
    np.testing.assert_array_equal(crops[..., 0], store.read_frames(utterances, starts, NUM_FRAMES).astype(np.float32))


def test_complete_store_is_left_as_it_is(packed, caplog):
    frames = packed.directory / 'frames.npy'
    before = frames.stat().st_mtime_ns, frames.stat().st_ino
    with caplog.at_level(logging.INFO, logger='store'):
        pack_store(packed.directory.parent, 'float32')
    assert (frames.stat().st_mtime_ns, frames.stat().st_ino) == before
    assert 'nothing to do' in caplog.text


def test_interrupted_pack_resumes_where_it_stopped(tmp_path, caplog):
    working_dir = fake_cache(tmp_path)
    victim = sorted((working_dir / 'audio-fbanks').glob('*/*.npy'))[30]
    whole = victim.read_bytes()
    np.save(victim, np.full_like(np.load(victim), np.nan))  # damaged in place (same size): the pack stops there.
    with pytest.raises(CacheError, match=str(victim)):
        pack_store(working_dir, 'float32')
    partial = packed_store.partial_dir(packed_store.WorkingDir.of(working_dir))
    assert not (working_dir / 'packed').exists()
    assert packed_store.read_state(partial)['done'] == 30
    frames = np.load(partial / 'frames.npy', mmap_mode='r+')
    frames[:5] = 7.0  # inside the first utterance, packed before the stop: a resume must not copy it again.
    frames.flush()
    del frames
    victim.write_bytes(whole)
    with caplog.at_level(logging.INFO, logger='store'):
        store = pack_store(working_dir, 'float32')
    assert 'after 30 of 39 utterances' in caplog.text
    assert not partial.exists()
    stored, cached = stored_arrays(store), cached_arrays(working_dir)
    first = next(iter(cached))
    assert (stored[first][:5] == 7.0).all()
    np.testing.assert_array_equal(stored[first][5:], cached[first][5:])
    for name in list(cached)[1:]:
        np.testing.assert_array_equal(stored[name], cached[name])


def test_store_of_another_cache_is_refused_and_kept(packed, tmp_path):
    working_dir = tmp_path / 'wd'
    shutil.copytree(packed.directory.parent, working_dir)
    np.save(working_dir / 'audio-fbanks' / 'eve' / 'new.flac.npy', np.zeros((200, NUM_FBANKS), np.float32))
    with pytest.raises(StoreError, match='packed from another cache'):
        open_for_training(working_dir)
    result = CliRunner().invoke(cli, ['build-packed-store', '--working_dir', str(working_dir), '--dtype', 'float32'])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f'Error: {working_dir / "packed"}: packed from another cache')
    assert f'delete it (rm -r {working_dir / "packed"}) and run build-packed-store again.' in lines[-1]
    assert (working_dir / 'packed' / 'frames.npy').stat().st_size == (packed.directory / 'frames.npy').stat().st_size


def test_training_without_a_store_names_the_command_that_builds_it(tmp_path):
    working_dir = fake_cache(tmp_path)
    with pytest.raises(NotBuiltError):
        open_for_training(working_dir)
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(working_dir), '--sampler', 'windows',
                                      '--pre_training_phase'])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f'Error: --working_dir {working_dir}: no packed feature store in {working_dir / "packed"}; run '
        f'build-packed-store (./deep-speaker build_packed_store) first.')


def test_held_out_split_keeps_a_training_utterance_per_speaker(packed):
    train, held_out = held_out_split(packed.labels, seed=3)
    assert sorted(np.concatenate([train, held_out])) == list(range(packed.num_utterances))
    train_counts = np.bincount(packed.labels[train], minlength=5)
    held_counts = np.bincount(packed.labels[held_out], minlength=5)
    assert train_counts.min() >= 1
    assert held_counts.tolist() == [2, 2, 2, 1, 0]  # alice 24, bob 8, carol 4, dave 2, eve 1 utterances.
    assert not np.array_equal(held_out, held_out_split(packed.labels, seed=4)[1])


@pytest.mark.parametrize('sampling', ['balanced', 'proportional'])
def test_speaker_frequencies_follow_the_sampling(packed, sampling):
    split = training_split(packed, seed=0)
    sampler = WindowSampler(packed, split.train, sampling, seed=0)
    draws = 20_000
    frequencies = np.bincount(packed.labels[sampler.draw(np.random.default_rng(0), draws)], minlength=5) / draws
    utterances = np.bincount(packed.labels[split.train], minlength=5)
    expected = np.full(5, 0.2) if sampling == 'balanced' else utterances / utterances.sum()
    np.testing.assert_allclose(frequencies, expected, atol=0.015)
    assert set(sampler.draw(np.random.default_rng(1), draws)) == set(split.train.tolist())


def test_same_seed_gives_the_same_batches_and_the_dataset_delivers_them_in_order(packed):
    train = training_split(packed, seed=0).train
    first, again, other = (WindowSampler(packed, train, 'balanced', seed) for seed in (5, 5, 6))
    for number in (0, 7):
        np.testing.assert_array_equal(first.batch(number, 12)[0], again.batch(number, 12)[0])
    assert not np.array_equal(first.batch(0, 12)[0], other.batch(0, 12)[0])
    assert not np.array_equal(first.batch(0, 12)[0], first.batch(1, 12)[0])
    delivered = list(first.dataset(12, first_batch=3).take(3).as_numpy_iterator())
    for k, (x, y) in enumerate(delivered):
        expected_x, expected_y = first.batch(3 + k, 12)
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)


def test_every_window_lies_inside_its_utterance_and_short_ones_are_zero_padded(packed):
    frames = packed.frames
    rng = np.random.default_rng(0)
    utterances = np.repeat(np.arange(packed.num_utterances), 20)
    starts = window_starts(packed.lengths[utterances], rng)
    assert (starts >= 0).all() and (starts <= np.maximum(packed.lengths[utterances] - NUM_FRAMES, 0)).all()
    crops = packed.read_windows(utterances, starts, NUM_FRAMES)
    assert crops.shape == (len(utterances), NUM_FRAMES, NUM_FBANKS, 1) and crops.dtype == np.float32
    for crop, utterance, start in zip(crops[..., 0], utterances, starts, strict=True):
        end = packed.offsets[utterance] + packed.lengths[utterance]
        inside = frames[packed.offsets[utterance] + start:min(end, packed.offsets[utterance] + start + NUM_FRAMES)]
        np.testing.assert_array_equal(crop[:len(inside)], inside)
        assert not crop[len(inside):].any()
    longest = int(np.argmax(packed.lengths))
    reached = window_starts(np.full(5000, packed.lengths[longest]), rng)
    assert reached.min() == 0 and reached.max() == packed.lengths[longest] - NUM_FRAMES


def test_validation_windows_are_drawn_once_from_held_out_utterances(packed):
    split = training_split(packed, seed=0)
    windows = validation_windows(packed, split.held_out, seed=0)
    again = validation_windows(packed, split.held_out, seed=0)
    np.testing.assert_array_equal(windows.utterances, again.utterances)
    np.testing.assert_array_equal(windows.starts, again.starts)
    assert set(windows.utterances.tolist()) == set(split.held_out.tolist())


def embed_by_mean(crops: np.ndarray) -> np.ndarray:
    """A stand-in embedding: each crop's unit-normalised mean frame, (n, NUM_FBANKS)."""
    means = crops[..., 0].mean(axis=1)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def test_random_triplets_take_fresh_windows_and_mined_ones_the_windows_the_history_embedded(packed):
    split = training_split(packed, seed=0)
    crops = WindowCrops(packed, split.train, np.random.default_rng(0))
    assert np.bincount(crops.labels).min() >= 2  # eve's lone utterance has two slots.
    batcher = WindowTripletBatcher(crops, crops.labels, seed=0)
    same = WindowTripletBatcher(WindowCrops(packed, split.train, np.random.default_rng(0)), crops.labels, seed=0)
    x, _ = batcher.get_batch(30)
    np.testing.assert_array_equal(x, same.get_batch(30)[0])
    miner = WindowMiner(crops.labels, 'hard', 40, seed=0)
    mined = WindowTripletBatcher(crops, crops.labels, seed=0, selector=miner)
    miner.refresh(crops, embed_by_mean, 16)
    history_windows = crops[miner.history[0]].reshape(len(miner.history[0]), -1)
    np.testing.assert_allclose(embed_by_mean(crops[miner.history[0]]), miner.history[1])
    batch = mined.get_batch(30)[0].reshape(30, -1)
    assert all((history_windows == row).all(axis=1).any() for row in batch)
    unchanged = crops.starts.copy()
    batcher.get_batch(30)
    assert (crops.starts != unchanged).any()  # random triplets drew new windows of their slots.


def test_speaker_sampling_without_the_windows_sampler_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ['train-model', '--working_dir', str(tmp_path), '--speaker_sampling',
                                      'proportional'])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == ('Error: --speaker_sampling proportional is an option of '
                                                      '--sampler windows; add --sampler windows.')
