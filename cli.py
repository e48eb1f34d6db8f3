"""Command-line entry points of deep-speaker (click): cache features, build model inputs, train, evaluate, and the
speaker toolkit (embed, verify, enroll, identify, profiles, cluster) and its service (serve).

Only parses options, calls one function per command and turns the domain errors of the modules below
(AudioError, CheckpointError, TrialError, SpeakerError, ClusteringError, NotBuiltError, OSError) into one-line
`Error: ...` messages that name the options and commands. Imports everything; nothing imports it."""

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from constants import (
    AAM_SOFTMAX_MARGIN,
    AM_SOFTMAX_MARGIN,
    ASNORM_TOP,
    BATCH_SIZE,
    CHANNEL_AUGMENTATIONS,
    CHANNEL_SNR_RANGE_DB,
    CHECKPOINTS_TRIPLET_DIR,
    CLASSIFICATION_LOSSES,
    COLLECTIVE_TIMEOUT_S,
    COUNTS_PER_SPEAKER,
    DCF_P_TARGET,
    DEFAULT_CHECKPOINT,
    DEFAULT_EPOCHS,
    DEFAULT_LOSS,
    DEFAULT_PACKED_DTYPE,
    DEFAULT_SEED,
    DEFAULT_TOP_K,
    DEFAULT_TRIPLET_MINING,
    DEFAULT_WORKING_DIR,
    DISTRIBUTE_MODES,
    EXPORT_FORMATS,
    MARGIN_RANGE,
    MARGIN_SCALE,
    MIN_TRAINING_SPEAKERS,
    MINING_HISTORY_SIZE,
    MINING_REFRESH_EVERY,
    NUM_FRAMES,
    OPERATING_POINTS,
    PACKED_DTYPES,
    RT60_RANGE_S,
    SAMPLE_RATE,
    SAMPLERS,
    SCALE_RANGE,
    SCORE_NORMS,
    SERVICE_HOST,
    SERVICE_MAX_SECONDS,
    SERVICE_MAX_UPLOAD_MB,
    SERVICE_PORT,
    SERVICE_QUEUE_SIZE,
    SERVICE_TOKEN_ENV,
    SNR_RANGE_DB,
    SOFTMAX_LEARNING_RATE,
    SPEAKER_SAMPLINGS,
    SPEC_AUGMENT_FREQ_MASKS,
    SPEC_AUGMENT_TIME_MASKS,
    TDNN_FRAME_LAYERS,
    TRIPLET_LEARNING_RATE,
    TRIPLET_MINING_MODES,
    TRIPLET_STEPS_PER_EPOCH,
    TSNE_PERPLEXITY,
    UNKNOWN_SPEAKER,
)
from tf_startup import import_tensorflow
from workdir import NotBuiltError, WorkingDir

VERSION = '2.0.0'
TENSORFLOW_COMMANDS = {'train-model', 'test-model', 'eval-trials', 'embed', 'verify', 'enroll', 'identify', 'profiles',
                       'cluster', 'export', 'serve'}
logger = logging.getLogger('deep-speaker')

working_dir_option = click.option('--working_dir', default=DEFAULT_WORKING_DIR, show_default=True,
                                  type=click.Path(file_okay=False),
                                  help='Holds the feature cache, model inputs, checkpoints and logs.')
width_option = click.option('--width', default=1.0, show_default=True, type=click.FloatRange(min=0.01),
                            help='Multiplier of the layer sizes (ResCNN filters 64/128/256/512, TDNN, GRU and ECAPA '
                                 'units). 1.0 is the published size; 0.25 trains fast on a CPU.')
checkpoint_width_option = click.option(
    '--width', default=None, type=click.FloatRange(min=0.01),
    help='Width of a .h5 or .weights.h5 checkpoint\'s model [default: read from a .keras file, else 1.0].')
model_option = click.option('--model', default='rescnn', show_default=True,
                            type=click.Choice(['rescnn', 'tdnn', 'gru', 'ecapa']),
                            help='Architecture: ResCNN (paper), TDNN (x-vector), GRU (paper) or ECAPA-TDNN. A .keras '
                                 'checkpoint says its own.')
seed_option = click.option('--seed', default=DEFAULT_SEED, show_default=True, type=int,
                           help='Seed of crop sampling, batch construction and weight initialisation.')


def fail(message: str) -> None:
    """Prints a one-line error and exits with status 1."""
    click.echo(f'Error: {message}', err=True)
    sys.exit(1)


