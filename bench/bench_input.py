"""Training input at scale, measured on generated feature caches (random float32 arrays of realistic lengths:
content does not change throughput or memory):

    fake-cache   a cache of N utterances (4-12 s each, 100 per speaker) in a working dir, as build-mfcc-cache lays it
    throughput   input alone (no model): crops/s of the window sampler (one thread, and its tf.data pipeline) and of
                 triplet batches, beside the crops/s a ResCNN training step consumes at each width, in one run
    rss          per corpus size: the pack (time, peak RSS) and the peak RSS of a short softmax and triplet training
                 run with --sampler windows, each in its own process (ru_maxrss of the child)
    rss-store    the same training runs on a store written directly at any size, VoxCeleb2's included: its index
                 is real, its frames file sparse (zeros, no disk used), and there is no cache to check it against
    precision    float16 against float32 frames on a real cache: feature error and shipped-model embeddings

    .venv/bin/python bench/bench_input.py rss --utterances 1000 --utterances 30000
    .venv/bin/python bench/bench_input.py throughput WORKING_DIR --width 1.0 --width 0.25
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import click  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from constants import BATCH_SIZE, CACHE_FORMAT, CACHE_FORMAT_FILE, NUM_FBANKS, NUM_FRAMES  # noqa: E402
from workdir import WorkingDir  # noqa: E402

logger = logging.getLogger('bench_input')
FRAMES_PER_SECOND = 100
UTTERANCE_SECONDS = (4, 12)


def write_fake_cache(working_dir: Path, utterances: int, per_speaker: int, seed: int) -> int:
    """A cache of `utterances` random (frames, NUM_FBANKS) float32 arrays of 4-12 s, `per_speaker` per speaker;
    returns the total frames."""
    rng = np.random.default_rng(seed)
    cache = WorkingDir.of(working_dir).cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    (cache / CACHE_FORMAT_FILE).write_text(CACHE_FORMAT + '\n')
    lengths = rng.integers(UTTERANCE_SECONDS[0] * FRAMES_PER_SECOND, UTTERANCE_SECONDS[1] * FRAMES_PER_SECOND + 1,
                           size=utterances)
    block = rng.standard_normal((int(lengths.max()) * 4, NUM_FBANKS)).astype(np.float32)
    for i, length in enumerate(lengths):
        speaker = cache / f'spk{i // per_speaker:05d}'
        speaker.mkdir(exist_ok=True)
        start = int(rng.integers(len(block) - length))
        np.save(speaker / f'video%2Futt{i:07d}.wav.npy', block[start:start + length])
    return int(lengths.sum())


def run_child(args: list[str]) -> tuple[float, float, str]:
    """Runs a command; returns (peak RSS in MB of the child, wall seconds, its output); raises when it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise click.ClickException(f'{" ".join(args)} failed:\n{output[-3000:]}')
    return usage.ru_maxrss / 1024, time.perf_counter() - start, output


@click.group()
def main():
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')


@main.command('fake-cache')
@click.argument('working_dir', type=click.Path(file_okay=False))
@click.option('--utterances', default=1000, show_default=True)
@click.option('--per_speaker', default=100, show_default=True)
@click.option('--seed', default=0, show_default=True)
def fake_cache(working_dir, utterances, per_speaker, seed):
    """Writes a generated cache into WORKING_DIR/audio-fbanks."""
    frames = write_fake_cache(Path(working_dir), utterances, per_speaker, seed)
    click.echo(f'{utterances} utterances, {frames / FRAMES_PER_SECOND / 3600:.1f} h, '
               f'{frames * NUM_FBANKS * 4 / 1e9:.2f} GB of float32 frames')


def crops_per_second(batches, count: int) -> float:
    """Crops per second of the iterator `batches` (of (crops, labels)) over `count` batches, after a warm-up
    batch; the iterator is dropped afterwards, so that no prefetching thread of it runs during the next timing."""
    next(batches)
    start, crops = time.perf_counter(), 0
    for _ in range(count):
        crops += len(next(batches)[0])
    return crops / (time.perf_counter() - start)


def sampler_batches(sampler, batch_size: int):
    for number in range(10**9):
        yield sampler.batch(number, batch_size)


