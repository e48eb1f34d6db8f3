"""Writes a verification trial list of a LibriSpeech-style test set (speaker/chapter/utterance.flac): every pair of
its utterances, `1` for the same speaker and `0` for two speakers, paths relative to the set's folder (eval-trials
--audio_root), pairs of two readings of the same text left out (the rule of the shared test-other list: a pair
with the same words would measure the text as much as the voice). Texts come from LibriSpeech's
`<speaker>-<chapter>.trans.txt` files; utterances without one count as different texts.

    python recipes/make_trials.py --audio_dir LibriSpeech/test-clean --out trials/librispeech-test-clean.txt
"""

import argparse
import itertools
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from constants import AUDIO_EXTENSIONS  # noqa: E402
from corpus import walk_files  # noqa: E402

logger = logging.getLogger('make_trials')


def transcripts(audio_dir: Path) -> dict[str, str]:
    """{utterance id: its text, upper-case words}, from every *.trans.txt under `audio_dir`."""
    texts = {}
    for trans in sorted(audio_dir.rglob('*.trans.txt')):
        for line in trans.read_text().splitlines():
            utterance, _, text = line.strip().partition(' ')
            texts[utterance] = ' '.join(text.upper().split())
    return texts


def trial_lines(audio_dir: Path) -> tuple[list[str], int]:
    """The trial lines `label a b` of every pair of utterances of `audio_dir` (speaker = first folder), sorted by
    path; and how many same-text pairs were left out."""
    files = [Path(*parts) for parts in walk_files(str(audio_dir), AUDIO_EXTENSIONS) if len(parts) > 1]
    texts = transcripts(audio_dir)
    lines, same_text = [], 0
    for a, b in itertools.combinations(files, 2):
        text_a, text_b = texts.get(a.name.split('.')[0]), texts.get(b.name.split('.')[0])
        if text_a is not None and text_a == text_b:
            same_text += 1
            continue
        lines.append(f'{int(a.parts[0] == b.parts[0])} {a.as_posix()} {b.as_posix()}')
    return lines, same_text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--audio_dir', type=Path, required=True, help='The test set: speaker/chapter/utterance.flac.')
    parser.add_argument('--out', type=Path, required=True, help='Trial list to write (its folder is created).')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if not args.audio_dir.is_dir():
        sys.exit(f'Error: --audio_dir {args.audio_dir}: no such directory.')
    lines, same_text = trial_lines(args.audio_dir)
    targets = sum(line.startswith('1') for line in lines)
    if not targets or targets == len(lines):
        sys.exit(f'Error: --audio_dir {args.audio_dir}: needs two speakers and two utterances of one of them.')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f'.{args.out.name}.tmp')
    tmp.write_text('\n'.join(lines) + '\n')
    tmp.replace(args.out)
    logger.info('%s: %d trials (%d target, %d non-target), %d same-text pairs left out.', args.out, len(lines),
                targets, len(lines) - targets, same_text)


if __name__ == '__main__':
    main()