BUILD_COMMANDS = {'features': 'build-mfcc-cache (./deep-speaker build_mfcc)',
                  'inputs': 'build-keras-inputs (./deep-speaker build_model_inputs)',
                  'store': 'build-packed-store (./deep-speaker build_packed_store)'}


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
@click.version_option(VERSION, '--version', message='%(version)s', help='Print the version and exit.')
@click.option('--verbose', is_flag=True, help='Debug logging, and TensorFlow\'s start-up and info lines.')
@click.pass_context
def cli(ctx: click.Context, verbose: bool):
    """Deep Speaker: speaker embeddings with a ResCNN trained by softmax then triplet loss."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    if ctx.invoked_subcommand in TENSORFLOW_COMMANDS:
        import_tensorflow(verbose)


@cli.command()
def version():
    """Prints the version of deep-speaker."""
    click.echo(VERSION)


@cli.command('build-mfcc-cache')
@working_dir_option
@click.option('--audio_dir', default=None, type=click.Path(),
              help='Audio tree: a folder per speaker, files at any depth in it: speaker/chapter/utterance.flac '
                   '(LibriSpeech), speaker/video/utterance.wav (VoxCeleb) or speaker/utterance.wav.')
@click.option('--manifest', default=None, type=click.Path(dir_okay=False),
              help='Instead of --audio_dir: a CSV of "path,speaker" lines (an optional first line "path,speaker" is '
                   'a header; relative paths are read from the manifest\'s folder).')
@click.option('--wav_scp', default=None, type=click.Path(dir_okay=False),
              help='Instead of --audio_dir: a Kaldi wav.scp of "<utterance-id> <path>" lines (plain paths, no '
                   'piped commands), with --utt2spk.')
@click.option('--utt2spk', default=None, type=click.Path(dir_okay=False),
              help='The Kaldi utt2spk of "<utterance-id> <speaker>" lines that goes with --wav_scp.')
@click.option('--shard', default=None,
              help='K/N: build only part K (1 to N) of N disjoint parts, so N processes or machines sharing the '
                   'working dir build one cache together (parts are chosen by a hash of each utterance\'s name).')
@click.option('--sample_rate', default=SAMPLE_RATE, show_default=True, type=int, help='Rate audio is resampled to.')
@click.option('--workers', default=None, type=click.IntRange(min=1), help='Processes [default: all cores].')
@click.option('--speed_perturb', is_flag=True,
              help='Also cache each utterance at speeds 0.9 and 1.1, as new speakers (<speaker>~sp0.9, ~sp1.1).')
@click.option('--noise', default='', help='Also cache a noisy copy per entry of this comma-separated list: white, '
                                         'pink, or a directory of noise files (e.g. MUSAN noise).')
@click.option('--snr_range', default=','.join(f'{x:g}' for x in SNR_RANGE_DB), show_default=True,
              help='Range of the noise copies\' signal-to-noise ratio in dB, "LOW,HIGH".')
@click.option('--augment', default='',
              help='Also cache a copy per entry of this comma-separated list of channels: reverb (synthetic room '
                   f'response, RT60 {RT60_RANGE_S[0]:g}-{RT60_RANGE_S[1]:g} s), telephone (8 kHz, 300-3400 Hz, '
                   '8-bit mu-law), babble (3-6 other speakers of --audio_dir), white (noise); babble and white at '
                   f'{CHANNEL_SNR_RANGE_DB[0]:g}-{CHANNEL_SNR_RANGE_DB[1]:g} dB SNR. Strengths drawn per file, '
                   'seeded by its name.')
@click.option('--verify', is_flag=True, help='First check every cached array; delete the damaged ones (listed in '
                                             'the log), so they are recomputed from --audio_dir.')
def build_mfcc_cache(working_dir, audio_dir, manifest, wav_scp, utt2spk, shard, sample_rate, workers, speed_perturb,
                     noise, snr_range, augment, verify):
    """Caches the normalised fbank of every utterance of --audio_dir, --manifest or --wav_scp/--utt2spk in
    WORKING_DIR/audio-fbanks (resumable); augmented copies with --speed_perturb, --noise and --augment (off by
    default)."""
    from audio import Audio, augmentations
    from corpus import CorpusError, parse_shard
    noises = [n for n in noise.split(',') if n]
    for n in noises:
        if n not in ('white', 'pink') and not os.path.isdir(n):
            fail(f'--noise {n}: expected white, pink or a directory of noise files.')
    snr = tuple(comma_list(snr_range, '--snr_range', '"LOW,HIGH" in dB, e.g. 5,20', float,
                           lambda values: len(values) == 2 and values[0] <= values[1]))
    channels = comma_list(augment, '--augment', f'a comma-separated list of {", ".join(CHANNEL_AUGMENTATIONS)}, '
                          f'each once', str, lambda values: len(set(values)) == len(values) and
                          set(values) <= set(CHANNEL_AUGMENTATIONS)) if augment else []
    if 'babble' in channels and audio_dir is None:
        fail('--augment babble takes its talkers from the speaker folders of --audio_dir; with --manifest or '
             '--wav_scp leave babble out.')
    try:
        part = parse_shard(shard) if shard is not None else None
    except ValueError as e:
        fail(f'--shard {e}.')
    try:
        corpus = read_corpus(audio_dir, manifest, wav_scp, utt2spk)
        audio = Audio(WorkingDir.of(working_dir), sample_rate=sample_rate, workers=workers,
                      variants=augmentations(speed_perturb, noises, snr, channels, audio_dir), verify=verify,
                      corpus=corpus, shard=part)
    except CorpusError as e:
        fail(f'--{e.source} {e}')
    except OSError as e:
        fail(os_error_message(e))
    num_utterances = sum(len(u) for u in audio.speakers_to_utterances.values())
    logger.info('Cache holds %d utterances of %d speakers.', num_utterances, len(audio.speaker_ids))


def read_corpus(audio_dir: str | None, manifest: str | None, wav_scp: str | None, utt2spk: str | None):
    """The corpus of exactly one source: a folder tree, a CSV manifest or a Kaldi wav.scp with its utt2spk."""
    from corpus import folder_corpus, kaldi_corpus, manifest_corpus
    given = [option for option, value in (('--audio_dir', audio_dir), ('--manifest', manifest),
                                          ('--wav_scp', wav_scp or utt2spk)) if value]
    if len(given) != 1:
        fail(f'{" and ".join(given) or "no audio"}: give exactly one of --audio_dir, --manifest or --wav_scp with '
             f'--utt2spk.')
    if (wav_scp is None) != (utt2spk is None):
        fail('--wav_scp and --utt2spk go together: give both files of the Kaldi data dir.')
    for option, path in (('--manifest', manifest), ('--wav_scp', wav_scp), ('--utt2spk', utt2spk)):
        if path is not None and not os.path.isfile(path):
            fail(f'{option} {path}: no such file.')
    if audio_dir is not None:
        return folder_corpus(Path(audio_dir).expanduser())
    if manifest is not None:
        return manifest_corpus(Path(manifest).expanduser())
    return kaldi_corpus(Path(wav_scp).expanduser(), Path(utt2spk).expanduser())


@cli.command('build-keras-inputs')
@working_dir_option
@click.option('--counts_per_speaker', default=','.join(map(str, COUNTS_PER_SPEAKER)), show_default=True,
              help='Training and test crops per speaker, "TRAIN,TEST".')
@seed_option
def build_keras_inputs(working_dir, counts_per_speaker, seed):
    """Samples fixed-length crops per speaker into WORKING_DIR/keras-inputs (kx/ky train/test .npy)."""
    from batcher import InputsError, KerasFormatConverter
    counts = tuple(comma_list(counts_per_speaker, '--counts_per_speaker', 'two integers >= 2, e.g. 600,100', int,
                              lambda values: len(values) == 2 and min(values) >= 2))
    try:
        KerasFormatConverter(working_dir).generate(NUM_FRAMES, counts, seed)
    except OSError as e:
        fail(os_error_message(e))
    except InputsError as e:
        fail(str(e))


@cli.command('build-packed-store')
@working_dir_option
@click.option('--dtype', default=DEFAULT_PACKED_DTYPE, show_default=True, type=click.Choice(PACKED_DTYPES),
              help='Type of the packed frames: float16 halves the store (README: "Packed feature store").')
def build_packed_store(working_dir, dtype):
    """Packs the feature cache into WORKING_DIR/packed (one array of every frame and its index) for train-model
    --sampler windows; resumes an interrupted pack, does nothing when the store is up to date."""
    from store import pack_store
    try:
        store = pack_store(WorkingDir.of(working_dir), dtype)
    except OSError as e:
        fail(os_error_message(e))
    logger.info('Packed store holds %d utterances of %d speakers.', store.num_utterances, len(store.speakers))


@cli.command('train-model')
@working_dir_option
@click.option('--pre_training_phase/--no_pre_training_phase', default=False, show_default=True,
              help='Softmax pre-training, or triplet training (initialised from the best softmax checkpoint, which '
                   'must exist unless --from_scratch).')
@click.option('--from_scratch', is_flag=True,
              help='Triplet phase: start from random weights when there is no softmax checkpoint.')
@click.option('--epochs', default=DEFAULT_EPOCHS, show_default=True, type=click.IntRange(min=1),
              help='Total epochs of the phase; a resumed run trains up to this number.')
@click.option('--steps_per_epoch', default=None, type=click.IntRange(min=1),
              help=f'Batches per epoch [default: softmax one pass over kx_train, triplet {TRIPLET_STEPS_PER_EPOCH}].')
@click.option('--batch_size', default=BATCH_SIZE, show_default=True, type=click.IntRange(min=3),
              help='Crops per batch of each replica (device); the global batch is this times the replicas. Triplet '
                   'phase: a multiple of 3.')
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
@click.option('--inference_batch', default=None, type=click.IntRange(min=1),
              help='Crops per forward pass of a history refresh [default: --batch_size]; lower it to save memory.')
@model_option
@width_option
@click.option('--tdnn_layers', default=None,
              help='TDNN frame layers as UNITS:KERNEL:DILATION,... (units before --width scales them) [default: '
                   + ','.join(':'.join(map(str, layer)) for layer in TDNN_FRAME_LAYERS) + '].')
@click.option('--dropout', default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help='TDNN: dropout rate after each frame layer.')
@click.option('--bn_before_relu', is_flag=True, help='TDNN: batch norm before each ReLU instead of after it.')
@click.option('--val_speakers', default=0, show_default=True, type=click.IntRange(min=0),
              help='Hold out this many training speakers (a fixed seeded choice) and score their utterances as '
                   'verification trials every epoch (val_eer, val_min_dcf); the best checkpoint is then the one of '
                   'lowest val_eer. Give both phases the same number.')
@click.option('--average_last', default=0, show_default=True, type=click.IntRange(min=0),
              help='Keep the last N epoch checkpoints (<Model>_epochNNNN.keras) and average their weights into '
                   '<Model>_averaged.keras after training; 0: off.')
@click.option('--sampler', default='fixed', show_default=True, type=click.Choice(SAMPLERS),
              help='Training crops: the fixed ones of build-keras-inputs, or fresh random windows of the packed store '
                   '(build-packed-store) at every step, validated on held-out utterances.')
@click.option('--speaker_sampling', default='balanced', show_default=True, type=click.Choice(SPEAKER_SAMPLINGS),
              help='--sampler windows: draw speakers equally often, or in proportion to their utterances.')
@click.option('--channels', default=None, type=click.IntRange(min=8),
              help='ECAPA: channels C of the frame layers before --width scales them (the paper: 512 or 1024) '
                   '[default: 1024].')
@click.option('--loss', default=DEFAULT_LOSS, show_default=True, type=click.Choice(CLASSIFICATION_LOSSES),
              help='Softmax phase: softmax (the original), amsoftmax (additive margin, cos - m) or aamsoftmax '
                   '(additive angular margin, cos(theta + m)), the last two over a cosine head.')
@click.option('--margin', default=None, type=float,
              help=f'Margin of amsoftmax/aamsoftmax, {MARGIN_RANGE[0]:g} <= m < {MARGIN_RANGE[1]:g} [default: '
                   f'amsoftmax {AM_SOFTMAX_MARGIN:g} (cosine), aamsoftmax {AAM_SOFTMAX_MARGIN:g} (radians)].')
@click.option('--scale', default=None, type=float,
              help=f'Scale s of amsoftmax/aamsoftmax logits, {SCALE_RANGE[0]:g} <= s <= {SCALE_RANGE[1]:g} '
                   f'[default: {MARGIN_SCALE:g}].')
@click.option('--spec_augment', is_flag=True,
              help=f'SpecAugment every training crop (both phases): {SPEC_AUGMENT_TIME_MASKS[0]} time masks of up to '
                   f'{SPEC_AUGMENT_TIME_MASKS[1]} frames and {SPEC_AUGMENT_FREQ_MASKS[0]} frequency masks of up to '
                   f'{SPEC_AUGMENT_FREQ_MASKS[1]} fbank channels, seeded by --seed.')
@click.option('--distribute', default=None, type=click.Choice(DISTRIBUTE_MODES),
              help='none: one device; mirrored: every GPU of this machine; multiworker: the machines of TF_CONFIG '
                   '(README "More than one GPU or machine") [default: mirrored with more than one GPU, else none].')
@click.option('--scale_lr', is_flag=True,
              help='Multiply the learning rate of a new model by the number of replicas (linear scaling).')
@click.option('--mixed_precision', is_flag=True,
              help='Compute in float16 with float32 weights, softmax, normalisation and losses, and loss scaling '
                   '(a GPU speed-up; slow on a CPU). A resumed run keeps its checkpoint\'s precision.')
@click.option('--jit_compile', is_flag=True, help='Compile the training step with XLA.')
@click.option('--collective_timeout', default=COLLECTIVE_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help='--distribute multiworker: seconds to wait for the other workers (to start, or to answer) before '
                   'stopping.')
@seed_option
def train_model(working_dir, pre_training_phase, from_scratch, epochs, steps_per_epoch, batch_size, learning_rate,
                triplet_mining, history_size, refresh_every, inference_batch, model, width, tdnn_layers, dropout,
                bn_before_relu, val_speakers, average_last, sampler, speaker_sampling, channels, loss, margin, scale,
                spec_augment, distribute, scale_lr, mixed_precision, jit_compile, collective_timeout, seed):
    """Trains one phase; checkpoints go to WORKING_DIR/checkpoints-softmax or checkpoints-triplets. The triplet
    phase (the default) starts from the best softmax checkpoint, with its architecture. One run per phase and
    working dir at a time."""
    options = tdnn_options(tdnn_layers, dropout, bn_before_relu)
    if options and model != 'tdnn':
        fail(f'--tdnn_layers, --dropout and --bn_before_relu are options of --model tdnn, not --model {model}.')
    if average_last > epochs:
        fail(f'--average_last {average_last}: at most --epochs {epochs} epoch checkpoints are kept; give at most '
             f'{epochs}.')
    if speaker_sampling != 'balanced' and sampler != 'windows':
        fail(f'--speaker_sampling {speaker_sampling} is an option of --sampler windows; add --sampler windows.')
    if channels is not None:
        if model != 'ecapa':
            fail(f'--channels is an option of --model ecapa, not --model {model}.')
        options['channels'] = channels
    from batcher import InputsError
    from checkpoints import AveragingError, CheckpointError
    from distribute import ClusterConfigError, TripletBatchError, WorkerLostError
    from losses import LossOptionError, classification_loss
    from train import NoPretrainingError, TrainConfig, train_softmax, train_triplet
    from validation import ValidationError
    from workdir import LockedError
    if loss == 'softmax' and (margin is not None or scale is not None):
        fail('--margin and --scale are options of --loss amsoftmax and aamsoftmax; plain softmax has neither.')
    try:
        classification_loss(loss, margin, scale)
    except LossOptionError as e:
        fail(f'--{e.option} {e.value:g}: out of range for --loss {loss}; expected {e.limit}.')
    if not pre_training_phase and (loss != DEFAULT_LOSS or margin is not None or scale is not None):
        logger.info('--loss, --margin and --scale set the softmax phase; the triplet phase uses the triplet loss.')
    config = TrainConfig(working_dir=working_dir, epochs=epochs, steps_per_epoch=steps_per_epoch, width=width,
                         batch_size=batch_size, seed=seed, model_name=model, learning_rate=learning_rate,
                         model_options=options, mining=triplet_mining, history_size=history_size,
                         refresh_every=refresh_every, inference_batch=inference_batch,
                         from_scratch=from_scratch, val_speakers=val_speakers, average_last=average_last,
                         sampler=sampler, speaker_sampling=speaker_sampling, loss=loss, margin=margin, scale=scale,
                         spec_augment=spec_augment, distribute=distribute, scale_lr=scale_lr,
                         mixed_precision=mixed_precision, jit_compile=jit_compile,
                         collective_timeout=collective_timeout)
    try:
        best = (train_softmax if pre_training_phase else train_triplet)(config)
    except NoPretrainingError as e:
        fail(f'{e.path}: no softmax checkpoint to start the triplet phase from; train the softmax phase first '
             f'(train-model --pre_training_phase, ./deep-speaker train_softmax) or add --from_scratch to start from '
             f'random weights.')
    except LockedError as e:
        fail(f'--working_dir {working_dir}: process {e.pid} is training this phase ({e.path}); wait for it to end '
             f'or use another --working_dir.')
    except ValidationError as e:
        fail(validation_message(e, val_speakers))
    except AveragingError as e:
        fail(f'--average_last {average_last}: only {e.kept} epoch checkpoints are kept in {e.directory}; give at '
             f'most {e.kept} (the training is saved: run train-model again with it to average).')
    except ClusterConfigError as e:
        fail(f'--distribute multiworker: {e} Set TF_CONFIG on every machine as the README\'s "More than one GPU or '
             f'machine" shows, or use --distribute mirrored (one machine) or none.')
    except TripletBatchError as e:
        fail(f'--batch_size {batch_size}: {e} Use a multiple of 3, e.g. {BATCH_SIZE}.')
    except WorkerLostError as e:
        fail(f'--distribute multiworker: {e}; another worker stopped or does not answer within '
             f'--collective_timeout {collective_timeout:g} s. Start every worker again with the same command: '
             f'training resumes from the chief\'s last checkpoint.')
    except (CheckpointError, InputsError) as e:
        fail(str(e))
    except OSError as e:
        fail(os_error_message(e))
    logger.info('Best checkpoint: %s', best)


def validation_message(e, val_speakers: int) -> str:
    """The one line of a ValidationError, naming --val_speakers and its limit."""
    if e.available is not None:
        return (f'--val_speakers {val_speakers}: at most {e.limit} of the {e.available} training speakers can be held '
                f'out ({MIN_TRAINING_SPEAKERS} must remain to train); give at most {e.limit}.')
    return f'--val_speakers {val_speakers}: {e}'


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
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(os_error_message(e))
    click.echo(f'f-measure = {fm:.4f}, true positive rate = {tpr:.4f}, accuracy = {acc:.4f}, '
               f'equal error rate = {eer:.4f}')


@cli.command('eval-trials')
@click.option('--trials', 'trials_file', required=True, type=click.Path(exists=True, dir_okay=False),
              help='Trial list, one trial a line: VoxCeleb\'s "1 a.flac b.flac" (1 = same speaker, 0 = different) '
                   'or Kaldi\'s "a.flac b.flac target|nontarget"; a list may mix the two.')
@click.option('--audio_root', required=True, type=click.Path(exists=True, file_okay=False),
              help='Directory the paths of the trial list are relative to; a path outside it is refused.')
@click.option('--strict', is_flag=True,
              help='Stop at the first file that cannot be decoded. By default such files are skipped with their '
                   'trials, logged, listed in TRIALS_STEM.skipped.txt beside the scores, counted, and the other '
                   'trials scored.')
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
@click.option('--calibration_file', default=None, type=click.Path(dir_okay=False),
              help='Record the score thresholds at the EER and at minDCF here, for verify and identify (one '
                   'checkpoint, whole utterances) [default: CHECKPOINT_FILE.calibration.json; with --score_norm, '
                   'only where given, as verify and identify score raw cosines].')
@click.option('--score_norm', default='none', show_default=True, type=click.Choice(SCORE_NORMS),
              help='Score back-end: raw cosine; mean: cosine of embeddings centred on the mean of the --cohort_dir '
                   'speakers\' embeddings; asnorm: adaptive symmetric normalisation against the --asnorm_top highest '
                   'cohort scores of each side. With several checkpoints, each model\'s scores are normalised before '
                   'the fusion.')
@click.option('--cohort_dir', default=None, type=click.Path(exists=True, file_okay=False),
              help='Working dir of training speakers (its audio-fbanks cache, e.g. train-clean-100\'s) whose '
                   'embeddings, one per speaker, make the cohort of --score_norm mean and asnorm.')
@click.option('--asnorm_top', default=ASNORM_TOP, show_default=True, type=click.IntRange(min=1),
              help='AS-norm: cohort scores per side averaged; at most the number of cohort speakers.')
def eval_trials(trials_file, audio_root, strict, checkpoint_files, model, width, fusion, fusion_weights, crop,
                scores_file, det_plot, calibration_file, score_norm, cohort_dir, asnorm_top):
    """EER and minDCF of one checkpoint, or of a fusion of several, on a trial list; each utterance is embedded
    once per model, deterministically. For one checkpoint without --crop, also records the thresholds at the EER
    and at minDCF beside it (--calibration_file), which verify and identify use when given no --threshold."""
    from checkpoints import CheckpointError
    from features import AudioError
    from score_norm import CohortError
    from speaker import Calibration, calibration_file_of
    from test import TrialError, evaluate_trials
    if (score_norm == 'none') != (cohort_dir is None):
        fail('--score_norm mean and asnorm need a --cohort_dir (a working dir of training speakers), and '
             '--cohort_dir needs one of them.')
    calibrates = len(checkpoint_files) == 1 and not crop and (score_norm == 'none' or calibration_file is not None)
    if calibration_file and not calibrates:
        fail('--calibration_file: thresholds are recorded for one --checkpoint_file without --crop (the '
             'embeddings verify and identify use); drop --calibration_file or the fusion/--crop.')
    weights = None
    if fusion_weights:
        count = len(checkpoint_files)
        weights = comma_list(fusion_weights, '--fusion_weights', f'{count} non-negative numbers, one per '
                             f'--checkpoint_file', float,
                             lambda values: len(values) == count and min(values) >= 0 and sum(values) > 0)
    try:
        result = evaluate_trials(trials_file, audio_root, list(checkpoint_files), model, width, fusion, weights, crop,
                                 scores_file, det_plot, strict, score_norm, cohort_dir, asnorm_top)
    except CohortError as e:
        fail(f'--asnorm_top {asnorm_top}: --cohort_dir {cohort_dir} caches {e.size} speakers; give at most {e.size}.'
             if e.top else f'--cohort_dir {e}')
    except (TrialError, CheckpointError, AudioError) as e:
        fail(str(e))
    click.echo(f'EER = {100 * result.equal_error_rate:.2f} %, minDCF(p_target={DCF_P_TARGET}) = {result.min_dcf:.4f}')
    if calibrates:
        path = Path(calibration_file) if calibration_file else calibration_file_of(checkpoint_files[0])
        calibration = Calibration(result.fingerprints[0], Path(trials_file).name, result.equal_error_rate,
                                  result.min_dcf, result.eer_threshold, result.min_dcf_threshold,
                                  score_norm=score_norm, cohort=cohort_dir and os.path.abspath(cohort_dir),
                                  asnorm_top=asnorm_top if score_norm == 'asnorm' else None)
        try:
            calibration.save(path)
        except OSError as e:
            fail(f'--calibration_file {path}: cannot write it ({e.strerror or e}); give a writable path.')
        kind = '' if score_norm == 'none' else f' (of {score_norm}-normalised scores, which verify does not compute)'
        click.echo(f'Thresholds: {result.eer_threshold:.4f} at the EER, {result.min_dcf_threshold:.4f} at minDCF; '
                   f'recorded in {path}{kind}')
    elif score_norm != 'none' and len(checkpoint_files) == 1 and not crop:
        logger.info('No thresholds recorded: verify and identify score raw cosines, not %s-normalised ones '
                    '(--calibration_file records them anyway).', score_norm)


checkpoint_option = click.option(
    '--checkpoint_file', default=DEFAULT_CHECKPOINT, type=click.Path(dir_okay=False),
    show_default='models/ResCNN-w0.25-librispeech100.keras, shipped',
    help='Checkpoint of the model: .keras (ours; says its own architecture), or .h5 / .weights.h5 with --model and '
         '--width (the published ResCNN_triplet_training_checkpoint_265.h5: rescnn, width 1.0).')
threshold_option = click.option(
    '--threshold', default=None, type=click.FloatRange(-1.0, 1.0),
    help='Cosine score threshold in [-1, 1] [default: the calibrated one, see --calibration_file].')
operating_point_option = click.option(
    '--operating_point', default='eer', show_default=True, type=click.Choice(OPERATING_POINTS),
    help='Without --threshold: the calibrated threshold at the equal error rate or at minDCF (fewer false '
         'accepts).')
calibration_option = click.option(
    '--calibration_file', default=None, type=click.Path(dir_okay=False),
    help='Thresholds recorded by eval-trials [default: CHECKPOINT_FILE.calibration.json].')
profiles_option = click.option('--profiles', 'profiles_file', required=True, type=click.Path(dir_okay=False),
                               help='Speaker profile store (.npz) of enrolled speakers.')
inputs_argument = click.argument('inputs', nargs=-1, required=True)


@contextmanager
def toolkit_errors() -> Iterator[None]:
    """Turns the toolkit's domain errors (speaker, clustering, audio, checkpoint, file system) into `Error:` lines."""
    from checkpoints import CheckpointError
    from clustering import ClusteringError
    from features import AudioError
    from speaker import CalibrationMissing, SpeakerError
    try:
        yield
    except CalibrationMissing as e:
        fail(f'no --threshold and no calibration ({e.path} does not exist): give --threshold T, or run eval-trials '
             f'with this --checkpoint_file on a trial list to record one.')
    except (SpeakerError, ClusteringError, AudioError, CheckpointError) as e:
        fail(str(e))
    except OSError as e:
        fail(os_error_message(e))


