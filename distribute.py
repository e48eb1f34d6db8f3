"""Training on several devices and machines with TensorFlow's own tf.distribute: the strategy of a --distribute
mode (none, MirroredStrategy over a machine's GPUs, MultiWorkerMirroredStrategy configured by TF_CONFIG), what only
the chief writes, batch statistics shared across replicas, triplet batches made of whole per-replica blocks, and
the precision policy (mixed_float16) models are built under.

How one distributed step equals one step on a single device with the same global batch: every replica computes
its loss as the mean over its own examples divided by the number of replicas (Keras' built-in losses do so through
keras.src.losses.loss.scale_loss_for_distribution; triplet_loss.deep_speaker_loss does it itself), the L2 weight
penalties are divided likewise (Keras' trainer), the optimizer sums the replicas' gradients, and batch
normalisation uses the statistics of the whole global batch (synchronize_batch_norm). The replicas' shards are
contiguous slices of each global batch, so a global triplet batch is built as whole [anchors; positives;
negatives] blocks, one per replica (whole_blocks).

Keras 3.15's model.fit cannot train under MultiWorkerMirroredStrategy by itself: its symbolic build reduces a
PerReplica input batch, and its training step reduces the scalar metrics along axis 0. multiworker_fit gives fit
training and test steps that reduce the metrics over all replicas, so the same fit (callbacks, checkpoints,
history, early stopping, resume) drives every strategy.

Imports tensorflow, keras and constants only.
"""

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf

from constants import (
    DISTRIBUTE_MODES,
    FINGERPRINT_HASH_CHARS,
    MIXED_PRECISION_POLICY,
    TF_CONFIG_ENV,
    WORKER_SEED_STRIDE,
)

logger = logging.getLogger(__name__)


class DistributeError(ValueError):
    """A distribution set-up that cannot work (no or a malformed TF_CONFIG, a batch that does not split into the
    replicas); the message says what is wrong."""


class ClusterConfigError(DistributeError):
    """No TF_CONFIG, or one that does not describe a cluster and this process's task in it."""


class TripletBatchError(DistributeError):
    """A per-replica triplet batch that is not a whole number of triplets."""


class WorkerLostError(RuntimeError):
    """A collective operation of multi-worker training that failed or timed out: another worker stopped."""


def default_mode() -> str:
    """'mirrored' when more than one GPU is visible, else 'none'."""
    return 'mirrored' if len(tf.config.list_physical_devices('GPU')) > 1 else 'none'


def cluster_spec() -> dict:
    """The TF_CONFIG environment variable, checked: {'cluster': {'worker': [host:port, ...], 'chief': [...]},
    'task': {'type': 'worker' or 'chief', 'index': i}}. ClusterConfigError saying what is missing or wrong."""
    text = os.environ.get(TF_CONFIG_ENV)
    if not text:
        raise ClusterConfigError(f'{TF_CONFIG_ENV} is not set; multi-worker training needs it on every machine.')
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClusterConfigError(f'{TF_CONFIG_ENV} is not JSON ({e.msg} at character {e.pos}).') from None
    cluster, task = (spec.get('cluster'), spec.get('task')) if isinstance(spec, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(hosts, list) and hosts and all(isinstance(h, str) and ':' in h for h in hosts)
            for hosts in cluster.values()):
        raise ClusterConfigError(f'{TF_CONFIG_ENV} has no "cluster" mapping each task type to a list of '
                                 f'"host:port".')
    if not isinstance(task, dict) or task.get('type') not in cluster or not isinstance(task.get('index'), int) \
            or not 0 <= task['index'] < len(cluster[task['type']]):
        raise ClusterConfigError(f'{TF_CONFIG_ENV} has no "task" {{"type": one of {sorted(cluster)}, "index": '
                                 f'its position in that list}}.')
    return spec


