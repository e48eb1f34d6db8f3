"""Times the toolkit on this machine: embedding the sample files with embedding.Embedder (decoding, silence
trimming, fbank and windows included, model loading and the first call's tracing excluded) as times real time, split
into features and model; the exported SavedModel and TFLite models' size and per-file latency; identification of one
query against many enrolled profiles (one matrix product and a top-k).

    .venv/bin/python bench/bench_toolkit.py --checkpoint_file models/ResCNN-w0.25-librispeech100.keras \\
        [--audio_dir samples/LibriSpeech/test-other] [--full_width 1.0] [--profiles 10000] [--repeats 3]

The full-width model is random-initialised (its speed does not depend on its weights).
"""

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import click  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constants import AUDIO_EXTENSIONS, EMBEDDING_SIZE  # noqa: E402
from conv_models import DeepSpeakerModel  # noqa: E402
from embedding import Embedder, utterance_windows  # noqa: E402
from export import directory_size, export_model, load_savedmodel_embedder, load_tflite_embedder  # noqa: E402
from features import read_audio, read_features  # noqa: E402

logger = logging.getLogger('bench_toolkit')


def audio_files(directory: str) -> list[Path]:
    return sorted(p for p in Path(directory).rglob('*') if p.suffix in AUDIO_EXTENSIONS)


def seconds_of_audio(files: list[Path]) -> float:
    return sum(sf.info(str(f)).duration for f in files)


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def embedding_speed(embedder: Embedder, files: list[Path], audio_seconds: float, repeats: int) -> dict:
    """× real time of embed_files (best and median of `repeats` runs: other jobs only ever slow a run down), and
    the best split: features of every file, then the model on all their windows."""
    embedder.embed_files(files[:2])  # traces the predict function: not part of the measurement.
    totals, features_times, model_times = [], [], []
    for _ in range(repeats):
        totals.append(timed(embedder.embed_files, files)[0])
        features_time, windows = timed(lambda: [utterance_windows(read_features(str(f))) for f in files])
        features_times.append(features_time)
        model_times.append(timed(embedder.pooled, windows)[0])
    return {'seconds_best': round(min(totals), 2), 'x_real_time_best': round(audio_seconds / min(totals), 1),
            'x_real_time_median': round(audio_seconds / float(np.median(totals)), 1),
            'features_seconds_best': round(min(features_times), 2), 'model_seconds_best': round(min(model_times), 2),
            'windows': int(sum(len(w) for w in windows))}


def exported_latency(embedder: Embedder, files: list[Path], directory: Path) -> dict:
    """Size on disk and milliseconds per file (PCM already decoded) of the SavedModel and the TFLite export."""
    signals = [read_audio(str(f)) for f in files]
    results = {}
    for export_format, load in (('savedmodel', load_savedmodel_embedder), ('tflite', load_tflite_embedder)):
        out = export_model(embedder.model, directory / export_format, export_format)
        embed = load(out)
        embed(signals[0])  # first call: graph set-up, not measured.
        times = [timed(embed, signal)[0] for signal in signals]
        results[export_format] = {'megabytes': round(directory_size(out) / 1e6, 2),
                                  'ms_per_file_mean': round(1000 * float(np.mean(times)), 1),
                                  'ms_per_file_median': round(1000 * float(np.median(times)), 1)}
    return results


def identification_ms(num_profiles: int, queries: int = 1000, top_k: int = 5) -> dict:
    """Milliseconds per query: cosine scores against `num_profiles` unit profiles (one matrix-vector product) and
    the top-k of them, one query at a time."""
    rng = np.random.default_rng(0)
    profiles = rng.standard_normal((num_profiles, EMBEDDING_SIZE)).astype(np.float32)
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    queries_array = rng.standard_normal((queries, EMBEDDING_SIZE)).astype(np.float32)
    times, found = [], np.empty((queries, top_k), dtype=np.int64)
    for number, query in enumerate(queries_array):
        start = time.perf_counter()
        scores = profiles @ query
        best = np.argpartition(-scores, top_k)[:top_k]
        found[number] = best[np.argsort(-scores[best])]
        times.append(time.perf_counter() - start)
    assert np.all(found[:, 0] == np.argmax(queries_array @ profiles.T, axis=1))
    return {'profiles': num_profiles, 'ms_per_query_median': round(1000 * float(np.median(times)), 3),
            'ms_per_query_mean': round(1000 * float(np.mean(times)), 3)}


@click.command()
@click.option('--checkpoint_file', required=True, type=click.Path(exists=True, dir_okay=False))
@click.option('--audio_dir', default='samples/LibriSpeech/test-other', show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option('--full_width', default=1.0, show_default=True, type=float,
              help='Width of the random-initialised model timed beside the checkpoint.')
@click.option('--profiles', default=10_000, show_default=True, type=int)
@click.option('--repeats', default=3, show_default=True, type=click.IntRange(min=1),
              help='Runs of each embedding measurement (best and median reported).')
def main(checkpoint_file, audio_dir, full_width, profiles, repeats):
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    files = audio_files(audio_dir)
    audio_seconds = seconds_of_audio(files)
    logger.info('%d files, %.0f s of audio.', len(files), audio_seconds)
    results = {'files': len(files), 'audio_seconds': round(audio_seconds, 1), 'cpus': os.cpu_count()}
    embedder = Embedder.from_checkpoint(checkpoint_file)
    results['checkpoint'] = embedding_speed(embedder, files, audio_seconds, repeats)
    logger.info('Checkpoint: %s', results['checkpoint'])
    results[f'random_width_{full_width:g}'] = embedding_speed(Embedder(DeepSpeakerModel(width=full_width)), files,
                                                             audio_seconds, repeats)
    logger.info('Width %g: %s', full_width, results[f'random_width_{full_width:g}'])
    with tempfile.TemporaryDirectory() as directory:
        results['export'] = exported_latency(embedder, files, Path(directory))
    logger.info('Export: %s', results['export'])
    results['identification'] = identification_ms(profiles)
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
