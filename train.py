"""The two training phases: softmax pre-training and triplet training (TrainConfig carries their settings),
streamed with tf.data from the memory-mapped model inputs (or, with the windows sampler, fresh windows of the
packed store), checkpointed atomically and resumed from the last finished epoch; the mining history is
re-embedded with embedding.embed_crops. With `val_speakers`, some training speakers are held out and scored as
verification trials every epoch (validation.py), which then chooses the best checkpoint; with `average_last`, the
last epoch checkpoints are averaged after training. Both phases run under a tf.distribute strategy
(distribute.py): TrainConfig.batch_size is the batch of each replica, the global batch is that times the
replicas, and only the chief writes checkpoints, the CSV history and TensorBoard logs.

Imports checkpoints, distribute, embedding, sampler, store, batcher, conv_models, losses, spec_augment,
triplet_loss, validation, workdir and constants."""

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from batcher import HardNegativeMiner, KerasFormatConverter, TripletBatcher, random_triplets
from checkpoints import AtomicCheckpoint, CheckpointError, average_last_epochs, build_model, read_state, resumed_or_new
from constants import (
    BATCH_SIZE,
    COLLECTIVE_TIMEOUT_S,
    DEFAULT_EPOCHS,
    DEFAULT_LOSS,
    DEFAULT_SEED,
    DEFAULT_TRIPLET_MINING,
    DEFAULT_WORKING_DIR,
    EARLY_STOPPING_MIN_DELTA,
    EARLY_STOPPING_PATIENCE,
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
    TRIPLET_PREFETCH_BATCHES,
    TRIPLET_STEPS_PER_EPOCH,
    TRIPLET_VALIDATION_BATCHES,
)
from conv_models import MODELS
from distribute import (
    check_triplet_batch,
    collective_failures,
    default_mode,
    is_chief,
    make_strategy,
    multiworker_fit,
    precision,
    synchronize_batch_norm,
    unsharded,
    weights_digest,
    whole_blocks,
    worker_index,
    worker_seed,
)
from embedding import embed_crops
from losses import classification_loss, head_of
from sampler import (
    WindowCrops,
    WindowMiner,
    WindowSampler,
    WindowSplit,
    WindowTripletBatcher,
    fixed_windows_dataset,
    training_split,
    validation_windows,
)
from spec_augment import spec_augmented
from store import PackedStore, open_for_training
from triplet_loss import deep_speaker_loss
from validation import (
    SpeakerValidation,
    base_speaker,
    check_pretrained_held_out,
    check_resumed_held_out,
    held_out_speakers,
    record_held_out,
    training_subset,
    validation_targets,
)
from workdir import WorkingDir, best_checkpoint, last_checkpoint, training_lock

logger = logging.getLogger(__name__)

CROP_SPEC = tf.TensorSpec((None, NUM_FRAMES, NUM_FBANKS, 1), tf.float32)


class MiningRefresh(keras.callbacks.Callback):
    """Re-embeds the miner's history with the training model every `every` batches, in the training thread,
    `inference_batch` crops at a time (embedding.embed_crops), and logs the time mining takes."""

    def __init__(self, miner: HardNegativeMiner, kx: np.ndarray, every: int, inference_batch: int):
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
    """An endless stream of triplet batches from `batcher`, (crops (n, 160, 64, 1) float32, zeros (n,)): the
    triplets are chosen one batch after another in one thread (batcher.select: its random state, a miner's
    history); their frames are read by parallel calls (batcher.frames) and cast to float32 by TensorFlow, outside
    the GIL, and delivered in order."""
    def selections():
        while True:
            yield batcher.select(batch_size)

    def crops(*selection):
        frames = tf.numpy_function(batcher.frames, selection, tf.as_dtype(batcher.frames_dtype), stateful=False)
        x = tf.reshape(tf.cast(frames, tf.float32), (-1,) + tuple(CROP_SPEC.shape[1:]))
        return x, tf.zeros(tf.shape(x)[:1])

    signature = (tf.TensorSpec((None,), tf.int64),) * batcher.selection_parts
    return tf.data.Dataset.from_generator(selections, output_signature=signature).map(
        crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(TRIPLET_PREFETCH_BATCHES)


def phase_callbacks(directory: Path, working_dir: Path, name: str, phase: str, monitor: str, mode: str,
                    first: list = (), keep_epochs: int = 0, scratch: Path | None = None) -> list:
    """The `first` callbacks (those that add to the logs the others read, e.g. SpeakerValidation), learning-rate
    schedule, early stopping, atomic checkpoints (keeping `keep_epochs` epoch checkpoints), the CSV history and
    TensorBoard logs. The training state is read from `directory`; with `scratch` (a worker other than the chief)
    everything is written there instead of `directory` and the working dir's logs."""
    schedules = (keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=REDUCE_LR_FACTOR,
                                                   patience=REDUCE_LR_PATIENCE, min_lr=MIN_LEARNING_RATE),
                 keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, min_delta=EARLY_STOPPING_MIN_DELTA,
                                               patience=EARLY_STOPPING_PATIENCE))
    writes = scratch or directory
    logs = scratch / 'logs' if scratch else WorkingDir.of(working_dir).logs_dir(phase)
    checkpoint = AtomicCheckpoint(directory, name, monitor, mode, counted=schedules, keep_epochs=keep_epochs,
                                  save_dir=writes)
    return [*first, *schedules, checkpoint, keras.callbacks.CSVLogger(str(writes / 'history.csv'), append=True),
            keras.callbacks.TensorBoard(log_dir=str(logs))]


