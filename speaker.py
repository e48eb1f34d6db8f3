"""The speaker toolkit's Python API: SpeakerEncoder (embed a file, a signal or many files; cosine similarity;
verify two recordings against a calibrated threshold), SpeakerProfiles (enrol, remove, list and identify speakers,
open-set, in an .npz store tied to the model that made it), audio_inputs (files, folders and list files to audio
paths with speaker labels) and the calibration files eval-trials writes beside a checkpoint.

Three lines from checkpoint to score:

    encoder = SpeakerEncoder('models/ResCNN-w0.25-librispeech100.keras')
    result = encoder.verify('samples/PhilippeRemy/PhilippeRemy_001.wav', 'samples/PhilippeRemy/PhilippeRemy_002.wav')
    print(result.score, result.same_speaker)

Embeddings are float32 unit vectors of shape (dims,) (512 for every model of the project), of the whole utterance
(embedding.Embedder: the re-normalised mean of 1.6 s windows), deterministic; scores are cosine similarities in
[-1, 1]. Imports embedding, checkpoints, features, workdir and constants.
"""

import io
import json
import logging
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from constants import (
    AUDIO_EXTENSIONS,
    CALIBRATION_SUFFIX,
    DCF_P_TARGET,
    DEFAULT_CHECKPOINT,
    DEFAULT_TOP_K,
    LIST_FILE_EXTENSIONS,
    MAX_SPEAKER_NAME_LENGTH,
    OPERATING_POINTS,
    UNKNOWN_SPEAKER,
)
from embedding import Embedder
from features import AudioError
from workdir import atomic_path

logger = logging.getLogger(__name__)

PROFILE_STORE_VERSION = 1
PROFILE_KEYS = ('version', 'fingerprint', 'names', 'sums', 'counts')


class SpeakerError(ValueError):
    """Bad toolkit input: inputs without audio, a bad list file, profile store or speaker name, a threshold outside
    [-1, 1], a calibration of another model. The message names the file or value and the fix."""


class CalibrationMissing(SpeakerError):
    """No threshold was given and the checkpoint has no calibration file (`path`)."""

    def __init__(self, path: Path):
        super().__init__(f'{path}: no such calibration file; run eval-trials with this checkpoint on a trial list, '
                         f'or give a threshold.')
        self.path = path


class AudioInput(NamedTuple):
    """One audio file to embed: its path, its speaker (the first folder under a given folder; None for a file or a
    list entry) and its name (a Kaldi utterance id from a `utt path` list line, else the path)."""
    path: str
    speaker: str | None
    name: str


class EmbeddedFiles(NamedTuple):
    """What embed_files made: the embedded paths in input order, their embeddings (files, dims) float32, and the
    skipped files as (path, reason)."""
    paths: list[str]
    embeddings: np.ndarray
    skipped: list[tuple[str, str]]


class Verification(NamedTuple):
    """verify's answer: the cosine score in [-1, 1], the threshold, and whether score >= threshold."""
    score: float
    threshold: float
    same_speaker: bool


class Threshold(NamedTuple):
    """A decision threshold on cosine scores and where it came from (for people: 'given', or the calibration)."""
    value: float
    source: str


def check_threshold(threshold: float) -> float:
    """The threshold as a float; SpeakerError outside [-1, 1] (cosine scores lie there)."""
    if not -1.0 <= threshold <= 1.0:
        raise SpeakerError(f'threshold {threshold:g}: outside [-1, 1], the range of cosine scores; give one in it '
                           f'(e.g. the calibrated one).')
    return float(threshold)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows of a (n, dims) or (dims,) array scaled to unit length, float32 (n, dims); SpeakerError for a zero or
    non-finite row."""
    rows = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if rows.ndim != 2 or not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise SpeakerError(f'embeddings of shape {np.shape(embeddings)}: expected finite non-zero vectors, shape '
                           f'(dims,) or (n, dims).')
    return rows / norms


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Cosine similarity of embeddings a (dims,) or (n, dims) and b (dims,) or (m, dims): a float for two vectors,
    (n,) or (m,) for a vector and a matrix, (n, m) for two matrices. Symmetric: similarity(b, a) is the transpose."""
    scores = unit_rows(a) @ unit_rows(b).T
    if np.ndim(a) == 1 and np.ndim(b) == 1:
        return float(scores[0, 0])
    return scores[0] if np.ndim(a) == 1 else scores[:, 0] if np.ndim(b) == 1 else scores


