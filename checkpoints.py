"""Checkpoints: loading by layer name from `.keras` (ours), `.weights.h5` (Keras 3) and Keras-2 `.h5` (the
published ResCNN) files, the architecture a `.keras` file was trained as, the training state kept inside
`<Model>_last.keras`, the AtomicCheckpoint callback that writes them (and the epoch checkpoints averaging uses),
resume, and the average of several checkpoints' weights.

Imports the models (conv_models, triplet_loss), workdir and constants; conv_models re-exports CheckpointError,
load_checkpoint, checkpoint_architecture and build_model for the users of the original layout.
"""

import hashlib
import json
import logging
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import keras
import numpy as np

from constants import (
    CHECKPOINT_STATE_ENTRY,
    FILE_KIND_HEAD_BYTES,
    FINGERPRINT_HASH_CHARS,
    HDF5_SIGNATURE,
    ZIP_SIGNATURE,
)
from conv_models import MODELS, SpeakerModel
from triplet_loss import deep_speaker_loss
from workdir import (
    atomic_path,
    averaged_checkpoint,
    best_checkpoint,
    epoch_checkpoint,
    epoch_checkpoints,
    last_checkpoint,
    remove_orphan_temp_files,
    state_file,
)

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not exist or does not fit the model; the message names the file and the fix."""


def weighted_layer_names(model: keras.Model) -> list[str]:
    """Names of the model's layers that own weights."""
    return [layer.name for layer in model.layers if layer.weights]


def legacy_h5_layer_names(path: str) -> set[str]:
    """Layers that hold weights in a Keras-2 HDF5 file (weights-only or full-model save)."""
    with h5py.File(path, 'r') as f:
        group = f['model_weights'] if 'layer_names' not in f.attrs and 'model_weights' in f else f
        if 'layer_names' not in group.attrs:
            raise CheckpointError(f'{path}: not a Keras-2 HDF5 file (no layer_names); a Keras 3 weights file must '
                                  f'end in .weights.h5.')
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs['layer_names']]
        return {n for n in names if len(group[n].attrs.get('weight_names', [])) > 0}


def check_shapes(path: str, model: keras.Model, saved: dict[str, list[tuple]]) -> None:
    """CheckpointError naming the first weighted layer of `model` whose weight shapes differ from those `saved` in
    `path` (layer name: shapes; a layer `saved` lacks is not checked)."""
    for layer in model.layers:
        expected = [tuple(w.shape) for w in layer.weights]
        if expected and layer.name in saved and saved[layer.name] != expected:
            ours, theirs = next(((a, b) for a, b in zip(expected, saved[layer.name], strict=False)
                                 if a != b),
                                (len(expected), len(saved[layer.name])))
            raise CheckpointError(f'{path}: weights of another architecture: layer {layer.name} has '
                                  f'{format_shape(theirs)}, the model {format_shape(ours)}; check --width and '
                                  f'--model (or the number of speakers of a softmax model).')


def format_shape(shape: tuple | int) -> str:
    """(5,5,1,16) for a shape; '3 weights' for a count."""
    return f'{shape} weights' if isinstance(shape, int) else '(' + ','.join(map(str, shape)) + ')'


def copy_weights_by_name(source: keras.Model, target: keras.Model, path: str = '<model>') -> None:
    """Sets each weighted layer of `target` from the layer of the same name in `source`, where there is one;
    CheckpointError when shapes differ."""
    source_layers = {layer.name: layer for layer in source.layers}
    check_shapes(path, target, {name: [tuple(w.shape) for w in layer.weights] for name, layer in source_layers.items()})
    for name in weighted_layer_names(target):
        if name in source_layers:
            target.get_layer(name).set_weights(source_layers[name].get_weights())


def snake_case(class_name: str) -> str:
    """Keras' file name of a layer class in a .weights.h5 file (ReLU -> re_lu, Conv2D -> conv2d)."""
    name = re.sub('(.)([A-Z][a-z]+)', r'\1_\2', re.sub(r'\W+', '', class_name))
    return re.sub('([a-z])([A-Z])', r'\1_\2', name).lower()