def fit(model: keras.Model, initial_epoch: int, epochs: int, train, validation, steps_per_epoch: int,
        callbacks: list) -> None:
    """model.fit from `initial_epoch` to `epochs` (under multi-worker training with distribute.multiworker_fit)."""
    if initial_epoch >= epochs:
        logger.info('Already trained %d epochs (asked for %d); nothing to do. Raise --epochs to go on.',
                    initial_epoch, epochs)
        return
    strategy = model.distribute_strategy
    with multiworker_fit(model, strategy):
        model.fit(train, validation_data=validation, epochs=epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=2)
    if strategy.num_replicas_in_sync > 1:
        logger.info('Worker %d: weights %s after epoch %d.', worker_index(strategy), weights_digest(model), epochs)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a training phase, from the command line (defaults: constants.py)."""
    working_dir: str = DEFAULT_WORKING_DIR
    epochs: int = DEFAULT_EPOCHS  # total epochs of the phase; a resumed run trains up to this number.
    steps_per_epoch: int | None = None  # None: one pass over kx_train (softmax), TRIPLET_STEPS_PER_EPOCH (triplet).
    width: float = 1.0
    batch_size: int = BATCH_SIZE
    seed: int = DEFAULT_SEED
    model_name: str = 'rescnn'  # a key of conv_models.MODELS.
    learning_rate: float | None = None  # None: SOFTMAX_LEARNING_RATE or TRIPLET_LEARNING_RATE.
    model_options: dict = field(default_factory=dict)  # constructor options, e.g. a TDNN's frame_layers.
    mining: str = DEFAULT_TRIPLET_MINING  # triplet phase: 'hard', 'semihard' or 'random'.
    history_size: int = MINING_HISTORY_SIZE
    refresh_every: int = MINING_REFRESH_EVERY
    inference_batch: int | None = None  # crops per forward pass of a history refresh; None: batch_size.
    from_scratch: bool = False  # triplet phase: start from random weights when there is no softmax checkpoint.
    val_speakers: int = 0  # training speakers held out and scored as trials every epoch (best checkpoint by val_eer).
    average_last: int = 0  # epoch checkpoints kept and averaged into <Model>_averaged.keras after training.
    sampler: str = 'fixed'  # 'fixed': build-keras-inputs crops; 'windows': fresh windows of the packed store.
    speaker_sampling: str = 'balanced'  # windows: speakers equally often, or 'proportional' to their utterances.
    loss: str = DEFAULT_LOSS  # softmax phase: a key of losses.LOSSES.
    margin: float | None = None  # softmax phase, margin losses: None for the loss's default.
    scale: float | None = None  # softmax phase, margin losses: None for the loss's default.
    spec_augment: bool = False  # both phases: SpecAugment masks on every training crop (spec_augment.py).
    distribute: str | None = None  # 'none', 'mirrored' or 'multiworker' (distribute.py); None: default_mode().
    scale_lr: bool = False  # multiply the learning rate of a new model by the number of replicas.
    mixed_precision: bool = False  # build a new model under the mixed_float16 policy (a resumed one keeps its own).
    jit_compile: bool = False  # compile the training step with XLA.
    collective_timeout: float = COLLECTIVE_TIMEOUT_S  # multiworker: seconds before a silent worker is given up.


class NoPretrainingError(CheckpointError):
    """A triplet phase asked to start without the softmax checkpoint `path` it starts from (and not from scratch)."""

    def __init__(self, path: Path):
        super().__init__(f'{path}: no softmax checkpoint to start the triplet phase from.')
        self.path = path


def phase_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The strategy of `config.distribute` (created before any other TensorFlow operation runs)."""
    mode = config.distribute or default_mode()
    strategy = make_strategy(mode, config.collective_timeout)
    logger.info('Distribution: %s, %d replica(s); per-replica batch %d, global batch %d.', mode,
                strategy.num_replicas_in_sync, config.batch_size, config.batch_size * strategy.num_replicas_in_sync)
    return strategy