def folder_inputs(folder: Path) -> list[AudioInput]:
    """The audio files under `folder`, recursively and sorted, each labelled with the first folder under `folder`
    (LibriSpeech `speaker/chapter/utt.flac` or `speaker/utt.wav`; None for files directly in it)."""
    files = sorted(p for p in folder.rglob('*')
                   if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith('.') and p.is_file())
    if not files:
        raise SpeakerError(f'{folder}: no audio files ({", ".join(AUDIO_EXTENSIONS)}) in it or below it; give a '
                           f'folder of audio files.')
    return [AudioInput(str(p), p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None,
                       str(p)) for p in files]


def listed_path(text: str, list_file: Path) -> Path | None:
    """A path written in a list file: relative to the current directory (as Kaldi reads them) or else to the list
    file's folder; None when neither exists."""
    for candidate in (Path(text), list_file.parent / text):
        if candidate.is_file():
            return candidate
    return None


def list_file_inputs(list_file: Path) -> list[AudioInput]:
    """The files of a list: one path per line, or Kaldi wav.scp `utterance-id path` lines (blank lines and `#`
    comments skipped). A piped command (`... |`) or a missing file is refused with its line number."""
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise SpeakerError(f'{list_file}: not a text list of audio paths (binary content); give audio files with '
                           f'.wav, .flac, .ogg or .mp3 suffixes, or a text list.') from None
    inputs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        where = f'{list_file}:{number}'
        if not line or line.startswith('#'):
            continue
        if line.endswith('|'):
            raise SpeakerError(f'{where}: a piped command ({line!r}); write the audio to .wav or .flac files first '
                               f'(e.g. with sox or ffmpeg) and list their paths.')
        whole = listed_path(line, list_file)  # a path with spaces is a whole line, not `utterance-id path`.
        fields = line.split(maxsplit=1)
        name, text = (line, line) if whole or len(fields) == 1 else fields
        path = whole or listed_path(text, list_file)
        if path is None:
            raise SpeakerError(f'{where}: no such audio file {text!r}; paths are relative to the current directory '
                               f'or to the list file\'s folder.')
        inputs.append(AudioInput(str(path), None, name))
    if not inputs:
        raise SpeakerError(f'{list_file}: lists no audio files; write one path (or "utterance-id path") per line.')
    return inputs


def audio_inputs(inputs: Sequence[str | Path]) -> list[AudioInput]:
    """Audio files from files, folders (recursive; speaker = first folder under the given one) and list files
    (.txt, .lst, .scp: paths or Kaldi wav.scp lines), in the given order; a file found twice is kept once.
    SpeakerError for a missing input, a folder without audio, or a bad list."""
    found: dict[str, AudioInput] = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            entries = folder_inputs(path)
        elif path.is_file() and path.suffix.lower() in LIST_FILE_EXTENSIONS:
            entries = list_file_inputs(path)
        elif path.is_file():
            entries = [AudioInput(str(path), None, str(path))]
        else:
            raise SpeakerError(f'{given}: no such file or folder; give audio files, folders of them or a list file '
                               f'({", ".join(LIST_FILE_EXTENSIONS)}).')
        for entry in entries:
            if entry.path in found:
                logger.warning('%s: given more than once; embedded once.', entry.path)
            found.setdefault(entry.path, entry)
    return list(found.values())


EMBEDDING_FORMATS = ('.npz', '.csv', '.ark', '.scp')


