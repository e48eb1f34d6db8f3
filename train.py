"""The two training phases: softmax pre-training and triplet training, streamed with tf.data from the
memory-mapped model inputs, checkpointed atomically and resumed from the last finished epoch."""

import json
import logging
import math
import os
import time
import uuid
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from audio import remove_orphan_temp_files
from batcher import HardNegativeMiner, KerasFormatConverter, TripletBatcher, random_triplets
from constants import (
    BATCH_SIZE,
    CHECKPOINT_STATE_ENTRY,
    CHECKPOINTS_SOFTMAX_DIR,
    CHECKPOINTS_TRIPLET_DIR,
    DEFAULT_TRIPLET_MINING,
    EARLY_STOPPING_PATIENCE,
    INFERENCE_BATCH_SIZE,
    LOGS_SUBDIR,
    MIN_LEARNING_RATE,
    MINING_HISTORY_SIZE,
    MINING_REFRESH_EVERY,
    NUM_FBANKS,
    NUM_FRAMES,
    REDUCE_LR_FACTOR,
    REDUCE_LR_PATIENCE,
    SOFTMAX_LEARNING_RATE,
    TRIPLET_LEARNING_RATE,
    TRIPLET_MOMENTUM,
    TRIPLET_VALIDATION_BATCHES,
)
from conv_models import MODELS, CheckpointError, build_model
from embedding import embed_crops
from triplet_loss import deep_speaker_loss

logger = logging.getLogger(__name__)

CROP_SPEC = tf.TensorSpec((None, NUM_FRAMES, NUM_FBANKS, 1), tf.float32)


class AtomicCheckpoint(keras.callbacks.Callback):
    """After each epoch saves `<name>_last.keras` (model and optimizer, for resuming) and, when `monitor`
    improves, `<name>_best.keras`. The training state (epoch, best value, training seconds, and the counters of
    the `counted` callbacks, e.g. ReduceLROnPlateau's epochs without improvement) goes inside `_last.keras`, so
    the two never disagree, and into `<name>_state.json` for people and scripts. Place it after the `counted`
    callbacks: it saves what their end of epoch changed and restores their counters after they reset them.
    Writes go through a temporary file (`.<name>.<pid>-<random>.tmp.keras`) and a rename, so a killed write never
    leaves a checkpoint that loads wrong; the temporary files of killed runs (their process is gone) are deleted
    at the start."""

    def __init__(self, directory: Path, name: str, monitor: str, mode: str, counted: tuple = ()):
        super().__init__()
        self.directory, self.name, self.monitor, self.mode, self.counted = directory, name, monitor, mode, counted
        self.state = read_state(directory, name)
        self.best, self.seconds = self.state.get('best'), self.state.get('seconds', 0.0)
        self.epoch_start = time.perf_counter()
        remove_orphan_temp_files(directory, f'.{name}.*.tmp.keras')

    def improved(self, value: float) -> bool:
        return self.best is None or (value > self.best if self.mode == 'max' else value < self.best)

    def save(self, filename: str, state: dict | None = None) -> None:
        tmp = self.directory / f'.{self.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp.keras'
        try:
            self.model.save(tmp)
            if state is not None:
                with zipfile.ZipFile(tmp, 'a') as archive:
                    archive.writestr(CHECKPOINT_STATE_ENTRY, json.dumps(state))
            os.replace(tmp, self.directory / filename)
        finally:
            tmp.unlink(missing_ok=True)

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
            self.save(f'{self.name}_best.keras')
            logger.info('Epoch %d: %s = %.4f, new best checkpoint.', epoch + 1, self.monitor, value)
        self.state = {'epoch': epoch + 1, 'best': self.best, 'monitor': self.monitor,
                      'seconds': round(self.seconds, 1), 'counters': self.counters()}
        self.save(f'{self.name}_last.keras', self.state)
        tmp = self.directory / f'.{self.name}_state.json.tmp'
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.directory / f'{self.name}_state.json')


