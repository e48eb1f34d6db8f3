"""Corpora: what audio files a cache build reads and the (speaker, utterance) name each gets in the cache.

Four sources, each a Corpus (its layout said in words, its utterances, the files it leaves out and why):
- a folder tree (`folder_corpus`): the speaker is the first folder under it, the utterance the rest of the path,
  extension kept: LibriSpeech `speaker/chapter/utterance.flac`, VoxCeleb 1/2 `speaker/video/utterance.wav`, plain
  `speaker/utterance.wav`, or deeper; found with os.scandir (no stat per file); VoxCeleb2's .m4a is refused with
  the ffmpeg command that converts it;
- a CSV manifest (`manifest_corpus`): `path,speaker` per line, an optional `path,speaker` header, relative paths
  read from the manifest's folder; the utterance is the path as written;
- Kaldi `wav.scp` + `utt2spk` (`kaldi_corpus`): the utterance is the utterance id, plain file paths only (a piped
  command is refused).
Names are escaped (escape_name), so no two files share a name and none looks like an augmented copy. A Shard
(`--shard K/N`) keeps the utterances whose stable hash falls to it. Imports constants only.
"""

import csv
import logging
import os
import re
import shlex
import zlib
from pathlib import Path
from typing import NamedTuple

from constants import AUDIO_EXTENSIONS, AUGMENTED_MARK, CONVERTIBLE_EXTENSIONS, MANIFEST_HEADER

logger = logging.getLogger(__name__)

# The conversion of VoxCeleb2's .m4a to 16 kHz mono wav beside each file, in parallel, skipping converted ones;
# written to .wav.part first, so an interrupted conversion is not read as audio.
M4A_CONVERSION = ("find {dir} -name '*.m4a' -print0 | xargs -0 -P \"$(nproc)\" -I{{}} sh -c "
                  "'[ -f \"${{1%.m4a}}.wav\" ] || {{ ffmpeg -nostdin -loglevel error -y -i \"$1\" -ac 1 -ar 16000 "
                  "-f wav \"${{1%.m4a}}.wav.part\" && mv \"${{1%.m4a}}.wav.part\" \"${{1%.m4a}}.wav\"; }}' _ {{}}")


ESCAPES = str.maketrans({c: f'%{ord(c):02X}' for c in f'%/\\{AUGMENTED_MARK}'})  # escape_name's characters.


class CorpusError(ValueError):
    """A corpus that cannot be read as given; `source` is what named it ('audio_dir', 'manifest', 'wav_scp' or
    'utt2spk'), for the caller to name the option; the message names the file (and line) and the fix."""

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source


class Utterance(NamedTuple):
    """One audio file and its cache name: `speaker` (a folder of the cache) and `name` (the file stem there),
    both escaped."""
    path: str
    speaker: str
    name: str


class Corpus(NamedTuple):
    """The utterances of a source, sorted by (path, speaker, name); `layout` says what was read, in words; `skipped`
    holds one line per file left out (why, and the fix)."""
    layout: str
    utterances: list[Utterance]
    skipped: list[str]
    root: Path | None = None  # the folder of a folder tree, whose paths name its utterances.

    @property
    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def description(self) -> str:
        return f'{self.layout}: {len(self.utterances)} audio files of {len(self.speakers)} speakers'


class Shard(NamedTuple):
    """Part `index` (1-based) of `count` disjoint parts of a corpus: N builds, one per part, make one cache."""
    index: int
    count: int

    def holds(self, speaker: str, name: str) -> bool:
        """Whether the utterance `speaker/name` (clean cache names) belongs to this part: by CRC-32 of the name,
        so the same on every machine and independent of the order or the number of files."""
        return zlib.crc32(f'{speaker}/{name}'.encode()) % self.count == self.index - 1

    def __str__(self) -> str:
        return f'{self.index}/{self.count}'


def parse_shard(text: str) -> Shard:
    """`K/N` (1 <= K <= N) as a Shard; ValueError otherwise."""
    match = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f'{text}: expected K/N with 1 <= K <= N (part K of N), e.g. 1/4')
    return Shard(int(match[1]), int(match[2]))


def escape_name(text: str) -> str:
    """`text` with '%', '/', '\\', the augmentation mark '~' and a leading '.' percent-encoded (as %25, %2F, ...):
    a one-to-one map (urllib.parse.unquote inverts it) onto names with no path separator, no augmentation mark
    and no leading dot (the mark of temporary files)."""
    escaped = text.translate(ESCAPES)
    return f'%2E{escaped[1:]}' if escaped.startswith('.') else escaped


