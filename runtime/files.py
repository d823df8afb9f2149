"""File helpers shared by every stage: content hashes (checkpoints, ONNX, plugin libraries), the one
output writer (``AtomicOutput``: write, fsync, rename, so a crashed, refused or powered-off run never leaves a
half-written file under the target name), and the one cache folder (plugin builds, TensorRT engines,
ONNX Runtime's TensorRT EP engines)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import io
import os
import re
import stat
import sys
import tempfile
import threading
from pathlib import Path
from time import monotonic
from typing import IO

from medmamba_edge.errors import UserError, plural

from .uri import uri_refusal

CACHE_ENV = "MEDMAMBA_EDGE_CACHE"

# How long a records output's last lines may stay in the page cache only, lost with it in a power cut. An fsync
# of an appended 200-byte record took 0.12 ms (median; 0.5 ms at most) on an ext4 virtual disk; on a Jetson's
# eMMC or SD card one is a flash page program plus the journal's commit, milliseconds to tens of them, so one a
# second costs at most a few percent of a run there, where one a record would bound the run's rate by the card.
SYNC_INTERVAL_S = 1.0

# fsync's "this file system cannot" (some FUSE and network mounts, and a folder's descriptor on some): the output
# is written as it was before fsync was asked for, never refused for it.
_CANNOT_SYNC = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


class OutputError(UserError):
    """An output file that cannot be created or written (a folder, no permission, a full disk)."""


def current_umask() -> int:
    # Read, not set: set and set straight back, another thread's file made meanwhile got the mode of the value set,
    # and two writes committing at once (an application's threads) had the second read the first's 0o022 and put
    # it back last, the application's umask (0o077 for private data) gone for good.
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux >= 4.7
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_SET:  # elsewhere setting it is the only way to read it: our own reads at least take turns
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_UMASK_SET = threading.Lock()


def any_is_stdout(*paths: str | Path | None) -> bool:
    """Whether writing one of ``paths`` (None: an output not given) writes where this process's stdout goes
    (/dev/stdout, /dev/fd/1, or the very file or pipe stdout is): records piped through stdout."""
    try:
        here = os.fstat(1)
    except OSError:
        return False
    for path in filter(None, paths):
        try:
            there = os.stat(path)
        except OSError:
            continue
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return True
    return False


def strip_unless_named(name: str, folder: str | Path | None = None) -> str:
    """``name`` without the white space around it ("$CAMERA " from a config file, "a.png, 1" as spreadsheets write
    it), unless ``name`` as given (in ``folder``, if one is given) is a file or a link: "scan 1.png " is one."""
    return name if os.path.lexists(name if folder is None else Path(folder) / name) else name.strip()


def streamed_in_place(path: Path) -> bool:
    """Whether ``path`` is written where it is, as a stream: a FIFO or device (/dev/full), or one of
    the process's file descriptors (/dev/stdout, /dev/fd/N: links to whatever stdout is, even a
    regular file). Renaming a temporary file over those would replace the device node or the link."""
    absolute = path.absolute()
    if str(absolute) in ("/dev/stdout", "/dev/stderr") or re.fullmatch(r"/proc/(self|\d+)/fd",
                                                                         os.path.realpath(absolute.parent)):
        return True
    return is_special(path)  # not there yet (or a dangling link): created by the rename


def is_special(path: Path) -> bool:
    """Whether ``path`` is a FIFO, socket or device: reading one waits for a writer or never ends (/dev/zero).
    False where it cannot be looked at (missing, no permission): opening it says why."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _own_descriptor(path: Path) -> int | None:
    """The descriptor of this process that ``path`` names (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N)."""
    text = str(path.absolute())
    named = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}.get(text)
    match = re.fullmatch(r"/(?:dev|proc/self)/fd/(\d+)", text)
    return named if named is not None else int(match.group(1)) if match else None