def load_encoder(checkpoint_file: str, model: str, width: float | None):
    """The SpeakerEncoder of a checkpoint, its errors as `Error:` lines."""
    from speaker import SpeakerEncoder
    with toolkit_errors():
        return SpeakerEncoder(checkpoint_file, model, width)


def listed_inputs(inputs: tuple[str, ...]) -> list:
    """The AudioInputs of INPUTS (speaker.audio_inputs), found before the model loads; errors as `Error:` lines."""
    from speaker import audio_inputs
    with toolkit_errors():
        return audio_inputs(inputs)


def check_output_folder(path: str, option: str) -> None:
    """Fails, before any embedding work, when the folder `path` is to be written in does not exist."""
    folder = Path(path).parent
    if not folder.is_dir():
        fail(f'{option} {path}: no such folder {folder}; create it first or give another path.')


def embedded_inputs(encoder, entries: list) -> tuple[list, object]:
    """The audio inputs that embedded and their EmbeddedFiles; each skipped file is listed on stderr with the
    reason."""
    embedded = encoder.embed_files([entry.path for entry in entries], progress=True)
    for path, reason in embedded.skipped:
        click.echo(f'Skipped {path}: {reason}', err=True)
    by_path = {entry.path: entry for entry in entries}
    return [by_path[path] for path in embedded.paths], embedded