def weights_h5_shapes(path: str, model: keras.Model) -> dict[str, list[tuple]]:
    """The weight shapes a Keras 3 .weights.h5 file holds for each layer of `model`. Keras names the layers there
    by class and position (conv2d, conv2d_1, ...), so a file is read as `model`'s own layer order."""
    counts: dict[str, int] = {}
    shapes = {}
    with h5py.File(path, 'r') as f:
        for layer in model.layers:
            key = snake_case(type(layer).__name__)
            counts[key] = counts.get(key, -1) + 1
            group = f.get(f'layers/{key}' + (f'_{counts[key]}' if counts[key] else ''))
            if group is not None:
                shapes[layer.name] = nested_var_shapes(group)
    return shapes


def nested_var_shapes(group: h5py.Group) -> list[tuple]:
    """The shapes of a layer group's own `vars`, then those of its sub-objects' (a GRU keeps its weights under
    `cell/vars`), in Keras' save order."""
    own = group.get('vars')
    shapes = [tuple(own[str(i)].shape) for i in range(len(own))] if own is not None else []
    for key, child in group.items():
        if key != 'vars' and isinstance(child, h5py.Group):
            shapes += nested_var_shapes(child)
    return shapes


def legacy_h5_shapes(path: str) -> dict[str, list[tuple]]:
    """The weight shapes of each layer of a Keras-2 HDF5 file, by layer name."""
    with h5py.File(path, 'r') as f:
        group = f['model_weights'] if 'layer_names' not in f.attrs and 'model_weights' in f else f
        return {name: [tuple(group[name][w].shape) for w in group[name].attrs.get('weight_names', [])]
                for name in legacy_h5_layer_names(path)}


def file_kind(path: str) -> str:
    """What the first bytes of a file say it is: 'an HDF5 file', 'a zip archive', 'an empty file', 'a text file?'
    or 'an unknown binary format'."""
    with open(path, 'rb') as f:
        head = f.read(FILE_KIND_HEAD_BYTES)
    if head.startswith(HDF5_SIGNATURE):
        return 'an HDF5 file'
    if head.startswith(ZIP_SIGNATURE):
        return 'a zip archive'
    if not head:
        return 'an empty file'
    try:
        head.decode('utf-8')
    except UnicodeDecodeError:
        return 'an unknown binary format'
    return 'an unknown binary format' if b'\0' in head else 'a text file?'


CHECKPOINT_FORMATS = {  # suffix: (kind the file must be, what a checkpoint of that suffix is).
    '.keras': ('a zip archive', 'a .keras checkpoint (a zip archive written by Keras 3)'),
    '.weights.h5': ('an HDF5 file', 'Keras 3 weights (.weights.h5, an HDF5 file)'),
    '.h5': ('an HDF5 file', 'a Keras-2 .h5 checkpoint (an HDF5 file)'),
    '.hdf5': ('an HDF5 file', 'a Keras-2 .h5 checkpoint (an HDF5 file)'),
}


def check_exists(path: str) -> None:
    """CheckpointError when `path` is missing, or is not the kind of file its suffix says (a text file named
    .h5, a .keras that is no zip archive)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file; train a model first or fix the path.')
    suffix = next((s for s in CHECKPOINT_FORMATS if path.endswith(s)), None)
    if suffix is None:
        return
    wanted, expected = CHECKPOINT_FORMATS[suffix]
    kind = file_kind(path)
    if kind != wanted:
        raise CheckpointError(f'{path}: not {wanted} ({kind}); expected {expected}.')


@contextmanager
def fitting(path: str) -> Iterator[None]:
    """Turns Keras' and h5py's errors while reading `path` into a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        message = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f'{path}: does not fit this model ({message}); check --model, --width and the '
                              f'number of speakers it was trained on.') from None


def architecture_of(config: dict, path: str) -> tuple[str, dict]:
    """The model name and constructor options of a saved functional model's config (its 'name' and 'layers')."""
    names = [key for key, cls in MODELS.items() if cls.name == config.get('name')]
    if not names or 'layers' not in config:
        raise CheckpointError(f'{path}: a model named {config.get("name")!r}, not one of deep-speaker\'s '
                              f'({", ".join(cls.name for cls in MODELS.values())}); use a checkpoint of ours.')
    return names[0], MODELS[names[0]].options_from_config({entry['name']: entry['config']
                                                          for entry in config['layers']})