def check_embeddings_file(path: str | Path) -> Path:
    """The output path; SpeakerError unless it ends in one of EMBEDDING_FORMATS."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_FORMATS:
        raise SpeakerError(f'{path}: unknown embeddings format; name it .npz, .csv, or .ark / .scp (Kaldi).')
    return path


def write_embeddings(path: str | Path, inputs: Sequence[AudioInput], embeddings: np.ndarray, fingerprint: str) -> None:
    """Writes embeddings (files, dims) of `inputs` atomically: .npz (names, paths, speakers ('' when unknown),
    embeddings float32, fingerprint), .csv (name, speaker, then one column per dimension) or Kaldi .ark with its
    .scp (both written for either suffix; the names are the keys, without spaces)."""
    path = check_embeddings_file(path)
    names = [entry.name for entry in inputs]
    speakers = [entry.speaker or '' for entry in inputs]
    if path.suffix.lower() == '.npz':
        with atomic_path(path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, names=np.array(names, dtype=str), paths=np.array([e.path for e in inputs], dtype=str),
                     speakers=np.array(speakers, dtype=str), embeddings=embeddings.astype(np.float32),
                     fingerprint=np.array(fingerprint))
    elif path.suffix.lower() == '.csv':
        write_table(path, ['name', 'speaker'] + [f'e{i}' for i in range(embeddings.shape[1])],
                    [[name, speaker] + [f'{x:.7g}' for x in row]
                     for name, speaker, row in zip(names, speakers, embeddings, strict=True)])
    else:
        write_kaldi(path.with_suffix('.ark'), path.with_suffix('.scp'), names, embeddings)


def csv_field(text: str) -> str:
    """A CSV field, quoted when it holds a comma, a quote or a line break."""
    return f'"{text.replace(chr(34), 2 * chr(34))}"' if re.search(r'[,"\r\n]', text) else text


def check_kaldi_keys(names: Sequence[str]) -> None:
    """SpeakerError for a repeated name or one that is empty or holds whitespace (Kaldi keys cannot)."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise SpeakerError(f'{repeated[0]!r}: the name of more than one file; Kaldi keys must be unique.')
    for name in names:
        if not name or re.search(r'\s', name):
            raise SpeakerError(f'{name!r}: Kaldi keys cannot contain whitespace; rename the file or list it as '
                               f'"utterance-id path" in a .scp list, or write .npz or .csv.')


def write_kaldi(ark: Path, scp: Path, names: list[str], embeddings: np.ndarray) -> None:
    """A Kaldi float-vector archive `ark` (kaldiio) and its index `scp` (`name ark:offset` lines), each renamed
    into place; SpeakerError for a name with whitespace (Kaldi keys cannot hold it)."""
    import kaldiio
    check_kaldi_keys(names)
    index = io.StringIO()
    with atomic_path(ark) as tmp_ark:
        kaldiio.save_ark(str(tmp_ark), {n: e.astype(np.float32) for n, e in zip(names, embeddings, strict=True)},
                         scp=index)
        offsets = [line.rsplit(':', 1)[1] for line in index.getvalue().splitlines()]
        with atomic_path(scp) as tmp_scp:
            tmp_scp.write_text(''.join(f'{n} {ark}:{o}\n' for n, o in zip(names, offsets, strict=True)))


def write_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV file of `header` and `rows`, written atomically."""
    lines = [','.join(csv_field(str(value)) for value in row) for row in [header, *rows]]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text('\n'.join(lines) + '\n')


class Calibration(NamedTuple):
    """Score thresholds measured by eval-trials on a trial list (accept score >= threshold), for the model with
    `fingerprint`: at the EER and at minDCF(p_target); the list's name, EER (fraction) and minDCF; and the score
    normalisation the thresholds assume ('none': raw cosines, the only scores verify and identify compute; 'mean'
    or 'asnorm' with the cohort's working dir and AS-norm's top N). Files without it are of raw cosines."""
    fingerprint: str
    trials: str
    equal_error_rate: float
    min_dcf: float
    eer_threshold: float
    min_dcf_threshold: float
    p_target: float = DCF_P_TARGET
    score_norm: str = 'none'
    cohort: str | None = None
    asnorm_top: int | None = None

    def threshold(self, operating_point: str) -> float:
        """The threshold at 'eer' or 'min_dcf'."""
        return self.eer_threshold if operating_point == 'eer' else self.min_dcf_threshold

    def describe(self, operating_point: str) -> str:
        point = 'EER' if operating_point == 'eer' else f'minDCF(p_target={self.p_target:g})'
        return (f'the {point} threshold of {self.trials} (EER {100 * self.equal_error_rate:.2f} %, minDCF '
                f'{self.min_dcf:.4f})')

    def save(self, path: Path) -> None:
        """Writes the calibration as JSON, atomically."""
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(self._asdict(), indent=2) + '\n')

    @classmethod
    def read(cls, path: Path) -> 'Calibration':
        """The calibration in `path`; SpeakerError when it is not one."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:
            raise SpeakerError(f'{path}: not a calibration file ({e}); delete it and run eval-trials again.') from None