def skipped_note(embedded) -> str:
    return f'; skipped {len(embedded.skipped)} (listed above)' if embedded.skipped else ''


@cli.command()
@inputs_argument
@click.option('--out', required=True, type=click.Path(dir_okay=False),
              help='.npz (names, paths, speakers, embeddings, fingerprint), .csv, or .ark/.scp (Kaldi: both written).')
@checkpoint_option
@model_option
@checkpoint_width_option
def embed(inputs, out, checkpoint_file, model, width):
    """Embeds INPUTS (audio files, folders searched recursively, or .txt/.lst/.scp lists of paths or Kaldi wav.scp
    lines) into --out; the first folder under a given folder names the speaker. Unreadable, empty, silent or
    too-short files are skipped and listed."""
    from speaker import check_embeddings_file, check_kaldi_keys, write_embeddings
    with toolkit_errors():
        check_embeddings_file(out)
    check_output_folder(out, '--out')
    found = listed_inputs(inputs)
    if Path(out).suffix.lower() in ('.ark', '.scp'):
        with toolkit_errors():
            check_kaldi_keys([entry.name for entry in found])
    encoder = load_encoder(checkpoint_file, model, width)
    with toolkit_errors():
        entries, embedded = embedded_inputs(encoder, found)
        if not entries:
            fail(f'none of the {len(embedded.skipped)} files could be embedded (reasons above); nothing written.')
        write_embeddings(out, entries, embedded.embeddings, encoder.fingerprint)
    click.echo(f'Embedded {len(entries)} files into {out}{skipped_note(embedded)}.')