def checkpoint_architecture(path: str, model: str = 'rescnn', width: float | None = None) -> tuple[str, dict]:
    """The model name and constructor options (width; a TDNN's frame layers and BN order) of a .keras checkpoint,
    read from its config; (model, {'width': width or 1.0}) for other files, whose architecture must be given."""
    if not (path.endswith('.keras') and os.path.isfile(path)):
        return model, {'width': width or 1.0}
    check_exists(path)
    with fitting(path), zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read('config.json'))
    return architecture_of(config.get('config', {}), path)


def read_keras_checkpoint(path: str) -> keras.Model:
    """The whole model saved in a .keras file, uncompiled; in Keras' safe mode (no code from the file runs)."""
    check_exists(path)
    with fitting(path):
        return keras.saving.load_model(path, compile=False, safe_mode=True)


def copy_checkpoint_weights(source: keras.Model, model: keras.Model, path: str) -> list[str]:
    """Copies the weights of `source` (read from `path`) into `model` by layer name; returns the weighted layers
    of `model` that `source` has nothing for."""
    with fitting(path):
        copy_weights_by_name(source, model, path)
    return missing_layers(path, weighted_layer_names(model), set(weighted_layer_names(source)))


def missing_layers(path: str, expected: list[str], present: set[str]) -> list[str]:
    """The `expected` layers not `present`; CheckpointError when none is."""
    missing = [name for name in expected if name not in present]
    if len(missing) == len(expected):
        raise CheckpointError(f'{path}: none of the model\'s layers is in this checkpoint; check --model.')
    if missing:
        logger.warning('%s: no weights for layers %s; they keep their initial values.', path, ', '.join(missing))
    return missing


def load_checkpoint(model: keras.Model, path: str) -> list[str]:
    """Loads weights into `model` by layer name; returns the weighted layers the checkpoint had nothing for.

    `.keras` (full model, ours), `.weights.h5` (Keras 3 weights, same architecture) and Keras-2 `.h5`
    (the published ResCNN checkpoints) are accepted. Raises CheckpointError when no layer gets weights or
    a layer's shapes differ (another model, width or number of speakers).
    """
    check_exists(path)
    if path.endswith('.keras'):
        return copy_checkpoint_weights(read_keras_checkpoint(path), model, path)
    expected = weighted_layer_names(model)
    with fitting(path), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Keras' warnings repeat what check_shapes says in one line.
        if path.endswith('.weights.h5'):
            check_shapes(path, model, weights_h5_shapes(path, model))
            model.load_weights(path)
            present = set(expected)
        elif path.endswith(('.h5', '.hdf5')):
            check_shapes(path, model, legacy_h5_shapes(path))
            present = legacy_h5_layer_names(path)
            model.load_weights(path, by_name=True)
        else:
            raise CheckpointError(f'{path}: unknown checkpoint format; expected .keras, .weights.h5 or .h5.')
    return missing_layers(path, expected, present)


def build_model(path: str, model: str = 'rescnn', width: float | None = None, **kwargs) -> SpeakerModel:
    """The embedding model a checkpoint was trained as (read from a .keras file, opened once), with its weights
    loaded; `model` and `width` give the architecture of other files."""
    if path.endswith('.keras') and os.path.isfile(path):
        source = read_keras_checkpoint(path)
        name, options = architecture_of(source.get_config(), path)
        speaker_model = MODELS[name](**options, **kwargs)
        copy_checkpoint_weights(source, speaker_model.m, path)
        return speaker_model
    speaker_model = MODELS[model](width=width or 1.0, **kwargs)
    load_checkpoint(speaker_model.m, path)
    return speaker_model


