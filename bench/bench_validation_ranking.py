"""Does the validation EER on held-out training speakers (train-model --val_speakers) rank checkpoints as the dev
lists do? Scores every epoch checkpoint (<Model>_epochNNNN.keras, kept by --average_last) of the given checkpoint
dirs, and their <Model>_averaged.keras, on trial lists (each distinct file embedded once per checkpoint, as
eval-trials embeds it), reads val_eer of each epoch from the dir's history.csv, and prints one CSV row per
checkpoint and Spearman's rank correlation between val_eer and each list's EER (scipy.stats.spearmanr).

    .venv/bin/python bench/bench_validation_ranking.py WD/checkpoints-softmax WD/checkpoints-triplets \\
        --trials ../shared/data/trials/librispeech-test-other.txt=../shared/data/LibriSpeech/test-other \\
        --trials ../shared/data/trials/librispeech-test-other-channels.txt=../shared/data
"""

import csv
import logging
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedding import Embedder  # noqa: E402
from eval_metrics import equal_error_rate  # noqa: E402
from test import read_trials, score_trials  # noqa: E402

logger = logging.getLogger('bench_validation_ranking')


def checkpoint_rows(directory: Path) -> list[tuple[Path, float]]:
    """(epoch checkpoint, its val_eer) of each kept epoch of a checkpoint dir, then (averaged, nan) if present."""
    with open(directory / 'history.csv', newline='') as f:
        val_eer = {int(row['epoch']) + 1: float(row['val_eer']) for row in csv.DictReader(f)}
    rows = [(path, val_eer[int(path.stem.rsplit('epoch', 1)[1])]) for path in sorted(directory.glob('*_epoch*.keras'))]
    return rows + [(path, float('nan')) for path in directory.glob('*_averaged.keras')]


@click.command()
@click.argument('directories', nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option('--trials', 'lists', multiple=True, required=True, help='TRIALS_FILE=AUDIO_ROOT; repeat per list.')
def main(directories, lists):
    from scipy.stats import spearmanr
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    parsed = {Path(t).stem: read_trials(t, root) for t, root in (entry.split('=', 1) for entry in lists)}
    files = sorted({f for trials in parsed.values() for f in trials.files})
    position = {f: i for i, f in enumerate(files)}
    writer = csv.writer(sys.stdout)
    writer.writerow(['checkpoint', 'val_eer', *(f'eer_{name}' for name in parsed)])
    results = []
    for directory in map(Path, directories):
        for path, val_eer in checkpoint_rows(directory):
            embeddings = Embedder.from_checkpoint(str(path)).embed_files(files, progress=False)
            eers = [equal_error_rate(score_trials(embeddings[[position[f] for f in trials.files]], trials),
                                     trials.labels) for trials in parsed.values()]
            results.append((path, val_eer, eers))
            writer.writerow([f'{path.parent.name}/{path.name}', f'{val_eer:.4f}', *(f'{e:.4f}' for e in eers)])
            sys.stdout.flush()
    for scope in [str(Path(d).name) for d in directories] + ['all']:
        chosen = [r for r in results if not np.isnan(r[1]) and (scope == 'all' or r[0].parent.name == scope)]
        for index, name in enumerate(parsed):
            rho, p = spearmanr([r[1] for r in chosen], [r[2][index] for r in chosen])
            print(f'# Spearman val_eer vs {name} ({scope}, {len(chosen)} checkpoints): rho = {rho:.3f}, p = {p:.3f}')


if __name__ == '__main__':
    main()
