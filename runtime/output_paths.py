"""The check that an output path can be written, made before the long work (an export takes minutes at
224×224, an evaluation as long) so that a wrong ``-o`` or ``--json`` costs a second, not the whole run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medmamba_edge.errors import UserError


class OutputPathError(UserError):
    """An output path that cannot be written."""


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Raise OutputPathError unless ``path`` (a file, or with ``folder`` a folder of files) can be written
    the way ``write_bytes_atomically`` writes: missing folders created, a temporary file renamed into place.

    The test is a real file created and removed in the nearest existing folder: permission bits say nothing
    for root, a read-only mount or an ACL, and creating that file is exactly what the write will do."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: is not a folder")
    if not folder and path.is_dir():
        raise OutputPathError(f"{path}: is a folder; give a file name")
    if not folder and path.exists() and not path.is_file():
        # A device or FIFO (/dev/stdout) is written in place, not replaced.
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{path}: not writable")
        return
    start = path if folder else path.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise OutputPathError(f"{path}: {existing} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".medmamba-edge-", suffix=".probe", dir=existing)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(handle)
    os.unlink(probe)