def triplet_batches(batcher, batch_size: int):
    while True:
        yield batcher.get_batch(batch_size)


def model_crops_per_second(width: float, batch_size: int, num_speakers: int, steps: int) -> float:
    """Crops per second one ResCNN softmax training step consumes on this machine (after a warm-up step)."""
    from conv_models import MODELS
    dsm = MODELS['rescnn'](include_softmax=True, num_speakers_softmax=num_speakers, width=width)
    dsm.m.compile(optimizer='adam', loss='sparse_categorical_crossentropy')
    rng = np.random.default_rng(0)
    crops = rng.standard_normal((batch_size, NUM_FRAMES, NUM_FBANKS, 1)).astype(np.float32)
    labels = rng.integers(num_speakers, size=batch_size)
    dsm.m.train_on_batch(crops, labels)
    start = time.perf_counter()
    for _ in range(steps):
        dsm.m.train_on_batch(crops, labels)
    return steps * batch_size / (time.perf_counter() - start)


def fixed_crop_rows(split, batch_size: int, batches: int, per_speaker: int = 20) -> list[tuple[str, float]]:
    """For comparison, the fixed crops' paths (train.softmax_dataset, batcher.TripletBatcher) on a kx_train-like
    memory map of `per_speaker` crops per speaker (windows of the store) written in a temporary directory."""
    from batcher import TripletBatcher
    from sampler import WindowSampler
    from train import softmax_dataset, triplet_dataset
    sampler = WindowSampler(split.store, split.train, 'balanced', seed=1)
    count = len(sampler.speakers) * per_speaker
    with tempfile.TemporaryDirectory(prefix='bench-kx-') as tmp:
        kx = np.lib.format.open_memmap(Path(tmp) / 'kx.npy', mode='w+', dtype=np.float32,
                                       shape=(count, NUM_FRAMES, NUM_FBANKS, 1))
        ky = np.repeat(sampler.speakers, per_speaker).astype(np.int32)  # as build-keras-inputs lays them out.
        for number, start in enumerate(range(0, count, batch_size)):
            kx[start:start + batch_size] = sampler.batch(number, min(batch_size, count - start))[0]
        kx.flush()
        kx = np.load(Path(tmp) / 'kx.npy', mmap_mode='r')
        return [('fixed crops, softmax (train.softmax_dataset over a kx_train memory map)',
                 crops_per_second(softmax_dataset(kx, ky, batch_size, seed=0).as_numpy_iterator(), batches)),
                ('fixed crops, random triplets (batcher.TripletBatcher, train.triplet_dataset)',
                 crops_per_second(triplet_dataset(TripletBatcher(kx, ky, seed=0), batch_size).as_numpy_iterator(),
                                  batches))]


@main.command()
@click.argument('working_dir', type=click.Path(exists=True, file_okay=False))
@click.option('--batches', default=300, show_default=True, help='Batches timed per input path.')
@click.option('--batch_size', default=BATCH_SIZE, show_default=True)
@click.option('--width', 'widths', multiple=True, type=float, default=(1.0, 0.25), show_default=True)
@click.option('--steps', default=3, show_default=True, help='Training steps timed per width.')
def throughput(working_dir, batches, batch_size, widths, steps):
    """Input crops/s of the window sampler and the model's consumption, side by side (packs the cache first when
    there is no store)."""
    from sampler import WindowCrops, WindowSampler, WindowTripletBatcher, training_split
    from store import open_for_training, pack_store
    from train import triplet_dataset
    if not WorkingDir.of(working_dir).packed_dir.exists():
        pack_store(working_dir)
    split = training_split(open_for_training(working_dir), seed=0)
    sampler = WindowSampler(split.store, split.train, 'balanced', seed=0)
    crops = WindowCrops(split.store, split.train, np.random.default_rng(0))
    triplets = WindowTripletBatcher(crops, crops.labels, seed=0)
    rows = [('softmax windows, one thread (WindowSampler.batch)', crops_per_second(sampler_batches(sampler, batch_size),
                                                                                   batches)),
            ('softmax windows, tf.data: parallel reads, prefetch (WindowSampler.dataset)',
             crops_per_second(sampler.dataset(batch_size).as_numpy_iterator(), batches)),
            ('random triplets of windows, one thread (WindowTripletBatcher.get_batch)',
             crops_per_second(triplet_batches(triplets, batch_size), batches)),
            ('random triplets of windows, tf.data: parallel reads, prefetch (train.triplet_dataset)',
             crops_per_second(triplet_dataset(triplets, batch_size).as_numpy_iterator(), batches))]
    rows += fixed_crop_rows(split, batch_size, batches)
    rows += [(f'ResCNN width {width:g}: training step (consumption)',
              model_crops_per_second(width, batch_size, len(split.store.speakers), steps)) for width in widths]
    click.echo(f'{split.store.num_utterances:,} utterances, batch {batch_size}, {os.cpu_count()} CPUs\n')
    click.echo('| path | crops/s |\n|---|---:|')
    for name, rate in rows:
        click.echo(f'| {name} | {rate:,.0f} |')


