"""How far 251 speakers go with a GPU's budget: the classification phase of train-model (same Keras models, heads,
margin losses and Adam) trained on a GPU through Keras' JAX backend, for the machines this project is lent, which
have JAX's CUDA build but no TensorFlow and no network (see bench/bench_gpu_jax.py). Three steps:

    python recipes/train_gpu_jax.py pack WORKING_DIR FEATURES.npz          # here: the cache, 8-bit, ~1/4 size
    KERAS_BACKEND=jax python recipes/train_gpu_jax.py train FEATURES.npz OUT_DIR --model ecapa --channels 512 \\
        --steps 3000 [--spec_augment] [--clean_only]                      # there: OUT_DIR/<run>_<step>.npz
    python recipes/train_gpu_jax.py restore OUT_DIR/<run>_<step>.npz CHECKPOINT.keras   # here: for eval-trials

`pack` stores a working dir's feature cache (normalised fbank, float32) as uint8 (value * 16 + 128, clipped to
0..255: steps of 1/16 of a standard deviation, +-8 deviations), small enough for the 64 MiB a GPU call carries.
`train` keeps those frames on the GPU and cuts every batch there: each crop draws a speaker uniformly, one of its
utterances, and a window of NUM_FRAMES frames uniformly inside it (as `--sampler windows` does; utterances shorter
than a window are left out), optionally with SpecAugment's masks (the bands of spec_augment.py, drawn with JAX's
random numbers); Adam, learning rate SOFTMAX_LEARNING_RATE decayed by a cosine to MIN_LEARNING_RATE over --steps.
It saves the weights by layer name, float16 (a call returns files of at most 16 MiB); `restore` builds the same
model with TensorFlow here and writes the .keras file that eval-trials reads.
"""

import json
import logging
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from constants import (  # noqa: E402
    MIN_LEARNING_RATE,
    NUM_FBANKS,
    NUM_FRAMES,
    SOFTMAX_LEARNING_RATE,
    SPEC_AUGMENT_FREQ_MASKS,
    SPEC_AUGMENT_TIME_MASKS,
)

logger = logging.getLogger('train_gpu_jax')
QUANTUM = 16  # uint8 steps per standard deviation of a normalised fbank value.


@click.group()
def main():
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')


@main.command()
@click.argument('working_dir', type=click.Path(exists=True, file_okay=False))
@click.argument('features', type=click.Path(dir_okay=False))
@click.option('--degraded_fraction', default=1.0, show_default=True,
              help='Of each degraded copy (build-mfcc-cache --augment: <utterance>~<kind>.npy), keep one stretch of '
                   'this fraction of its frames, at a random place.')
def pack(working_dir, features, degraded_fraction):
    """The feature cache of WORKING_DIR as one 8-bit FEATURES.npz: frames (total, 64) uint8, lengths, labels."""
    from store import cache_listing
    cache = Path(working_dir) / 'audio-fbanks'
    listing = list(cache_listing(cache))
    speakers = sorted({cached.speaker for cached in listing})
    rng = np.random.default_rng(0)
    arrays = [stretch(np.load(cache / cached.speaker / cached.name),
                      degraded_fraction if '~' in cached.name else 1.0, rng) for cached in listing]
    frames = np.concatenate([np.clip(np.rint(a * QUANTUM + 128), 0, 255).astype(np.uint8) for a in arrays])
    np.savez_compressed(features, frames=frames, lengths=np.array([len(a) for a in arrays]),
                        labels=np.array([speakers.index(cached.speaker) for cached in listing]),
                        degraded=np.array(['~' in cached.name for cached in listing]), speakers=np.array(speakers))
    logger.info('%s: %d utterances of %d speakers, %d frames, %.1f MB.', features, len(arrays), len(speakers),
                len(frames), Path(features).stat().st_size / 1e6)