@contextmanager
def scratch_dir(strategy: tf.distribute.Strategy, directory: Path) -> Iterator[Path | None]:
    """For the block: on the chief None (it writes the phase's own dirs, under the phase's training lock); on the
    other workers a temporary dir for their checkpoints, history and logs, deleted afterwards (Keras' multi-worker
    recipe: every worker saves, only the chief's files are kept)."""
    if is_chief(strategy):
        with training_lock(directory):
            yield None
        return
    with tempfile.TemporaryDirectory(prefix=f'deep-speaker-worker{worker_index(strategy)}-') as scratch:
        yield Path(scratch)


def prepared(model: keras.Model, strategy: tf.distribute.Strategy, config: TrainConfig) -> keras.Model:
    """`model` with batch statistics over the global batch (synchronize_batch_norm) and XLA as asked."""
    synchronize_batch_norm(model, strategy)
    model.jit_compile = config.jit_compile
    return model


def learning_rate(config: TrainConfig, default: float, strategy: tf.distribute.Strategy) -> float:
    """The learning rate of a new model: `config.learning_rate` (else `default`), times the replicas with
    `config.scale_lr`."""
    rate = config.learning_rate or default
    return rate * strategy.num_replicas_in_sync if config.scale_lr else rate


def phase_inputs(config: TrainConfig, phase: str) -> tuple[WorkingDir, KerasFormatConverter | None, Path]:
    """Seeds every generator, and returns the working dir, its model inputs (None with the windows sampler) and
    the phase's checkpoint dir."""
    keras.utils.set_random_seed(config.seed)
    working_dir = WorkingDir.of(config.working_dir)
    directory = working_dir.checkpoints_dir(phase)
    converter = KerasFormatConverter(working_dir) if config.sampler == 'fixed' else None
    directory.mkdir(parents=True, exist_ok=True)
    return working_dir, converter, directory


class HeldOut(NamedTuple):
    """The training speakers held out of a phase and the validation callbacks that score them (none when none)."""
    speakers: list[str]
    callbacks: list


def held_out_validation(config: TrainConfig, working_dir: WorkingDir, directory: Path, name: str,
                        speakers: list[str]) -> HeldOut:
    """The `config.val_speakers` speakers of `speakers` held out, and the SpeakerValidation callback over their
    cached utterances. ValidationError (before any training) for too many, or for other speakers than a resumed
    phase held out."""
    held_out = held_out_speakers(speakers, config.val_speakers) if config.val_speakers else []
    check_resumed_held_out(directory, held_out, read_state(directory, name).get('epoch', 0) > 0)
    callbacks = []
    if held_out:
        windows, targets = validation_targets(working_dir, held_out)
        callbacks.append(SpeakerValidation(windows, targets, config.inference_batch or config.batch_size))
    return HeldOut(held_out, callbacks)


def monitored(held_out: HeldOut, monitor: str, mode: str) -> tuple[str, str]:
    """What chooses the best checkpoint (and drives the schedules): val_eer with held-out speakers, else
    (monitor, mode)."""
    return ('val_eer', 'min') if held_out.speakers else (monitor, mode)


def finish_phase(config: TrainConfig, directory: Path, name: str, scratch: Path | None) -> Path:
    """Averages the last epoch checkpoints when asked (on the chief: `scratch` None); returns the best checkpoint's
    path."""
    if config.average_last and scratch is None:
        average_last_epochs(directory, name, config.average_last)
    return best_checkpoint(directory, name)


