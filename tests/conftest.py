"""Shared fixtures: paths to the real audio shipped in samples/ and a helper copying LibriSpeech utterances."""

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def samples_dir() -> Path:
    """samples/ of the repository (real speech: LibriSpeech test-other at 16 kHz, PhilippeRemy at 48 kHz)."""
    return REPO_ROOT / 'samples'


@pytest.fixture(scope='session')
def librispeech_dir(samples_dir: Path) -> Path:
    """samples/LibriSpeech/test-other: <speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac."""
    return samples_dir / 'LibriSpeech' / 'test-other'


@pytest.fixture(scope='session')
def copy_librispeech(librispeech_dir: Path) -> Callable[[Path, list[str]], list[Path]]:
    """copy(dest, ['1688-142285-0002', ...]) copies those utterances into dest keeping the LibriSpeech layout
    (dest/<speaker>/<chapter>/<utterance>.flac) and returns the copied paths in the given order."""

    def copy(dest: Path, utterance_ids: list[str]) -> list[Path]:
        copied = []
        for utterance_id in utterance_ids:
            speaker, chapter, _ = utterance_id.split('-')
            source = librispeech_dir / speaker / chapter / f'{utterance_id}.flac'
            target = dest / speaker / chapter / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(target)
        return copied

    return copy
