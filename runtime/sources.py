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
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np

from medmamba_edge.errors import UserError, first_line, install_hint
from medmamba_edge.runtime.preprocess import IMAGE_SUFFIXES, ImageError, quiet_opencv, read_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts", ".mjpeg", ".mjpg", ".gif")
DICOM_SUFFIXES = (".dcm", ".dicom")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
# FFmpeg logs every dropped connection itself; our reconnect notice says it once, in words.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
NETWORK_TIMEOUT_MS = 5000  # FFmpeg's open/read timeouts: a dead server is noticed, not waited on forever


class SourceError(UserError):
    """A source that cannot be opened, or a live source that was lost for good."""


@dataclass
class Frame:
    source: str  # path or URI
    index: int  # frame number within its file or stream (0 for a still image)
    timestamp: float  # seconds into a video file; wall-clock time (epoch) for live sources and stills
    image: np.ndarray | None = None  # RGB or grayscale, uint8/uint16/float32 in [0, 1]
    error: str | None = None  # why the frame cannot be used; then image is None
    captured: float = field(default_factory=time.perf_counter)  # start of capture→result latency
    tensor: np.ndarray | None = None  # the model input, filled by Capture's thread


class Source(ABC):
    """Base: ``live`` sources drop the oldest frame when inference falls behind; files never drop."""

    description: str = ""
    live: bool = False
    # Where a source reports what happened without ending the run (a reconnect); the loop prints it.
    notify: Callable[[str], None] = staticmethod(lambda message: None)

    @abstractmethod
    def frames(self, stride: int = 1) -> Iterator[Frame]:
        """The frames in order, every ``stride``-th one; a broken frame comes with its ``error``."""

    @property
    def fps(self) -> float | None:
        """Frames per second the source delivers, where it says (a video file or camera)."""
        return None

    def stop(self) -> None:
        """Called from another thread: stop reading and waiting soon."""

    def close(self) -> None:
        """Release the device or file."""


def item_error(path, exc: Exception) -> str:
    """The reason one item failed, as its record gives it. An ImageError already says it in words; anything
    else is unexpected, so its type stays in the reason (a bug is reported, never hidden)."""
    if isinstance(exc, UserError):
        return str(exc)
    detail = first_line(exc)
    return f"{path}: unexpected {type(exc).__name__}" + (f": {detail}" if detail else "")


def iterate(source: Source, stride: int = 1, max_frames: int | None = None, loop: bool = False,
            stop: threading.Event | None = None) -> Iterator[Frame]:
    """The frames a run sees: every ``stride``-th, at most ``max_frames`` (skipped ones count), and the
    whole source again while ``loop`` is set (files only; a pass without one usable frame ends it)."""
    if stride < 1:
        raise SourceError(f"--stride must be ≥ 1, got {stride}")
    count = 0
    while True:
        usable = False
        for frame in source.frames(stride):
            if (stop is not None and stop.is_set()) or (max_frames is not None and count >= max_frames):
                return
            usable = usable or frame.error is None
            count += 1
            yield frame
        if not loop or source.live or not usable:
            return


# ----------------------------------------------------------------------------------------------- files