def resolved_threshold(encoder, threshold: float | None, operating_point: str, calibration_file: str | None):
    """The decision threshold (given or calibrated), logged with where it came from."""
    with toolkit_errors():
        chosen = encoder.decision_threshold(threshold, operating_point, calibration_file)
    logger.info('Threshold %.4f: %s.', chosen.value, 'given by --threshold' if chosen.source == 'given'
                else chosen.source)
    return chosen


@cli.command()
@click.argument('a', type=click.Path(exists=True, dir_okay=False))
@click.argument('b', type=click.Path(exists=True, dir_okay=False))
@checkpoint_option
@model_option
@checkpoint_width_option
@threshold_option
@operating_point_option
@calibration_option
@click.option('--json', 'as_json', is_flag=True, help='Print one JSON object (score, threshold, decision, source).')
def verify(a, b, checkpoint_file, model, width, threshold, operating_point, calibration_file, as_json):
    """Whether audio files A and B share a speaker: their cosine score against the threshold."""
    encoder = load_encoder(checkpoint_file, model, width)
    chosen = resolved_threshold(encoder, threshold, operating_point, calibration_file)
    with toolkit_errors():
        result = encoder.verify(a, b, chosen.value)
    if as_json:
        click.echo(json.dumps({'a': a, 'b': b, 'score': round(result.score, 6), 'threshold': result.threshold,
                               'same_speaker': bool(result.same_speaker), 'threshold_source': chosen.source}))
    else:
        decision = 'same speaker' if result.same_speaker else 'different speakers'
        click.echo(f'score = {result.score:.4f}, threshold = {result.threshold:.4f}: {decision}')


