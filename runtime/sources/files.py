"""Still images and DICOM files: one file, a folder (recursively) or a glob. Nothing that looks like an image
is passed over in silence: a dangling link, a FIFO or a hidden file gets a record with the reason.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from ..decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageError, is_still, read_still
from .base import Frame, Source, item_error


class FileSource(Source):
    """Still images and DICOM files, in order; ``stride`` takes every Nth file. A path given with a
    reason (a dangling link found while listing a folder) is not read; it gets a record with the reason."""

    def __init__(self, paths: list[Path | tuple[Path, str]], description: str):
        self.paths, self.description = paths, description
        self.inputs = tuple(entry[0] if isinstance(entry, tuple) else entry for entry in paths)

    def frames(self, stride: int = 1) -> Iterator[Frame]:
        for entry in self.paths[::stride]:
            path, reason = entry if isinstance(entry, tuple) else (entry, None)
            captured = time.perf_counter()
            try:
                if reason:
                    raise ImageError(f"{path}: {reason}")
                images = read_still(path)
            except Exception as exc:  # this file only: the next one is read all the same
                yield Frame(str(path), 0, time.time(), error=item_error(path, exc), captured=captured)
                continue
            for index, image in enumerate(images):
                yield Frame(str(path), index, time.time(), image, captured=captured)


NOT_REGULAR = "not a regular file (a FIFO, socket or device), not read"


def _cannot_stat(path: Path, error: OSError, is_link: bool) -> str:
    """Why os.stat refused a listed entry: a link that leads nowhere (ELOOP or ENOENT from following it: the
    link, not a file, is what is there), or an entry of a folder that can be listed but not searched (mode
    644: its names can be read, nothing else about them)."""
    if not is_link:
        return f"cannot be examined ({error.strerror or error}), not read"
    what = "a symbolic link loop" if error.errno == errno.ELOOP else "a dangling symbolic link"
    return f"{what} (to {os.readlink(path)})"


def glob_files(pattern: str) -> list[Path | tuple[Path, str]]:
    """The files matching ``pattern``, sorted; like a folder's listing, a match that cannot be read (a dangling
    link, a FIFO) comes with the reason, so it gets a record, and a folder's entries are listed once: ``**``
    follows links to folders, so a link back up the tree (or a second link to one folder) would give the same
    files again and again, under ever longer names. The shortest name (the first in sorted order of those)
    is kept."""
    entries = {}
    for path in sorted((Path(p) for p in glob.glob(pattern, recursive=True)), key=lambda p: (len(p.parts), p)):
        # An entry is its folder (as the folder walker tells folders apart) and its name: a link to a file in
        # the same folder is a name of its own, listed as a folder's listing lists it.
        folder = os.stat(path.parent)  # cannot fail: glob has just listed that folder
        entries.setdefault((folder.st_dev, folder.st_ino, path.name), path)
    found: list[Path | tuple[Path, str]] = []
    for path in sorted(entries.values()):
        try:
            info = os.stat(path)
        except OSError as exc:
            found.append((path, _cannot_stat(path, exc, os.path.islink(path))))
            continue
        if stat.S_ISREG(info.st_mode):
            found.append(path)
        elif not stat.S_ISDIR(info.st_mode):
            found.append((path, NOT_REGULAR))
    return found


def folder_files(folder: Path, recursive: bool = True) -> list[Path | tuple[Path, str]]:
    """Every image and DICOM file in ``folder`` and, if ``recursive``, below it, sorted, following links to
    folders once each (a link back up the tree is a loop and is not entered). What looks like an image but
    cannot be read as one (a dangling link, a link loop, a FIFO, a hidden file, an entry that cannot be
    examined) comes with the reason, so it gets a record; other files (notes.txt, .DS_Store) are not listed."""
    found: list[Path | tuple[Path, str]] = []
    top = os.stat(folder)
    seen = {(top.st_dev, top.st_ino)}

    def walk(directory: Path) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            found.append((directory, f"folder cannot be listed ({exc.strerror or exc})"))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                info = os.stat(path)
            except OSError as exc:
                # Without a suffix it may be a DICOM file or a folder of images: nothing tells which.
                if entry.is_symlink() or path.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES or not path.suffix:
                    found.append((path, _cannot_stat(path, exc, entry.is_symlink())))
                continue
            if stat.S_ISDIR(info.st_mode):
                if not recursive:
                    continue
                if (info.st_dev, info.st_ino) in seen:
                    found.append((path, f"a link to a folder already listed ({os.readlink(path)}), not entered again "
                                        f"(a loop, or a second way to the same files)"
                                  if entry.is_symlink() else "folder already listed"))
                    continue
                seen.add((info.st_dev, info.st_ino))
                walk(path)
            elif not stat.S_ISREG(info.st_mode):
                if path.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES:
                    found.append((path, NOT_REGULAR))
            elif path.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES and entry.name.startswith("."):
                found.append((path, "hidden file (the name starts with '.'; macOS '._' files are metadata), not read"))
            elif not entry.name.startswith(".") and is_still(path):
                found.append(path)

    walk(folder)
    return found
