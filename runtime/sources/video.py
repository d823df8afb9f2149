"""Video through OpenCV: files, V4L2 cameras, Jetson CSI cameras (GStreamer) and network streams (FFmpeg),
one ``VideoSource`` class; a live one reconnects with back-off and is lost only after ``reconnect`` failures, and
each outage, however it ends, is yielded as a ``Frame`` with ``outage_s`` so that the records show the gap.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2

from medmamba_edge.errors import plural

from ..backoff import BACKOFF_FIRST_S, backoff_s
from ..decode import opencv_cannot_name, quiet_opencv
from ..uri import without_password
from .base import Frame, Source, SourceError, wall_clock

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts", ".mjpeg", ".mjpg", ".gif")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
# FFmpeg logs every dropped connection itself; our reconnect notice says it once, in words.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
NETWORK_TIMEOUT_MS = 5000  # FFmpeg's open/read timeouts: a dead server is noticed, not waited on forever


# Failed reads in a row after which a video file counts as ended: a damaged stretch fails a few frames' reads, the
# missing end of a truncated file every read (each fails at once).
FILE_READ_FAILURES = 25


class VideoSource(Source):
    """A video file, camera or network stream through OpenCV. A live source that stops delivering is
    reopened with exponential back-off; after ``reconnect`` failures in a row it is lost. A stream also
    gets those retries for its first connection (a camera that is still booting)."""

    # Why a video ends before the frames it lists. OpenCV tells neither a stalled or dropped connection nor a file cut
    # short on its server from the file's own end: a video read from a web server says both (stream_source).
    cut_short = "truncated or corrupt"

    def __init__(self, open_capture: Callable[[], cv2.VideoCapture], description: str, uri: str, live: bool = False,
                 reconnect: int = 5, retry_first_open: bool = False,
                 notify: Callable[[str], None] | None = None):
        self.open_capture, self.description, self.uri, self.live = open_capture, description, uri, live
        if notify is not None:  # a first connection's retries are said too, not only a lost stream's
            self.notify = notify
        self.reconnect, self.backoff = reconnect, BACKOFF_FIRST_S  # the first wait, in s (backoff_s doubles it)
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
        tries = reconnect + 1  # the first and its retries
        raise SourceError(f"{uri}: cannot be opened after {plural(tries, 'attempt')} "
                          f"(server unreachable, wrong URL or unsupported stream)")

    def frames(self, stride: int = 1) -> Iterator[Frame]:
        if self.capture is None:  # a second pass (--loop) over a file
            self.capture = self.open_capture()
        total = 0 if self.live else int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = self.fps
        # a frame not read has no time of its own
        at = lambda position: file_time(position * 1000 / fps) if fps else 0.0  # noqa: E731
        index, failures = 0, 0
        lost_at = None  # when a live source's failed reads began: its outage gets a record
        while not self.stopping.is_set():
            keep = index % stride == 0
            # The outage's timestamp is wall-clock time, as a frame's; its length is not: NTP stepping the clock
            # (a board without a real-time clock, synced once its network is back) made it an hour or negative.
            read_at = wall_clock(), time.monotonic()
            # grab() skips the colour conversion of a frame --stride passes over (FFmpeg decodes it either way). Quiet:
            # a stalled stream's read printed OpenCV's '[ WARN:0@11.050] ... Stream timeout triggered after 5008 ms'
            # beside the reconnect notice that says it in words.
            with quiet_opencv():
                ok, image = self.capture.read() if keep else (self.capture.grab(), None)
            if not ok and not self.live:
                # A corrupt frame fails its read, which passes over it, and the frames after it read again; the end of
                # the file, or of what a truncated one holds, fails every read.
                failures, index = failures + 1, index + 1
                # Raw MJPEG and some MPEG files list no count (-1, or -2^63): their end is the failures in a row.
                if 0 < total < index or failures > FILE_READ_FAILURES:
                    break
                continue
            if not self.live:
                for lost in range(index - failures, index):
                    if lost % stride == 0:
                        yield Frame(self.uri, lost, at(lost),
                                    error=f"{self.uri}: frame {lost} does not decode (corrupt); the frames after it "
                                          f"are read")
            if not ok:
                if self.stopping.is_set():  # the stop came during this read (a stalled stream's 5 s): not a loss
                    break
                lost_at = lost_at or read_at
                failures += 1
                self.close()
                if failures > self.reconnect:
                    attempts = plural(self.reconnect, "reconnect attempt")
                    yield self._outage(lost_at, f"given up after {attempts}")
                    raise SourceError(f"{self.description}: lost; no frames after {attempts}")
                self._wait(failures)
                if self.stopping.is_set():  # a connection now would hold a stop up to FFmpeg's 5 s open timeout
                    break
                self.capture = self._try_open()
                continue
            if lost_at is not None:
                yield self._outage(lost_at, f"reconnected after {plural(failures, 'reconnect attempt')}")
                lost_at = None
            failures = 0
            if keep:
                timestamp = wall_clock() if self.live else file_time(self.capture.get(cv2.CAP_PROP_POS_MSEC))
                yield Frame(self.uri, index, timestamp, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            index += 1
        self.close()
        if self.stopping.is_set():
            if lost_at is not None:
                yield self._outage(lost_at, "the run was stopped while reconnecting")
            return
        first_lost = index - failures  # the reads that failed at the end, up to the frame count the container lists
        if first_lost < total and failures > FILE_READ_FAILURES:  # what follows may decode, but was not read
            # (A file that lists no count ends so too: its damage cannot be told from its end.)
            yield Frame(self.uri, first_lost, at(first_lost),
                        error=f"{self.uri}: {failures} frames in a row from frame {first_lost} on did not decode, and "
                              f"the rest of the {total} frames the video lists was not read ({self.cut_short})")
        elif first_lost == 0:  # FFmpeg read the container but not one frame: say so, never end with no record
            # One that lists frames ended before them, as a file cut short does (a web server's connection lost
            # before the first frame of a short clip came here).
            why = f"unsupported video data, or {self.cut_short}" if total > 0 else \
                "no frames, or corrupt or unsupported video data"
            yield Frame(self.uri, 0, 0.0, error=f"{self.uri}: the video opens but no frame decodes ({why})")
        elif first_lost < total:
            # A truncated file ends early. FFmpeg also passes over some corrupt frames without a word (its reads do
            # not fail): the frames after one are numbered as read, and it shows here as frames missing at the end.
            yield Frame(self.uri, first_lost, at(first_lost),
                        error=f"{self.uri}: {total - first_lost} of the {total} frames the video lists did not "
                              f"decode ({self.cut_short}), from frame {first_lost} on")

    def _outage(self, lost_at: tuple[float, float], end: str) -> Frame:
        timestamp, since = lost_at
        seconds = time.monotonic() - since
        return Frame(self.uri, None, timestamp, error=f"{self.description} lost for {seconds:.1f} s; {end}",
                     outage_s=seconds)

    def _wait(self, attempt: int) -> None:
        wait = backoff_s(attempt, self.backoff)
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


def file_time(ms: float) -> float:
    """A position in a video file, in seconds to the microsecond: divided as it comes, 600 ms was 0.6000000000000001
    in a record. Not to the millisecond: OpenCV's milliseconds carry the container's time base in their fraction
    (a 29.97 fps frame at 33.3667 ms), which a millisecond put 33 or 34 ms apart, and over 1000 fps on one time."""
    return round(ms / 1000, 6)


def _opener(what: str, *args, hint: str = "") -> Callable[[], cv2.VideoCapture]:
    if any(isinstance(arg, str) and opencv_cannot_name(arg) for arg in args):  # a file, a device, a URL
        raise SourceError(f"{what}: OpenCV opens videos under UTF-8 names only; this one has other bytes")

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


def csi_source(uri: str, reconnect: int) -> VideoSource:
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
                       f"CSI camera {sensor}", uri, live=True, reconnect=reconnect)


def camera_source(device: int | str, uri: str, reconnect: int) -> VideoSource:
    # A path (/dev/video0) goes to V4L2 directly; an index lets OpenCV pick the platform's camera backend.
    args = (device, cv2.CAP_V4L2) if isinstance(device, str) else (device,)
    return VideoSource(_opener(f"camera {device}", *args,
                               hint=" (no such device, no permission, or in use; list cameras with `v4l2-ctl --list-devices`)"),
                       f"camera {device}", uri, live=True, reconnect=reconnect)


def stream_source(uri: str, reconnect: int, notify: Callable[[str], None] | None = None) -> VideoSource:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
    shown = without_password(uri)  # the records' source and every message; FFmpeg alone gets the password
    opener = _opener(shown, uri, cv2.CAP_FFMPEG, params, hint=" (server unreachable, wrong URL or unsupported stream)")
    source = VideoSource(opener, f"stream {shown}", shown, live=True, reconnect=reconnect, retry_first_open=True, notify=notify)
    # A video file on a web server (http://host/clip.avi) lists its frames, a camera's stream does not. Read as live,
    # the file was dropped from as a camera is, and its end taken for a lost connection: replayed from its start.
    if source.capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0:
        source.live, source.description = False, f"video {shown}"
        source.cut_short = "the connection stalled or dropped, or the file on the server is truncated or corrupt"
    return source


def video_file_source(path: Path) -> VideoSource:
    source = VideoSource(_opener(str(path), str(path), cv2.CAP_FFMPEG,
                                 hint=" as a video (corrupt, truncated or an unsupported codec)"),
                         f"video {path}", str(path))
    source.inputs = (path,)
    return source