def without_speakers(store: PackedStore, utterances: np.ndarray, held_out: list[str]) -> np.ndarray:
    """The `utterances` (store indices) whose speaker is not `held_out` (augmented copies of one held out too)."""
    held = set(held_out)
    kept = np.array([base_speaker(speaker) not in held for speaker in store.speakers], dtype=bool)
    return utterances[kept[store.labels[utterances]]]


def window_split(config: TrainConfig, working_dir: WorkingDir, directory: Path, name: str) -> tuple[WindowSplit,
                                                                                                    HeldOut]:
    """The packed store's seeded split without the held-out speakers' utterances (their softmax classes stay,
    unused), and the validation over those speakers."""
    split = training_split(open_for_training(working_dir), config.seed)
    held_out = held_out_validation(config, working_dir, directory, name, list(split.store.speakers))
    if held_out.speakers:
        split = split._replace(train=without_speakers(split.store, split.train, held_out.speakers),
                               held_out=without_speakers(split.store, split.held_out, held_out.speakers))
    return split, held_out


class FixedInputs(NamedTuple):
    """The build-keras-inputs crops (n, frames, 64, 1) and labels (n,) of training and test, without the held-out
    speakers (validation.Rows views, labels renumbered), their number of classes, and the held-out speakers."""
    kx_train: np.ndarray
    ky_train: np.ndarray
    kx_test: np.ndarray
    ky_test: np.ndarray
    num_speakers: int
    held_out: HeldOut


def fixed_inputs(config: TrainConfig, working_dir: WorkingDir, converter: KerasFormatConverter, directory: Path,
                 name: str) -> FixedInputs:
    speakers = working_dir.input_speakers()
    held_out = held_out_validation(config, working_dir, directory, name, speakers)
    kx_train, ky_train, num_speakers = training_subset(*converter.load('train'), speakers, held_out.speakers)
    kx_test, ky_test, _ = training_subset(*converter.load('test'), speakers, held_out.speakers)
    return FixedInputs(kx_train, ky_train, kx_test, ky_test, num_speakers, held_out)


class SoftmaxData(NamedTuple):
    """What the softmax phase trains on: `train(first_batch)` the endless (crops, labels) batches from batch number
    `first_batch` on, `validation` one pass of fixed batches, `steps` the default steps per epoch, and the
    held-out speakers."""
    num_speakers: int
    description: str
    steps: int
    train: Callable[[int], tf.data.Dataset]
    validation: tf.data.Dataset
    held_out: HeldOut


def softmax_data(config: TrainConfig, working_dir: WorkingDir, converter: KerasFormatConverter | None,
                 directory: Path, name: str, batch_size: int, seed: int) -> SoftmaxData:
    """Batches of `batch_size` (the global batch) of the fixed crops of the model inputs (one pass over kx_train
    per epoch), or of fresh windows of the packed store's training utterances (as many batches per epoch as one
    window per utterance takes), validated on windows of its held-out utterances drawn once; without the speakers
    held out for `config.val_speakers`. `seed`: this worker's."""
    if config.sampler == 'windows':
        split, held_out = window_split(config, working_dir, directory, name)
        sampler = WindowSampler(split.store, split.train, config.speaker_sampling, seed)
        validation = validation_windows(split.store, split.held_out, seed)
        return SoftmaxData(len(split.store.speakers), f'{len(split.train):,} training utterances '
                           f'({config.speaker_sampling} speakers, fresh windows), {len(validation.utterances):,} '
                           f'validation windows', math.ceil(len(split.train) / batch_size),
                           partial(sampler.dataset, batch_size),
                           fixed_windows_dataset(split.store, validation, batch_size), held_out)
    kx_train, ky_train, kx_test, ky_test, num_speakers, held_out = fixed_inputs(config, working_dir, converter,
                                                                                directory, name)
    return SoftmaxData(num_speakers, f'{len(kx_train)} training crops', math.ceil(len(kx_train) / batch_size),
                       lambda first_batch: softmax_dataset(kx_train, ky_train, batch_size, seed),
                       softmax_dataset(kx_test, ky_test, batch_size, None), held_out)


