"""Peak memory of each pipeline stage, each run in its own process: resident set size (the child's ru_maxrss,
from os.wait4) and, when a GPU is visible, TensorFlow's peak GPU memory
(tf.config.experimental.get_memory_info('GPU:0')['peak'], read in the stage process at its exit).

Stages, on a working dir built from samples/ (10 LibriSpeech speakers, 100 training and 20 test crops each):
cache, model inputs (width-independent), then per width the softmax phase, the triplet phase with each mining
mode, test-model, and eval-trials on a trial list it writes over samples/LibriSpeech/test-other.

    .venv/bin/python bench/bench_memory.py [--width 0.25 --width 1.0] [--steps 3] [--csv memory.csv]
"""

import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from constants import BATCH_SIZE, CHECKPOINTS_TRIPLET_DIR, TRIPLET_MINING_MODES  # noqa: E402

logger = logging.getLogger('bench_memory')
SAMPLES = ROOT / 'samples' / 'LibriSpeech' / 'test-other'
GPU_PEAK_MARK = 'GPU_PEAK_BYTES='
TRIALS_PER_SPEAKER = 4  # target and non-target trials per speaker in the eval-trials stage.


def write_trials(path: Path, audio_root: Path) -> Path:
    """A trial list over `audio_root` (speaker/chapter/utterance.flac): per speaker, TRIALS_PER_SPEAKER target
    trials (consecutive utterances) and as many non-target ones (with the next speaker's utterances)."""
    by_speaker = {s.name: sorted(p.relative_to(audio_root) for p in s.rglob('*.flac'))
                  for s in sorted(audio_root.iterdir()) if s.is_dir()}
    speakers = list(by_speaker)
    lines = []
    for i, speaker in enumerate(speakers):
        mine, theirs = by_speaker[speaker], by_speaker[speakers[(i + 1) % len(speakers)]]
        for k in range(TRIALS_PER_SPEAKER):
            lines.append(f'1 {mine[k]} {mine[k + 1]}')
            lines.append(f'0 {mine[k]} {theirs[k]}')
    path.write_text('\n'.join(lines) + '\n')
    return path


