"""Export: a checkpoint's whole-utterance embedder as one TensorFlow graph from raw audio, saved as a SavedModel or
a TFLite flatbuffer, written beside the target directory and renamed into place.

The graph takes 16 kHz mono float32 PCM of any length, shape (samples,), range [-1, 1], and returns the unit
embedding (512,) that embedding.Embedder.embed_signal gives for the same samples: silence trimmed as
features.trim_silence does (95th percentile of |x|, exact selection by sorting), the normalised fbank
(conv_models.PcmToFbank), windows of NUM_FRAMES frames every WINDOW_HOP frames with the last one ending at the last
frame (a short utterance zero-padded), the model on all windows, their mean, L2-normalised. Audio the Python
encoder refuses (empty, silent, or shorter than one 25 ms frame after trimming) gives an all-zero vector.

Imports checkpoints, conv_models, features and constants.
"""

import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.lite.python.convert_phase import ConverterError

from checkpoints import build_model
from constants import EXPORT_FORMATS, NUM_FBANKS, NUM_FRAMES, SILENCE_PERCENTILE, WINDOW_HOP
from conv_models import PcmToFbank, SpeakerModel
from features import frame_length

logger = logging.getLogger(__name__)

TFLITE_FILE = 'model.tflite'
SIGNATURE = 'serving_default'


class ExportError(ValueError):
    """An export that cannot be made: an unknown format, a target that is the current directory or above it, a
    model TFLite cannot convert; the message says what to do."""


class TargetExists(ExportError):
    """The export's target directory exists and overwriting was not asked for."""

    def __init__(self, path: Path):
        super().__init__(f'{path}: already exists; choose another directory or overwrite it.')
        self.path = path


def export_target(out: str | Path, overwrite: bool) -> Path:
    """`out` made absolute; ExportError when it is the current directory or one above it (replacing it would
    delete what is running), TargetExists when it exists and not `overwrite`."""
    target = Path(out).resolve()
    if Path.cwd().is_relative_to(target):
        raise ExportError(f'{out}: is the current directory or one above it; give the path of a new directory.')
    if target.exists() and not overwrite:
        raise TargetExists(target)
    return target


def loud_threshold(energy: tf.Tensor) -> tf.Tensor:
    """The smallest |x| that numpy's 95th percentile (linear interpolation) counts as loud: the sample at the
    percentile's index when it falls on a sample, else the next larger one (no sample lies strictly between two
    neighbours of the sorted |x|, so `energy >= threshold` selects what `energy >= np.percentile(...)` does).
    Integer index arithmetic, so long signals lose no precision; 0 for no samples."""
    ordered = tf.concat([tf.sort(energy), [0.0]], axis=0)
    scaled = (tf.size(energy) - 1) * SILENCE_PERCENTILE
    below = scaled // 100
    return tf.gather(ordered, tf.where(scaled % 100 == 0, below, below + 1))


def trimmed(pcm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """features.trim_silence in the graph: the samples from the first loud one up to (not including) the last,
    zero-padded to one 25 ms frame if shorter, and whether the Python encoder would accept them (a scalar bool)."""
    energy = tf.abs(pcm)
    loud = tf.cast(tf.reshape(tf.where((energy >= loud_threshold(energy)) & (energy > 0)), [-1]), tf.int32)
    has_loud = tf.size(loud) > 0
    first = tf.where(has_loud, tf.reduce_min(loud), 0)  # reduce_min and reduce_max of nothing are not indices.
    speech = tf.slice(pcm, [first], [tf.where(has_loud, tf.reduce_max(loud), 0) - first])
    minimum = frame_length()
    valid = has_loud & (tf.size(speech) >= minimum)
    return tf.pad(speech, [[0, tf.maximum(minimum - tf.size(speech), 0)]]), valid


def windows(features: tf.Tensor) -> tf.Tensor:
    """embedding.utterance_windows in the graph: (frames, NUM_FBANKS) to (windows, NUM_FRAMES, NUM_FBANKS, 1),
    every WINDOW_HOP frames, the last ending at the last frame; fewer than NUM_FRAMES frames are zero-padded."""
    num_frames = tf.shape(features)[0]
    padded = tf.pad(features, [[0, tf.maximum(NUM_FRAMES - num_frames, 0)], [0, 0]])
    last = tf.maximum(num_frames - NUM_FRAMES, 0)
    starts = tf.minimum(tf.range(0, last + WINDOW_HOP, WINDOW_HOP), last)
    indices = tf.expand_dims(starts, 1) + tf.expand_dims(tf.range(NUM_FRAMES), 0)
    return tf.expand_dims(tf.gather(padded, indices), -1)


class PcmEmbedder(tf.Module):
    """A tf.Module whose `embed` maps 16 kHz PCM (samples,) float32 to the unit embedding (512,) float32."""

    def __init__(self, speaker_model: SpeakerModel):
        super().__init__(name='deep_speaker')
        self.model_name = speaker_model.m.name
        self.forward = speaker_model.m.__call__  # a bound method is not tracked: the weights are saved once,
        self.weights = [v.value for v in speaker_model.m.variables]  # as these tf.Variables (TFLite freezes them).
        self.front_end = PcmToFbank(name='fbank')

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name='pcm')])
    def embed(self, pcm):
        speech, valid = trimmed(pcm)
        features = tf.reshape(self.front_end(tf.expand_dims(speech, 0)), [-1, NUM_FBANKS])
        window_embeddings = self.forward(tf.reshape(windows(features), [-1, NUM_FRAMES, NUM_FBANKS, 1]),
                                       training=False)
        embedding = tf.math.l2_normalize(tf.reduce_mean(window_embeddings, axis=0))
        return {'embedding': tf.where(valid, embedding, tf.zeros_like(embedding))}