def is_dicom(path: Path) -> bool:
    """By suffix, or by the 'DICM' magic after the 128-byte preamble (DICOM files often have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
        from pydicom import pixels
    except ImportError as exc:
        raise SourceError(f"reading DICOM needs pydicom ({exc}): {install_hint('dicom')}") from None
    return pydicom, pixels


def read_dicom(path: str | Path) -> list[np.ndarray]:
    """A DICOM file's frames, ready for ``preprocess``. Monochrome images go through the modality LUT
    (rescale slope/intercept) and the VOI LUT or window, in float, then map that output range to [0, 1]
    (MONOCHROME1 inverted so that bright is dense everywhere). An 8-bit image without any of these is
    returned as uint8, identical to the same pixels saved as PNG. PALETTE COLOR goes through its palette
    to RGB; colour images stay RGB; 1- to 7-bit images are scaled from their bit range like 12-bit ones."""
    pydicom, lut = _pydicom()
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, …: every way a header can be broken
        raise ImageError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        # pydicom reads a cut file up to where it ends, silently: an image class or image attributes
        # without the pixels means the pixels were cut off, not that there never were any.
        sop = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
        if "Rows" in ds or "Image" in str(getattr(sop, "name", "")):
            raise ImageError(f"{path}: truncated DICOM file: {getattr(sop, 'name', 'an image')} that ends before "
                             f"its pixel data")
        raise ImageError(f"{path}: DICOM without pixel data (modality {ds.get('Modality', '?')})")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated pixel data, …
        message = first_line(exc)
        if "less than expected" in message:
            raise ImageError(f"{path}: truncated DICOM file (the pixel data is cut short: {message})") from None
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ImageError(f"{path}: cannot decode DICOM pixel data ({name}): {message} "
                         f"(compressed DICOM may need pillow or pylibjpeg)") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[None]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":  # the stored values are indices into the palette, not intensities
            return list(lut.apply_color_lut(pixels, ds))
        if ds.get("SamplesPerPixel", 1) != 1:  # RGB (pydicom converts YBR to RGB)
            return list(pixels)
        return _monochrome(ds, pixels, photometric, lut, path)
    except ImageError:
        raise
    except Exception as exc:  # a WindowWidth of 0, a palette without its tables: the file's values, not ours
        raise ImageError(f"{path}: DICOM {photometric} pixels cannot be mapped to intensities "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def _monochrome(ds, pixels: np.ndarray, photometric: str, lut, path) -> list[np.ndarray]:
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"{path}: DICOM photometric interpretation {photometric} with one sample per pixel is "
                         f"not supported (MONOCHROME1/2 or PALETTE COLOR)")
    transformed = any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
                                        "WindowCenter", "VOILUTSequence"))
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    if pixels.dtype == np.uint8 and bits == 8 and not transformed:
        return list(255 - pixels if photometric == "MONOCHROME1" else pixels)
    values = lut.apply_voi_lut(lut.apply_modality_lut(pixels, ds), ds)
    # The output range of the same transforms applied to the extremes the stored bits can hold: the
    # window's or LUT's range when there is one, else the modality range of the stored values.
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    extremes = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1],
                        dtype=np.int64 if signed else np.uint64).astype(pixels.dtype)
    low, high = (float(v) for v in lut.apply_voi_lut(lut.apply_modality_lut(extremes, ds), ds))
    if not high > low:
        raise ImageError(f"{path}: DICOM value range is empty ({low}..{high})")
    scaled = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return list(1.0 - scaled if photometric == "MONOCHROME1" else scaled)


def read_still(path: Path) -> list[np.ndarray]:
    """An image or DICOM file's frames (one, except multi-frame DICOM)."""
    return read_dicom(path) if is_dicom(path) else [read_image(path)]


class FileSource(Source):
    """Still images and DICOM files, in order; ``stride`` takes every Nth file. A path given with a
    reason (a dangling link found while listing a folder) is not read; it gets a record with the reason."""

    def __init__(self, paths: list[Path | tuple[Path, str]], description: str):
        self.paths, self.description = paths, description

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


