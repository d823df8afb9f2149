"""Still images and DICOM files: one file, a folder (recursively) or a glob. Nothing that looks like an image
is passed over in silence: a dangling link, a FIFO or a hidden file gets a record with the reason.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import shlex
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from ..decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageError, is_still, read_still
from .base import Frame, Source, item_error, wall_clock


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
                yield Frame(str(path), 0, wall_clock(), error=item_error(path, exc), captured=captured)
                continue
            for index, image in enumerate(images):  # a multi-frame DICOM file's frames are decoded as they come
                if isinstance(image, ImageError):  # that frame only: its record says why
                    yield Frame(str(path), index, wall_clock(), error=str(image), captured=captured)
                else:
                    yield Frame(str(path), index, wall_clock(), image, captured=captured)
                captured = time.perf_counter()


NOT_REGULAR = "not a regular file (a FIFO, socket or device), not read"
# A GIF looks like an image but is read as a video (animated, it is one): a source of its own, so in `run`'s folder
# or glob it gets a record saying so rather than being passed over as notes.txt is (other videos are: nobody takes
# an .mp4 for one of the images). A data set's listing passes it over, as train.py's ImageFolder does.
ANIMATION = "a GIF is read as a video, a source of its own (medmamba-edge run MODEL {path}), not among {where}"


def is_animation_record(entry: Path | tuple[Path, str]) -> bool:
    """Whether a listing's entry is a GIF's record (see ANIMATION)."""
    return isinstance(entry, tuple) and entry[1].startswith(ANIMATION.split(" (", 1)[0])


def cannot_stat(path: Path, error: OSError, is_link: bool) -> str:
    """Why os.stat refused an entry listed or given as the source: a link that leads nowhere (ELOOP or ENOENT
    from following it: the link, not a file, is what is there), a link itself gone since the folder was listed, or
    an entry of a folder that can be listed but not searched (mode 644: its names can be read, nothing else about
    them)."""
    if not is_link:
        return f"cannot be examined ({error.strerror or error}), not read"
    try:
        target = os.readlink(path)
    except OSError:  # gone since it was listed: /dev/fd's link to the listing's own descriptor, a folder being written
        return "gone since its folder was listed, not read"
    what = "a symbolic link loop" if error.errno == errno.ELOOP else "a dangling symbolic link"
    return f"{what} (to {target})"


def _names(directory: str, part: str, folders_only: bool) -> tuple[list[str], OSError | None]:
    """The names in ``directory`` that ``part`` matches, sorted, by glob's rules (a leading '.' matched only by a
    part that starts with one; ``folders_only``: folders or links to them), and the error listing it gave."""
    try:
        with os.scandir(directory or os.curdir) as listing:
            entries = list(listing)
    except OSError as exc:
        return [], exc
    names = []
    for entry in entries:
        if (entry.name.startswith(".") and not part.startswith(".")) or not fnmatch.fnmatchcase(entry.name, part):
            continue
        try:
            if folders_only and not entry.is_dir():
                continue
        except OSError:
            continue
        names.append(entry.name)
    return sorted(names), None


def _expand(pattern: str, problems: list[tuple[Path, str]]) -> list[str]:
    """glob.glob(pattern, recursive=True), but each ``**`` enters a folder (by device and inode) once, nearest
    first from all the folders it starts from: glob.glob follows every link to a folder, so two links into a tree
    (a loop and a second way in) multiplied the paths it walked until it never returned. A folder ``**`` cannot
    list is added to ``problems``."""
    parts = pattern.split(os.sep)
    current = [os.sep] if parts[0] == "" and len(parts) > 1 else [""]
    parts = parts[1:] if current == [os.sep] else parts

    def folders_below(tops: list[str]) -> list[str]:
        found, queue, entered = [], list(tops), set()
        while queue:
            folder = queue.pop(0)
            try:
                info = os.stat(folder or os.curdir)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in entered:
                continue
            entered.add((info.st_dev, info.st_ino))
            found.append(folder)
            names, error = _names(folder, "*", folders_only=True)
            if error is not None:
                problems.append((Path(folder), f"folder cannot be listed ({error.strerror or error})"))
            queue += [os.path.join(folder, name) for name in names]
        return found

    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            below = folders_below(current)
            current = [os.path.join(f, name) for f in below for name in _names(f, "*", False)[0]] if last else below
            continue
        matched = []
        for folder in current:
            if glob.has_magic(part):
                matched += [os.path.join(folder, name) for name in _names(folder, part, folders_only=not last)[0]]
            elif part and (os.path.lexists if last else os.path.isdir)(os.path.join(folder, part)):
                matched.append(os.path.join(folder, part))
            elif not part:  # a doubled or trailing separator
                matched.append(folder)
        current = matched
    return current


def glob_files(pattern: str, gifs: bool = False) -> list[Path | tuple[Path, str]]:
    """The image and DICOM files matching ``pattern``, sorted; like a folder's listing, a match that cannot be read
    (a dangling link, a FIFO named as an image) comes with the reason, so it gets a record, other files are not
    listed, and a folder's entries are listed once: ``**``
    follows links to folders, so a link back up the tree (or a second link to one folder) would give the same
    files again and again, under ever longer names. The shortest name (the first in sorted order of those)
    is kept. ``gifs``: a GIF gets a record naming its own run (`run`'s globs), else it is not listed."""
    problems: list[tuple[Path, str]] = []
    entries = {}
    for path in sorted((Path(p) for p in _expand(pattern, problems)), key=lambda p: (len(p.parts), p)):
        # An entry is its folder (as the folder walker tells folders apart) and its name: a link to a file in
        # the same folder is a name of its own, listed as a folder's listing lists it.
        folder = os.stat(path.parent)  # cannot fail: its folder has just been listed
        entries.setdefault((folder.st_dev, folder.st_ino, path.name), path)
    found: list[Path | tuple[Path, str]] = list(problems)
    for path in sorted(entries.values()):
        try:
            info = os.stat(path)
        except OSError as exc:
            found.append((path, cannot_stat(path, exc, os.path.islink(path))))
            continue
        where = "the images a glob matches" if gifs else None
        if not stat.S_ISDIR(info.st_mode) and (listed := _listed(path, info, where)) is not None:
            found.append(listed)
    return sorted(found, key=lambda entry: entry[0] if isinstance(entry, tuple) else entry)


def _listed(path: Path, info: os.stat_result, gif_not_among: str | None = None) -> Path | tuple[Path, str] | None:
    """What a folder's listing or a glob gives for an entry that is no folder: an image or DICOM file, or what
    looks like one with the reason it is not read; None for other files (notes.txt, a video, .DS_Store).
    ``gif_not_among`` says what a GIF is not among, in its record (a folder's images: `run`'s sources); None: it is
    not listed (a data set's images, as torchvision's ImageFolder takes none)."""
    suffix = path.suffix.lower()
    gif = gif_not_among is not None and suffix == ".gif"
    if not stat.S_ISREG(info.st_mode):
        return (path, NOT_REGULAR) if suffix in IMAGE_SUFFIXES + DICOM_SUFFIXES or gif else None
    if gif:  # the command a shell is given: a name starting with '-' would read as an option ('No such option: -c')
        named = f"./{path}" if str(path).startswith("-") else str(path)
        return path, ANIMATION.format(path=shlex.quote(named), where=gif_not_among)
    try:
        return path if is_still(path) else None
    except OSError as exc:  # unreadable: it may be a DICOM file (IM0001, a UID)
        return path, f"cannot be read ({exc.strerror or exc}), not read"


def folder_files(folder: Path, recursive: bool = True, gifs: bool = False) -> list[Path | tuple[Path, str]]:
    """Every image and DICOM file in ``folder`` and, if ``recursive``, below it, sorted, following links to
    folders once each (a link back up the tree is a loop and is not entered). What looks like an image but
    cannot be read as one (a dangling link, a link loop, a FIFO, a hidden file, an entry that cannot be
    examined) comes with the reason, so it gets a record; other files (notes.txt, .DS_Store) are not listed.
    ``gifs``: a GIF gets a record naming its own run (`run`'s folders), else it is not listed (data sets)."""
    found: list[Path | tuple[Path, str]] = []
    top = os.stat(folder)
    seen = {(top.st_dev, top.st_ino)}

    def listing(directory: Path) -> Iterator[os.DirEntry]:
        try:
            return iter(sorted(os.scandir(directory), key=lambda e: e.name))
        except OSError as exc:
            found.append((directory, f"folder cannot be listed ({exc.strerror or exc})"))
            return iter(())

    # The folders being listed, deepest last, in place of recursion: a tree deeper than Python's recursion limit
    # (1 000 folders) would end in a RecursionError traceback.
    walking = [listing(folder)]
    while walking:
        entry = next(walking[-1], None)
        if entry is None:
            walking.pop()
            continue
        path = Path(entry.path)
        try:
            info = os.stat(path)
        except OSError as exc:
            # Whatever its name it may be a DICOM file (IM0001, CR.1.2.276.0.7230010) or a folder of images.
            if entry.is_symlink() or not entry.name.startswith("."):
                found.append((path, cannot_stat(path, exc, entry.is_symlink())))
            continue
        if stat.S_ISDIR(info.st_mode):
            if not recursive:
                continue
            if entry.name.startswith("."):  # .Trash-1000's deleted studies, .ipynb_checkpoints' copies
                found.append((path, "hidden folder (the name starts with '.'), not entered"))
                continue
            if (info.st_dev, info.st_ino) in seen:
                found.append((path, f"a link to a folder already listed ({os.readlink(path)}), not entered again "
                                    f"(a loop, or a second way to the same files)"
                              if entry.is_symlink() else "folder already listed"))
                continue
            seen.add((info.st_dev, info.st_ino))
            walking.append(listing(path))
        elif entry.name.startswith(".") and stat.S_ISREG(info.st_mode):  # a glob matches these only when asked
            if path.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES:
                found.append((path, "hidden file (the name starts with '.'; macOS '._' files are metadata), "
                                    "not read"))
        elif (listed := _listed(path, info, "a folder's images" if gifs else None)) is not None:
            found.append(listed)
    return found
