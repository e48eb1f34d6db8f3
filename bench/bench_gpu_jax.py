"""Training speed of the full-width models on a GPU through Keras' JAX backend: for a machine that has JAX's CUDA
build but no TensorFlow (the lent GPU machines of this project: no network, so TensorFlow's CUDA build cannot be
installed there). The same Keras models, triplet loss and optimizer as train-model's triplet phase; the step is
compiled by XLA (always, under JAX). For each model, precision (float32, mixed_float16, mixed_bfloat16) and batch:
triplet training steps and crops per second, the compile time of the first step and the peak GPU memory. Each
measurement runs in its own process, so that peak memory is its own and running out of memory ends only it.

    KERAS_BACKEND=jax python bench/bench_gpu_jax.py [--steps 20] [--big_batches 768,3072,12288] [--json FILE]

Batches are of device-resident random crops (batch, 160, 64, 1): the input pipeline is not in the step, so the
crops per second are what the GPU consumes; compare them with bench/bench_input.py on the CPU that would feed it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ('float32', 'mixed_float16', 'mixed_bfloat16')
MODEL_NAMES = ('rescnn', 'tdnn')


def measure(model_name: str, precision: str, width: float, batch: int, steps: int) -> dict:
    """One configuration, in this process: seconds per step (median of `steps` after two warm-up steps), the first
    step's seconds (tracing and XLA compilation), peak GPU bytes."""
    import jax
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from constants import NUM_FBANKS, NUM_FRAMES
    from conv_models import MODELS
    from triplet_loss import deep_speaker_loss

    keras.mixed_precision.set_global_policy(precision)
    model = MODELS[model_name](width=width).m
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=deep_speaker_loss, jit_compile=True)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32))
    y = jax.device_put(np.zeros((batch,), np.float32))
    start = time.perf_counter()
    model.train_on_batch(x, y)
    compile_s = time.perf_counter() - start
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    step = float(np.median(times))
    return {'model': MODELS[model_name].name, 'precision': precision, 'batch': batch, 'steps_per_s': 1 / step,
            'crops_per_s': batch / step, 'compile_s': compile_s, 'peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30,
            'loss': float(loss), 'device': device.device_kind, 'parameters': model.count_params()}


def child(model_name: str, precision: str, width: float, batch: int, steps: int) -> dict:
    """`measure` in a subprocess; {'error': last line} when it fails (out of memory, say)."""
    env = {**os.environ, 'KERAS_BACKEND': 'jax', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    done = subprocess.run([sys.executable, __file__, '--child', f'{model_name},{precision},{width},{batch},{steps}'],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {'model': model_name, 'precision': precision, 'batch': batch, 'error': lines[-1] if lines else '?'}
    return json.loads(done.stdout.strip().splitlines()[-1])


def record(result: dict, json_file: str | None) -> dict:
    """Prints `result` as a table row and appends it to `json_file` (one JSON object a line)."""
    click.echo(row(result))
    if json_file:
        with open(json_file, 'a') as f:
            f.write(json.dumps(result) + '\n')
    return result


def row(result: dict) -> str:
    if 'error' in result:
        return f'| {result["model"]} | {result["precision"]} | {result["batch"]} | failed: {result["error"][:80]} |'
    return (f'| {result["model"]} | {result["precision"]} | {result["batch"]} | {result["steps_per_s"]:.2f} | '
            f'{result["crops_per_s"]:.0f} | {result["peak_gib"]:.1f} GiB | {result["compile_s"]:.0f} s |')


@click.command()
@click.option('--steps', default=20, show_default=True, help='Timed steps per measurement at batch 96.')
@click.option('--big_batches', default='768,3072,12288', show_default=True,
              help='Larger batches tried in order with the fastest precision, until one does not fit.')
@click.option('--width', default=1.0, show_default=True, help='Model width (1.0: the published size).')
@click.option('--json', 'json_file', type=click.Path(dir_okay=False), help='Also append each result here.')
@click.option('--child', 'child_spec', hidden=True)
def main(steps, big_batches, width, json_file, child_spec):
    if child_spec:
        model_name, precision, child_width, batch, child_steps = child_spec.split(',')
        click.echo(json.dumps(measure(model_name, precision, float(child_width), int(batch), int(child_steps))))
        return
    click.echo(f'{time.strftime("%Y-%m-%d")}; Keras JAX backend, XLA; triplet steps on device-resident random crops; '
               f'median of {steps} steps after 2 warm-up steps')
    click.echo('| model | precision | batch | steps/s | crops/s | peak GPU memory | first step (compile) |')
    click.echo('|---|---|---|---|---|---|---|')
    fastest = {}
    for model_name in MODEL_NAMES:
        at_96 = [record(child(model_name, precision, width, 96, steps), json_file) for precision in PRECISIONS]
        fitted = [r for r in at_96 if 'error' not in r]
        fastest[model_name] = max(fitted, key=lambda r: r['crops_per_s'])['precision'] if fitted else 'float32'
    for model_name in MODEL_NAMES:
        for batch in (int(b) for b in big_batches.split(',')):
            if 'error' in record(child(model_name, fastest[model_name], width, batch, max(3, steps // 4)),
                                 json_file):
                break


if __name__ == '__main__':
    main()