class MiningRefresh(keras.callbacks.Callback):
    """Re-embeds the miner's history with the training model every `every` batches, in the training thread,
    `inference_batch` crops at a time (embedding.embed_crops), and logs the time mining takes."""

    def __init__(self, miner: HardNegativeMiner, kx: np.ndarray, every: int,
                 inference_batch: int = INFERENCE_BATCH_SIZE):
        super().__init__()
        self.miner, self.kx, self.every, self.inference_batch = miner, kx, every, inference_batch
        self.step, self.refresh_seconds = 0, []

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return embed_crops(self.model, crops, self.inference_batch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.step % self.every == 0:
            start = time.perf_counter()
            self.miner.refresh(self.kx, self.embed, self.inference_batch)
            self.refresh_seconds.append(time.perf_counter() - start)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        selection = self.miner.selection_seconds
        logger.info('Mining (%s): %.1f ms per batch selection over %d batches; %d history refreshes of %d crops, '
                    '%.1f s each.', self.miner.mode, 1000 * np.mean(selection or [0]), len(selection),
                    len(self.refresh_seconds), len(self.miner.history[0]), np.mean(self.refresh_seconds or [0]))
        selection.clear()
        self.refresh_seconds.clear()


def read_state(directory: Path, name: str) -> dict:
    """The phase's progress ({'epoch': finished epochs, 'best': best monitored value, 'seconds': wall time of
    the epochs, validation included, 'counters': see AtomicCheckpoint}), {} before the first epoch. Read from
    `<name>_last.keras` when it holds it (it is the checkpoint a resume loads), else from `<name>_state.json`."""
    last = directory / f'{name}_last.keras'
    if last.exists():
        with zipfile.ZipFile(last) as archive:
            if CHECKPOINT_STATE_ENTRY in archive.namelist():
                return json.loads(archive.read(CHECKPOINT_STATE_ENTRY))
    path = directory / f'{name}_state.json'
    return json.loads(path.read_text()) if path.exists() else {}


def best_checkpoint(directory: Path, name: str = 'ResCNN') -> Path:
    """Path of a phase's best checkpoint (it may not exist yet)."""
    return directory / f'{name}_best.keras'


def softmax_dataset(kx: np.ndarray, ky: np.ndarray, batch_size: int, seed: int | None) -> tf.data.Dataset:
    """Batches of (crops, labels) read from the memory maps; shuffled and repeated when `seed` is given."""
    def gather(indices):
        indices = np.sort(indices)
        return kx[indices], ky[indices]

    dataset = tf.data.Dataset.range(len(kx))
    if seed is not None:
        dataset = dataset.shuffle(len(kx), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size).map(
        lambda idx: tf.numpy_function(gather, [idx], (tf.float32, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda x, y: (tf.ensure_shape(x, CROP_SPEC.shape), tf.ensure_shape(y, (None,))))
    return dataset.prefetch(tf.data.AUTOTUNE)


def triplet_dataset(batcher: TripletBatcher, batch_size: int) -> tf.data.Dataset:
    """An endless stream of triplet batches from `batcher`."""
    def batches():
        while True:
            yield batcher.get_batch(batch_size)

    signature = (CROP_SPEC, tf.TensorSpec((None,), tf.float32))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def phase_callbacks(directory: Path, working_dir: Path, name: str, phase: str, monitor: str, mode: str) -> list:
    schedules = (keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=REDUCE_LR_FACTOR,
                                                   patience=REDUCE_LR_PATIENCE, min_lr=MIN_LEARNING_RATE),
                 keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, min_delta=0.001,
                                               patience=EARLY_STOPPING_PATIENCE))
    return [*schedules, AtomicCheckpoint(directory, name, monitor, mode, counted=schedules),
            keras.callbacks.CSVLogger(str(directory / 'history.csv'), append=True),
            keras.callbacks.TensorBoard(log_dir=str(working_dir / LOGS_SUBDIR / phase))]


def resumed_or_new(directory: Path, name: str, new_model) -> tuple[keras.Model, int]:
    """The phase's last checkpoint with its optimizer state and finished epochs, or `new_model()` and 0."""
    last = directory / f'{name}_last.keras'
    epoch = read_state(directory, name).get('epoch', 0)
    if last.exists() and epoch > 0:
        logger.info('Resuming from %s after epoch %d.', last, epoch)
        return keras.saving.load_model(last, custom_objects={'deep_speaker_loss': deep_speaker_loss}), epoch
    return new_model(), 0


def fit(model: keras.Model, initial_epoch: int, epochs: int, train, validation, steps_per_epoch: int,
        callbacks: list) -> None:
    if initial_epoch >= epochs:
        logger.info('Already trained %d epochs (asked for %d); nothing to do. Raise --epochs to go on.',
                    initial_epoch, epochs)
        return
    model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=initial_epoch,
              steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=2)


def phase_inputs(working_dir: str, checkpoints_subdir: str, seed: int) -> tuple[Path, KerasFormatConverter, Path]:
    """Seeds every generator, and returns the working dir, its model inputs and the phase's checkpoint dir."""
    keras.utils.set_random_seed(seed)
    working_dir = Path(working_dir).expanduser()
    directory = working_dir / checkpoints_subdir
    converter = KerasFormatConverter(str(working_dir))
    directory.mkdir(parents=True, exist_ok=True)
    return working_dir, converter, directory