def run_stage(name: str, args: list[str], gpu: bool) -> dict:
    """Runs `cli.py ARGS` in a child process (through `stage` below when `gpu`); returns its peak RSS (MB), peak
    GPU memory (MB, None when not measured), wall seconds and exit status."""
    prefix = [sys.executable, str(Path(__file__).resolve()), 'stage', '--'] if gpu else [sys.executable, 'cli.py']
    start = time.perf_counter()
    process = subprocess.Popen(prefix + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    gpu_peak = next((int(line.split('=')[1]) / 2**20 for line in output.splitlines()
                     if line.startswith(GPU_PEAK_MARK)), None)
    if process.returncode:
        logger.error('%s failed (exit %d):\n%s', name, process.returncode, output[-3000:])
    row = {'stage': name, 'peak_rss_mb': round(usage.ru_maxrss / 1024), 'seconds': round(seconds, 1),
           'peak_gpu_mb': None if gpu_peak is None else round(gpu_peak), 'exit': process.returncode}
    logger.info('%s', row)
    return row


def width_stages(base: Path, width: float, steps: int, batch_size: int, trials: Path,
                 modes: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """The stages of one width, in order, on a copy of the base working dir's cache and model inputs."""
    wd = base.parent / f'wd-width{width:g}'
    for sub in ('audio-fbanks', 'keras-inputs'):
        shutil.copytree(base / sub, wd / sub, dirs_exist_ok=True)
    common = ['--working_dir', str(wd), '--epochs', '1', '--steps_per_epoch', str(steps), '--width', str(width),
              '--batch_size', str(batch_size)]
    stages = [(f'softmax w={width:g}', ['train-model', '--pre_training_phase', *common])]
    stages += [(f'triplet {mode} w={width:g}', ['train-model', '--no_pre_training_phase', *common,
                                                '--triplet_mining', mode]) for mode in modes]
    checkpoint = wd / CHECKPOINTS_TRIPLET_DIR / 'ResCNN_best.keras'
    stages += [(f'test-model w={width:g}', ['test-model', '--working_dir', str(wd)]),
               (f'eval-trials w={width:g}', ['eval-trials', '--trials', str(trials), '--audio_root', str(SAMPLES),
                                             '--checkpoint_file', str(checkpoint), '--scores_file',
                                             str(wd / 'scores.csv')])]
    return stages


def markdown(rows: list[dict], gpu: bool) -> str:
    header = '| stage | peak RSS (MB) | seconds |' + (' peak GPU (MB) |' if gpu else '')
    lines = [header, '|---|---:|---:|' + ('---:|' if gpu else '')]
    for row in rows:
        line = f'| {row["stage"]} | {row["peak_rss_mb"]:,} | {row["seconds"]} |'
        if gpu:
            line += f' {row["peak_gpu_mb"] if row["peak_gpu_mb"] is not None else "n/a"} |'
        lines.append(line + (' **failed**' if row['exit'] else ''))
    return '\n'.join(lines)


@click.group(invoke_without_command=True)
@click.option('--width', 'widths', multiple=True, type=float, default=(0.25, 1.0), show_default=True)
@click.option('--steps', default=3, show_default=True, help='Training steps per phase (one epoch).')
@click.option('--batch_size', default=BATCH_SIZE, show_default=True)
@click.option('--mining', 'modes', multiple=True, type=click.Choice(TRIPLET_MINING_MODES),
              default=TRIPLET_MINING_MODES, show_default=True, help='Triplet phases to run, one per mining mode.')
@click.option('--gpu/--no_gpu', default=None,
              help='Also read the peak GPU memory of each stage [default: when nvidia-smi is on the PATH].')
@click.option('--csv', 'csv_file', default=None, type=click.Path(dir_okay=False), help='Also write the rows here.')
@click.option('--keep', is_flag=True, help='Keep the temporary working dirs (their path is logged).')
@click.pass_context
def main(context, widths, steps, batch_size, modes, gpu, csv_file, keep):
    """Runs every stage in its own process and prints a markdown table of peak memory per stage and width."""
    if context.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    gpu = shutil.which('nvidia-smi') is not None if gpu is None else gpu
    tmp = Path(tempfile.mkdtemp(prefix='bench-memory-'))
    logger.info('Working dirs under %s', tmp)
    base, trials = tmp / 'wd', write_trials(tmp / 'trials.txt', SAMPLES)
    stages = [('cache', ['build-mfcc-cache', '--working_dir', str(base), '--audio_dir', str(SAMPLES)]),
              ('model inputs', ['build-keras-inputs', '--working_dir', str(base), '--counts_per_speaker', '100,20'])]
    rows = [run_stage(name, args, gpu) for name, args in stages]
    for width in widths:
        for name, args in width_stages(base, width, steps, batch_size, trials, modes):
            if args[0] == 'train-model' and '--triplet_mining' in args:
                shutil.rmtree(Path(args[args.index('--working_dir') + 1]) / CHECKPOINTS_TRIPLET_DIR,
                              ignore_errors=True)
            rows.append(run_stage(name, args, gpu))
    click.echo(markdown(rows, gpu))
    if csv_file:
        with open(csv_file, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if not keep:
        shutil.rmtree(tmp)
    sys.exit(1 if any(row['exit'] for row in rows) else 0)


@main.command(context_settings={'ignore_unknown_options': True, 'allow_interspersed_args': False})
@click.argument('cli_args', nargs=-1, type=click.UNPROCESSED)
def stage(cli_args):
    """Runs `cli.py CLI_ARGS` in this process, then prints GPU_PEAK_BYTES=<peak GPU memory> when a GPU is
    visible to TensorFlow."""
    import cli
    os.chdir(ROOT)
    try:
        cli.cli.main(list(cli_args), standalone_mode=False)
    finally:
        import tensorflow as tf
        if tf.config.list_physical_devices('GPU'):
            click.echo(f'{GPU_PEAK_MARK}{tf.config.experimental.get_memory_info("GPU:0")["peak"]}')


if __name__ == '__main__':
    main()