def make_strategy(mode: str, timeout_s: float) -> tf.distribute.Strategy:
    """The strategy of a --distribute mode: 'none' the default (one device), 'mirrored' every GPU of the machine
    (or every logical CPU device when there is no GPU), 'multiworker' the machines of TF_CONFIG, whose collective
    operations fail after `timeout_s` seconds without an answer (a worker that died). Create it before any other
    TensorFlow operation runs."""
    if mode not in DISTRIBUTE_MODES:
        raise DistributeError(f'unknown distribution mode {mode!r}; expected one of {", ".join(DISTRIBUTE_MODES)}.')
    if mode == 'none':
        return tf.distribute.get_strategy()
    if mode == 'mirrored':
        gpus = tf.config.list_logical_devices('GPU')
        if gpus:
            return tf.distribute.MirroredStrategy([device.name for device in gpus])
        # CPU devices: the default collective all-reduce can pair one layer's batch statistics with another's
        # gradients (a shape mismatch, or silently wrong values); a reduction on one device keeps them in order.
        return tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices('CPU')],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    spec = cluster_spec()
    coordinate(spec['cluster'], timeout_s)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.UnknownError as e:  # TensorFlow's gRPC server did not start: the port is taken.
        address = spec['cluster'][spec['task']['type']][spec['task']['index']]
        raise ClusterConfigError(f'this task cannot listen on {address} ({e.message.strip()}); is the port in use '
                                 f'by another process? Pick a free one in {TF_CONFIG_ENV}.') from None
    except tf.errors.DeadlineExceededError:
        raise WorkerLostError(f'not every task of {TF_CONFIG_ENV} started within {timeout_s:g} s') from None
    logging.getLogger('tensorflow').setLevel(logging.WARNING)  # it logs every all-reduce it sets up at INFO.
    return strategy


def coordinate(cluster: dict, timeout_s: float) -> None:
    """Configures the coordination service MultiWorkerMirroredStrategy would configure (its leader the first task,
    TensorFlow's own choice), with one change: a task waits at most `timeout_s` seconds for the others to start
    (TensorFlow's default: an hour), so a worker whose partner died while starting stops too. TensorFlow offers no
    public option for it: this uses its eager context's own call."""
    from tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2 import CoordinatedJob
    from tensorflow.python.distribute.multi_worker_util import coordination_leader
    from tensorflow.python.eager import context
    jobs = [CoordinatedJob(name=job, num_tasks=len(cluster[job])) for job in ('chief', 'worker') if job in cluster]
    context.context().configure_coordination_service(
        service_type='standalone', service_leader=coordination_leader(cluster),
        cluster_register_timeout_in_ms=int(1000 * timeout_s), coordinated_jobs=jobs)


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's position among the machines (0 without multi-worker training); a 'chief' task is 0 and the
    'worker' tasks follow it."""
    resolver = getattr(strategy, 'cluster_resolver', None)
    if resolver is None or resolver.task_type is None:
        return 0
    has_chief = 'chief' in resolver.cluster_spec().as_dict()
    return 0 if resolver.task_type == 'chief' else resolver.task_id + int(has_chief)


def worker_seed(seed: int, strategy: tf.distribute.Strategy) -> int:
    """The seed of this worker's batches: `seed` on worker 0, distinct ones on the others (each worker feeds its own
    replicas with its own crops)."""
    return seed + WORKER_SEED_STRIDE * worker_index(strategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the checkpoints, the CSV history and the TensorBoard logs: the only process,
    or the 'chief' task, or worker 0 of a cluster without one."""
    return worker_index(strategy) == 0


def check_triplet_batch(batch_size: int) -> None:
    """TripletBatchError unless a per-replica triplet batch `batch_size` is a whole number of triplets."""
    if batch_size % 3:
        raise TripletBatchError(f'a per-replica triplet batch of {batch_size} crops is not a whole number of '
                              f'[anchor, positive, negative] triplets.')