def model_fingerprint(speaker_model: SpeakerModel) -> str:
    """A string naming the model's architecture and weights, e.g. 'ResCNN width=0.25 weights=3f1c9a0b2d4e':
    the model name, its constructor options and the first FINGERPRINT_HASH_CHARS hex digits of the SHA-256 of its
    weights. Two models give the same embeddings only if their fingerprints are equal."""
    name, options = architecture_of(speaker_model.m.get_config(), speaker_model.m.name)
    digest = hashlib.sha256()
    for weight in speaker_model.m.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    described = ' '.join(f'{key}={json.dumps(value, separators=(",", ":"))}' for key, value in sorted(options.items()))
    return f'{MODELS[name].name} {described} weights={digest.hexdigest()[:FINGERPRINT_HASH_CHARS]}'


def read_state(directory: Path, name: str) -> dict:
    """The phase's progress ({'epoch': finished epochs, 'best': best monitored value, 'seconds': wall time of
    the epochs, validation included, 'counters': see AtomicCheckpoint}), {} before the first epoch. Read from
    `<name>_last.keras` when it holds it (it is the checkpoint a resume loads), else from `<name>_state.json`."""
    last = last_checkpoint(directory, name)
    if last.exists():
        with readable(last), zipfile.ZipFile(last) as archive:
            if CHECKPOINT_STATE_ENTRY in archive.namelist():
                return json.loads(archive.read(CHECKPOINT_STATE_ENTRY))
    path = state_file(directory, name)
    if not path.exists():
        return {}
    with readable(path):
        return json.loads(path.read_text())


@contextmanager
def readable(path: Path) -> Iterator[None]:
    """Turns the errors of reading a damaged training checkpoint or state file into a CheckpointError naming it."""
    try:
        yield
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        message = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f'{path}: damaged ({message}); delete it (or the whole checkpoints dir) to start this '
                              f'training phase over.') from None


def resumed_or_new(directory: Path, name: str, new_model: Callable[[], keras.Model]) -> tuple[keras.Model, int]:
    """The phase's last checkpoint with its optimizer state and finished epochs, or `new_model()` and 0."""
    last = last_checkpoint(directory, name)
    epoch = read_state(directory, name).get('epoch', 0)
    if last.exists() and epoch > 0:
        logger.info('Resuming from %s after epoch %d.', last, epoch)
        with readable(last):
            return keras.saving.load_model(last, custom_objects={'deep_speaker_loss': deep_speaker_loss},
                                           safe_mode=True), epoch
    return new_model(), 0