@cli.command()
@click.argument('files', nargs=-1, required=True)
@profiles_option
@click.option('--speaker', required=True, help='Name of the speaker to enrol (or to add files to).')
@checkpoint_option
@model_option
@checkpoint_width_option
def enroll(files, profiles_file, speaker, checkpoint_file, model, width):
    """Enrols --speaker from FILES (audio files, folders or lists) into the --profiles store, created when missing;
    enrolling more files later updates the speaker's mean embedding as if all were enrolled at once."""
    from speaker import SpeakerProfiles, check_speaker_name
    with toolkit_errors():
        check_speaker_name(speaker)
        stored = SpeakerProfiles.read(profiles_file) if Path(profiles_file).exists() else None  # before the model.
    check_output_folder(profiles_file, '--profiles')
    found = listed_inputs(files)
    encoder = load_encoder(checkpoint_file, model, width)
    with toolkit_errors():
        profiles = stored or SpeakerProfiles(profiles_file, encoder.fingerprint)
        profiles.check_model(encoder.fingerprint)
        entries, embedded = embedded_inputs(encoder, found)
        if not entries:
            fail(f'none of the {len(embedded.skipped)} files of --speaker {speaker} could be embedded (reasons '
                 f'above); {profiles_file} unchanged.')
        profiles.enroll(speaker, embedded.embeddings)
        profiles.save()
    click.echo(f'Enrolled {speaker} from {len(entries)} files ({profiles.counts[speaker.strip()]} in all) into '
               f'{profiles_file}{skipped_note(embedded)}.')