def _is_still(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES or (not suffix and is_dicom(path))


NOT_REGULAR = "not a regular file (a FIFO, socket or device), not read"


def _broken_link(path: Path, error: OSError) -> str:
    # ELOOP or ENOENT from following it: the link, not a file, is what is there.
    what = "a symbolic link loop" if error.errno == errno.ELOOP else "a dangling symbolic link"
    return f"{what} (to {os.readlink(path)})"


def _glob_files(pattern: str) -> list[Path | tuple[Path, str]]:
    """The files matching ``pattern``, sorted; like a folder's listing, a match that cannot be read (a dangling
    link, a FIFO) comes with the reason, so it gets a record."""
    found: list[Path | tuple[Path, str]] = []
    for path in sorted(Path(p) for p in glob.glob(pattern, recursive=True)):
        try:
            info = os.stat(path)
        except OSError as exc:
            found.append((path, _broken_link(path, exc)))
            continue
        if stat.S_ISREG(info.st_mode):
            found.append(path)
        elif not stat.S_ISDIR(info.st_mode):
            found.append((path, NOT_REGULAR))
    return found


def _folder_files(folder: Path) -> list[Path | tuple[Path, str]]:
    """Every image and DICOM file below ``folder``, sorted, following links to folders once each (a link
    back up the tree is a loop and is not entered). What looks like an image but cannot be read as one
    (a dangling link, a link loop, a FIFO, a hidden file) comes with the reason, so it gets a record;
    other files (notes.txt, .DS_Store) are not listed."""
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
                if entry.is_symlink():
                    found.append((path, _broken_link(path, exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
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
            elif not entry.name.startswith(".") and _is_still(path):
                found.append(path)

    walk(folder)
    return found


# ----------------------------------------------------------------------------------------------- video

class VideoSource(Source):
    """A video file, camera or network stream through OpenCV. A live source that stops delivering is
    reopened with exponential back-off; after ``reconnect`` failures in a row it is lost. A stream also
    gets those retries for its first connection (a camera that is still booting)."""

    def __init__(self, open_capture: Callable[[], cv2.VideoCapture], description: str, uri: str, live: bool = False,
                 reconnect: int = 5, retry_first_open: bool = False, backoff: float = 0.5):
        self.open_capture, self.description, self.uri, self.live = open_capture, description, uri, live
        self.reconnect, self.backoff = reconnect, backoff  # first wait; doubles up to 8 s
        self.stopping = threading.Event()  # set by the loop: stop reading and waiting
        self.capture: cv2.VideoCapture | None = None
        try:
            self.capture = open_capture()
            return
        except SourceError:
            if not retry_first_open:
                raise
        for attempt in range(1, reconnect + 1):
            self._wait(attempt)
            capture = self._try_open()
            if capture.isOpened():
                self.capture = capture
                return
        raise SourceError(f"{uri}: cannot be opened after {reconnect} attempts "
                          f"(server unreachable, wrong URL or unsupported stream)")

    def frames(self, stride: int = 1) -> Iterator[Frame]:
        if self.capture is None:  # a second pass (--loop) over a file
            self.capture = self.open_capture()
        total = 0 if self.live else int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        index, failures = 0, 0
        while not self.stopping.is_set():
            keep = index % stride == 0
            # grab() skips a frame without decoding it, so --stride saves the decode too.
            ok, image = self.capture.read() if keep else (self.capture.grab(), None)
            if not ok:
                if not self.live:
                    break
                failures += 1
                self.close()
                if failures > self.reconnect:
                    raise SourceError(f"{self.description}: lost; no frames after {self.reconnect} reconnect attempts")
                self._wait(failures)
                self.capture = self._try_open()
                continue
            failures = 0
            if keep:
                timestamp = time.time() if self.live else self.capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
                yield Frame(self.uri, index, timestamp, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            index += 1
        self.close()
        if self.stopping.is_set():
            return
        if index == 0:  # FFmpeg read the container but not one frame: say so, never end with no record
            yield Frame(self.uri, 0, 0.0, error=f"{self.uri}: the video opens but no frame decodes "
                                               f"(no frames, or corrupt or unsupported video data)")
        elif index < total - 1:  # the container promised more frames: the file ends early or stops decoding
            yield Frame(self.uri, index, 0.0, error=f"{self.uri}: video stopped decoding at frame {index} of "
                                                  f"{total} (truncated or corrupt)")

    def _wait(self, attempt: int) -> None:
        wait = min(self.backoff * 2 ** (attempt - 1), 8.0)
        self.notify(f"{self.description}: no frames; reconnecting in {wait:.1f} s (attempt {attempt}/{self.reconnect})")
        self.stopping.wait(wait)

    def _try_open(self) -> cv2.VideoCapture:
        """Opened, or a closed capture whose read() fails, which counts as the next failure."""
        try:
            return self.open_capture()
        except SourceError:
            return cv2.VideoCapture()

    @property
    def fps(self) -> float | None:
        fps = self.capture.get(cv2.CAP_PROP_FPS) if self.capture is not None else 0.0
        return fps if 0 < fps < 1000 else None  # some streams report 0 or 90000 (the RTP clock)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


def _opener(what: str, *args, hint: str = "") -> Callable[[], cv2.VideoCapture]:
    def open_capture() -> cv2.VideoCapture:
        with quiet_opencv():
            capture = cv2.VideoCapture(*args)
        if not capture.isOpened():
            raise SourceError(f"{what}: cannot be opened{hint}")
        return capture
    return open_capture


def has_gstreamer() -> bool:
    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        return True
    return bool(re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()))


def csi_pipeline(sensor: int, width: int = 1920, height: int = 1080, fps: int = 30) -> str:
    """nvarguscamerasrc (Jetson ISP) → NVMM → nvvidconv → BGR for OpenCV; appsink keeps only the newest frame."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR "
            f"! appsink drop=true max-buffers=1")


def _csi_source(uri: str) -> VideoSource:
    parsed = urlparse(uri)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    try:
        sensor = int(parsed.netloc or "0")
        size = {k: int(query[k]) for k in ("width", "height", "fps") if k in query}
    except ValueError:
        raise SourceError(f"{uri}: expected csi://N[?width=W&height=H&fps=F] with integers") from None
    if not has_gstreamer():
        raise SourceError(
            f"{uri}: this OpenCV ({cv2.__version__}, {Path(cv2.__file__).parent}) has no GStreamer support, which "
            f"CSI cameras need (PyPI's opencv-python wheels never have it). On Jetson use JetPack's OpenCV: "
            f"`sudo apt install python3-opencv`, create the venv with --system-site-packages and "
            f"`pip uninstall opencv-python opencv-python-headless` inside it")
    return VideoSource(_opener(uri, csi_pipeline(sensor, **size), cv2.CAP_GSTREAMER,
                               hint=" (is nvargus-daemon running and the sensor connected?)"),
                       f"CSI camera {sensor}", uri, live=True)


def _camera_source(device: int | str, uri: str) -> VideoSource:
    # A path (/dev/video0) goes to V4L2 directly; an index lets OpenCV pick the platform's camera backend.
    args = (device, cv2.CAP_V4L2) if isinstance(device, str) else (device,)
    return VideoSource(_opener(f"camera {device}", *args,
                               hint=" (no such device, no permission, or in use; list cameras with `v4l2-ctl --list-devices`)"),
                       f"camera {device}", uri, live=True)


def _stream_source(uri: str, reconnect: int) -> VideoSource:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
    return VideoSource(_opener(uri, uri, cv2.CAP_FFMPEG, params, hint=" (server unreachable, wrong URL or unsupported stream)"),
                       f"stream {uri}", uri, live=True, reconnect=reconnect, retry_first_open=True)


def _video_file_source(path: Path) -> VideoSource:
    return VideoSource(_opener(str(path), str(path), cv2.CAP_FFMPEG,
                               hint=" as a video (corrupt, truncated or an unsupported codec)"),
                       f"video {path}", str(path))


# ------------------------------------------------------------------------------------------------ parse

def open_source(spec: str, reconnect: int = 5) -> Source:
    """The source for a URI (see the module docstring), opened."""
    spec = str(spec).strip()
    if re.fullmatch(r"\d+", spec):
        return _camera_source(int(spec), spec)
    scheme = urlparse(spec).scheme.lower() if "://" in spec else ""
    if scheme == "csi":
        return _csi_source(spec)
    if scheme == "v4l2":
        return _camera_source(urlparse(spec).path, spec)
    if scheme in STREAM_SCHEMES:
        return _stream_source(spec, reconnect)
    if scheme == "file":
        spec = unquote(urlparse(spec).path)  # file:///scans/chest%20x-ray.png names "chest x-ray.png"
    elif scheme:
        raise SourceError(f"{spec}: unknown scheme {scheme}://; expected csi://, v4l2://, file:// or a stream "
                          f"({', '.join(s + '://' for s in STREAM_SCHEMES)})")
    if re.fullmatch(r"/dev/video\d+", spec):
        return _camera_source(spec, spec)
    if glob.has_magic(spec) and not Path(spec).exists():
        paths = _glob_files(spec)
        if not paths:
            raise SourceError(f"{spec}: no files match")
        return FileSource(paths, f"{spec} ({len(paths)} files)")
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{path}: no such file, folder, camera or stream")
    if path.is_dir():
        paths = _folder_files(path)
        if not paths:
            raise SourceError(f"{path}: no images or DICOM files found (looked for {', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})")
        return FileSource(paths, f"{path} ({len(paths)} files)")
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise SourceError(f"{path}: not a regular file (a FIFO, socket or device); expected an image, video, "
                          f"DICOM file, folder, camera or stream")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if path.stat().st_size == 0:
            raise SourceError(f"{path}: video file is empty")
        return _video_file_source(path)
    if suffix in IMAGE_SUFFIXES or is_dicom(path):
        return FileSource([path], str(path))
    raise SourceError(f"{path}: unsupported file type {suffix or '(no suffix)'}; expected an image "
                      f"({', '.join(IMAGE_SUFFIXES)}), a video ({', '.join(VIDEO_SUFFIXES)}) or DICOM")


# --------------------------------------------------------------------------------------------- capture

class Capture:
    """Reads and preprocesses frames in its own thread into a bounded queue, so decoding overlaps
    inference. A live source that outruns inference loses its oldest waiting frame (kept in ``dropped``
    so that it still gets a record); a file source waits for room and loses nothing."""

    def __init__(self, source: Source, prepare: Callable[[np.ndarray], np.ndarray], size: int, **iterate_options):
        self.source, self.prepare, self.size, self.options = source, prepare, max(size, 1), iterate_options
        self.queue: deque[Frame] = deque()
        self.dropped: list[Frame] = []
        self.ready = threading.Condition()
        self.stopping = threading.Event()
        self.done = False
        self.failure: BaseException | None = None  # what ended the source early; the loop reports or re-raises it
        self.thread = threading.Thread(target=self._read, name="capture", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        try:
            for frame in iterate(self.source, stop=self.stopping, **self.options):
                if frame.error is None:
                    try:
                        frame.tensor = self.prepare(frame.image)
                    except Exception as exc:  # a 5-channel TIFF, float pixels: skipped, the run goes on
                        frame.image, frame.error = None, item_error(frame.source, exc)
                self._put(frame)
        except BaseException as exc:  # handed to the main thread, which owns error reporting
            self.failure = exc
        finally:
            self.source.close()
            with self.ready:
                self.done = True
                self.ready.notify_all()

    def _put(self, frame: Frame) -> None:
        with self.ready:
            while len(self.queue) >= self.size and not self.stopping.is_set():
                if self.source.live:
                    dropped = self.queue.popleft()
                    dropped.image = dropped.tensor = None
                    self.dropped.append(dropped)
                    break
                self.ready.wait(0.1)
            self.queue.append(frame)
            self.ready.notify_all()

    def next_batch(self, size: int, timeout: float = 0.1) -> list[Frame] | None:
        """Up to ``size`` frames, waiting at most ``timeout`` for each; a live source's batch takes only
        what is waiting (latency first). None once the source is finished and the queue empty."""
        batch: list[Frame] = []
        with self.ready:
            while len(batch) < size:
                if self.queue:
                    batch.append(self.queue.popleft())
                    self.ready.notify_all()
                elif self.done or (batch and self.source.live) or not self.ready.wait(timeout):
                    break
            return None if not batch and self.done and not self.queue else batch

    def take_dropped(self) -> list[Frame]:
        with self.ready:
            dropped, self.dropped = self.dropped, []
        return dropped

    def stop(self) -> list[Frame]:
        """Stop reading; the frames still waiting (they get records too)."""
        self.stopping.set()
        self.source.stop()
        with self.ready:
            self.ready.notify_all()
        self.thread.join(timeout=2.0)
        with self.ready:
            left, self.queue = list(self.queue), deque()
        return left