def train_softmax(working_dir: str, epochs: int, steps_per_epoch: int | None = None, width: float = 1.0,
                  batch_size: int = BATCH_SIZE, seed: int = 0, model_name: str = 'rescnn',
                  learning_rate: float = SOFTMAX_LEARNING_RATE, model_options: dict | None = None) -> Path:
    """Softmax pre-training (Adam) of the model `model_name` (a key of conv_models.MODELS, built with
    `model_options` such as a TDNN's frame_layers) on kx_train, validated on kx_test; returns the best
    checkpoint's path. A resumed run keeps the architecture and learning rate of its checkpoint."""
    working_dir, converter, directory = phase_inputs(working_dir, CHECKPOINTS_SOFTMAX_DIR, seed)
    kx_train, ky_train = converter.load('train')
    kx_test, ky_test = converter.load('test')

    def new_model():
        dsm = MODELS[model_name](include_softmax=True, num_speakers_softmax=converter.num_speakers, width=width,
                                 **(model_options or {}))
        dsm.m.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss='sparse_categorical_crossentropy', metrics=['accuracy'])
        return dsm.m

    name = MODELS[model_name].name
    model, initial_epoch = resumed_or_new(directory, name, new_model)
    if model.output_shape[-1] != converter.num_speakers:
        raise CheckpointError(f'{directory / f"{name}_last.keras"}: trained on {model.output_shape[-1]} speakers, but '
                              f'the model inputs have {converter.num_speakers}; delete {directory} or use another '
                              f'--working_dir.')
    logger.info('Softmax phase: %d speakers, %d training crops, %s parameters.', converter.num_speakers,
                len(kx_train), f'{model.count_params():,}')
    steps = steps_per_epoch or math.ceil(len(kx_train) / batch_size)
    fit(model, initial_epoch, epochs, softmax_dataset(kx_train, ky_train, batch_size, seed),
        softmax_dataset(kx_test, ky_test, batch_size, None), steps,
        phase_callbacks(directory, working_dir, name, 'softmax', 'val_accuracy', 'max'))
    return best_checkpoint(directory, name)


def train_triplet(working_dir: str, epochs: int, steps_per_epoch: int = 100, width: float = 1.0,
                  batch_size: int = BATCH_SIZE, seed: int = 0, learning_rate: float = TRIPLET_LEARNING_RATE,
                  mining: str = DEFAULT_TRIPLET_MINING, history_size: int = MINING_HISTORY_SIZE,
                  refresh_every: int = MINING_REFRESH_EVERY, model_name: str = 'rescnn',
                  model_options: dict | None = None, inference_batch: int | None = None) -> Path:
    """Triplet training (SGD, deep_speaker_loss) started from the best softmax checkpoint when there is one, with
    that checkpoint's architecture (else `width` and `model_options`); returns the best checkpoint's path (by
    val_loss on fixed random triplets of kx_test).

    mining: 'random' triplets, or 'hard' / 'semihard' negatives mined from a history of `history_size` crops
    re-embedded every `refresh_every` batches, `inference_batch` crops at a time (default `batch_size`: a
    refresh then needs less memory than a training step, at any width).
    """
    working_dir, converter, directory = phase_inputs(working_dir, CHECKPOINTS_TRIPLET_DIR, seed)
    kx_train, ky_train = converter.load('train')
    kx_test, ky_test = converter.load('test')
    name = MODELS[model_name].name

    def new_model():
        pre_trained = best_checkpoint(working_dir / CHECKPOINTS_SOFTMAX_DIR, name)
        if pre_trained.exists():
            dsm = build_model(str(pre_trained), model_name)
            logger.info('Initialising from the softmax checkpoint %s, with its architecture.', pre_trained)
        else:
            logger.warning('No softmax checkpoint in %s: triplet training starts from random weights.',
                           pre_trained.parent)
            dsm = MODELS[model_name](width=width, **(model_options or {}))
        dsm.m.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=TRIPLET_MOMENTUM),
                      loss=deep_speaker_loss)
        return dsm.m

    model, initial_epoch = resumed_or_new(directory, name, new_model)
    callbacks = phase_callbacks(directory, working_dir, name, 'triplet', 'val_loss', 'min')
    selector = random_triplets
    if mining != 'random':
        selector = HardNegativeMiner(ky_train, mining, min(history_size, len(ky_train)), seed + initial_epoch)
        callbacks.append(MiningRefresh(selector, kx_train, refresh_every, inference_batch or batch_size))
    train_batcher = TripletBatcher(kx_train, ky_train, seed=seed + initial_epoch, selector=selector)
    test_batcher = TripletBatcher(kx_test, ky_test, seed=seed)
    validation = [test_batcher.get_batch(batch_size) for _ in range(TRIPLET_VALIDATION_BATCHES)]
    validation = (np.concatenate([x for x, _ in validation]), np.concatenate([y for _, y in validation]))
    validation = tf.data.Dataset.from_tensor_slices(validation).batch(3 * (batch_size // 3))
    logger.info('Triplet phase: %d speakers, %s parameters, %s triplets.', converter.num_speakers,
                f'{model.count_params():,}', mining)
    fit(model, initial_epoch, epochs, triplet_dataset(train_batcher, batch_size), validation, steps_per_epoch,
        callbacks)
    return best_checkpoint(directory, name)