@contextmanager
def writable(path: Path) -> Iterator[None]:
    """Turns an OSError while writing `path` into a CheckpointError naming it."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f'{path}: cannot be written ({e.strerror or e}); free disk space and run '
                              f'train-model again (it resumes from the last checkpoint).') from None


class AtomicCheckpoint(keras.callbacks.Callback):
    """After each epoch saves `<name>_last.keras` (model and optimizer, for resuming) and, when `monitor`
    improves, `<name>_best.keras`. The training state (epoch, best value, training seconds, and the counters of
    the `counted` callbacks, e.g. ReduceLROnPlateau's epochs without improvement) goes inside `_last.keras`, so
    the two never disagree, and into `<name>_state.json` for people and scripts. Place it after the `counted`
    callbacks: it saves what their end of epoch changed and restores their counters after they reset them.
    Writes go through a temporary file (`.<name>.<pid>-<random>.tmp.keras`, `.<name>_state.<pid>-<random>.tmp.json`)
    and a rename, so a killed write never leaves a checkpoint that loads wrong; the temporary files of killed runs
    (their process is gone) are deleted at the start. With `keep_epochs`, also saves `<name>_epoch<NNNN>.keras`
    after each epoch and deletes all but the last `keep_epochs` of them (for average_checkpoints). The state is
    read from `directory` and everything is written to `save_dir` (default `directory`; another worker than the
    chief of a multi-worker run writes to a scratch dir)."""

    def __init__(self, directory: Path, name: str, monitor: str, mode: str, counted: tuple = (), keep_epochs: int = 0,
                 save_dir: Path | None = None):
        super().__init__()
        self.name, self.monitor, self.mode, self.counted = name, monitor, mode, counted
        self.keep_epochs = keep_epochs
        self.state = read_state(directory, name)
        directory = self.directory = save_dir or directory
        self.best, self.seconds = self.state.get('best'), self.state.get('seconds', 0.0)
        self.epoch_start = time.perf_counter()
        for pattern in (f'.{name}.*.tmp.keras', f'.{state_file(directory, name).stem}.*.tmp.json'):
            remove_orphan_temp_files(directory, pattern)

    def improved(self, value: float) -> bool:
        return self.best is None or (value > self.best if self.mode == 'max' else value < self.best)

    def save(self, path: Path, state: dict | None = None) -> None:
        """Writes the model (and `state`) to `path` atomically; CheckpointError naming it when it cannot be written."""
        with writable(path), atomic_path(path, self.name) as tmp:
            self.model.save(tmp)
            if state is not None:
                with zipfile.ZipFile(tmp, 'a') as archive:
                    archive.writestr(CHECKPOINT_STATE_ENTRY, json.dumps(state))

    def counters(self) -> dict:
        return {type(c).__name__: {'wait': int(c.wait), 'best': float(c.best)} for c in self.counted}

    def on_train_begin(self, logs=None):
        for callback in self.counted:
            for attribute, value in self.state.get('counters', {}).get(type(callback).__name__, {}).items():
                setattr(callback, attribute, value)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self.epoch_start
        value = float((logs or {}).get(self.monitor, np.nan))
        if not np.isnan(value) and self.improved(value):
            self.best = value
            self.save(best_checkpoint(self.directory, self.name))
            logger.info('Epoch %d: %s = %.4f, new best checkpoint.', epoch + 1, self.monitor, value)
        if self.keep_epochs:
            self.save(epoch_checkpoint(self.directory, self.name, epoch + 1))
            for old in epoch_checkpoints(self.directory, self.name)[:-self.keep_epochs]:
                old.unlink(missing_ok=True)
        self.state = {'epoch': epoch + 1, 'best': self.best, 'monitor': self.monitor,
                      'seconds': round(self.seconds, 1), 'counters': self.counters()}
        self.save(last_checkpoint(self.directory, self.name), self.state)
        path = state_file(self.directory, self.name)
        with writable(path), atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.state))


def average_checkpoints(paths: list[str | Path], out: Path) -> None:
    """Writes to `out` (atomically, without optimizer) the model of the last of `paths` (.keras checkpoints of one
    architecture) with the arithmetic mean of their weights, batch-norm statistics included; integer variables keep
    the last checkpoint's values. Reads one checkpoint at a time. CheckpointError for a file that does not load or
    whose weights differ in shape from the others'."""
    first = read_keras_checkpoint(str(paths[0]))
    sums = [np.asarray(w, dtype=np.float64) for w in first.get_weights()]
    model = first
    for path in paths[1:]:
        model = read_keras_checkpoint(str(path))
        weights = model.get_weights()
        if [w.shape for w in weights] != [s.shape for s in sums]:
            raise CheckpointError(f'{path}: weights of another architecture than {paths[0]}; average checkpoints of '
                                  f'one training run.')
        for total, weight in zip(sums, weights, strict=True):
            total += weight
    model.set_weights([(total / len(paths)).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
                       for total, w in zip(sums, model.get_weights(), strict=True)])
    with writable(out), atomic_path(out, out.stem) as tmp:
        model.save(tmp)


class AveragingError(CheckpointError):
    """Fewer epoch checkpoints (`kept`) in `directory` than the `count` to average."""

    def __init__(self, directory: Path, count: int, kept: int):
        super().__init__(f'{directory}: {kept} epoch checkpoints kept, {count} asked to average.')
        self.directory, self.count, self.kept = directory, count, kept


def average_last_epochs(directory: Path, name: str, count: int) -> Path:
    """Averages the last `count` epoch checkpoints of a phase into `<name>_averaged.keras`; returns its path.
    AveragingError when fewer are kept."""
    kept = epoch_checkpoints(directory, name)
    if count > len(kept):
        raise AveragingError(directory, count, len(kept))
    out = averaged_checkpoint(directory, name)
    average_checkpoints(kept[-count:], out)
    logger.info('Averaged the weights of %s into %s.', ', '.join(p.name for p in kept[-count:]), out)
    return out
