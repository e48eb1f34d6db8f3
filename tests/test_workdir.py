"""workdir.py: the training lock names its holder only while it is held, however the block ends."""

import os

import pytest

from constants import TRAINING_LOCK
from workdir import lock_holder, training_lock


def test_the_lock_file_names_the_holder_while_held_and_nobody_after_an_error(tmp_path):
    with pytest.raises(RuntimeError, match='training failed'), training_lock(tmp_path) as path:
        assert path == tmp_path / TRAINING_LOCK
        assert lock_holder(path) == os.getpid()
        raise RuntimeError('training failed')
    assert lock_holder(tmp_path / TRAINING_LOCK) == 0
    with training_lock(tmp_path) as path:  # free again.
        assert lock_holder(path) == os.getpid()
