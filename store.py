"""The packed feature store `<working_dir>/packed/`: every cached utterance's frames back to back in one
memory-mappable array and an index of where each one lies, so that training at VoxCeleb2 size opens one file
instead of a million and never holds the corpus in memory.

Files of the store:
- frames.npy: (total frames, NUM_FBANKS) float16 (default) or float32, the cached features in index order;
- index.npz: offsets (utterances,) int64 first frame of each utterance, lengths (utterances,) int32 its frames,
  labels (utterances,) int32 its speaker's position in meta.json's sorted speakers;
- utterances.txt: `<speaker>/<utterance>` per line, in index order (speakers sorted, then utterances);
- meta.json: format, dtype, counts, the speakers, and the fingerprint of the cache it was packed from.

A pack writes into `<working_dir>/.packed.partial/` (frames preallocated, its progress in state.json, saved every
PACK_STATE_EVERY_S seconds and when the pack stops) and renames it to `packed/` when whole: a killed pack resumes
from its saved progress, a complete store is left as it is, and a store packed from another cache is refused.

Imports audio, workdir and constants.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from audio import CacheError, checked_features
from constants import DEFAULT_PACKED_DTYPE, NUM_FBANKS, PACK_STATE_EVERY_S, PACKED_DTYPES, PACKED_FORMAT
from workdir import NotBuiltError, WorkingDir, atomic_path

logger = logging.getLogger(__name__)

FRAMES, INDEX, UTTERANCES, META, STATE = 'frames.npy', 'index.npz', 'utterances.txt', 'meta.json', 'state.json'


class StoreError(OSError):
    """A packed store that cannot be used or written (another cache's, damaged, truncated); the message names the
    directory or file and the fix."""


class CachedFile(NamedTuple):
    """One cached array: its speaker folder, file name (`<utterance>.npy`) and size in bytes."""
    speaker: str
    name: str
    size: int


def cache_listing(cache_dir: Path) -> Iterator[CachedFile]:
    """Every cached array in place (temporary files left out), speakers sorted, then file names sorted: the order
    of the store. Reads directories and file sizes only."""
    speakers = sorted(entry.name for entry in os.scandir(cache_dir) if entry.is_dir())
    for speaker in speakers:
        with os.scandir(cache_dir / speaker) as entries:
            files = sorted((e.name, e.stat().st_size) for e in entries
                           if e.name.endswith('.npy') and not e.name.startswith('.') and e.is_file())
        for name, size in files:
            yield CachedFile(speaker, name, size)


def cache_fingerprint(listing) -> str:
    """SHA-256 (hex) of every cached file's speaker, name and size, in order: another cache (files added, removed,
    renamed or of other lengths) has another fingerprint."""
    digest = hashlib.sha256()
    for cached in listing:
        digest.update(f'{cached.speaker}/{cached.name}\t{cached.size}\n'.encode())
    return digest.hexdigest()


def frame_count(path: Path) -> int:
    """Frames of a cached array, from its .npy header only; CacheError when it is not a (frames, NUM_FBANKS)
    float32 array."""
    try:
        with open(path, 'rb') as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, fortran, dtype = read_header(f)
    except (ValueError, KeyError, EOFError, OSError) as e:
        raise CacheError(f'{path}: damaged cache file (not a .npy array: {e}); run build-mfcc-cache --verify to '
                         f'rebuild it.') from None
    if dtype != np.float32 or len(shape) != 2 or shape[1] != NUM_FBANKS or not shape[0] or fortran:
        raise CacheError(f'{path}: damaged cache file ({dtype} array of shape {shape}, expected float32 (frames, '
                         f'{NUM_FBANKS})); run build-mfcc-cache --verify to rebuild it.')
    return shape[0]


FLOAT16_VALUES = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)  # every float16, widened.


def as_float32(frames: np.ndarray) -> np.ndarray:
    """`frames` as float32; float16 through a table of every float16 value (4x faster than numpy's cast)."""
    if frames.dtype == np.float16:
        return np.take(FLOAT16_VALUES, frames.view(np.uint16))
    return frames.astype(np.float32, copy=False)


def write_json_atomically(path: Path, content: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content))


