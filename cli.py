"""Command-line entry points of deep-speaker (click): cache features, build model inputs, train, evaluate.

Only parses options, calls one function per command and turns the domain errors of the modules below
(AudioError, CheckpointError, TrialError, NotBuiltError, OSError) into one-line `Error: ...` messages that name
the options and commands. Imports everything; nothing imports it."""

import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ info logs; 0 shows them.

import click  # noqa: E402

from constants import (  # noqa: E402
    BATCH_SIZE,
    CHECKPOINTS_TRIPLET_DIR,
    COUNTS_PER_SPEAKER,
    DCF_P_TARGET,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    DEFAULT_TRIPLET_MINING,
    DEFAULT_WORKING_DIR,
    MINING_HISTORY_SIZE,
    MINING_REFRESH_EVERY,
    NUM_FRAMES,
    SAMPLE_RATE,
    SNR_RANGE_DB,
    SOFTMAX_LEARNING_RATE,
    TDNN_FRAME_LAYERS,
    TRIPLET_LEARNING_RATE,
    TRIPLET_MINING_MODES,
    TRIPLET_STEPS_PER_EPOCH,
    TSNE_PERPLEXITY,
)
from workdir import NotBuiltError, WorkingDir  # noqa: E402

VERSION = '2.0.0'
logger = logging.getLogger('deep-speaker')

working_dir_option = click.option('--working_dir', default=DEFAULT_WORKING_DIR, show_default=True,
                                  type=click.Path(file_okay=False),
                                  help='Holds the feature cache, model inputs, checkpoints and logs.')
width_option = click.option('--width', default=1.0, show_default=True, type=click.FloatRange(min=0.01),
                            help='Multiplier of the layer sizes (ResCNN filters 64/128/256/512, TDNN and GRU units). '
                                 '1.0 is the published size; 0.25 trains fast on a CPU.')
checkpoint_width_option = click.option(
    '--width', default=None, type=click.FloatRange(min=0.01),
    help='Width of a .h5 or .weights.h5 checkpoint\'s model [default: read from a .keras file, else 1.0].')
model_option = click.option('--model', default='rescnn', show_default=True,
                            type=click.Choice(['rescnn', 'tdnn', 'gru']),
                            help='Architecture: ResCNN (paper), TDNN (x-vector) or GRU (paper). A .keras checkpoint '
                                 'says its own.')
seed_option = click.option('--seed', default=DEFAULT_SEED, show_default=True, type=int,
                           help='Seed of crop sampling, batch construction and weight initialisation.')


def fail(message: str) -> None:
    """Prints a one-line error and exits with status 1."""
    click.echo(f'Error: {message}', err=True)
    sys.exit(1)


BUILD_COMMANDS = {'features': 'build-mfcc-cache (./deep-speaker build_mfcc)',
                  'inputs': 'build-keras-inputs (./deep-speaker build_model_inputs)'}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: a missing pipeline step names the command that builds it; ours carry their
    message; the system's (unwritable or non-directory working dir, full disk) name the file and the reason."""
    if isinstance(e, NotBuiltError):
        return f'--working_dir {e.working_dir}: {e.what}; run {BUILD_COMMANDS[e.step]} first.'
    return str(e) if e.filename is None else f'{e.filename}: {e.strerror or e}.'


def comma_list(text: str, option: str, expected: str, convert, valid) -> list:
    """The comma-separated values of `option`, each through `convert`; a one-line error saying what was
    `expected` when one does not convert (ValueError) or `valid(values)` is false."""
    try:
        values = [convert(x) for x in text.split(',')]
    except ValueError:
        values = None
    if values is None or not valid(values):
        fail(f'{option} {text}: expected {expected}.')
    return values