@main.command()
@click.option('--utterances', 'sizes', multiple=True, type=int, default=(1000, 30000), show_default=True)
@click.option('--per_speaker', default=100, show_default=True)
@click.option('--steps', default=3, show_default=True, help='Training steps per phase.')
@click.option('--width', default=0.0625, show_default=True)
@click.option('--keep', is_flag=True, help='Keep the generated working dirs (their path is logged).')
def rss(sizes, per_speaker, steps, width, keep):
    """Pack time and peak RSS, and the peak RSS of both training phases with --sampler windows, per corpus size."""
    tmp = Path(tempfile.mkdtemp(prefix='bench-input-'))
    logger.info('Working dirs under %s', tmp)
    python = [sys.executable, 'cli.py']
    click.echo('| utterances | hours | store GB | index MB | pack s | pack RSS MB | softmax RSS MB | '
               'triplet RSS MB |\n|---:|---:|---:|---:|---:|---:|---:|---:|')
    for size in sizes:
        wd = tmp / f'wd{size}'
        frames = write_fake_cache(wd, size, per_speaker, seed=size)
        pack_rss, pack_seconds, _ = run_child(python + ['build-packed-store', '--working_dir', str(wd)])
        softmax_rss, triplet_rss = training_rss(wd, steps, width)
        store_bytes = (wd / 'packed' / 'frames.npy').stat().st_size
        index_bytes = (wd / 'packed' / 'index.npz').stat().st_size
        click.echo(f'| {size:,} | {frames / FRAMES_PER_SECOND / 3600:,.1f} | {store_bytes / 1e9:.2f} | '
                   f'{index_bytes / 1e6:.2f} | {pack_seconds:.1f} | {pack_rss:,.0f} | {softmax_rss:,.0f} | '
                   f'{triplet_rss:,.0f} |')
        if not keep:
            shutil.rmtree(wd)


def training_rss(working_dir: Path, steps: int, width: float) -> tuple[float, float]:
    """Peak RSS (MB) of a softmax then a triplet (semihard mining) run of `steps` steps with --sampler windows."""
    common = ['--working_dir', str(working_dir), '--sampler', 'windows', '--epochs', '1', '--steps_per_epoch',
              str(steps), '--width', str(width)]
    softmax_rss, _, _ = run_child([sys.executable, 'cli.py', 'train-model', '--pre_training_phase', *common])
    triplet_rss, _, _ = run_child([sys.executable, 'cli.py', 'train-model', '--no_pre_training_phase',
                                   '--triplet_mining', 'semihard', *common])
    return softmax_rss, triplet_rss