def training_batches(dataset: tf.data.Dataset, config: TrainConfig, initial_epoch: int) -> tf.data.Dataset:
    """The training batches, SpecAugment-masked when `config.spec_augment` (seeded by the seed and first epoch)."""
    return spec_augmented(dataset, config.seed + initial_epoch) if config.spec_augment else dataset


def train_softmax(config: TrainConfig) -> Path:
    """Classification pre-training (Adam) of the model `config.model_name` on kx_train with `config.loss` (softmax,
    or a margin loss over a cosine head), validated on kx_test; returns the best checkpoint's path. A resumed run
    keeps the architecture, loss, learning rate and precision of its checkpoint. LossOptionError for a margin or
    scale out of range, before anything is read."""
    loss = classification_loss(config.loss, config.margin, config.scale)
    strategy = phase_strategy(config)
    working_dir, converter, directory = phase_inputs(config, 'softmax')
    name = MODELS[config.model_name].name
    with scratch_dir(strategy, directory) as scratch, collective_failures(strategy):
        data = softmax_data(config, working_dir, converter, directory, name,
                            config.batch_size * strategy.num_replicas_in_sync, worker_seed(config.seed, strategy))
        num_speakers = data.num_speakers

        def new_model():
            dsm = MODELS[config.model_name](include_softmax=True, num_speakers_softmax=num_speakers, width=config.width,
                                            head=head_of(config.loss), **config.model_options)
            dsm.m.compile(optimizer=keras.optimizers.Adam(learning_rate(config, SOFTMAX_LEARNING_RATE, strategy)),
                          loss=loss, metrics=['accuracy'])
            return dsm.m

        with strategy.scope(), precision(config.mixed_precision):
            model, initial_epoch = resumed_or_new(directory, name, new_model)
        prepared(model, strategy, config)
        if model.output_shape[-1] != num_speakers:
            raise CheckpointError(f'{last_checkpoint(directory, name)}: trained on {model.output_shape[-1]} speakers, '
                                  f'but the model inputs have {num_speakers}; delete {directory} or use another '
                                  f'--working_dir.')
        if scratch is None:  # the chief.
            record_held_out(directory, data.held_out.speakers)
        logger.info('Softmax phase: %d speakers (%d held out), %s, %s parameters, loss %s.', num_speakers,
                    len(data.held_out.speakers), data.description, f'{model.count_params():,}',
                    describe_loss(model.loss))
        steps = config.steps_per_epoch or data.steps
        train = training_batches(data.train(initial_epoch * steps), config, initial_epoch)
        fit(model, initial_epoch, config.epochs, unsharded(train), unsharded(data.validation), steps,
            phase_callbacks(directory, working_dir.root, name, 'softmax',
                            *monitored(data.held_out, 'val_accuracy', 'max'), data.held_out.callbacks,
                            config.average_last, scratch))
        return finish_phase(config, directory, name, scratch)


class TripletData(NamedTuple):
    """What the triplet phase trains on: crops indexed like kx (a memory map, validation.Rows or
    sampler.WindowCrops) and their labels, for training and validation, the miner and batcher classes that read
    them, and the held-out speakers."""
    num_speakers: int
    kx_train: object
    ky_train: np.ndarray
    kx_test: object
    ky_test: np.ndarray
    miner: type
    batcher: Callable
    held_out: HeldOut


def triplet_data(config: TrainConfig, working_dir: WorkingDir, converter: KerasFormatConverter | None,
                 directory: Path, name: str) -> TripletData:
    """The fixed crops of the model inputs, or windows of the packed store's training utterances (fresh ones for
    each random triplet and at each history refresh) and of its held-out utterances (drawn once); without the
    speakers held out for `config.val_speakers`."""
    if config.sampler == 'windows':
        split, held_out = window_split(config, working_dir, directory, name)
        rng = np.random.default_rng(config.seed)
        train, test = WindowCrops(split.store, split.train, rng), WindowCrops(split.store, split.held_out, rng)
        return TripletData(len(split.store.speakers), train, train.labels, test, test.labels, WindowMiner,
                           partial(WindowTripletBatcher, speaker_sampling=config.speaker_sampling), held_out)
    kx_train, ky_train, kx_test, ky_test, num_speakers, held_out = fixed_inputs(config, working_dir, converter,
                                                                                directory, name)
    return TripletData(num_speakers, kx_train, ky_train, kx_test, ky_test, HardNegativeMiner, TripletBatcher,
                       held_out)