@click.group()
@click.option('--verbose', is_flag=True, help='Debug logging.')
def cli(verbose: bool):
    """Deep Speaker: speaker embeddings with a ResCNN trained by softmax then triplet loss."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')


@cli.command()
def version():
    """Prints the version of deep-speaker."""
    click.echo(VERSION)


@cli.command('build-mfcc-cache')
@working_dir_option
@click.option('--audio_dir', required=True, type=click.Path(),
              help='Audio tree: speaker/chapter/utterance.flac (LibriSpeech) or speaker/utterance.wav.')
@click.option('--sample_rate', default=SAMPLE_RATE, show_default=True, type=int, help='Rate audio is resampled to.')
@click.option('--workers', default=None, type=click.IntRange(min=1), help='Processes [default: all cores].')
@click.option('--speed_perturb', is_flag=True,
              help='Also cache each utterance at speeds 0.9 and 1.1, as new speakers (<speaker>~sp0.9, ~sp1.1).')
@click.option('--noise', default='', help='Also cache a noisy copy per entry of this comma-separated list: white, '
                                         'pink, or a directory of noise files (e.g. MUSAN noise).')
@click.option('--snr_range', default=','.join(f'{x:g}' for x in SNR_RANGE_DB), show_default=True,
              help='Range of the noise copies\' signal-to-noise ratio in dB, "LOW,HIGH".')
def build_mfcc_cache(working_dir, audio_dir, sample_rate, workers, speed_perturb, noise, snr_range):
    """Caches the normalised fbank of every utterance in WORKING_DIR/audio-fbanks (resumable); augmented copies
    with --speed_perturb and --noise (off by default)."""
    from audio import Audio, augmentations
    noises = [n for n in noise.split(',') if n]
    for n in noises:
        if n not in ('white', 'pink') and not os.path.isdir(n):
            fail(f'--noise {n}: expected white, pink or a directory of noise files.')
    snr = tuple(comma_list(snr_range, '--snr_range', '"LOW,HIGH" in dB, e.g. 5,20', float,
                           lambda values: len(values) == 2 and values[0] <= values[1]))
    try:
        audio = Audio(WorkingDir.of(working_dir), audio_dir=audio_dir, sample_rate=sample_rate, workers=workers,
                      variants=augmentations(speed_perturb, noises, snr))
    except OSError as e:
        fail(os_error_message(e))
    num_utterances = sum(len(u) for u in audio.speakers_to_utterances.values())
    logger.info('Cache holds %d utterances of %d speakers.', num_utterances, len(audio.speaker_ids))


@cli.command('build-keras-inputs')
@working_dir_option
@click.option('--counts_per_speaker', default=','.join(map(str, COUNTS_PER_SPEAKER)), show_default=True,
              help='Training and test crops per speaker, "TRAIN,TEST".')
@seed_option
def build_keras_inputs(working_dir, counts_per_speaker, seed):
    """Samples fixed-length crops per speaker into WORKING_DIR/keras-inputs (kx/ky train/test .npy)."""
    from batcher import KerasFormatConverter
    counts = tuple(comma_list(counts_per_speaker, '--counts_per_speaker', 'two integers >= 2, e.g. 600,100', int,
                              lambda values: len(values) == 2 and min(values) >= 2))
    try:
        KerasFormatConverter(working_dir).generate(NUM_FRAMES, counts, seed)
    except OSError as e:
        fail(os_error_message(e))


@cli.command('train-model')
@working_dir_option
@click.option('--pre_training_phase/--no_pre_training_phase', default=False, show_default=True,
              help='Softmax pre-training, or triplet training (initialised from the best softmax checkpoint).')
@click.option('--epochs', default=DEFAULT_EPOCHS, show_default=True, type=click.IntRange(min=1),
              help='Total epochs of the phase; a resumed run trains up to this number.')
@click.option('--steps_per_epoch', default=None, type=click.IntRange(min=1),
              help=f'Batches per epoch [default: softmax one pass over kx_train, triplet {TRIPLET_STEPS_PER_EPOCH}].')
@click.option('--batch_size', default=BATCH_SIZE, show_default=True, type=click.IntRange(min=3))
@click.option('--learning_rate', default=None, type=click.FloatRange(min=0, min_open=True),
              help=f'Learning rate: Adam in the softmax phase [default: {SOFTMAX_LEARNING_RATE:g}], SGD in the '
                   f'triplet phase [default: {TRIPLET_LEARNING_RATE:g}]; a resumed run keeps its own.')
@click.option('--triplet_mining', default=DEFAULT_TRIPLET_MINING, show_default=True,
              type=click.Choice(TRIPLET_MINING_MODES),
              help='Triplet phase: hardest negatives, semi-hard negatives (less similar than the positive) or random.')
@click.option('--history_size', default=MINING_HISTORY_SIZE, show_default=True, type=click.IntRange(min=4),
              help='Crops embedded for mining hard triplets.')
@click.option('--refresh_every', default=MINING_REFRESH_EVERY, show_default=True, type=click.IntRange(min=1),
              help='Batches between two re-embeddings of the mining history.')
@model_option
@width_option
@click.option('--tdnn_layers', default=None,
              help='TDNN frame layers as UNITS:KERNEL:DILATION,... (units before --width scales them) [default: '
                   + ','.join(':'.join(map(str, layer)) for layer in TDNN_FRAME_LAYERS) + '].')
@click.option('--dropout', default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help='TDNN: dropout rate after each frame layer.')
@click.option('--bn_before_relu', is_flag=True, help='TDNN: batch norm before each ReLU instead of after it.')
@seed_option
def train_model(working_dir, pre_training_phase, epochs, steps_per_epoch, batch_size, learning_rate, triplet_mining,
                history_size, refresh_every, model, width, tdnn_layers, dropout, bn_before_relu, seed):
    """Trains one phase; checkpoints go to WORKING_DIR/checkpoints-softmax or checkpoints-triplets. The triplet
    phase takes its architecture from the softmax checkpoint when there is one."""
    options = tdnn_options(tdnn_layers, dropout, bn_before_relu)
    if options and model != 'tdnn':
        fail(f'--tdnn_layers, --dropout and --bn_before_relu are options of --model tdnn, not --model {model}.')
    from checkpoints import CheckpointError
    from train import TrainConfig, train_softmax, train_triplet
    config = TrainConfig(working_dir=working_dir, epochs=epochs, steps_per_epoch=steps_per_epoch, width=width,
                         batch_size=batch_size, seed=seed, model_name=model, learning_rate=learning_rate,
                         model_options=options, mining=triplet_mining, history_size=history_size,
                         refresh_every=refresh_every)
    try:
        best = (train_softmax if pre_training_phase else train_triplet)(config)
    except FileNotFoundError as e:
        fail(os_error_message(e))
    except CheckpointError as e:
        fail(str(e))
    logger.info('Best checkpoint: %s', best)


def tdnn_options(tdnn_layers: str | None, dropout: float, bn_before_relu: bool) -> dict:
    """The TdnnModel constructor options given on the command line (only those that differ from the defaults)."""
    options = {}
    if tdnn_layers is not None:
        layers = comma_list(tdnn_layers, '--tdnn_layers', 'UNITS:KERNEL:DILATION,... of positive integers, e.g. '
                            '512:5:1,512:3:2,1500:1:1', lambda layer: tuple(int(n) for n in layer.split(':')),
                            lambda layers: all(len(layer) == 3 and min(layer) >= 1 for layer in layers))
        options['frame_layers'] = tuple(layers)
    if dropout:
        options['dropout'] = dropout
    if bn_before_relu:
        options['bn_before_relu'] = True
    return options


@cli.command('test-model')
@working_dir_option
@click.option('--checkpoint_file', default=None, type=click.Path(dir_okay=False),
              help=f'Checkpoint to evaluate (.keras, .weights.h5 or Keras-2 .h5) '
                   f'[default: WORKING_DIR/{CHECKPOINTS_TRIPLET_DIR}/<model>_best.keras].')
@model_option
@checkpoint_width_option
@seed_option
def test_model(working_dir, checkpoint_file, model, width, seed):
    """Anchor / positive / 99 negatives evaluation on the held-out audio of the cached speakers."""
    from checkpoints import CheckpointError, build_model
    from conv_models import MODELS
    from test import eval_model
    checkpoint_file = checkpoint_file or str(WorkingDir.of(working_dir).best_checkpoint('triplet', MODELS[model].name))
    try:
        fm, tpr, acc, eer = eval_model(working_dir, build_model(checkpoint_file, model, width), seed)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    click.echo(f'f-measure = {fm:.4f}, true positive rate = {tpr:.4f}, accuracy = {acc:.4f}, '
               f'equal error rate = {eer:.4f}')


@cli.command('eval-trials')
@click.option('--trials', 'trials_file', required=True, type=click.Path(exists=True, dir_okay=False),
              help='VoxCeleb-style list: "1 a.flac b.flac" per line, 1 = same speaker, 0 = different.')
@click.option('--audio_root', required=True, type=click.Path(exists=True, file_okay=False),
              help='Directory the paths of the trial list are relative to.')
@click.option('--checkpoint_file', 'checkpoint_files', required=True, multiple=True, type=click.Path(dir_okay=False),
              help='Checkpoint to evaluate (.keras, .weights.h5 or Keras-2 .h5); repeat it to fuse several models.')
@model_option
@checkpoint_width_option
@click.option('--fusion', default='score', show_default=True, type=click.Choice(['score', 'concat']),
              help='With several checkpoints: weighted mean of their cosine scores, or cosine of the concatenated '
                   'embeddings.')
@click.option('--fusion_weights', default=None, help='Comma-separated weight per checkpoint [default: equal].')
@click.option('--crop', is_flag=True, help='Embed a single centre crop instead of the whole utterance.')
@click.option('--scores_file', default=None, type=click.Path(dir_okay=False),
              help='CSV of label,score,enrol,test [default: TRIALS_STEM.scores.csv in the current directory].')
@click.option('--det_plot', default=None, type=click.Path(dir_okay=False), help='Draw the DET curve to this PNG.')
def eval_trials(trials_file, audio_root, checkpoint_files, model, width, fusion, fusion_weights, crop, scores_file,
                det_plot):
    """EER and minDCF of one checkpoint, or of a fusion of several, on a trial list; each utterance is embedded
    once per model, deterministically."""
    from checkpoints import CheckpointError
    from features import AudioError
    from test import TrialError, evaluate_trials
    weights = None
    if fusion_weights:
        count = len(checkpoint_files)
        weights = comma_list(fusion_weights, '--fusion_weights', f'{count} non-negative numbers, one per '
                             f'--checkpoint_file', float,
                             lambda values: len(values) == count and min(values) >= 0 and sum(values) > 0)
    try:
        result = evaluate_trials(trials_file, audio_root, list(checkpoint_files), model, width, fusion, weights, crop,
                                 scores_file, det_plot)
    except (TrialError, CheckpointError, AudioError) as e:
        fail(str(e))
    click.echo(f'EER = {100 * result.equal_error_rate:.2f} %, minDCF(p_target={DCF_P_TARGET}) = {result.min_dcf:.4f}')


@cli.command('plot-embeddings')
@click.argument('embeddings_file', type=click.Path(dir_okay=False))
@click.option('--out', required=True, type=click.Path(dir_okay=False), help='PNG file to draw the map to.')
@click.option('--perplexity', default=TSNE_PERPLEXITY, show_default=True, type=click.FloatRange(min=1),
              help='t-SNE perplexity (about the number of close neighbours); clipped below the number of embeddings.')
def plot_embeddings_command(embeddings_file, out, perplexity):
    """Draws a t-SNE map of an embeddings .npz (from embed), coloured by speaker, to a PNG."""
    from plots import EmbeddingsFileError, PlotError, plot_embeddings, read_embeddings
    try:
        embedding_set = read_embeddings(embeddings_file)
        plot_embeddings(embedding_set, out, perplexity)
    except EmbeddingsFileError as e:
        fail(str(e))
    except PlotError as e:
        fail(f'{embeddings_file}: {e}')
    except OSError as e:
        fail(f'--out {out}: {e.strerror or e}.')
    logger.info('Map of %d embeddings written to %s.', len(embedding_set.embeddings), out)


@cli.command('export')
@click.option('--checkpoint_file', required=True, type=click.Path(dir_okay=False),
              help='Checkpoint to export (.keras, .weights.h5 or Keras-2 .h5).')
@model_option
@checkpoint_width_option
@click.option('--out', required=True, type=click.Path(), help='Directory to write the exported model to.')
@click.option('--format', 'export_format', default='savedmodel', show_default=True,
              type=click.Choice(['savedmodel', 'tflite']),
              help='SavedModel directory (signature serving_default: pcm -> embedding) or OUT/model.tflite.')
@click.option('--overwrite', is_flag=True, help='Replace OUT if it exists.')
def export_command(checkpoint_file, model, width, out, export_format, overwrite):
    """Exports a graph from raw 16 kHz mono float32 PCM of any length to the whole-utterance unit embedding
    (silence trimming, fbank and windows in the graph), as the Python encoder computes it."""
    if os.path.exists(out) and not overwrite:
        fail(f'--out {out}: already exists; choose another directory or add --overwrite.')
    from checkpoints import CheckpointError
    from export import ExportError, directory_size, export_checkpoint
    try:
        export_checkpoint(checkpoint_file, out, export_format, model, width, overwrite)
    except (CheckpointError, ExportError) as e:
        fail(str(e))
    except OSError as e:
        fail(f'--out {out}: {e.strerror or e}.')
    click.echo(f'{out}: {export_format}, {directory_size(out) / 1e6:.1f} MB.')


if __name__ == '__main__':
    cli()