@cli.command()
@inputs_argument
@profiles_option
@checkpoint_option
@model_option
@checkpoint_width_option
@click.option('--top_k', default=DEFAULT_TOP_K, show_default=True, type=click.IntRange(min=1),
              help='Candidates per file.')
@threshold_option
@operating_point_option
@calibration_option
@click.option('--out', default=None, type=click.Path(dir_okay=False), help='Also write the table to this CSV.')
def identify(inputs, profiles_file, checkpoint_file, model, width, top_k, threshold, operating_point,
             calibration_file, out):
    """Who speaks in each of INPUTS: the --top_k enrolled speakers scoring at least the threshold, best first, or
    "unknown" (with the best score) when none does. Prints file, rank, speaker, score."""
    from speaker import SpeakerProfiles, write_table
    with toolkit_errors():  # a bad or empty store fails before the model loads.
        profiles = SpeakerProfiles.read(profiles_file)
    if not profiles.names:
        fail(f'--profiles {profiles_file}: no enrolled speakers; enrol some with enroll first.')
    if out:
        check_output_folder(out, '--out')
    found = listed_inputs(inputs)
    encoder = load_encoder(checkpoint_file, model, width)
    with toolkit_errors():
        profiles.check_model(encoder.fingerprint)
    chosen = resolved_threshold(encoder, threshold, operating_point, calibration_file)
    with toolkit_errors():
        entries, embedded = embedded_inputs(encoder, found)
        matches = profiles.identify(embedded.embeddings, top_k, chosen.value) if entries else []
    rows = [(entry.path, rank, name, f'{score:.4f}') for entry, ranked in zip(entries, matches, strict=True)
            for rank, (name, score) in enumerate(ranked, start=1)]
    for row in rows:  # printed first: a failing --out loses nothing.
        click.echo('\t'.join(map(str, row)))
    if out:
        with toolkit_errors():
            write_table(out, ('file', 'rank', 'speaker', 'score'), rows)
    unknown = sum(ranked[0][0] == UNKNOWN_SPEAKER for ranked in matches)
    logger.info('%d files identified, %d unknown%s.', len(entries), unknown, skipped_note(embedded))


@cli.command()
@profiles_option
@click.option('--remove', default=None, help='Forget this speaker (the store is rewritten atomically).')
def profiles(profiles_file, remove):
    """Lists the speakers enrolled in --profiles with their number of files; --remove NAME forgets one."""
    from speaker import SpeakerProfiles
    with toolkit_errors():
        store = SpeakerProfiles.read(profiles_file)
        if remove is not None:
            store.remove(remove)
            store.save()
            logger.info('Removed %s from %s.', remove, profiles_file)
    click.echo(f'{len(store.names)} speakers in {profiles_file} (model: {store.fingerprint})')
    for name in store.names:
        click.echo(f'{name}\t{store.counts[name]} files')


@cli.command()
@inputs_argument
@click.option('--out', required=True, type=click.Path(dir_okay=False), help='CSV of file, speaker, cluster.')
@click.option('--num_speakers', default=None, type=click.IntRange(min=1), help='Number of clusters to make.')
@click.option('--threshold', default=None, type=click.FloatRange(-1.0, 1.0),
              help='Instead of --num_speakers: merge clusters while their average cosine similarity is at least '
                   'this.')
