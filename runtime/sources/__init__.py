"""Frame sources behind one URI grammar, as jetson-inference's videoSource or Ultralytics' ``source=``:

    0, 1, …                    camera by index (V4L2 on Linux)
    /dev/video0, v4l2:///dev/video0   camera device
    csi://0[?width=&height=&fps=]     Jetson CSI camera (GStreamer nvarguscamerasrc; needs OpenCV with GStreamer)
    rtsp://…, http(s)://…, rtmp://…   network stream (live: reconnects with back-off)
    clip.mp4 (.avi, .mkv, …)   video file
    scan.png, study.dcm        one image or DICOM file (a multi-frame DICOM gives one frame per frame)
    folder/, "images/*.png"    every image and DICOM file under a folder (recursively) or matching a glob

``open_source(spec)`` parses it and opens the device or file at once, so a camera that does not exist or
a file that is not a video fails before the run starts. ``Source.frames(stride)`` then yields ``Frame``s;
a file that cannot be decoded, or fails in any other way, yields a Frame with ``error`` set (it gets a
"skipped" record with the reason) and the run goes on. Everything here is numpy + OpenCV; pydicom is
imported only when a DICOM file is read.
"""

from __future__ import annotations

import errno
import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from medmamba_edge.errors import plural

from ..decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_still
from ..files import strip_unless_named
from ..metadata import int_at_least
from ..uri import without_password
from .base import Frame, Source, SourceError, item_error, iterate
from .capture import Capture
from .files import FileSource, cannot_stat, folder_files, glob_files, is_animation_record
from .video import (
    STREAM_SCHEMES,
    VIDEO_SUFFIXES,
    camera_source,
    csi_source,
    stream_source,
    video_file_source,
)

__all__ = ["Capture", "Frame", "Source", "SourceError", "item_error", "iterate", "open_source"]


C_INT_MAX = 2**31 - 1


def file_url_path(url_path: str) -> str:
    """A file:// URL's path as this system names the file: file:///scans/chest%20x-ray.png names "chest x-ray.png",
    and on Windows file:///C:/scans/a.png names C:\\scans\\a.png (as a Path, /C:/scans/a.png is a folder "C:" under
    the current drive's root, a name Windows refuses)."""
    if os.name == "nt":
        # Not nturl2path, which urllib.request used here through 3.13: 3.14 deprecates it, and 3.19 removes it.
        from urllib.request import url2pathname

        return url2pathname(url_path)
    return unquote(url_path)


def open_source(spec: str, reconnect: int = 5, notify: Callable[[str], None] | None = None) -> Source:
    """The source for a URI (see the module docstring), opened; ``notify`` hears a stream's first reconnect
    attempts (the run loop takes over once it starts)."""
    if not int_at_least(reconnect, 0):
        raise SourceError(f"--reconnect must be an integer ≥ 0, got {reconnect!r}")
    spec = strip_unless_named(str(spec))
    if not spec.strip():  # an unset "$SOURCE" would otherwise be ".", the current folder
        raise SourceError("SOURCE is empty: expected a camera, stream, video, image, folder, glob or DICOM file")
    if re.fullmatch(r"[0-9]+", spec):  # not \d: "١" is a digit to re, and no camera
        if int(spec) > C_INT_MAX:  # OpenCV takes a C int: 2147483648 ended in cv2.error's overload traceback
            raise SourceError(f"camera {int(spec)}: no such device (a camera index is at most {C_INT_MAX})")
        return camera_source(int(spec), spec, reconnect)
    try:
        url = urlparse(spec) if "://" in spec else None
    except ValueError as exc:  # a "[" with no "]" (an IPv6 host half typed) ended the run in urllib's traceback
        raise SourceError(f"{without_password(spec)}: not a valid URL ({exc})") from None
    scheme = url.scheme.lower() if url else ""
    # A URL that names nothing: rtsp:// took FFmpeg's six attempts (15 s) to be 'cannot be opened', file:// read the
    # current folder and v4l2:// was 'camera : cannot be opened'.
    needed = {"v4l2": ("path", "device", "v4l2:///dev/videoN"), "file": ("path", "file", "file:///path"),
              **{s: ("netloc", "host", f"{s}://HOST[:PORT]/…") for s in STREAM_SCHEMES}}.get(scheme)
    if needed and not getattr(url, needed[0]):
        raise SourceError(f"{without_password(spec)}: names no {needed[1]}; expected {needed[2]}")
    if scheme == "csi":
        return csi_source(spec, reconnect)
    if scheme == "v4l2":
        return camera_source(url.path, spec, reconnect)
    if scheme in STREAM_SCHEMES:
        return stream_source(spec, reconnect, notify)
    if scheme == "file":
        if url.netloc not in ("", "localhost"):
            shown = without_password(spec)
            raise SourceError(f"{shown}: a file:// URL names a file on this machine (file:///path), not on "
                              f"{urlparse(shown).netloc}")
        spec = file_url_path(url.path)
    elif scheme:
        raise SourceError(f"{without_password(spec)}: unknown scheme {scheme}://; expected csi://, v4l2://, file:// "
                          f"or a stream ({', '.join(s + '://' for s in STREAM_SCHEMES)})")
    if re.fullmatch(r"/dev/video[0-9]+", spec):
        return camera_source(spec, spec, reconnect)
    if glob.has_magic(spec) and not Path(spec).exists():
        paths = glob_files(spec, gifs=True)
        if all(is_animation_record(entry) for entry in paths):  # none, or only GIFs: videos, each a run's source
            raise SourceError(f"{spec}: no image or DICOM file matches (a video is a source of its own: "
                              f"one per run)")
        return FileSource(paths, f"{spec} ({plural(len(paths), 'file')})")
    path = Path(spec)
    try:
        path.stat()
    except OSError as exc:  # a link loop, a dangling link, a name too long: said as a folder's listing says it
        is_link = os.path.islink(path)  # not Path.is_symlink: it raises for a name too long
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not is_link:  # ENOTDIR: a file as a folder on the way
            raise SourceError(f"{path}: no such file, folder, camera or stream") from None
        raise SourceError(f"{path}: {cannot_stat(path, exc, is_link)}") from None
    if path.is_dir():
        paths = folder_files(path, gifs=True)
        if all(is_animation_record(entry) for entry in paths):  # none, or only GIFs: as a glob of them is refused
            gifs = (f"; {plural(len(paths), 'GIF file')}, read as video: a video is a source of its own, one per "
                    f"run") if paths else ""
            raise SourceError(f"{path}: no images or DICOM files found (looked for "
                              f"{', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)}{gifs})")
        return FileSource(paths, f"{path} ({plural(len(paths), 'file')})")
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise SourceError(f"{path}: not a regular file (a FIFO, socket or device); expected an image, video, "
                          f"DICOM file, folder, camera or stream")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if path.stat().st_size == 0:
            raise SourceError(f"{path}: video file is empty")
        return video_file_source(path)
    try:
        still = is_still(path)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if still:
        return FileSource([path], str(path))
    raise SourceError(f"{path}: unsupported file type {suffix or '(no suffix)'}; expected an image "
                      f"({', '.join(IMAGE_SUFFIXES)}), a video ({', '.join(VIDEO_SUFFIXES)}) or DICOM")
