"""Feature-cache build at scale: a generated corpus (cut from LibriSpeech, with speed and gain changes: the build's
cost depends on duration, not content), cached at several sizes by `cli.py build-mfcc-cache` as a user runs it.

Per size: wall time, CPU time, x real time, throughput per core, peak RSS of the process tree (the command and its pool
workers, sampled from /proc), the time to index the finished cache (audio.Audio(working_dir)) and of a no-op
re-run. --original PATH also times the original implementation's (sequential) cache build, from a checkout at
PATH (its audio.py, run with this interpreter), against ours on the same files.

    python bench/bench_cache.py --corpus_dir /data/bench-corpus --sizes 1000,10000,30000
    python bench/bench_cache.py --corpus_dir /data/bench-corpus --sizes 0 --original /path/to/deep-speaker
"""

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from audio import Audio, find_audio_files  # noqa: E402
from constants import SAMPLE_RATE  # noqa: E402

logger = logging.getLogger('bench_cache')
SHARED = ROOT.parent / 'shared' / 'data' / 'LibriSpeech' / 'train-clean-100'  # as recipes/common.sh
PIECE_SECONDS = (4.0, 12.0)
SPEED_RANGE = (0.9, 1.1)
GAIN_DB_RANGE = (-12.0, 0.0)
RSS_POLL_S = 0.05