def stretch(frames: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stretch of `fraction` of `frames` (at least NUM_FRAMES of them, or all), at a random start."""
    keep = min(len(frames), max(NUM_FRAMES, int(len(frames) * fraction)))
    start = rng.integers(0, len(frames) - keep + 1)
    return frames[start:start + keep]


def band_keep(key, batch: int, length: int, masks: int, widest: int):
    """1.0 outside and 0.0 inside `masks` bands per row, each of a width drawn from 0..`widest` at a uniform start:
    (batch, length) float32 (spec_augment.band_keep with JAX's random numbers)."""
    import jax
    import jax.numpy as jnp
    width_key, start_key = jax.random.split(key)
    widths = jax.random.randint(width_key, (batch, masks), 0, widest + 1)
    starts = (jax.random.uniform(start_key, (batch, masks)) * (length - widths + 1)).astype(jnp.int32)
    positions = jnp.arange(length)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return 1.0 - jnp.any(inside, axis=1).astype(jnp.float32)


def batch_maker(frames, lengths: np.ndarray, labels: np.ndarray, batch: int, spec_augment: bool, seed: int):
    """A function of the step number returning (crops (batch, NUM_FRAMES, 64, 1) float32, labels (batch,)) cut on
    the device from `frames` (uint8, on the device)."""
    import jax
    import jax.numpy as jnp
    starts_of = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    usable = np.flatnonzero(lengths >= NUM_FRAMES)
    by_speaker = [usable[labels[usable] == s] for s in range(labels.max() + 1)]
    speakers = np.array([s for s, u in enumerate(by_speaker) if len(u)])
    rng = np.random.default_rng(seed)
    offsets = jnp.arange(NUM_FRAMES)

    @jax.jit
    def cut(starts, key):
        crops = (jnp.take(frames, starts[:, None] + offsets, axis=0).astype(jnp.float32) - 128) / QUANTUM
        if spec_augment:
            time_key, freq_key = jax.random.split(key)
            crops = crops * (band_keep(time_key, batch, NUM_FRAMES, *SPEC_AUGMENT_TIME_MASKS)[:, :, None] *
                             band_keep(freq_key, batch, NUM_FBANKS, *SPEC_AUGMENT_FREQ_MASKS)[:, None, :])
        return crops[..., None]

    def make(step: int):
        chosen = rng.choice(speakers, batch)
        utterances = np.array([rng.choice(by_speaker[s]) for s in chosen])
        starts = starts_of[utterances] + rng.integers(0, lengths[utterances] - NUM_FRAMES + 1)
        return cut(jnp.asarray(starts), jax.random.PRNGKey(seed * 1_000_003 + step)), jnp.asarray(chosen)
    return make


@main.command()
@click.argument('features', type=click.Path(exists=True, dir_okay=False))
@click.argument('out_dir', type=click.Path(file_okay=False))
@click.option('--model', 'model_name', default='ecapa', show_default=True, help="train-model's --model.")
@click.option('--channels', default=512, show_default=True, help='ECAPA C.')
@click.option('--width', default=1.0, show_default=True)
@click.option('--loss', default='aamsoftmax', show_default=True, help="train-model's --loss (default margin, scale).")
@click.option('--batch', default=256, show_default=True)
@click.option('--steps', default=3000, show_default=True)
@click.option('--save_at', default='', help='Steps to save at, comma-separated (the last step always).')
@click.option('--spec_augment', is_flag=True)
@click.option('--precision', default='mixed_bfloat16', show_default=True, help='A Keras dtype policy.')
@click.option('--clean_only', is_flag=True, help='Leave out the degraded copies.')
@click.option('--seed', default=1, show_default=True)
@click.option('--max_seconds', default=0.0, help='Save and stop after this many seconds of training (0: never).')
@click.option('--name', default='', help='Run name (default: from the options).')
def train(features, out_dir, model_name, channels, width, loss, batch, steps, save_at, spec_augment, precision,
          clean_only, seed, max_seconds, name):
    """Trains the classification phase on FEATURES.npz; writes OUT_DIR/<name>_<step>.npz and <name>.json."""
    import jax
    import keras

    from losses import classification_loss
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)
    data = np.load(features)
    lengths, labels = data['lengths'], data['labels']
    if clean_only:
        lengths = np.where(data['degraded'], 0, lengths)  # too short for a window: never drawn
    options = {'width': width, **({'channels': channels} if model_name == 'ecapa' else {})}
    run = {'model': model_name, 'options': options, 'loss': loss, 'speakers': int(labels.max()) + 1}
    speaker_model = classifier(run)
    model = speaker_model.m
    schedule = keras.optimizers.schedules.CosineDecay(SOFTMAX_LEARNING_RATE, steps,
                                                      alpha=MIN_LEARNING_RATE / SOFTMAX_LEARNING_RATE)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=classification_loss(loss), metrics=['accuracy'],
                  jit_compile=True)
    make = batch_maker(jax.device_put(data['frames']), lengths, labels, batch, spec_augment, seed)
    name = name or (f'{speaker_model.name}-{loss}{"" if clean_only else "-aug"}{"-specaug" if spec_augment else ""}'
                    f'-seed{seed}')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saves = {int(s) for s in save_at.split(',') if s} | {steps}
    log, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss_value, accuracy = model.train_on_batch(*make(step))
        if step == 1:
            compiled = time.perf_counter() - start
            logger.info('%s: %d parameters; first step (compilation) %.1f s.', name, model.count_params(), compiled)
        over = max_seconds and time.perf_counter() - start > max_seconds
        if step % 250 == 0 or step in saves or over:
            log.append({'step': step, 'loss': float(loss_value), 'accuracy': float(accuracy),
                        'seconds': time.perf_counter() - start})
            logger.info('%s', log[-1])
        if step in saves or over:
            np.savez(out / f'{name}_{step}.npz', **float16_weights(model))
        if over:
            logger.warning('%s: --max_seconds %s reached; saved and stopped at step %d.', name, max_seconds, step)
            break
    (out / f'{name}.json').write_text(json.dumps({
        **run, 'batch': batch, 'steps': steps, 'precision': precision, 'spec_augment': spec_augment,
        'clean_only': clean_only, 'seed': seed, 'compile_s': compiled, 'device': jax.devices()[0].device_kind,
        'log': log}, indent=1))