def write_sparse_store(working_dir: Path, utterances: int, speakers: int, seed: int) -> int:
    """A packed store of `utterances` of 4-12 s over `speakers` speakers written directly: real index and meta,
    frames.npy allocated but never written (a sparse file of zeros). Returns the total frames."""
    from constants import PACKED_FORMAT
    from store import FRAMES, INDEX, META, UTTERANCES
    rng = np.random.default_rng(seed)
    lengths = rng.integers(UTTERANCE_SECONDS[0] * FRAMES_PER_SECOND, UTTERANCE_SECONDS[1] * FRAMES_PER_SECOND + 1,
                           size=utterances).astype(np.int32)
    labels = np.sort(rng.integers(speakers, size=utterances)).astype(np.int32)
    directory = WorkingDir.of(working_dir).packed_dir
    directory.mkdir(parents=True)
    frames = np.lib.format.open_memmap(directory / FRAMES, mode='w+', dtype=np.float16,
                                       shape=(int(lengths.sum(dtype=np.int64)), NUM_FBANKS))
    del frames
    np.savez(directory / INDEX, offsets=np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]),
             lengths=lengths, labels=labels)
    (directory / UTTERANCES).write_text(''.join(f'spk{s:05d}/utt{i:07d}\n' for i, s in enumerate(labels)))
    (directory / META).write_text(json.dumps({'format': PACKED_FORMAT, 'fingerprint': 'sparse', 'dtype': 'float16',
                                              'utterances': utterances, 'frames': int(lengths.sum(dtype=np.int64)),
                                              'speakers': [f'spk{s:05d}' for s in range(speakers)]}))
    return int(lengths.sum(dtype=np.int64))


@main.command('rss-store')
@click.option('--utterances', 'sizes', multiple=True, type=int, default=(1000, 30000, 1092009), show_default=True)
@click.option('--speakers', 'speaker_counts', multiple=True, type=int, default=(10, 300, 5994), show_default=True,
              help='Speakers of each size, in the same order.')
@click.option('--steps', default=3, show_default=True, help='Training steps per phase.')
@click.option('--width', default=0.0625, show_default=True)
def rss_store(sizes, speaker_counts, steps, width):
    """Peak RSS of both training phases with --sampler windows on stores written directly (sparse frames)."""
    tmp = Path(tempfile.mkdtemp(prefix='bench-store-'))
    click.echo('| utterances | speakers | hours | index MB | softmax RSS MB | triplet RSS MB |\n'
               '|---:|---:|---:|---:|---:|---:|')
    for size, speakers in zip(sizes, speaker_counts, strict=True):
        wd = tmp / f'wd{size}'
        frames = write_sparse_store(wd, size, speakers, seed=size)
        softmax_rss, triplet_rss = training_rss(wd, steps, width)
        index_bytes = (wd / 'packed' / 'index.npz').stat().st_size
        click.echo(f'| {size:,} | {speakers:,} | {frames / FRAMES_PER_SECOND / 3600:,.0f} | {index_bytes / 1e6:.1f} | '
                   f'{softmax_rss:,.0f} | {triplet_rss:,.0f} |')
        shutil.rmtree(wd)


@main.command()
@click.argument('working_dir', type=click.Path(exists=True, file_okay=False))
def precision(working_dir):
    """Packs WORKING_DIR's cache as float16 and float32 (in a temporary copy) and compares the frames and the
    shipped model's embeddings of each utterance's centre crop."""
    from checkpoints import build_model
    from constants import DEFAULT_CHECKPOINT
    from embedding import embed_crops
    from store import pack_store
    tmp = Path(tempfile.mkdtemp(prefix='bench-precision-'))
    stores = {}
    for dtype in ('float16', 'float32'):
        shutil.copytree(WorkingDir.of(working_dir).cache_dir, tmp / dtype / 'audio-fbanks')
        stores[dtype] = pack_store(tmp / dtype, dtype)
    exact = np.asarray(stores['float32'].frames)
    error = np.abs(np.asarray(stores['float16'].frames, dtype=np.float32) - exact)
    model = build_model(DEFAULT_CHECKPOINT).m
    starts = np.maximum(stores['float32'].lengths - NUM_FRAMES, 0) // 2
    utterances = np.arange(len(starts))
    embeddings = {dtype: embed_crops(model, store.read_windows(utterances, starts, NUM_FRAMES))
                  for dtype, store in stores.items()}
    cosines = np.sum(embeddings['float16'] * embeddings['float32'], axis=1)
    scores = {dtype: e @ e.T for dtype, e in embeddings.items()}
    change = np.abs(scores['float16'] - scores['float32']).max()
    click.echo(f'{len(utterances)} utterances, {len(exact):,} frames: float16 feature error max {error.max():.2e}, '
               f'mean {error.mean():.2e} (feature std {exact.std():.2f}); embeddings float16 vs float32: cosine '
               f'min {cosines.min():.6f}; largest change of a pair score {change:.2e}')
    shutil.rmtree(tmp)


if __name__ == '__main__':
    main()