def whole_blocks(dataset: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """Global batches of `replicas` consecutive per-replica batches (x: (b, ...), y: (b,)) concatenated, so that
    the strategy's contiguous split gives each replica one whole batch (a whole [a; p; n] triplet block); each
    worker keeps its own stream (auto-sharding off), since a worker feeds only its own replicas."""
    if replicas > 1:
        dataset = dataset.batch(replicas, drop_remainder=True).map(
            lambda x, y: (tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0)), tf.reshape(y, [-1])))
    return unsharded(dataset)


def unsharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data auto-sharding off: every worker reads its own copy (seeded per worker)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def synchronize_batch_norm(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Makes every BatchNormalization layer of `model` normalise a training batch by the mean and variance of the
    whole global batch (one all-reduce per layer) when there is more than one replica, and by its own batch
    otherwise. Set before the first fit: Keras reads the flag when it traces the training step."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = strategy.num_replicas_in_sync > 1


@contextmanager
def precision(mixed: bool) -> Iterator[None]:
    """Models built in the block compute in float16 with float32 weights (Keras' 'mixed_float16' policy) when
    `mixed`, else in float32; the global policy is restored afterwards. Keras wraps the optimizer of a
    mixed_float16 model in a LossScaleOptimizer when it is compiled (dynamic loss scaling)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICY if mixed else 'float32')
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` trains over the machines of TF_CONFIG."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def replica_reduced(step, strategy: tf.distribute.Strategy, jit_compile: bool):
    """A Keras train or test function (iterator -> logs) that runs `step` (Keras' train_step or test_step: a batch
    -> a dict of scalar metrics) on the next distributed batch on every replica, and returns each metric as its
    mean over all replicas, the same on every worker."""
    def on_replicas(iterator):
        logs = strategy.run(step, args=(next(iterator),))
        return {name: strategy.reduce('MEAN', value, axis=None) for name, value in logs.items()}

    return tf.function(on_replicas, jit_compile=jit_compile)


@contextmanager
def collective_failures(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """For the block: WorkerLostError (one line) instead of the error of a collective operation of multi-worker
    training that failed or timed out (another worker died or stopped answering); other strategies' errors pass."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.InternalError) as e:
        if not is_multiworker(strategy):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = next((line for line in lines if 'aborted' in line), lines[0])  # names the worker that stopped.
        raise WorkerLostError(f'a collective operation failed ({type(e).__name__}: {cause[:300]})') from None


def skipped(**_) -> None:
    """Does nothing (stands in for a method)."""


@contextmanager
def multiworker_fit(model: keras.Model, strategy: tf.distribute.Strategy) -> Iterator[None]:
    """For the block (around model.fit), when `strategy` is multi-worker: the optimizer's variables created under
    the strategy, `model` trained and validated with replica_reduced steps, without Keras' symbolic build (which
    reduces a PerReplica input batch), and model.predict_on_batch (the callbacks' embedding.embed_crops) run on
    this worker alone (Keras' own concatenates every worker's outputs: 2n rows for n crops with 2 workers; models
    the callbacks build, outside the strategy's scope, are local anyway); all as before afterwards. With any other
    strategy nothing changes."""
    if not is_multiworker(strategy):
        yield
        return
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    model.train_function = replica_reduced(model.train_step, strategy, model.jit_compile)
    model.test_function = replica_reduced(model.test_step, strategy, model.jit_compile)
    model.predict_function = tf.function(lambda batches: model.predict_step(batches[0]), reduce_retracing=True)
    model._maybe_symbolic_build = skipped  # the variables are built by the first step instead.
    try:
        yield
    finally:
        del model._maybe_symbolic_build
        model.train_function = model.test_function = model.predict_function = None


def weights_digest(model: keras.Model) -> str:
    """The first FINGERPRINT_HASH_CHARS hex digits of the SHA-256 of the model's weights (as float32): equal on
    every worker of a multi-worker run, which train in lockstep."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    return digest.hexdigest()[:FINGERPRINT_HASH_CHARS]