def calibration_file_of(checkpoint_file: str | Path) -> Path:
    """Where eval-trials records a checkpoint's thresholds by default: `<checkpoint>.calibration.json` beside it."""
    return Path(f'{checkpoint_file}{CALIBRATION_SUFFIX}')


class SpeakerEncoder:
    """One checkpoint's model, loaded once, with the project's one embedding policy (embedding.Embedder).

    checkpoint_file: a .keras checkpoint of ours (it says its own architecture) or a .h5 / .weights.h5 file of
    architecture `model` at `width` (the published Keras-2 ResCNN: 'rescnn', 1.0).
    """

    def __init__(self, checkpoint_file: str | Path = DEFAULT_CHECKPOINT, model: str = 'rescnn',
                 width: float | None = None):
        self.checkpoint_file = str(checkpoint_file)
        self.embedder = Embedder.from_checkpoint(self.checkpoint_file, model, width)
        self.fingerprint = self.embedder.fingerprint

    @property
    def dims(self) -> int:
        """Embedding size (512)."""
        return int(self.embedder.model.m.output_shape[-1])

    def embed_file(self, path: str | Path) -> np.ndarray:
        """An audio file (wav or flac, any rate, mono or not) to its unit embedding, float32 (dims,)."""
        return self.embedder.embed_file(path)

    def embed_signal(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        """Samples in [-1, 1] at `sample_rate` Hz, mono (samples,) or multi-channel (samples, channels) (averaged,
        as files are), to the unit embedding float32 (dims,) that a file of them gives."""
        signal = np.asarray(signal, dtype=np.float32)
        if signal.ndim not in (1, 2):
            raise AudioError(f'<signal of shape {signal.shape}>: expected (samples,) or (samples, channels).')
        return self.embedder.embed_signal(signal.mean(axis=1) if signal.ndim == 2 else signal, sample_rate)

    def embed_files(self, paths: Sequence[str | Path], progress: bool = False) -> EmbeddedFiles:
        """Many files through Embedder.embed_files (features one chunk ahead on threads, one predict per chunk).
        Files that cannot be embedded (unreadable, empty, silent, too short) are skipped with the reason;
        `progress` shows a tqdm bar on stderr."""
        paths = [str(p) for p in paths]
        reasons: dict[int, str] = {}
        embeddings = self.embedder.embed_files(paths, reasons, progress)
        kept = [row for row in range(len(paths)) if row not in reasons]
        skipped = [(paths[row], reasons[row].removeprefix(f'{paths[row]}: ')) for row in sorted(reasons)]
        return EmbeddedFiles([paths[row] for row in kept], embeddings[kept], skipped)

    def embedding(self, item: str | Path | np.ndarray) -> np.ndarray:
        """An embedding (dims,) from a path (embedded) or an embedding (checked and unit-normalised)."""
        if isinstance(item, str | Path):
            return self.embed_file(item)
        vector = unit_rows(item)
        if vector.shape != (1, self.dims):
            raise SpeakerError(f'embedding of shape {np.shape(item)}: expected ({self.dims},) from this model.')
        return vector[0]

    similarity = staticmethod(cosine_similarity)

    def decision_threshold(self, threshold: float | None = None, operating_point: str = 'eer',
                           calibration: str | Path | None = None) -> Threshold:
        """`threshold` when given (checked to lie in [-1, 1]), else the calibrated one at `operating_point` ('eer'
        or 'min_dcf') from `calibration` (default: calibration_file_of(checkpoint)). CalibrationMissing without
        either; SpeakerError for a calibration of another model."""
        if threshold is not None:
            return Threshold(check_threshold(threshold), 'given')
        if operating_point not in OPERATING_POINTS:
            raise SpeakerError(f'operating point {operating_point!r}: expected one of {", ".join(OPERATING_POINTS)}.')
        path = Path(calibration) if calibration else calibration_file_of(self.checkpoint_file)
        if not path.is_file():
            raise CalibrationMissing(path)
        measured = Calibration.read(path)
        if measured.score_norm != 'none':
            raise SpeakerError(f'{path}: thresholds of {measured.score_norm}-normalised scores, but verification '
                               f'scores raw cosines; run eval-trials without --score_norm to calibrate, or give a '
                               f'threshold.')
        if measured.fingerprint != self.fingerprint:
            raise SpeakerError(f'{path}: thresholds of another model ({measured.fingerprint}), not of this checkpoint '
                               f'({self.fingerprint}); run eval-trials with this checkpoint, or give a threshold.')
        return Threshold(check_threshold(measured.threshold(operating_point)),
                         f'{measured.describe(operating_point)}, from {path}')

    def verify(self, a: str | Path | np.ndarray, b: str | Path | np.ndarray, threshold: float | None = None,
               operating_point: str = 'eer') -> Verification:
        """Whether a and b (paths or embeddings (dims,)) share a speaker: cosine score >= threshold (given, or the
        calibrated one: decision_threshold). Symmetric: verify(b, a) gives the same score."""
        limit = self.decision_threshold(threshold, operating_point).value
        score = cosine_similarity(self.embedding(a), self.embedding(b))
        return Verification(score, limit, score >= limit)


def check_speaker_name(name: str) -> str:
    """The name, stripped; SpeakerError when empty, too long, with path or control characters, or 'unknown'."""
    stripped = name.strip()
    if not stripped or len(stripped) > MAX_SPEAKER_NAME_LENGTH or stripped in ('.', '..') \
            or re.search(r'[/\\\x00-\x1f\x7f]', stripped) or stripped == UNKNOWN_SPEAKER:
        raise SpeakerError(f'speaker name {name!r}: expected 1 to {MAX_SPEAKER_NAME_LENGTH} characters without / \\ '
                           f'or control characters, and not {UNKNOWN_SPEAKER!r} (identify\'s answer for no match).')
    return stripped


class SpeakerProfiles:
    """Enrolled speakers of one model: per speaker the sum of its unit embeddings and their count, so that its
    profile (the unit mean) after enrolling files in several calls equals enrolling them at once. Stored as .npz
    (no pickle) with the model's fingerprint; a store of another model is refused."""

    def __init__(self, path: str | Path, fingerprint: str, names: Sequence[str] = (), sums: np.ndarray | None = None,
                 counts: np.ndarray | None = None):
        self.path, self.fingerprint = Path(path), fingerprint
        self.sums = {name: np.asarray(s, dtype=np.float64) for name, s in zip(names, sums if sums is not None else [],
                                                                              strict=True)}
        self.counts = {name: int(c) for name, c in zip(names, counts if counts is not None else [], strict=True)}
        self._matrix: np.ndarray | None = None

    @classmethod
    def read(cls, path: str | Path, fingerprint: str | None = None) -> 'SpeakerProfiles':
        """The store in `path`; SpeakerError when it is missing or not a profile store, or (with `fingerprint`)
        when another model made it."""
        path = Path(path)
        if not path.is_file():
            raise SpeakerError(f'{path}: no such profile store; enrol speakers into it first.')
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = {key: data[key] for key in PROFILE_KEYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            message = (str(e).splitlines() or [type(e).__name__])[0]
            raise SpeakerError(f'{path}: not a speaker profile store ({message}); give another file or delete it.') \
                from None
        sums, counts = stored['sums'], stored['counts']
        if sums.ndim != 2 or not len(stored['names']) == len(sums) == len(counts):
            raise SpeakerError(f'{path}: not a speaker profile store ({len(stored["names"])} names, sums of shape '
                               f'{sums.shape}, {len(counts)} counts); give another file or delete it.')
        profiles = cls(path, str(stored['fingerprint']), [str(n) for n in stored['names']], sums, counts)
        if fingerprint is not None:
            profiles.check_model(fingerprint)
        return profiles

    def check_model(self, fingerprint: str) -> None:
        """SpeakerError when the profiles were enrolled with another model than the one with `fingerprint`."""
        if self.fingerprint != fingerprint:
            raise SpeakerError(f'{self.path}: profiles enrolled with another model ({self.fingerprint}), not with this '
                               f'checkpoint ({fingerprint}); use that checkpoint, or enrol into a new profile store.')

    @classmethod
    def open(cls, path: str | Path, fingerprint: str) -> 'SpeakerProfiles':
        """The store in `path` (checked to be of the model with `fingerprint`), or a new empty one when the file
        does not exist (written by save)."""
        return cls.read(path, fingerprint) if Path(path).exists() else cls(path, fingerprint)

    @property
    def names(self) -> list[str]:
        """Enrolled speakers, in enrolment order."""
        return list(self.sums)

    def matrix(self) -> np.ndarray:
        """The profiles, one unit vector per speaker in `names` order: float32 (speakers, dims)."""
        if self._matrix is None:
            sums = np.stack(list(self.sums.values()))
            self._matrix = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
        return self._matrix

    def enroll(self, name: str, embeddings: np.ndarray) -> None:
        """Adds embeddings (n, dims) or (dims,) (each scaled to unit length) to speaker `name`, new or enrolled."""
        name = check_speaker_name(name)
        rows = unit_rows(embeddings).astype(np.float64)
        dims = next(iter(self.sums.values())).shape[0] if self.sums else rows.shape[1]
        if rows.shape[1] != dims or len(rows) == 0:
            raise SpeakerError(f'{self.path}: embeddings of shape {np.shape(embeddings)} for {name!r}; the store '
                               f'holds {dims}-d profiles.')
        self.sums[name] = self.sums.get(name, np.zeros(dims)) + rows.sum(axis=0)
        self.counts[name] = self.counts.get(name, 0) + len(rows)
        self._matrix = None

    def remove(self, name: str) -> None:
        """Forgets speaker `name`; SpeakerError when it is not enrolled."""
        if name not in self.sums:
            raise SpeakerError(f'{self.path}: no speaker {name!r}; enrolled: {", ".join(self.names) or "none"}.')
        del self.sums[name], self.counts[name]
        self._matrix = None

    def identify(self, embeddings: np.ndarray, top_k: int = DEFAULT_TOP_K,
                 threshold: float | None = None) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
        """The best `top_k` enrolled speakers of an embedding (dims,) as (speaker, cosine score), best first, or
        one such list per row of (n, dims); one matrix product for all. With a threshold (open set) only the
        speakers scoring at least it are kept, and a list with none holds (UNKNOWN_SPEAKER, best score)."""
        if not self.sums:
            raise SpeakerError(f'{self.path}: no enrolled speakers; enrol some first.')
        if threshold is not None:
            check_threshold(threshold)
        scores = (self.matrix() @ unit_rows(embeddings).T).T  # (n, speakers); a matrix-vector product for one.
        k = min(top_k, scores.shape[1])
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        names = self.names
        results = []
        for row, candidates in zip(scores, best, strict=True):
            ranked = [(names[j], float(row[j])) for j in candidates[np.argsort(-row[candidates], kind='stable')]]
            accepted = ranked if threshold is None else [(n, s) for n, s in ranked if s >= threshold]
            results.append(accepted or [(UNKNOWN_SPEAKER, ranked[0][1])])
        return results[0] if np.ndim(embeddings) == 1 else results

    def save(self) -> None:
        """Writes the store to its path atomically (a temporary file renamed into place): .npz of the format
        version, the fingerprint, the names (unicode), the sums (speakers, dims) float64 and the counts."""
        names = self.names
        dims = next(iter(self.sums.values())).shape[0] if names else 0
        with atomic_path(self.path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, version=np.array(PROFILE_STORE_VERSION), fingerprint=np.array(self.fingerprint),
                     names=np.array(names, dtype=str), counts=np.array([self.counts[n] for n in names], dtype=np.int64),
                     sums=np.stack([self.sums[n] for n in names]) if names else np.zeros((0, dims)))