class PackedStore:
    """A complete packed store, opened read-only: its index in memory (16 bytes per utterance), its frames on disk.

    `read_windows` reads windows with positioned reads (os.preadv) rather than through a memory map, so the
    resident memory of a training process does not grow as it visits the store (the kernel's page cache holds
    the pages instead, and gives them back under memory pressure); `frames` maps the whole array for inspection.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        meta_file = directory / META
        if not meta_file.exists():
            raise NotBuiltError(directory.parent, 'store', f'no packed feature store in {directory}')
        try:
            self.meta = json.loads(meta_file.read_text())
            with np.load(directory / INDEX, allow_pickle=False) as index:
                self.offsets, self.lengths, self.labels = index['offsets'], index['lengths'], index['labels']
            header = np.load(directory / FRAMES, mmap_mode='r', allow_pickle=False)
        except (ValueError, KeyError, EOFError, OSError) as e:
            raise StoreError(f'{directory}: damaged packed store ({e}); delete it (rm -r {directory}) and run '
                             f'build-packed-store again.') from None
        if self.meta.get('format') != PACKED_FORMAT:
            raise StoreError(f'{directory}: packed store of format {self.meta.get("format")}, this version reads '
                             f'{PACKED_FORMAT}; delete it (rm -r {directory}) and run build-packed-store again.')
        self.dtype = np.dtype(self.meta['dtype'])
        self.speakers: list[str] = self.meta['speakers']
        self.fingerprint: str = self.meta['fingerprint']
        self.data_offset = header.offset  # bytes before the first frame in frames.npy.
        self.frame_bytes = NUM_FBANKS * self.dtype.itemsize
        self._fd: int | None = None

    @classmethod
    def of(cls, working_dir: 'str | WorkingDir') -> 'PackedStore':
        """The store of a working dir; NotBuiltError before build-packed-store."""
        return cls(WorkingDir.of(working_dir).packed_dir)

    @property
    def num_utterances(self) -> int:
        return len(self.offsets)

    @property
    def frames(self) -> np.ndarray:
        """Every frame, memory-mapped read-only: (total frames, NUM_FBANKS) of the store's dtype."""
        return np.load(self.directory / FRAMES, mmap_mode='r', allow_pickle=False)

    def utterance_ids(self) -> list[str]:
        """`<speaker>/<utterance>` of every utterance, in index order (read from utterances.txt)."""
        return (self.directory / UTTERANCES).read_text().splitlines()

    def check_cache(self, cache_dir: Path) -> None:
        """StoreError when `cache_dir` exists and is not the cache the store was packed from (its fingerprint
        differs): the cache changed since (files added or rebuilt) or the store was copied from elsewhere."""
        if not cache_dir.is_dir():
            logger.info('No feature cache in %s: the packed store %s is used as it is.', cache_dir, self.directory)
            return
        found = cache_fingerprint(cache_listing(cache_dir))
        if found != self.fingerprint:
            raise StoreError(f'{self.directory}: packed from another cache than {cache_dir} (fingerprint '
                             f'{self.fingerprint[:12]}, the cache now {found[:12]}); delete it (rm -r '
                             f'{self.directory}) and run build-packed-store again.')

    def read_frames(self, utterances: np.ndarray, starts: np.ndarray, num_frames: int) -> np.ndarray:
        """Windows of `num_frames` frames of utterances (n,) from frames `starts` (n,), in the store's dtype:
        (n, num_frames, NUM_FBANKS); the frames past an utterance's end are zeros (batcher.sample_from_mfcc's
        padding). Thread-safe: positioned reads of one file descriptor, all announced to the kernel first
        (POSIX_FADV_WILLNEED) so that the disk reads those not in the page cache at once, not one after another."""
        if self._fd is None:
            self._fd = os.open(self.directory / FRAMES, os.O_RDONLY)
        windows = np.zeros((len(utterances), num_frames, NUM_FBANKS), dtype=self.dtype)
        counts = np.minimum(self.lengths[utterances] - starts, num_frames)
        positions = self.data_offset + (self.offsets[utterances] + starts) * self.frame_bytes
        for count, position in zip(counts.tolist(), positions.tolist(), strict=True):
            os.posix_fadvise(self._fd, position, count * self.frame_bytes, os.POSIX_FADV_WILLNEED)
        for window, count, position in zip(windows, counts.tolist(), positions.tolist(), strict=True):
            if os.preadv(self._fd, [window[:count]], position) != count * self.frame_bytes:
                raise StoreError(f'{self.directory / FRAMES}: truncated packed store; delete {self.directory} and '
                                 f'run build-packed-store again.')
        return windows

    def read_windows(self, utterances: np.ndarray, starts: np.ndarray, num_frames: int) -> np.ndarray:
        """read_frames as float32 crops with a channel axis: (n, num_frames, NUM_FBANKS, 1)."""
        return as_float32(self.read_frames(utterances, starts, num_frames))[..., np.newaxis]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_for_training(working_dir: 'str | WorkingDir') -> PackedStore:
    """The working dir's store, checked against its feature cache (when there is one)."""
    working_dir = WorkingDir.of(working_dir)
    store = PackedStore.of(working_dir)
    store.check_cache(working_dir.cache_dir)
    return store