def _sync(fd: int) -> None:
    """fsync ``fd``, where its file system can; a real failure (EIO: the device is failing) raises."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise


def sync_path(path: Path, folder: bool = False) -> None:
    """fsync the file at ``path``, or the ``folder`` (so that a name renamed into it survives a power cut)."""
    if folder and not hasattr(os, "O_DIRECTORY"):
        # Windows: no folder can be opened to be flushed (os.open refuses one), and NTFS journals the rename itself.
        return
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except OSError:
        if not folder:
            raise
        return  # a folder one may write but not read (mode 0333): its entry is written back as before
    try:
        _sync(fd)
    finally:
        os.close(fd)


def sync_renamed(target: Path, created_folders: list[Path]) -> None:
    """fsync the folder ``target`` was renamed into, and those the folders made for it (``missing_folders``) were
    made in: a rename is on the disk once they are."""
    for folder in (target.parent, *(made.parent for made in created_folders)):
        sync_path(folder, folder=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
# renameat2's answers where it is there but this kernel (ENOSYS, before 3.15), file system (EINVAL: some FUSE
# and network mounts, overlayfs on some kernels) or a container's seccomp profile not listing the call (EPERM,
# Docker's answer to a call it does not allow) cannot exchange. A real EPERM fails again in the two renames.
_CANNOT_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EPERM}


@functools.cache
def _renameat2():
    """libc's renameat2 (glibc 2.28 and later), or None where there is none (not Linux, an older glibc, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap the names ``first`` and ``second`` (both there, on one file system) in one step, renameat2's
    RENAME_EXCHANGE: a crash or power cut leaves each name on one of the two, never one name on neither as two
    renames can. False, with nothing done, where the system or file system cannot; other failures raise OSError."""
    function = _renameat2()
    if function is None:
        return False
    import ctypes

    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _temporary_affixes(target: Path, name_max: int) -> tuple[str, str]:
    """mkstemp's prefix and suffix beside ``target``: ``.NAME.XXXXXXXX.partial.SUFFIX``, NAME cut so that the
    whole fits the file system's ``name_max`` bytes (a valid 250-byte target name must still get one). A
    suffix too long to keep (no container's: "notes.<200 bytes>") stays part of NAME."""
    stem, suffix = target.stem, target.suffix
    if len(os.fsencode(f"..XXXXXXXX.partial{suffix}")) >= name_max:
        stem, suffix = target.name, ""
    while len(os.fsencode(f".{stem}.XXXXXXXX.partial{suffix}")) > name_max:
        stem = stem[:-1]
    return f".{stem}.", f".partial{suffix}"


def mounts(root: Path = Path("/")) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, file system type, super options) of each mount in ``root``/proc/self/mountinfo;
    OSError where there is none (not Linux). The kernel writes a space, tab, newline or backslash in a path there
    as \\ooo (octal), which is undone; bytes that are not UTF-8 come as surrogate escapes, as os.fsdecode gives them."""
    table = []
    text = (root / "proc/self/mountinfo").read_text(encoding="utf-8", errors="surrogateescape")
    for line in text.splitlines():
        fields, sep, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if sep and len(fields) >= 5 and len(tail) >= 3:
            table.append((_unescaped(fields[3]), _unescaped(fields[4]), tail[0], set(tail[2].split(","))))
    return table


def _unescaped(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal[1], 8)), field)


def name_max(folder: Path) -> int:
    """The longest name, in bytes, the file system of ``folder`` takes. Windows has no pathconf: its file systems
    take 255 UTF-16 units, never fewer than the 255 bytes of the same name in UTF-8 (os.fsencode there)."""
    return os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255


def missing_folders(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, deepest first: what a write that fails removes
    again (``remove_empty_folders``), so that a failed output leaves nothing behind. A link counts as there even
    when it leads nowhere or in a loop: the caller finds it is no folder, where mkdir said "File exists"."""
    return list(itertools.takewhile(lambda candidate: not os.path.lexists(candidate), (folder, *folder.parents)))


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``missing_folders``' folders again, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError as exc:
            # A mkdir that failed halfway (no permission, a name too long) did not get to make it.
            if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
                continue
            break  # something else was put there meanwhile (another output, another program): it stays