@checkpoint_option
@model_option
@checkpoint_width_option
def cluster(inputs, out, num_speakers, threshold, checkpoint_file, model, width):
    """Groups INPUTS by speaker: agglomerative clustering (average linkage) on the cosine distance of their
    embeddings. When folders name the speakers of every file, prints purity, adjusted Rand index and NMI."""
    from clustering import cluster_embeddings, clustering_scores
    from speaker import write_table
    if (num_speakers is None) == (threshold is None):
        fail('give exactly one of --num_speakers K and --threshold T.')
    check_output_folder(out, '--out')
    found = listed_inputs(inputs)
    encoder = load_encoder(checkpoint_file, model, width)
    with toolkit_errors():
        entries, embedded = embedded_inputs(encoder, found)
    if num_speakers is not None and 2 <= len(entries) < num_speakers:  # fewer than 2: cluster_embeddings says so.
        fail(f'--num_speakers {num_speakers}: more than the {len(entries)} files embedded; give at most '
             f'{len(entries)}.')
    with toolkit_errors():
        labels = cluster_embeddings(embedded.embeddings, num_speakers, threshold)
        write_table(out, ('file', 'speaker', 'cluster'),
                    [(entry.path, entry.speaker or '', int(label)) for entry, label in zip(entries, labels,
                                                                                              strict=True)])
    click.echo(f'{len(entries)} files in {len(set(labels.tolist()))} clusters, written to {out}'
               f'{skipped_note(embedded)}.')
    speakers = [entry.speaker for entry in entries]
    if all(speakers):
        scores = clustering_scores(speakers, labels)
        click.echo(f'{len(set(speakers))} speakers: purity = {scores["purity"]:.4f}, adjusted Rand index = '
                   f'{scores["ari"]:.4f}, NMI = {scores["nmi"]:.4f}')


@cli.command('plot-embeddings')
@click.argument('embeddings_file', type=click.Path(dir_okay=False))
@click.option('--out', required=True, type=click.Path(dir_okay=False), help='PNG file to draw the map to.')
@click.option('--perplexity', default=TSNE_PERPLEXITY, show_default=True, type=click.FloatRange(min=1),
              help='t-SNE perplexity (about the number of close neighbours); clipped below the number of embeddings.')
def plot_embeddings_command(embeddings_file, out, perplexity):
    """Draws a t-SNE map of an embeddings .npz (from embed), coloured by speaker, to a PNG."""
    from plots import EmbeddingsFileError, PlotError, plot_embeddings, read_embeddings
    if not out.lower().endswith('.png'):
        fail(f'--out {out}: the map is drawn as a PNG; give a file name ending in .png.')
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
              type=click.Choice(EXPORT_FORMATS),
              help='SavedModel directory (signature serving_default: pcm -> embedding) or OUT/model.tflite.')
@click.option('--overwrite', is_flag=True, help='Replace OUT if it exists.')
def export_command(checkpoint_file, model, width, out, export_format, overwrite):
    """Exports a graph from raw 16 kHz mono float32 PCM of any length to the whole-utterance unit embedding
    (silence trimming, fbank and windows in the graph), as the Python encoder computes it."""
    from checkpoints import CheckpointError
    from export import ExportError, TargetExists, directory_size, export_checkpoint
    try:
        export_checkpoint(checkpoint_file, out, export_format, model, width, overwrite)
    except TargetExists:
        fail(f'--out {out}: already exists; choose another directory or add --overwrite.')
    except (CheckpointError, ExportError) as e:
        fail(str(e))
    except OSError as e:
        fail(f'--out {out}: {e.strerror or e}.')
    click.echo(f'{out}: {export_format}, {directory_size(out) / 1e6:.1f} MB.')


LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '::1')


@cli.command()
@profiles_option
@checkpoint_option
@model_option
@checkpoint_width_option
@click.option('--host', default=SERVICE_HOST, show_default=True,
              help='Address to listen on; the default accepts connections from this machine only.')
@click.option('--port', default=SERVICE_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option('--token', default=None, envvar=SERVICE_TOKEN_ENV, show_envvar=True,
              help='Bearer token every route but /health, / and /docs requires (Authorization: Bearer TOKEN).')
@click.option('--max_upload_mb', default=SERVICE_MAX_UPLOAD_MB, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help='Largest request body (all its uploads), MB.')
@click.option('--max_seconds', default=SERVICE_MAX_SECONDS, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help='Longest accepted clip, seconds.')
@click.option('--queue_size', default=SERVICE_QUEUE_SIZE, show_default=True, type=click.IntRange(min=1),
              help='Requests that may wait for the model; more are answered 503.')
@threshold_option
@operating_point_option
@calibration_option
def serve(profiles_file, checkpoint_file, model, width, host, port, token, max_upload_mb, max_seconds, queue_size,
          threshold, operating_point, calibration_file):
    """Serves the REST API (embed, verify, enrol, identify; OpenAPI page at /docs) and a web page at / over one
    model loaded once, with enrolled speakers kept in --profiles. Stop it with Ctrl-C."""
    import uvicorn

    from service import Limits, create_app, warm_up
    from speaker import SpeakerProfiles
    if Path(profiles_file).exists():
        with toolkit_errors():  # a bad store fails before the model loads.
            SpeakerProfiles.read(profiles_file)
    encoder = load_encoder(checkpoint_file, model, width)
    chosen = resolved_threshold(encoder, threshold, operating_point, calibration_file)
    with toolkit_errors():
        app = create_app(encoder, profiles_file, chosen, token or None,
                         Limits(int(max_upload_mb * 1e6), max_seconds, queue_size), VERSION)
        warm_up(encoder)
    if host not in LOOPBACK_HOSTS and not token:
        logger.warning('--host %s accepts connections from other machines and no --token is set: anyone who can '
                       'reach it can enrol and delete speakers.', host)
    logger.info('Serving %s on http://%s:%d (page /, API docs /docs).', encoder.fingerprint, host, port)
    uvicorn.run(app, host=host, port=port, log_level='info', timeout_graceful_shutdown=5)


if __name__ == '__main__':
    cli()