def piece(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 4-12 s stretch of `source` played at a random speed (linear interpolation) and gain: int16."""
    speed = rng.uniform(*SPEED_RANGE)
    length = int(rng.uniform(*PIECE_SECONDS) * SAMPLE_RATE)
    span = min(len(source) - 1, int(length * speed))
    start = int(rng.integers(0, len(source) - span))
    stretched = np.interp(np.linspace(0, span, length), np.arange(span + 1), source[start:start + span + 1])
    return np.clip(stretched * 10 ** (rng.uniform(*GAIN_DB_RANGE) / 20), -32768, 32767).astype(np.int16)


def write_speaker(job: tuple[str, list[str], int, int, int]) -> float:
    """Writes one generated speaker `<speaker>/<chapter>/<speaker>-<chapter>-<i>.flac`; returns its seconds."""
    corpus_dir, sources, speaker, per_speaker, seed = job
    rng = np.random.default_rng(seed + speaker)
    folder = Path(corpus_dir, f'{speaker}', '1')
    folder.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for i in range(per_speaker):
        audio, _ = sf.read(sources[int(rng.integers(len(sources)))], dtype='int16')
        samples = piece(audio, rng)
        sf.write(folder / f'{speaker}-1-{i:04d}.flac', samples, SAMPLE_RATE)
        seconds += len(samples) / SAMPLE_RATE
    return seconds


def generate_corpus(corpus_dir: Path, source_dir: Path, speakers: int, per_speaker: int, workers: int,
                    seed: int) -> dict[int, float]:
    """The generated corpus in `corpus_dir` (made once, reused): {speaker: seconds of audio}."""
    durations_file = corpus_dir / 'durations.json'
    durations = {}
    if durations_file.exists():
        durations = {int(k): v for k, v in json.loads(durations_file.read_text()).items()}
    missing = [s for s in range(speakers) if s not in durations]
    if not missing:
        return durations
    sources = [str(p) for p in find_audio_files(str(source_dir))]
    logger.info('Generating %d speakers x %d utterances into %s from %d files.', len(missing), per_speaker,
                corpus_dir, len(sources))
    start = time.perf_counter()
    jobs = [(str(corpus_dir), sources, s, per_speaker, seed) for s in missing]
    with get_context('fork').Pool(workers) as pool:
        durations.update(zip(missing, pool.map(write_speaker, jobs, chunksize=8), strict=True))
    durations_file.write_text(json.dumps(durations))
    logger.info('Generated in %.0f s.', time.perf_counter() - start)
    return durations


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (/proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f'/proc/{current}/statm') as f:
                total += int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
            for task in os.listdir(f'/proc/{current}/task'):
                with open(f'/proc/{current}/task/{task}/children') as f:
                    stack += [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def timed_run(command: list[str], **kwargs) -> tuple[float, float, int]:
    """Runs `command` to completion; (wall seconds, CPU seconds (user + system) of its process tree, peak RSS of
    the tree in bytes). Raises on failure. On a loaded machine the CPU seconds are the steadier measure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(RSS_POLL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f'{command}: exit {process.returncode}: {stderr[-2000:]}')
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, peak[0]


def build_command(working_dir: Path, audio_dir: Path, workers: int) -> list[str]:
    return [sys.executable, str(ROOT / 'cli.py'), 'build-mfcc-cache', '--working_dir', str(working_dir),
            '--audio_dir', str(audio_dir), '--workers', str(workers)]


def measure_size(corpus_dir: Path, durations: dict[int, float], files: int, per_speaker: int, workers: int,
                 scratch: Path) -> dict:
    """Builds the cache of the first files/per_speaker speakers (a tree of links to their folders)."""
    speakers = files // per_speaker
    audio_dir, working_dir = scratch / f'audio-{files}', scratch / f'wd-{files}'
    shutil.rmtree(audio_dir, ignore_errors=True)
    shutil.rmtree(working_dir, ignore_errors=True)
    audio_dir.mkdir(parents=True)
    for speaker in range(speakers):
        (audio_dir / str(speaker)).symlink_to(corpus_dir / str(speaker), target_is_directory=True)
    seconds = sum(durations[s] for s in range(speakers))
    wall, cpu, rss = timed_run(build_command(working_dir, audio_dir, workers))
    start = time.perf_counter()
    cached = sum(len(u) for u in Audio(str(working_dir)).speakers_to_utterances.values())
    index_s = time.perf_counter() - start
    rerun_s, _, _ = timed_run(build_command(working_dir, audio_dir, workers))
    shutil.rmtree(working_dir)
    shutil.rmtree(audio_dir)
    if cached != files:
        raise RuntimeError(f'{files} files, {cached} cached')
    return {'files': files, 'audio_hours': round(seconds / 3600, 2), 'wall_s': round(wall, 1),
            'cpu_s': round(cpu, 1), 'x_real_time': round(seconds / wall),
            'files_per_s_per_core': round(files / wall / workers, 1), 'cpu_ms_per_file': round(1000 * cpu / files, 1),
            'peak_rss_mb': round(rss / 2 ** 20), 'index_s': round(index_s, 2), 'noop_rerun_s': round(rerun_s, 2)}


def original_command(checkout: Path, working_dir: Path, audio_dir: Path) -> list[str]:
    """The original implementation's cache build (its audio.Audio, sequential) from a checkout."""
    code = (f'import sys; sys.path.insert(0, {str(checkout)!r}); from audio import Audio; '
            f'Audio({str(working_dir)!r}, {str(audio_dir)!r})')
    return [sys.executable, '-c', code]


def compare_original(checkout: Path, source_dir: Path, workers: int, scratch: Path) -> dict:
    """Wall times of the original's and our cache build of `source_dir`, each from a fresh working dir."""
    files = len(find_audio_files(str(source_dir)))
    for working_dir in (scratch / 'wd-original', scratch / 'wd-ours'):
        shutil.rmtree(working_dir, ignore_errors=True)
    original_s, original_cpu, _ = timed_run(original_command(checkout, scratch / 'wd-original', source_dir),
                                            cwd=checkout)
    ours_s, ours_cpu, _ = timed_run(build_command(scratch / 'wd-ours', source_dir, workers))
    return {'files': files, 'original_s': round(original_s, 2), 'ours_s': round(ours_s, 2),
            'speed_up': round(original_s / ours_s, 2), 'original_cpu_s': round(original_cpu, 2),
            'ours_cpu_s': round(ours_cpu, 2), 'ours_rerun_s': round(timed_run(build_command(
                scratch / 'wd-ours', source_dir, workers))[0], 2)}


def write_results(results: dict, out: Path | None) -> None:
    """Records the load average now and writes `results` to `out` (if given): after each size, so a long run that
    is stopped keeps what it measured."""
    results['load_average_now'] = os.getloadavg()
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus_dir', type=Path, required=True, help='Where the generated flac corpus is written '
                                                                       '(reused when there).')
    parser.add_argument('--source_dir', type=Path, default=SHARED, help='LibriSpeech audio to cut the corpus from.')
    parser.add_argument('--sizes', default='1000,10000,30000', help='Comma-separated file counts; 0: none.')
    parser.add_argument('--per_speaker', type=int, default=10, help='Utterances per generated speaker.')
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='Cache build processes.')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--original', type=Path, default=None,
                        help='A checkout of the original deep-speaker: also time its cache build of --source_dir.')
    parser.add_argument('--scratch', type=Path, default=None, help='Working dirs (default: a temporary dir).')
    parser.add_argument('--out', type=Path, default=None, help='Also write the results to this JSON file.')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    sizes = [int(s) for s in args.sizes.split(',') if int(s)]
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix='bench-cache-'))
    scratch.mkdir(parents=True, exist_ok=True)
    results = {'cpus': os.cpu_count(), 'workers': args.workers, 'load_average': os.getloadavg(), 'sizes': []}
    if args.original is not None:
        results['original'] = compare_original(args.original, args.source_dir, args.workers, scratch)
        logger.info('Original vs ours: %s', results['original'])
    if sizes:
        args.corpus_dir.mkdir(parents=True, exist_ok=True)
        durations = generate_corpus(args.corpus_dir, args.source_dir, -(-max(sizes) // args.per_speaker),
                                    args.per_speaker, args.workers, args.seed)
        for files in sizes:
            results['sizes'].append(measure_size(args.corpus_dir, durations, files, args.per_speaker, args.workers,
                                                 scratch))
            logger.info('%s', results['sizes'][-1])
            write_results(results, args.out)
    write_results(results, args.out)
    print(json.dumps(results, indent=1))
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
    main()