def classifier(run: dict):
    """The SpeakerModel with a classification head that a run trains: run['model'] (a --model name) built with
    run['options'], a head over run['speakers'] for run['loss']."""
    from conv_models import MODELS
    from losses import head_of
    return MODELS[run['model']](include_softmax=True, num_speakers_softmax=run['speakers'], head=head_of(run['loss']),
                                **run['options'])


def float16_weights(model) -> dict[str, np.ndarray]:
    """Every weight of `model` by '<layer name>/<index in layer.weights>', as float16."""
    return {f'{layer.name}/{i}': np.asarray(w).astype(np.float16)
            for layer in model.layers for i, w in enumerate(layer.weights)}


def restored_model(weights: Path):
    """The model of `weights` (<name>_<step>.npz of train, <name>.json beside it) with those weights, float32."""
    run = json.loads(weights.with_name(weights.stem.rsplit('_', 1)[0] + '.json').read_text())
    model = classifier(run).m
    saved = np.load(weights)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([saved[f'{layer.name}/{i}'].astype(np.float32) for i in range(len(layer.weights))])
    return model


@main.command()
@click.argument('weights', type=click.Path(exists=True, dir_okay=False))
@click.argument('checkpoint', type=click.Path(dir_okay=False))
def restore(weights, checkpoint):
    """WEIGHTS (<name>_<step>.npz of train, with <name>.json beside it) as a .keras CHECKPOINT for eval-trials."""
    restored_model(Path(weights)).save(checkpoint)
    logger.info('%s: written from %s.', checkpoint, weights)


if __name__ == '__main__':
    main()