def partial_dir(working_dir: WorkingDir) -> Path:
    """Where a pack is written until it is whole."""
    return working_dir.root / f'.{working_dir.packed_dir.name}.partial'


def start_pack(partial: Path, listing: list[CachedFile], cache_dir: Path, state: dict) -> None:
    """A fresh partial store: the index of `listing` (frame counts read from the headers), its utterance ids, the
    frames preallocated, then state.json (0 utterances packed)."""
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    position = {speaker: i for i, speaker in enumerate(state['speakers'])}
    lengths = np.array([frame_count(cache_dir / c.speaker / c.name)
                        for c in tqdm(listing, desc='Indexing fbank cache', unit='file')], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
    labels = np.array([position[c.speaker] for c in listing], dtype=np.int32)
    np.savez(partial / INDEX, offsets=offsets, lengths=lengths, labels=labels)
    (partial / UTTERANCES).write_text(''.join(f'{c.speaker}/{c.name[:-len(".npy")]}\n' for c in listing))
    frames = np.lib.format.open_memmap(partial / FRAMES, mode='w+', dtype=state['dtype'],
                                       shape=(int(lengths.sum(dtype=np.int64)), NUM_FBANKS))
    del frames
    write_json_atomically(partial / STATE, state)


def read_state(partial: Path) -> dict | None:
    """The progress of an interrupted pack; None when there is none (or it cannot be read)."""
    try:
        return json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        return None


def fill_frames(partial: Path, listing: list[CachedFile], cache_dir: Path, state: dict) -> None:
    """Copies the cached arrays from utterance state['done'] on into the preallocated frames, one at a time with
    positioned writes, saving the progress (after an fsync) every PACK_STATE_EVERY_S seconds and when it stops,
    for whatever reason: what was copied is never copied again."""
    with np.load(partial / INDEX) as index:
        offsets, lengths = index['offsets'], index['lengths']
    dtype = np.dtype(state['dtype'])
    data_offset = np.load(partial / FRAMES, mmap_mode='r').offset
    store_bytes = int(lengths.sum(dtype=np.int64)) * NUM_FBANKS * dtype.itemsize
    fd = os.open(partial / FRAMES, os.O_WRONLY)
    saved = time.monotonic()

    def save_progress(done: int) -> None:
        os.fsync(fd)
        write_json_atomically(partial / STATE, {**state, 'done': done})

    done = state['done']
    try:
        for i in tqdm(range(done, len(listing)), desc='Packing fbank cache', unit='file', initial=done,
                      total=len(listing)):
            path = cache_dir / listing[i].speaker / listing[i].name
            features = np.asarray(checked_features(path), dtype=dtype)
            if len(features) != lengths[i] or not np.isfinite(features).all():
                raise CacheError(f'{path}: changed while packing, or beyond {dtype} range; run build-packed-store '
                                 f'again (it starts over when the cache changed).')
            try:
                os.pwrite(fd, features.tobytes(), data_offset + int(offsets[i]) * NUM_FBANKS * dtype.itemsize)
            except OSError as e:
                raise StoreError(f'{partial / FRAMES}: cannot be written ({e.strerror or e}); free disk space '
                                 f'(the store takes {store_bytes / 1e9:.1f} GB) and run build-packed-store again: '
                                 f'it resumes.') from None
            done = i + 1
            if time.monotonic() - saved > PACK_STATE_EVERY_S:
                save_progress(done)
                saved = time.monotonic()
    finally:
        try:
            save_progress(done)
        except OSError as e:  # a full disk: the last saved progress stands, the error that stopped the pack too.
            logger.warning('%s: progress not saved (%s); the next run resumes from the last save.', partial, e)
        os.close(fd)


def pack_store(working_dir: 'str | WorkingDir', dtype: str = DEFAULT_PACKED_DTYPE) -> PackedStore:
    """Packs the working dir's feature cache into its store and returns it; resumes an interrupted pack of the same
    cache (another cache's is started over); does nothing when the store of this cache is complete. NotBuiltError
    without cached features; StoreError when a complete store of another cache or dtype is in the way (nothing
    is deleted: the message says what to delete)."""
    if dtype not in PACKED_DTYPES:
        raise ValueError(f'dtype {dtype}: expected one of {", ".join(PACKED_DTYPES)}.')
    working_dir = WorkingDir.of(working_dir)
    cache_dir, packed = working_dir.cache_dir, working_dir.packed_dir
    listing = list(cache_listing(cache_dir)) if cache_dir.is_dir() else []
    if not listing:
        raise NotBuiltError(working_dir.root, 'features', 'no cached features')
    fingerprint = cache_fingerprint(listing)
    if (packed / META).exists():
        return complete_store(packed, fingerprint, dtype)
    partial = partial_dir(working_dir)
    state = read_state(partial)
    wanted = {'format': PACKED_FORMAT, 'fingerprint': fingerprint, 'dtype': dtype}
    if state is not None and {key: state.get(key) for key in wanted} == wanted:
        logger.info('Resuming the pack in %s after %d of %d utterances.', partial, state['done'], len(listing))
    else:
        if partial.exists():
            logger.info('Starting over: %s was packing another cache or dtype.', partial)
        state = {**wanted, 'done': 0, 'speakers': sorted({cached.speaker for cached in listing})}
        start_pack(partial, listing, cache_dir, state)
    fill_frames(partial, listing, cache_dir, state)
    speakers = state['speakers']
    with np.load(partial / INDEX) as index:
        total_frames = int(index['lengths'].sum(dtype=np.int64))
    write_json_atomically(partial / META, {**wanted, 'utterances': len(listing), 'frames': total_frames,
                                           'speakers': speakers})
    os.rename(partial, packed)
    (packed / STATE).unlink()
    logger.info('Packed %d utterances of %d speakers (%d frames, %.2f GB as %s) into %s.', len(listing),
                len(speakers), total_frames, total_frames * NUM_FBANKS * np.dtype(dtype).itemsize / 1e9, dtype,
                packed)
    return PackedStore(packed)


def complete_store(packed: Path, fingerprint: str, dtype: str) -> PackedStore:
    """The complete store `packed` when it holds this cache (fingerprint) as `dtype`; StoreError otherwise."""
    store = PackedStore(packed)
    if store.fingerprint != fingerprint:
        raise StoreError(f'{packed}: packed from another cache (fingerprint {store.fingerprint[:12]}, this cache '
                         f'{fingerprint[:12]}); delete it (rm -r {packed}) and run build-packed-store again.')
    if store.dtype != np.dtype(dtype):
        raise StoreError(f'{packed}: packed as {store.dtype}, --dtype {dtype} asked; delete it (rm -r {packed}) to '
                         f'pack again, or keep it and drop --dtype.')
    logger.info('%s is up to date (%d utterances); nothing to do.', packed, store.num_utterances)
    return store
