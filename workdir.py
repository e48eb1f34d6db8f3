"""The working directory: every path of one (feature cache, skipped-files report, model inputs, checkpoints, logs),
the checkpoint names `<Model>_best/_last/_state/_epoch<NNNN>/_averaged`, what was built in it (NotBuiltError when a
step is missing), and the one atomic-write helper used by the cache, the model inputs and the checkpoints.

Imports only constants (and the standard library), so the data modules and the training modules can share it.
"""

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from constants import (
    CACHE_SUBDIR,
    EPOCH_CHECKPOINT_DIGITS,
    INPUTS_META,
    KERAS_INPUTS_SUBDIR,
    LOGS_SUBDIR,
    PACKED_SUBDIR,
    PHASE_DIRS,
    SKIPPED_FILES_REPORT,
    TRAINING_LOCK,
)

logger = logging.getLogger(__name__)


class NotBuiltError(FileNotFoundError):
    """A pipeline step that has not run in a working dir: `step` is 'features' (the cache), 'inputs' (the model
    inputs) or 'store' (the packed store); the caller names the command that builds it."""

    def __init__(self, working_dir: Path, step: str, what: str):
        super().__init__(f'{working_dir}: {what}.')
        self.working_dir, self.step, self.what = working_dir, step, what


def best_checkpoint(directory: Path, name: str = 'ResCNN') -> Path:
    """`<name>_best.keras` in a phase's checkpoint dir: the best epoch's model (it may not exist yet)."""
    return directory / f'{name}_best.keras'


def last_checkpoint(directory: Path, name: str) -> Path:
    """`<name>_last.keras`: the last finished epoch's model and optimizer, with the training state inside."""
    return directory / f'{name}_last.keras'


def epoch_checkpoint(directory: Path, name: str, epoch: int) -> Path:
    """`<name>_epoch<NNNN>.keras`: the model after epoch `epoch` (1-based), kept for --average_last."""
    return directory / f'{name}_epoch{epoch:0{EPOCH_CHECKPOINT_DIGITS}d}.keras'


def epoch_checkpoints(directory: Path, name: str) -> list[Path]:
    """The epoch checkpoints in a phase's checkpoint dir, oldest first."""
    digits = '[0-9]' * EPOCH_CHECKPOINT_DIGITS
    return sorted(directory.glob(f'{name}_epoch{digits}.keras'))


def averaged_checkpoint(directory: Path, name: str) -> Path:
    """`<name>_averaged.keras`: the mean of the weights of the last epoch checkpoints (--average_last)."""
    return directory / f'{name}_averaged.keras'


def state_file(directory: Path, name: str) -> Path:
    """`<name>_state.json`: the training state, for people and scripts."""
    return directory / f'{name}_state.json'


@contextmanager
def atomic_path(path: Path, tag: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path`, `.<tag>.<pid>-<random>.tmp<suffix>` (tag: the stem of `path`), to
    write; renames it to `path` when the block succeeds, so `path` is whole or absent. The temporary file is gone
    afterwards either way; a killed writer's is found by remove_orphan_temp_files."""
    tmp = path.with_name(f'.{tag or path.stem}.{os.getpid()}-{uuid.uuid4().hex}.tmp{path.suffix}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_is_alive(pid: int) -> bool:
    """Whether process `pid` runs. A zombie (a killed pool worker that nobody has reaped yet) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the parenthesised command name in /proc/<pid>/stat.
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


def remove_orphan_temp_files(directory: Path, pattern: str, owned: Callable[[Path], bool] = lambda tmp: True) -> int:
    """Deletes the temporary files `.<name>.<pid>-<random>.tmp.<ext>` matching `pattern` in `directory` whose
    writing process is gone (a killed build or training run) and that are `owned` (a cache build --shard leaves
    the other parts' files alone: their writers may run on other machines); returns how many. Files of live
    writers stay."""
    return remove_orphans(tmp for tmp in directory.glob(pattern) if owned(tmp))


def remove_orphans(temp_files: Iterable[Path]) -> int:
    """Deletes those of `temp_files` (`.<name>.<pid>-<random>.tmp.<ext>`) whose writing process is gone; returns
    how many."""
    orphans = [tmp for tmp in temp_files if not process_is_alive(int(tmp.name.rsplit('.', 3)[-3].split('-')[0]))]
    for tmp in orphans:
        tmp.unlink(missing_ok=True)
    return len(orphans)


class LockedError(RuntimeError):
    """A directory that another live process holds the training lock of: `path` (the lock file), `pid` (its
    holder)."""

    def __init__(self, path: Path, pid: int):
        super().__init__(f'{path}: held by process {pid}.')
        self.path, self.pid = path, pid


def lock_holder(path: Path) -> int:
    """The pid written in a lock file; 0 when it holds none."""
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


@contextmanager
def training_lock(directory: Path) -> Iterator[Path]:
    """Holds `directory/TRAINING_LOCK` (an flock, released by the kernel when the process ends, however it ends;
    the file names the holder's pid) for the block; LockedError naming the holder when another process holds it.
    A file left by a killed run (its pid gone) is taken over, and said so."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRAINING_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(path, lock_holder(path)) from None
        previous = lock_holder(path)
        if previous and previous != os.getpid() and not process_is_alive(previous):
            logger.info('%s: taking over the lock of process %d, which is no longer running.', path, previous)
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class WorkingDir:
    """A working directory `root` and the paths of what the pipeline builds there."""

    root: Path

    @classmethod
    def of(cls, working_dir: 'str | Path | WorkingDir') -> 'WorkingDir':
        """A WorkingDir from a path (`~` expanded) or an existing WorkingDir."""
        return working_dir if isinstance(working_dir, WorkingDir) else cls(Path(working_dir).expanduser())

    @property
    def cache_dir(self) -> Path:
        """The fbank cache: `<speaker>/<utterance>.npy`."""
        return self.root / CACHE_SUBDIR

    @property
    def skipped_files_report(self) -> Path:
        return self.root / SKIPPED_FILES_REPORT

    @property
    def inputs_dir(self) -> Path:
        """The model inputs: kx/ky train/test .npy, categorical_speakers.pkl and meta.json."""
        return self.root / KERAS_INPUTS_SUBDIR

    @property
    def packed_dir(self) -> Path:
        """The packed feature store (store.py): every cached utterance's frames in one memory-mappable array."""
        return self.root / PACKED_SUBDIR

    def checkpoints_dir(self, phase: str) -> Path:
        """Checkpoints of the 'softmax' or 'triplet' phase."""
        return self.root / PHASE_DIRS[phase]

    def logs_dir(self, phase: str) -> Path:
        return self.root / LOGS_SUBDIR / phase

    def best_checkpoint(self, phase: str, name: str) -> Path:
        return best_checkpoint(self.checkpoints_dir(phase), name)

    def inputs_settings(self) -> dict:
        """What the model inputs were built from (meta.json: crop length, counts, seed, speakers, in class order);
        NotBuiltError before build-keras-inputs."""
        meta = self.inputs_dir / INPUTS_META
        if not meta.exists():
            raise NotBuiltError(self.root, 'inputs', f'no model inputs in {self.inputs_dir}')
        return json.loads(meta.read_text())

    def input_speakers(self) -> list[str]:
        """The speakers of the built model inputs, one per softmax class: the softmax size is their number."""
        return self.inputs_settings()['speakers']
