"""Distributed training speed. On a CPU (default): the overhead of a MirroredStrategy over 2 logical CPU devices
against no strategy, triplet training steps per second at the same global batch, and the FLOPs of one training
step of the full-width ResCNN and TDNN with the seconds such a step takes on this CPU. With --gpu: on the visible
GPUs (all of them under a MirroredStrategy when there are several), for the full-width ResCNN and TDNN in
float32, mixed precision and mixed precision + XLA: steps and crops per second at per-replica batch 96 and at the
largest batch that fits, peak GPU memory, and the share of the step spent waiting for the input pipeline.

    .venv/bin/python bench/bench_distribute.py [--width 0.25] [--global_batch 24] [--steps 5] [--flops_steps 2]
    .venv/bin/python bench/bench_distribute.py --gpu [--steps 20]

FLOPs: TensorFlow's profiler counts the forward pass of one crop (convolutions, matrix products, element-wise
ops); a training step is taken as 3 forward passes (the backward pass costs about two) times the batch.
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import click  # noqa: E402
import tensorflow as tf  # noqa: E402

GPU_MODE = '--gpu' in sys.argv
if not GPU_MODE:  # logical devices must be set before TensorFlow initialises.
    CPU = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batcher import TripletBatcher  # noqa: E402
from constants import BATCH_SIZE, NUM_FBANKS, NUM_FRAMES  # noqa: E402
from conv_models import MODELS  # noqa: E402
from distribute import make_strategy, precision, synchronize_batch_norm, whole_blocks  # noqa: E402
from train import triplet_dataset  # noqa: E402
from triplet_loss import deep_speaker_loss  # noqa: E402

SPEAKERS = 50  # speakers of the random crops the batches are drawn from.
CROPS_PER_SPEAKER = 8
PRECISIONS = {'float32': (False, False), 'mixed': (True, False), 'mixed+XLA': (True, True)}


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training batch after the first (tracing and warm-up excluded)."""

    def __init__(self):
        super().__init__()
        self.times, self.start = [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch > 0:
            self.times.append(time.perf_counter() - self.start)


def triplet_model(strategy, model_name: str, width: float, mixed: bool = False, jit: bool = False) -> keras.Model:
    with strategy.scope(), precision(mixed):
        model = MODELS[model_name](width=width).m
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=deep_speaker_loss, jit_compile=jit)
    synchronize_batch_norm(model, strategy)
    return model