def describe_loss(loss) -> str:
    """'AamSoftmaxLoss margin=0.2 scale=30' for a margin loss, the class or name of any other."""
    if hasattr(loss, 'margin'):
        return f'{type(loss).__name__} margin={loss.margin:g} scale={loss.scale:g}'
    return loss if isinstance(loss, str) else type(loss).__name__


def train_triplet(config: TrainConfig) -> Path:
    """Triplet training (SGD, deep_speaker_loss) started from the best softmax checkpoint when there is one, with
    that checkpoint's architecture (else `config.width` and `config.model_options`); returns the best checkpoint's
    path (by val_loss on fixed random triplets of kx_test).

    config.mining: 'random' triplets, or 'hard' / 'semihard' negatives mined from a history of
    `config.history_size` crops re-embedded every `config.refresh_every` batches, `config.inference_batch` crops
    at a time (default `config.batch_size`: a refresh then needs less memory than a training step, at any width).
    """
    check_triplet_batch(config.batch_size)
    strategy = phase_strategy(config)
    working_dir, converter, directory = phase_inputs(config, 'triplet')
    name = MODELS[config.model_name].name
    with scratch_dir(strategy, directory) as scratch, collective_failures(strategy):
        data = triplet_data(config, working_dir, converter, directory, name)
        kx_train, ky_train, kx_test, ky_test = data.kx_train, data.ky_train, data.kx_test, data.ky_test
        seed, batch_size = worker_seed(config.seed, strategy), config.batch_size
        replicas = strategy.num_replicas_in_sync

        def new_model():
            pre_trained = working_dir.best_checkpoint('softmax', name)
            if pre_trained.exists():
                check_pretrained_held_out(pre_trained.parent, data.held_out.speakers)
                dsm = build_model(str(pre_trained), config.model_name)
                logger.info('Initialising from the softmax checkpoint %s, with its architecture.', pre_trained)
            elif config.from_scratch:
                logger.warning('No softmax checkpoint in %s: triplet training starts from random weights, as '
                               'asked.', pre_trained.parent)
                dsm = MODELS[config.model_name](width=config.width, **config.model_options)
            else:
                raise NoPretrainingError(pre_trained)
            dsm.m.compile(optimizer=keras.optimizers.SGD(learning_rate(config, TRIPLET_LEARNING_RATE, strategy),
                                                         momentum=TRIPLET_MOMENTUM),
                          loss=deep_speaker_loss)
            return dsm.m

        with strategy.scope(), precision(config.mixed_precision):
            model, initial_epoch = resumed_or_new(directory, name, new_model)
        prepared(model, strategy, config)
        if scratch is None:  # the chief.
            record_held_out(directory, data.held_out.speakers)
        callbacks = phase_callbacks(directory, working_dir.root, name, 'triplet',
                                    *monitored(data.held_out, 'val_loss', 'min'), data.held_out.callbacks,
                                    config.average_last, scratch)
        selector = random_triplets
        if config.mining != 'random':
            selector = data.miner(ky_train, config.mining, min(config.history_size, len(ky_train)),
                                  seed + initial_epoch)
            callbacks.append(MiningRefresh(selector, kx_train, config.refresh_every,
                                           config.inference_batch or batch_size))
        train_batcher = data.batcher(kx_train, ky_train, seed=seed + initial_epoch, selector=selector)
        test_batcher = data.batcher(kx_test, ky_test, seed=config.seed)
        validation = [test_batcher.get_batch(batch_size) for _ in range(TRIPLET_VALIDATION_BATCHES)]
        validation = (np.concatenate([x for x, _ in validation]), np.concatenate([y for _, y in validation]))
        validation = unsharded(tf.data.Dataset.from_tensor_slices(validation).batch(batch_size * replicas))
        logger.info('Triplet phase: %d speakers (%d held out), %s parameters, %s triplets.', data.num_speakers,
                    len(data.held_out.speakers), f'{model.count_params():,}', config.mining)
        train = training_batches(triplet_dataset(train_batcher, batch_size), config, initial_epoch)
        fit(model, initial_epoch, config.epochs, whole_blocks(train, replicas), validation,
            config.steps_per_epoch or TRIPLET_STEPS_PER_EPOCH, callbacks)
        return finish_phase(config, directory, name, scratch)