def save_savedmodel(module: PcmEmbedder, directory: Path) -> None:
    tf.saved_model.save(module, str(directory), signatures={SIGNATURE: module.embed})


def tflite_flatbuffer(saved_model: Path, model_name: str) -> bytes:
    """A SavedModel's serving signature as a TFLite flatbuffer of TFLite builtin ops only (the sort, FFT and dynamic
    shapes of ResCNN and TDNN are builtins). ExportError when more is needed: the GRU's loops need Select TF ops,
    which tensorflow's own TFLite interpreter cannot run (no Flex delegate), so such a file could not be checked."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    try:
        return converter.convert()
    except ConverterError as e:
        logger.debug('TFLite conversion of %s failed: %s', model_name, e)
        raise ExportError(f'{model_name}: has layers that TFLite has no builtin ops for (a GRU\'s loops); export '
                          f'it as a savedmodel.') from None


def save_tflite(module: PcmEmbedder, directory: Path) -> None:
    """`directory`/model.tflite, converted from a SavedModel of `module` written in a scratch folder beside it."""
    scratch = directory.with_name(directory.name + '.savedmodel')
    save_savedmodel(module, scratch)
    try:
        flatbuffer = tflite_flatbuffer(scratch, module.model_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    directory.mkdir()
    (directory / TFLITE_FILE).write_bytes(flatbuffer)


SAVERS = dict(zip(EXPORT_FORMATS, (save_savedmodel, save_tflite), strict=True))


def export_model(speaker_model: SpeakerModel, out: str | Path, export_format: str, overwrite: bool = False) -> Path:
    """Writes the PCM-to-embedding graph of `speaker_model` to directory `out` in `export_format` ('savedmodel':
    a SavedModel with signature 'serving_default', input 'pcm', output 'embedding'; 'tflite': out/model.tflite),
    through a temporary directory beside `out` renamed into place. Returns `out` made absolute. ExportError (see
    export_target) for a target that cannot be written, or an unknown format."""
    if export_format not in SAVERS:
        raise ExportError(f'{export_format}: unknown export format; use one of {", ".join(EXPORT_FORMATS)}.')
    out = export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.{uuid.uuid4().hex}.tmp')
    try:
        SAVERS[export_format](PcmEmbedder(speaker_model), tmp)
        replace_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info('Exported %s to %s (%.1f MB).', export_format, out, directory_size(out) / 1e6)
    return out


def replace_directory(new: Path, target: Path) -> None:
    """Renames directory `new` to `target`; an existing `target` is first renamed aside, then deleted."""
    old = target.with_name(f'.{target.name}.{uuid.uuid4().hex}.old') if target.exists() else None
    if old is not None:
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export_checkpoint(checkpoint: str, out: str | Path, export_format: str, model: str = 'rescnn',
                      width: float | None = None, overwrite: bool = False) -> Path:
    """export_model of the model a checkpoint was trained as (checkpoints.build_model); CheckpointError for a
    checkpoint that does not load; the target is checked (export_target) before the slow model build."""
    export_target(out, overwrite)
    return export_model(build_model(str(checkpoint), model, width), out, export_format, overwrite)


def directory_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())


def load_savedmodel_embedder(directory: str | Path):
    """The exported SavedModel's function: f(pcm (samples,) float32) -> embedding (512,) numpy float32."""
    signature = tf.saved_model.load(str(directory)).signatures[SIGNATURE]
    return lambda pcm: signature(pcm=tf.constant(pcm, tf.float32))['embedding'].numpy()


def load_tflite_embedder(directory: str | Path):
    """The exported TFLite model's signature runner: f(pcm (samples,) float32) -> embedding (512,) float32."""
    runner = tf.lite.Interpreter(model_path=str(Path(directory) / TFLITE_FILE)).get_signature_runner(SIGNATURE)
    return lambda pcm: runner(pcm=np.asarray(pcm, np.float32))['embedding']