class AtomicOutput:
    """One output file. A regular file is written to a unique temporary file beside the target
    (``.NAME.XXXXXXXX.partial.SUFFIX``: unique, so two runs given the same target never share it; the
    suffix kept, so OpenCV still picks the container) and renamed over the target by ``commit``, with
    the permissions a new file gets under the umask (mkstemp alone would leave 0600). Special files
    (FIFOs, devices, /dev/stdout) are written in place, as a stream.

    ``write`` writes whole chunks (records): when the disk fills up, the file is cut back to the last
    whole chunk and ``OutputError`` says what was kept, so a committed file never ends in a torn line.

    ``commit`` fsyncs the file before the rename and its folder after: renamed unsynced, a power cut could leave
    an empty or torn file under the target name. Streams (FIFOs, devices, a terminal) are never fsynced: nothing
    of them is on a disk. ``sync_interval_s``, for records written over a long run: the file is fsynced from
    ``write`` too, at most once in that time, so a power cut loses at most that much of them.
    """

    def __init__(self, path: str | Path, sync_interval_s: float | None = None):
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        self.synced_at = float("-inf")  # the first record is fsynced at once
        self.syncs = False  # whether it is a file on a disk: found by open() (/dev/stdout may be one)
        self.in_place = streamed_in_place(self.path)
        # A descriptor of this process (/dev/stdout, /dev/fd/N), found once: write() asks for every record
        self.descriptor = _own_descriptor(self.path) if self.in_place else None
        self.written = 0  # bytes of whole chunks
        self.cut_short = False  # a write failed: a commit keeps the whole chunks before it
        self.complete = False  # committed with every chunk: only then may a command say "wrote PATH"
        self.handle = None
        self.created_folders: list[Path] = []  # deepest first: what discard removes again, if still empty
        if self.in_place:
            self.write_path = self.path
            return
        # A link to a file: replace the file it points to, keep the link.
        self.target = Path(os.path.realpath(self.path))
        try:
            if self.path.is_dir():  # raises, too, for a name longer than the file system allows
                raise OutputError(f"{self.path}: is a folder, expected a file name")
            self.created_folders = missing_folders(self.target.parent)
            existing = self.created_folders[-1].parent if self.created_folders else self.target.parent
            if not existing.is_dir():  # mkdir's FileExistsError named neither the path nor what is wrong with it
                raise OutputError(f"{self.path}: {existing} is not a folder")
            self.target.parent.mkdir(parents=True, exist_ok=True)
            prefix, suffix = _temporary_affixes(self.target, name_max(self.target.parent))
            fd, temp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=self.target.parent)
        except OSError as exc:
            remove_empty_folders(self.created_folders)
            raise OutputError(f"{self.path}: cannot write there ({exc.strerror or exc})") from None
        os.close(fd)
        self.write_path = Path(temp)

    def open(self) -> None:
        """Open for ``write`` (streams opened for appending: /dev/stdout redirected to a file keeps what
        is already there)."""
        fd = self.descriptor
        if fd == 1 and sys.stdout is None:  # `>&-`: fd 1 is closed, or already some other file's: not stdout
            fd = None
        try:
            if fd is not None:
                # Its own description, not a reopening: /dev/stdout reopened where the shell's `>` made stdout a
                # file got an offset of its own, and the console's lines and this output overwrote each other.
                self.handle = os.fdopen(os.dup(fd), "wb", buffering=0)
            else:
                self.handle = open(self.write_path, "ab" if self.in_place else "wb", buffering=0)
            # /dev/stdout redirected to a file is on a disk as much as a temporary file is; a pipe or a device is not
            self.syncs = stat.S_ISREG(os.fstat(self.handle.fileno()).st_mode)
        except OSError as exc:
            self.discard()
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def write(self, data: bytes) -> None:
        if self.handle is None:
            self.open()
        if self.descriptor == 1 and sys.stdout is not None:
            with contextlib.suppress(OSError, ValueError):  # its reader gone: this write says so
                sys.stdout.flush()  # what the console printed before this comes before it
        view = memoryview(data)
        try:
            while view:
                view = view[self.handle.write(view):]
        except OSError as exc:
            self.cut_short = True
            if not self.in_place:
                self.handle.truncate(self.written)
            why = exc.strerror or errno.errorcode.get(exc.errno, str(exc))
            kept = (f"; the output ends after the last complete record ({plural(self.written, 'byte')})"
                    if self.written else "")
            raise OutputError(f"{self.path}: cannot write ({why}){kept}") from None
        self.written += len(data)
        if self.sync_interval_s is not None and self.syncs and monotonic() - self.synced_at >= self.sync_interval_s:
            try:
                _sync(self.handle.fileno())
            except OSError as exc:  # on disk or not, the records are all in the file: the run ends as on a full disk
                self.cut_short = True
                raise self._cannot_write(exc) from None
            self.synced_at = monotonic()

    def commit(self, whole: bool = True) -> None:
        """Close, and rename a temporary file into place (readable as the umask allows). ``whole=False``: what
        was written is kept, but it is not all (a writer that reports its failures only at the end)."""
        try:
            if self.handle is not None and self.syncs:
                _sync(self.handle.fileno())
            elif self.handle is None and not self.in_place and self.write_path.exists():
                sync_path(self.write_path)  # written through its path by another writer (OpenCV's video writer)
        except OSError as exc:  # not known to be on the disk: it does not replace what the target holds
            self._close_handle()
            if not self.in_place:
                self._kept(exc)
            raise self._cannot_write(exc) from None
        self._close_handle()
        if not self.in_place and self.write_path.exists():
            os.chmod(self.write_path, 0o666 & ~current_umask())
            try:
                os.replace(self.write_path, self.target)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    self._kept(exc)
                # The target is a mount point, a file bind-mounted into a container (`docker run -v
                # host.jsonl:/out/r.jsonl`): no rename replaces it, so its content is, in place.
                try:
                    self._write_into_target()
                except OSError as copy_exc:
                    self._kept(copy_exc)
                self.write_path.unlink()
            try:
                sync_renamed(self.target, self.created_folders)
            except OSError as exc:
                raise self._cannot_write(exc) from None
        self.complete = whole and not self.cut_short

    def _write_into_target(self) -> None:
        """The whole file's bytes over the target's, the space reserved first: a disk too full for them fails before
        the target's old content is touched (truncating first left a torn record where the old file was)."""
        size = self.write_path.stat().st_size
        fd = os.open(self.target, os.O_WRONLY)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except AttributeError:  # macOS and Windows have none: written as on a file system that cannot reserve
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write on
                    raise
            with open(self.write_path, "rb") as whole_file:
                while chunk := whole_file.read(1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.ftruncate(fd, size)
            _sync(fd)
        finally:
            os.close(fd)

    def _cannot_write(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot write ({exc.strerror or exc})")

    def _kept(self, exc: OSError) -> None:
        raise OutputError(f"{self.path}: cannot put the output in place ({exc.strerror or exc}); it is kept as "
                          f"{self.write_path}") from None

    def discard(self) -> None:
        """Close and remove the temporary file and the folders made for it: the target is left as it was."""
        self._close_handle()
        if not self.in_place:
            self.write_path.unlink(missing_ok=True)
            remove_empty_folders(self.created_folders)

    def _close_handle(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.close()


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``AtomicOutput``: complete or not at all."""
    output = AtomicOutput(path)
    try:
        output.write(data)
    except BaseException:
        output.discard()
        raise
    output.commit()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Root of medmamba-edge's cache: $MEDMAMBA_EDGE_CACHE, $XDG_CACHE_HOME/medmamba-edge or ~/.cache/medmamba-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medmamba-edge"


class GuardedStdout:
    """sys.stdout as it is at each call (tests swap it), where a write that fails (a pipe whose reader has gone,
    `| head`; a full disk) raises OutputError in one line instead of ending a run with a traceback before its
    outputs are closed. stdout is then pointed at /dev/null, or Python's own flush at exit would fail again.
    A closed stdout (`>&-`: Python's sys.stdout is None) takes everything and keeps nothing, as /dev/null."""

    _failed_on = None  # the sys.stdout a write failed on: process-wide, as stdout is, whichever guard wrote

    @property
    def failed(self) -> bool:
        """Whether a write to stdout failed (its reader gone): what is still to say belongs on stderr."""
        return GuardedStdout._failed_on is not None and GuardedStdout._failed_on is sys.stdout

    def write(self, text: str) -> int:
        try:
            return self._stdout().write(text)
        except OSError as exc:
            raise self._failed(exc) from None

    def flush(self) -> None:
        try:
            self._stdout().flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._stdout(), name)

    @staticmethod
    @functools.cache
    def _devnull() -> IO[str]:
        return open(os.devnull, "w")

    def _stdout(self) -> IO[str]:
        return sys.stdout if sys.stdout is not None else self._devnull()

    @staticmethod
    def _failed(exc: OSError) -> OutputError:
        GuardedStdout._failed_on = sys.stdout
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OutputError(f"stdout: cannot write ({exc.strerror or exc})")


# C0, DEL and C1: in a file name, ESC [ ... would move the cursor, clear or retitle the terminal.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str, stream: IO[str]) -> str:
    """``text`` as ``stream`` can show it: control characters and a file name's undecodable bytes are
    written as ``\\u001b`` and ``\\udcff`` escapes, as in the JSONL, instead of reaching the terminal or
    raising a UnicodeEncodeError that would end the run."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    text = CONTROL_CHARACTERS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return text.encode(encoding, "backslashreplace").decode(encoding)


def overwrites_input(path: str | Path, reads) -> bool:
    """Whether writing ``path`` would replace one of the files ``reads`` (through a link too): an output renamed
    into place replaces whatever file is there without a word."""
    return os.path.realpath(path) in resolved(reads)


def resolved(reads) -> set[str]:
    """Where each of ``reads`` leads, for ``overwrites_input``."""
    return {os.path.realpath(p) for p in reads if p}


def check_distinct_outputs(outputs, reads, *, reader: str = "this command reads", streams_may_share: bool = False) -> None:
    """Raise OutputError where an output would replace one of the files ``reads`` or another output: renamed into
    place at the end, it would do so without a word. ``outputs`` are (option, path) pairs, path None for an output
    not given; the option names the output in the message ("--jsonl"), None for one named by its path alone.
    ``streams_may_share``: two outputs may reach one stream by way of two of this process's descriptors, the user's
    own joining (/dev/stdout and /dev/stderr on one terminal, or after 2>&1: run's records, whole lines each); never
    by one name or descriptor given twice (run's JSONL and CSV on /dev/stdout came out interleaved, a stream neither
    a JSON nor a CSV reader can read, with 'wrote /dev/stdout' said twice), nor a file (a stream redirected onto a
    file output was lost in its rename); /dev/null, which discards, for any number of them. Binary outputs (an engine
    and its timing cache) never. ``reader`` says what reads the files ("this run reads (the model or a source)")."""
    # Once, not once an output: resolving a folder of 20 000 images takes 0.4 s, and a run's --jsonl, --csv and
    # --save-video would take it three times over before the first record.
    read_targets = resolved(reads)
    taken: dict[str, tuple[str | None, int | None]] = {}  # where it leads: (option, descriptor streamed through)
    for option, path in outputs:
        if path is None:
            continue
        real, through = os.path.realpath(path), _own_descriptor(Path(path))
        if real in read_targets:
            raise OutputError(f"{path}: {option or 'the output'} would overwrite a file {reader}")
        if streams_may_share and real == os.devnull:  # discards: nothing of two outputs there to interleave
            continue
        if real in taken:
            first, first_through = taken[real]
            joined = through is not None and first_through is not None and through != first_through
            if not (streams_may_share and joined):
                raise OutputError(f"{path}: given to both {first} and {option}" if option and first
                                  else f"{path}: given for two outputs")
        taken[real] = option, through


def check_onnx_name(path: str | Path, what: str) -> None:
    """Refuse an ONNX output not named *.onnx: run, evaluate and the rest pick a model's backend by its suffix, so
    `-o m.pth` would be read as a checkpoint."""
    if Path(path).suffix.lower() != ".onnx":
        raise OutputError(f"{path}: {what} is ONNX; name it *.onnx (models are opened by their suffix)")


def local_output(spec: str | Path | None, command: str, *, folder: bool = False) -> Path | None:
    """An output argument (``-o``, ``--json``...; a folder with ``folder``) as a Path, None as None; a URI is refused
    as typed, in one line naming ``command``: as a Path its "//" folded, and the output went to folders named
    "http:" and "host" ("wrote http:/host/r.json")."""
    if spec is None:
        return None
    if problem := uri_refusal(spec, command, f"a local output {'folder' if folder else 'file'}"):
        raise OutputError(problem)
    # As a Path, "new.onnx/" and "new/." lose the ending that names a folder: a file was written where none is yet
    # (an existing one is refused where it is opened, as without the ending). "new/.." keeps it but passed the checks
    # (nothing there to look at): the work was done, then refused at its rename, its partial file left one folder up.
    if not folder and isinstance(spec, str) and spec.endswith(("/", "/.", "/..")) and not os.path.isdir(spec):
        raise OutputError(f"{spec}: names a folder, expected a file name")
    return Path(spec)


def check_writable(path: str | Path, *, folder: bool = False, command: str = "medmamba-edge") -> None:
    """Raise OutputError unless ``path`` (a file, or with ``folder`` a folder of files) can be written as
    ``AtomicOutput`` writes it. For the start of long work (an export, an evaluation), so that a wrong
    ``-o`` or ``--json`` costs a second, not the whole run; nothing is created, not even missing folders.
    A URI is refused (local_output), naming ``command``.

    A real file is created and removed in the nearest existing folder: permission bits say nothing for
    root, a read-only mount or an ACL."""
    path = local_output(path, command, folder=folder)
    try:  # every look at path raises, too, for a name longer than the file system allows
        if folder and path.exists() and not path.is_dir():
            raise OutputError(f"{path}: is not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{path}: is a folder, expected a file name")
        if not folder and streamed_in_place(path):
            if not os.access(path, os.W_OK):
                raise OutputError(f"{path}: cannot write there (permission denied)")
            return
        # through links, as the output is written (a link in a loop stays: it is no folder)
        start = Path(os.path.realpath(path)) if folder else Path(os.path.realpath(path)).parent
        missing = missing_folders(start)
        existing = missing[-1].parent if missing else start
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    if not existing.is_dir():
        raise OutputError(f"{path}: {existing} is not a folder")
    # Nothing looks at a folder still to be made: a name too long for it passed, and the export failed at its end.
    longest = name_max(existing)
    if any(len(os.fsencode(folder_to_make.name)) > longest for folder_to_make in missing):
        raise OutputError(f"{path}: cannot write there ({os.strerror(errno.ENAMETOOLONG)})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".medmamba-edge-", suffix=".probe", dir=existing)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
