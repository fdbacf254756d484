"""Output folders of the command-line scripts, created before the work whose results go there."""

from __future__ import annotations

import os
from pathlib import Path


class OutputDirError(ValueError):
    """An output folder that cannot be created or written to; the message names the flag and the path."""


def prepare_output_dir(path: Path, what: str = "--output-dir") -> Path:
    """Create `path` (with its parents) and check it is writable, so that a bad folder fails before minutes
    of inference rather than after; `what` names where the path came from (a flag, a default, a subfolder)."""
    where = f"{what} {str(path)!r}"
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{where} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{where}: cannot create the folder: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"{where}: the folder is not writable")
    return path