def cache_name(audio_file: Path, audio_dir: Path) -> tuple[str, str]:
    """(speaker, utterance) of a file under `audio_dir`: the speaker is the first folder under `audio_dir`, the
    utterance the rest of the path, extension kept, both escaped: `id10001/1zcIwhmdeo4/00001.wav` ->
    ('id10001', '1zcIwhmdeo4%2F00001.wav'). Two files never share a name."""
    speaker, *rest = audio_file.relative_to(audio_dir).parts
    return escape_name(speaker), escape_name('/'.join(rest))


def walk_files(directory: str, extensions: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The relative paths (as tuples of parts) of the files under `directory` whose lower-case suffix is in
    `extensions`, sorted; os.scandir's entry types, no stat per file (symbolic links followed)."""
    found, stack = [], [()]
    while stack:
        parts = stack.pop()
        with os.scandir(os.path.join(directory, *parts)) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append((*parts, entry.name))
                elif os.path.splitext(entry.name)[1].lower() in extensions and entry.is_file():
                    found.append((*parts, entry.name))
    return sorted(found)


def folder_layout(files: list[tuple[str, ...]]) -> str:
    """What a tree of speaker folders looks like, in words, from the relative paths of its files."""
    depths = {len(parts) for parts in files}
    if depths == {2}:
        return 'plain speaker/utterance folders'
    if depths == {3} and all(re.fullmatch(r'id\d+', parts[0]) for parts in files):
        return 'VoxCeleb (speaker/video/utterance)'
    if depths == {3} and all(parts[2].startswith(f'{parts[0]}-{parts[1]}-') for parts in files):
        return 'LibriSpeech (speaker/chapter/utterance)'
    return f'speaker folders, files {min(depths) - 1} to {max(depths) - 1} folders deep'


def unconverted(directory: str, files: list[tuple[str, ...]], convertible: list[tuple[str, ...]]) -> None:
    """Raises CorpusError when some .m4a file has no converted sibling (same path, a readable extension)."""
    readable = {os.path.splitext(os.path.join(*parts))[0] for parts in files}
    missing = [parts for parts in convertible if os.path.splitext(os.path.join(*parts))[0] not in readable]
    if missing:
        raise CorpusError('audio_dir', f'{directory}: {len(missing)} .m4a files (e.g. '
                                       f'{os.path.join(directory, *missing[0])}), which libsndfile cannot read; '
                                       f'convert them to wav beside them (needs ffmpeg), then run again: '
                                       f"{M4A_CONVERSION.format(dir=shlex.quote(directory))}")


def folder_corpus(audio_dir: Path) -> Corpus:
    """Every audio file under `audio_dir`, named after its path. FileNotFoundError when `audio_dir` is missing or
    holds no audio; CorpusError when it holds .m4a files not converted yet. Files directly in `audio_dir` (no
    speaker folder) are skipped."""
    if not audio_dir.is_dir():
        raise FileNotFoundError(f'--audio_dir {audio_dir}: no such directory.')
    found = walk_files(str(audio_dir), AUDIO_EXTENSIONS + CONVERTIBLE_EXTENSIONS)
    readable = [os.path.splitext(parts[-1])[1].lower() in AUDIO_EXTENSIONS for parts in found]
    files = [parts for parts, ok in zip(found, readable, strict=True) if ok]
    unconverted(str(audio_dir), files, [parts for parts, ok in zip(found, readable, strict=True) if not ok])
    if not files:
        raise FileNotFoundError(f'--audio_dir {audio_dir}: no audio files ({", ".join(AUDIO_EXTENSIONS)}); '
                                f'expected speaker/chapter/utterance.flac (LibriSpeech) or speaker/utterance.wav.')
    skipped = [f'{audio_dir / parts[0]}: not inside a speaker folder; expected speaker/utterance.wav or '
               f'speaker/chapter/utterance.flac under --audio_dir.' for parts in files if len(parts) == 1]
    nested = [parts for parts in files if len(parts) > 1]
    utterances = sorted(Utterance(os.path.join(audio_dir, *parts), escape_name(parts[0]),
                                  escape_name('/'.join(parts[1:]))) for parts in nested)
    return Corpus(folder_layout(nested) if nested else 'no speaker folders', utterances, skipped, audio_dir)


def manifest_rows(manifest: Path) -> list[tuple[int, str, str]]:
    """(line number, path, speaker) of each data row of a `path,speaker` CSV; CorpusError naming the line of a
    malformed row."""
    rows = []
    with open(manifest, newline='', encoding='utf-8') as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if number == 1 and [cell.strip().lower() for cell in row] == list(MANIFEST_HEADER):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise CorpusError('manifest', f'{manifest}: line {number}: expected "path,speaker" (2 fields, '
                                              f'quote a path holding a comma), got {",".join(row)!r}; fix the line.')
            rows.append((number, row[0].strip(), row[1].strip()))
    return rows


def manifest_corpus(manifest: Path) -> Corpus:
    """The files a `path,speaker` CSV lists (relative paths from the manifest's folder), each named `speaker` /
    the path as written. CorpusError naming the lines of missing files or of a file listed twice."""
    rows = manifest_rows(manifest)
    if not rows:
        raise CorpusError('manifest', f'{manifest}: no "path,speaker" rows; list one audio file per line.')
    base = manifest.parent
    first_line: dict[str, int] = {}
    for number, path, _ in rows:
        if path in first_line:
            raise CorpusError('manifest', f'{manifest}: line {number}: {path} is already listed on line '
                                          f'{first_line[path]} (duplicate utterance); keep one of the lines.')
        first_line[path] = number
    missing = [(number, path) for number, path, _ in rows if not os.path.isfile(base / path)]
    if missing:
        number, path = missing[0]
        more = f' (and {len(missing) - 1} more lines)' if len(missing) > 1 else ''
        raise CorpusError('manifest', f'{manifest}: line {number}: {base / path}: no such file{more}; fix the '
                                      f'paths (relative ones are read from {base}) or remove those lines.')
    utterances = sorted(Utterance(str(base / path), escape_name(speaker), escape_name(path))
                        for _, path, speaker in rows)
    return Corpus(f'CSV manifest {manifest}', utterances, [])


def kaldi_table(path: Path, source: str) -> list[tuple[int, str, str]]:
    """(line number, key, rest of the line) of each non-empty line of a Kaldi table (`key value...`); CorpusError
    naming a line without a value or a key given twice."""
    table, seen = [], {}
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, _, value = line.strip().partition(' ')
            if not value.strip():
                raise CorpusError(source, f'{path}: line {number}: expected "<utterance-id> <value>", got '
                                          f'{line.strip()!r}; fix the line.')
            if key in seen:
                raise CorpusError(source, f'{path}: line {number}: utterance id {key} is already on line '
                                          f'{seen[key]} (duplicate utterance id); keep one of the lines.')
            seen[key] = number
            table.append((number, key, value.strip()))
    return table


def kaldi_corpus(wav_scp: Path, utt2spk: Path) -> Corpus:
    """The files of a Kaldi data dir's `wav.scp` (`<utt-id> <path>`, plain paths, relative ones from the current
    folder as Kaldi reads them) with the speakers of `utt2spk`, each named `speaker` / utterance id. CorpusError
    naming the line of a piped command, a missing file or an utterance with no speaker."""
    speakers = {key: value for _, key, value in kaldi_table(utt2spk, 'utt2spk')}
    utterances = []
    for number, key, value in kaldi_table(wav_scp, 'wav_scp'):
        if value.endswith('|'):
            raise CorpusError('wav_scp', f'{wav_scp}: line {number}: utterance {key} is a piped command ("... |"), '
                                         f'which is not run; write its audio to a wav file (e.g. '
                                         f'{value[:-1].strip()} > {key}.wav) and list that file instead.')
        if key not in speakers:
            raise CorpusError('wav_scp', f'{wav_scp}: line {number}: utterance {key} has no speaker in {utt2spk}; '
                                         f'add "{key} <speaker>" to it or remove the line.')
        if not os.path.isfile(value):
            raise CorpusError('wav_scp', f'{wav_scp}: line {number}: {value}: no such file; fix the path (relative '
                                         f'paths are read from {Path.cwd()}) or remove the line.')
        utterances.append(Utterance(value, escape_name(speakers[key]), escape_name(key)))
    if not utterances:
        raise CorpusError('wav_scp', f'{wav_scp}: no "<utterance-id> <path>" lines; list one audio file per line.')
    unlisted = len(speakers) - len(utterances)
    if unlisted > 0:
        logger.warning('%s: %d utterances have no audio in %s; left out.', utt2spk, unlisted, wav_scp)
    return Corpus(f'Kaldi data dir {wav_scp} + {utt2spk}', sorted(utterances), [])


def speakers_without_audio(utterances: list[Utterance], cached: set[tuple[str, str]]) -> list[str]:
    """The speakers of `utterances` none of whose utterances is in `cached` ((speaker, name) pairs), sorted."""
    return sorted({u.speaker for u in utterances} - {u.speaker for u in utterances if (u.speaker, u.name) in cached})