def random_batcher(seed: int = 0) -> TripletBatcher:
    rng = np.random.default_rng(seed)
    kx = rng.standard_normal((SPEAKERS * CROPS_PER_SPEAKER, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32)
    return TripletBatcher(kx, np.repeat(np.arange(SPEAKERS), CROPS_PER_SPEAKER).astype(np.int32), seed=seed)


def seconds_per_step(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    """Median wall time of a training step over `steps` steps after a warm-up one."""
    timer = StepTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
    return float(np.median(timer.times))


def forward_flops(model_name: str) -> int:
    """Floating-point operations of one full-width forward pass of one crop (TensorFlow's profiler)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    model = MODELS[model_name](width=1.0).m
    spec = tf.TensorSpec((1, NUM_FRAMES, NUM_FBANKS, 1), tf.float32)
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(forward)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options['output'] = 'none'
    return tf.compat.v1.profiler.profile(graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd='op',
                                         options=options).total_float_ops


def cpu_report(width: float, global_batch: int, steps: int, flops_steps: int) -> None:
    none, mirrored = make_strategy('none', 60.0), make_strategy('mirrored', 60.0)
    per_replica = global_batch // mirrored.num_replicas_in_sync
    click.echo(f'MirroredStrategy over {mirrored.num_replicas_in_sync} logical CPU devices vs none: ResCNN width '
               f'{width:g}, triplet steps, global batch {global_batch} ({per_replica} per replica), median of {steps}')
    single = seconds_per_step(triplet_model(none, 'rescnn', width), triplet_dataset(random_batcher(), global_batch),
                              steps)
    distributed = seconds_per_step(triplet_model(mirrored, 'rescnn', width), whole_blocks(
        triplet_dataset(random_batcher(), per_replica), mirrored.num_replicas_in_sync), steps)
    click.echo(f'| none | {1 / single:.2f} steps/s | {global_batch / single:.1f} crops/s |')
    click.echo(f'| mirrored, 2 logical CPUs | {1 / distributed:.2f} steps/s | {global_batch / distributed:.1f} crops/s '
               f'| overhead {100 * (distributed / single - 1):+.0f} % |')
    for model_name in ('rescnn', 'tdnn'):
        flops = 3 * forward_flops(model_name) * BATCH_SIZE
        step = seconds_per_step(triplet_model(none, model_name, 1.0), triplet_dataset(random_batcher(), BATCH_SIZE),
                                flops_steps)
        click.echo(f'| {MODELS[model_name].name} width 1 | {flops / 1e9:.0f} GFLOP per training step of {BATCH_SIZE} | '
                   f'{step:.2f} s on this CPU | {flops / step / 1e9:.1f} GFLOP/s |')


def largest_batch(model_name: str, strategy, mixed: bool, jit: bool, start: int) -> int:
    """The largest per-replica batch (a multiple of 3, doubling from `start`) whose training step does not run out
    of GPU memory."""
    fits, batch = start, start
    while True:
        batch *= 2
        try:
            model = triplet_model(strategy, model_name, 1.0, mixed, jit)
            seconds_per_step(model, whole_blocks(triplet_dataset(random_batcher(), batch),
                                                 strategy.num_replicas_in_sync), 1)
        except tf.errors.ResourceExhaustedError:
            return fits
        fits = batch
        keras.backend.clear_session()


def gpu_row(model_name: str, strategy, name: str, batch: int, steps: int) -> str:
    mixed, jit = PRECISIONS[name]
    replicas = strategy.num_replicas_in_sync
    keras.backend.clear_session()
    for device in range(len(tf.config.list_physical_devices('GPU'))):
        tf.config.experimental.reset_memory_stats(f'GPU:{device}')
    model = triplet_model(strategy, model_name, 1.0, mixed, jit)
    real = seconds_per_step(model, whole_blocks(triplet_dataset(random_batcher(), batch), replicas), steps)
    cached = seconds_per_step(model, whole_blocks(triplet_dataset(random_batcher(), batch), replicas).take(1)
                              .cache().repeat(), steps)
    peak = max(tf.config.experimental.get_memory_info(f'GPU:{device}')['peak']
               for device in range(len(tf.config.list_physical_devices('GPU'))))
    return (f'| {MODELS[model_name].name} | {name} | {batch} | {1 / real:.2f} | {batch * replicas / real:.0f} | '
            f'{peak / 2 ** 30:.1f} GiB | {100 * max(0.0, 1 - cached / real):.0f} % |')


def gpu_report(steps: int) -> None:
    gpus = tf.config.list_physical_devices('GPU')
    if not gpus:
        raise click.ClickException('--gpu: TensorFlow sees no GPU; install the CUDA build (./deep-speaker setup '
                                   '--gpu).')
    strategy = make_strategy('mirrored' if len(gpus) > 1 else 'none', 60.0)
    names = ', '.join(tf.config.experimental.get_device_details(g).get('device_name', g.name) for g in gpus)
    click.echo(f'{names}; {strategy.num_replicas_in_sync} replica(s); {time.strftime("%Y-%m-%d")}; median of {steps} '
               f'steps; input wait = 1 - (step on one cached batch) / (step on the triplet pipeline)')
    click.echo('| model | precision | per-replica batch | steps/s | crops/s | peak GPU memory | input wait |')
    click.echo('|---|---|---|---|---|---|---|')
    for model_name in ('rescnn', 'tdnn'):
        for name, (mixed, jit) in PRECISIONS.items():
            click.echo(gpu_row(model_name, strategy, name, BATCH_SIZE, steps))
            largest = largest_batch(model_name, strategy, mixed, jit, BATCH_SIZE)
            if largest > BATCH_SIZE:
                click.echo(gpu_row(model_name, strategy, name, largest, steps))


@click.command()
@click.option('--gpu', is_flag=True, help='Measure on the visible GPUs (see the module docstring).')
@click.option('--width', default=0.25, show_default=True, help='CPU: ResCNN width of the overhead comparison.')
@click.option('--global_batch', default=24, show_default=True, help='CPU: crops per step, both runs (even, /6).')
@click.option('--steps', default=5, show_default=True, help='Timed steps per measurement (after a warm-up one).')
@click.option('--flops_steps', default=2, show_default=True, help='CPU: timed full-width steps per model.')
def main(gpu, width, global_batch, steps, flops_steps):
    if gpu:
        gpu_report(steps)
    else:
        cpu_report(width, global_batch, steps, flops_steps)


if __name__ == '__main__':
    main()
