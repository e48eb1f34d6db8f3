"""TensorFlow's import without its start-up notices: the absl and oneDNN lines its C++ libraries write straight to
file descriptor 2 while `import tensorflow` loads them ("WARNING: All log messages before absl::InitializeLog()
...", "... oneDNN custom operations are on ..."), once per library, which users read as errors.

They come before Python's logging or absl's Python API exist, so TF_CPP_MIN_LOG_LEVEL does not reach them: fd 2
is pointed at a temporary file during the import and every other line is written back. `--verbose` (or
TF_CPP_MIN_LOG_LEVEL=0) keeps them. Used by cli.py and example.py; imports only constants.
"""

import os
import sys
import tempfile

from constants import TENSORFLOW_STARTUP_NOTICES


def is_startup_notice(line: str) -> bool:
    return any(notice in line for notice in TENSORFLOW_STARTUP_NOTICES)


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow (and sets TF_CPP_MIN_LOG_LEVEL to 2, TensorFlow's warnings and errors only, unless set);
    without its start-up notices, unless `verbose` or TF_CPP_MIN_LOG_LEVEL=0. Anything else written to fd 2
    during the import (a real error, a Python warning) is written back to it."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if verbose else '2')
    if 'tensorflow' in sys.modules or verbose or os.environ['TF_CPP_MIN_LOG_LEVEL'] == '0':
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(line for line in lines if not is_startup_notice(line)))
            sys.stderr.flush()
