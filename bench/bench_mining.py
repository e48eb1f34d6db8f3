"""Times hard-negative selection alone: one batch of 32 triplets (96 crops) mined from a history of 25,600
embedded crops of 251 speakers. Target: under 50 ms per batch on 2 CPU cores.

    .venv/bin/python bench/bench_mining.py [--history 25600] [--batch 96] [--repeats 50]
"""

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batcher import HardNegativeMiner  # noqa: E402
from constants import EMBEDDING_SIZE  # noqa: E402

TARGET_MS = 50.0


@click.command()
@click.option('--history', default=25_600, show_default=True)
@click.option('--batch', default=96, show_default=True)
@click.option('--speakers', default=251, show_default=True)
@click.option('--repeats', default=50, show_default=True)
@click.option('--mode', default='hard', type=click.Choice(['hard', 'semihard']), show_default=True)
def main(history, batch, speakers, repeats, mode):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(speakers), -(-history // speakers))[:history]
    embeddings = rng.standard_normal((history, EMBEDDING_SIZE)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    miner = HardNegativeMiner(labels, mode, history, seed=0)
    miner.history = (np.arange(history), embeddings, labels)
    miner.select(batch // 3)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        miner.select(batch // 3)
        times.append(1000 * (time.perf_counter() - start))
    median = float(np.median(times))
    click.echo(f'{mode} mining, history {history:,} crops, batch {batch}: median {median:.1f} ms, '
               f'p90 {np.percentile(times, 90):.1f} ms (target < {TARGET_MS:g} ms): '
               f'{"OK" if median < TARGET_MS else "TOO SLOW"}')
    sys.exit(0 if median < TARGET_MS else 1)


if __name__ == '__main__':
    main()
