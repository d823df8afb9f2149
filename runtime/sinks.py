"""Where results go: console lines, JSONL/CSV records, an annotated video, a window, and the summary.

Every frame the loop sees becomes one ``Record`` (classified, abstained, skipped with the reason, or
dropped because inference fell behind a live source), and so does each outage of a live source (lost, no frame).
Files go through ``files.AtomicOutput``: written under a unique temporary name beside the target and renamed by
``close()``, which the loop always calls (Ctrl-C, SIGTERM and a full disk included), so a file under the target
name holds whole records only.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Protocol

import cv2
import numpy as np

from medmamba_edge.errors import UserError, plural

from .decode import opencv_cannot_name, quiet_opencv
from .files import (SYNC_INTERVAL_S, AtomicOutput, GuardedStdout, any_is_stdout, check_distinct_outputs, local_output,
                    printable)

STATUSES = ("ok", "abstain", "skipped", "dropped", "lost")


class SinkError(UserError):
    """An output that cannot be written (or shown)."""


@dataclass
class Record:
    seq: int  # position in the run, over all sources and loops
    source: str
    frame: int | None  # None for an outage, which is no frame
    timestamp: float  # for an outage, when the source was lost
    status: str  # one of STATUSES
    labels: list[str] = field(default_factory=list)  # top-k, best first; empty unless classified
    probabilities: list[float] = field(default_factory=list)
    latency_ms: float | None = None  # capture → result
    reason: str | None = None  # why skipped/dropped/abstained/lost
    outage_s: float | None = None  # how long a lost source delivered nothing; None for a frame

    def as_dict(self) -> dict:
        data = asdict(self)
        data["probabilities"] = [round(p, 6) for p in self.probabilities]
        data["latency_ms"] = None if self.latency_ms is None else round(self.latency_ms, 3)
        data["outage_s"] = None if self.outage_s is None else round(self.outage_s, 3)
        return data


class Sink(Protocol):
    """``image`` is the frame as the source gave it, or, for a sink whose ``shows_overlay`` is true, the frame with
    the overlay drawn (BGR uint8, shared with the other such sinks: drawn on, it would change theirs too); None
    for a frame the model never saw."""

    def write(self, record: Record, image: np.ndarray | None, fps: float) -> None: ...

    def close(self) -> None: ...


def encode_text(text: str) -> bytes:
    """UTF-8, with a name's undecodable bytes (surrogate-escaped by Python: ``\\udcff`` for byte 0xff)
    written as that escape, which is how JSON spells the character: the JSONL reads back to the very
    string ``os.fsencode`` turns into the original bytes, and the CSV carries the same text."""
    return text.encode("utf-8", "backslashreplace")


# A backslash in a CSV field that would read as an escape: one before another backslash, before \udc80-\udcff
# text, or before a surrogate (which encode_text writes as such an escape).
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=\\|udc[89a-f][0-9a-f]|[\udc80-\udcff])")


def csv_text(text: str) -> str:
    r"""A CSV line as ``encode_text`` will spell it, read back without loss by one rule: ``\\`` is a backslash,
    ``\udcXX`` the byte 0xXX of a name (``os.fsencode``), any other backslash itself. A name holding the text
    ``\udcff`` and a name holding the byte 0xff were the same line of CSV; the first is now ``\\udcff``. Names
    without such a backslash (``C:\scans\a.png``) are written as they are."""
    return _AMBIGUOUS_BACKSLASH.sub(r"\\\\", text)


class TextSink:
    """Records as lines of text into an ``AtomicOutput``; a full disk keeps the complete lines, a power cut all but
    the last ``SYNC_INTERVAL_S`` of them."""

    def __init__(self, path: str | Path):
        self.output = AtomicOutput(path, sync_interval_s=SYNC_INTERVAL_S)
        self.output.open()  # an unwritable place fails now, before the run

    def write_line(self, text: str) -> None:
        # One write per record: the file on disk always ends with a whole line, even if killed.
        self.output.write(encode_text(text))

    def close(self) -> None:
        self.output.commit()

    def discard(self) -> None:
        self.output.discard()


class JsonlSink(TextSink):
    def write(self, record: Record, image, fps) -> None:
        # allow_nan=False: a NaN or infinity is a bug upstream, never a JSON token nobody can parse.
        self.write_line(json.dumps(record.as_dict(), ensure_ascii=False, allow_nan=False) + "\n")


class CsvSink(TextSink):
    COLUMNS = ("seq", "source", "frame", "timestamp", "status", "label", "probability", "top_k", "latency_ms", "reason",
               "outage_s")

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer)
        try:
            self._row(self.COLUMNS)
        except UserError:  # a full disk already: no half-made file left behind
            self.discard()
            raise

    def _row(self, values) -> None:
        self.writer.writerow(values)
        self.write_line(csv_text(self.buffer.getvalue()))
        self.buffer.seek(0)
        self.buffer.truncate()

    def write(self, record: Record, image, fps) -> None:
        d = record.as_dict()
        top = ";".join(f"{label}:{p:.6f}" for label, p in zip(record.labels, record.probabilities))
        self._row([d["seq"], d["source"], d["frame"], f"{d['timestamp']:.6f}", d["status"],
                   record.labels[0] if record.labels else "",
                   f"{record.probabilities[0]:.6f}" if record.probabilities else "", top,
                   "" if d["latency_ms"] is None else d["latency_ms"], d["reason"] or "",
                   "" if d["outage_s"] is None else d["outage_s"]])


def to_display(image: np.ndarray) -> np.ndarray:
    """Any frame the sources give (RGB/gray, uint8/uint16/float32 in [0, 1]) → BGR uint8 for drawing."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2BGR)


def caption(record: Record, label: str | None = None) -> str:
    """The record in a few words; ``label`` in place of its top label (the overlay's, cut to fit)."""
    label = record.labels[0] if label is None and record.labels else label
    if record.status == "ok":
        return f"{label} {record.probabilities[0]:.1%}"
    if record.status == "abstain":
        return f"uncertain ({label}? {record.probabilities[0]:.1%})"
    return record.status


def _overlay_caption(record: Record, width: int, font_scale: float, thickness: int) -> str:
    """The caption as the overlay can draw it in ``width`` pixels: a label too long for the frame is cut ('...'),
    so that the probability after it is still seen."""
    label = record.labels[0] if record.labels else ""

    def cut(length: int) -> str:
        return caption(record) if length == len(label) else caption(record, label[:length].rstrip() + "...")

    def too_wide(length: int) -> bool:
        return cv2.getTextSize(cut(length), cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0][0] > width

    if not too_wide(len(label)):
        return caption(record)
    # The longest cut that fits, bisected (a letter at a time, a 2000-letter name took 0.44 s a frame). Only among
    # the cuts: the whole name, without the '...', can fit where the cut one letter shorter does not.
    return cut(max(bisect.bisect_left(range(len(label)), True, key=too_wide) - 1, 0))


# The longer side a frame is drawn on at least: a caption on a 28×28 MedMNIST frame would be a few pixels high.
OVERLAY_MIN_SIDE = 256


def overlay(image: np.ndarray, record: Record, fps: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frame with the label and confidence (top left) and the FPS (below), scaled to the frame. A frame smaller
    than OVERLAY_MIN_SIDE is enlarged by a whole factor first, each pixel a sharp square, so that the text fits;
    given a ``size`` (a video's), it is then fitted to it (letterbox), so that every frame's text is as large."""
    canvas = to_display(image)
    factor = math.ceil(OVERLAY_MIN_SIDE / max(canvas.shape[:2]))
    if factor > 1:
        canvas = cv2.resize(canvas, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    if size is not None and canvas.shape[1::-1] != size:
        canvas = letterbox(canvas, size)
    # Not below 0.6: smaller, the strokes blur into a grey smudge (BUSI's 256-pixel frames drew 0.28-point text)
    scale = max(max(canvas.shape[0], canvas.shape[1]) / 640, 0.6)
    colour = (80, 220, 80) if record.status == "ok" else (60, 200, 255)
    thickness = max(1, int(2 * scale))
    left = int(8 * scale) + 2
    text = _overlay_caption(record, canvas.shape[1] - 2 * left, 0.7 * scale, thickness + 2)
    for line, text, col in ((1, text, colour), (2, f"{fps:.1f} FPS", (255, 255, 255))):
        origin = (left, int(28 * scale * line) + 2)
        # A dark outline, wider than the text at any scale, keeps it readable on bright ultrasound and X-ray frames.
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, col, thickness, cv2.LINE_AA)
    return canvas


def video_size(width: int, height: int) -> tuple[int, int]:
    """The size a video of frames ``width`` × ``height`` is written at: even sides from 16 to 4096 (FFmpeg's mpeg4
    encoder refuses a side over 8191 or an odd one, and a 1-pixel image shows nothing), the aspect kept where those
    bounds allow."""
    scale = min(1.0, 4096 / max(width, height))
    scale = max(scale, min(16 / min(width, height), 4096 / max(width, height)))
    return tuple(min(4096, max(16, 2 * round(side * scale / 2))) for side in (width, height))


def letterbox(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frame`` scaled to fit ``size`` (width, height) with its aspect kept, centred on black: stretched, a
    lesion's shape and the caption would be distorted."""
    width, height = size
    scale = min(width / frame.shape[1], height / frame.shape[0])
    inner = (max(1, min(width, round(frame.shape[1] * scale))), max(1, min(height, round(frame.shape[0] * scale))))
    canvas = np.zeros((height, width, 3), np.uint8)
    left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
    canvas[top:top + inner[1], left:left + inner[0]] = cv2.resize(
        frame, inner, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return canvas


class VideoSink:
    """MP4 (mp4v) or AVI (MJPG) of the frames with the overlay (``Outputs`` draws it); the first frame fixes the size
    (video_size), later ones are fitted to it (letterbox). At ``fps``, or, ``measured``, at the rate its first
    MEASURED_FRAMES frames were captured (``fps`` for a shorter video): a live source's own figure is a guess
    (FFmpeg gives an MJPEG camera 25 fps whatever it sends) or its nominal rate, which the frames the video holds
    fall short of when inference drops some."""

    shows_overlay = True
    FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v"}
    MEASURED_FRAMES = 10  # held until the writer opens: 60 MB at 1080p
    # Faster is no camera's rate but frames read from a buffer in a burst (a stream's after a reconnect)
    MEASURED_FPS_MAX = 240.0

    def __init__(self, path: str | Path, fps: float, measured: bool = False):
        if Path(path).suffix.lower() not in self.FOURCC:
            raise SinkError(f"{path}: --save-video needs one of {', '.join(self.FOURCC)}")
        self.output = AtomicOutput(path)
        # What OpenCV is given for the file, beside the real path: relative to the working folder where only that
        # folder's path has other bytes (OpenCV opens it as the C library does).
        write_path = self.output.write_path
        self.opencv_path = next((name for name in (str(write_path), os.path.relpath(write_path))
                                 if not opencv_cannot_name(name)), None)
        if self.opencv_path is None:
            self.output.discard()
            where = "this name" if opencv_cannot_name(path) else f"{write_path.parent} (the folder it is written in)"
            raise SinkError(f"{path}: OpenCV writes videos under UTF-8 names only; {where} has other bytes")
        self.fps = fps
        self.pending: list[tuple[float, np.ndarray]] | None = [] if measured else None  # capture time, frame
        self.writer: cv2.VideoWriter | None = None
        self.frame_size: tuple[int, int] | None = None  # (width, height), fixed by the first frame
        self.frames = 0
        self.stop_requested = False  # a frame OpenCV could not write: close() says what the file holds

    def write(self, record: Record, frame: np.ndarray | None, fps: float) -> None:
        if frame is None:
            return
        if self.pending is None:
            self._put(frame)
            return
        self.pending.append((record.timestamp, frame))
        if len(self.pending) == self.MEASURED_FRAMES:
            self._put_pending()

    def _put_pending(self) -> None:
        pending, self.pending = self.pending, None
        # The median gap, not the mean: a stream's first frames come in a burst (those FFmpeg read while probing it,
        # 3 within 6 ms from an 8 fps MJPEG camera), which made 10.6 fps of it. Too few frames to tell: ``fps``.
        gap = float(np.median(np.diff([timestamp for timestamp, _ in pending]))) if len(pending) > 1 else 0.0
        if len(pending) == self.MEASURED_FRAMES and gap > 1 / self.MEASURED_FPS_MAX:
            self.fps = 1 / gap
        for _, frame in pending:
            self._put(frame)

    def _put(self, frame: np.ndarray) -> None:
        if self.writer is None:
            self.frame_size = video_size(frame.shape[1], frame.shape[0])
            codec = self.FOURCC[self.output.path.suffix.lower()]
            # In hundredths, and at least one: OpenCV gives FFmpeg the rate in thousandths, a fraction mp4v refuses
            # over 65535 (a 15 ms gap's 66.667 fps, or a 200 fps file's with --stride 3, failed to open the video),
            # and 0.001 fps failed in both codecs.
            self.fps = max(round(self.fps, 2), 0.01)
            with quiet_opencv():
                writer = cv2.VideoWriter(self.opencv_path, cv2.VideoWriter_fourcc(*codec), self.fps, self.frame_size)
            if not writer.isOpened():
                width, height = self.frame_size
                raise SinkError(f"{self.output.path}: OpenCV cannot write a {width}×{height} {codec} video here")
            self.writer = writer
        if (frame.shape[1], frame.shape[0]) != self.frame_size:
            frame = letterbox(frame, self.frame_size)
        with quiet_opencv():  # a WARN line for every frame that fails: the error at the end says it once
            written = self.writer.write(frame)
        self.frames += 1
        # OpenCV 5 says a frame was not written (a full disk), a few frames late (FFmpeg buffers); 4.x returns None
        # and only the file read back at the end tells. The run stops, as it does when a JSONL cannot be written.
        if written is False:
            self.stop_requested = True

    def close(self) -> None:
        if self.pending:  # a run shorter than the measure
            try:
                self._put_pending()
            except BaseException:  # the writer refused to open: no later call removes the temporary file
                self.discard()
                raise
        if self.writer is None:  # not one frame: no video rather than an empty file
            self.discard()
            return
        self.writer.release()
        # Whether write() said a frame failed or not (OpenCV 4.x never does), the file, read back, tells what it holds.
        whole = self.output.in_place or _holds_frames(self.opencv_path, self.frames)
        if not whole and not _plays(self.opencv_path):  # an MP4 cut short lacks its index: nothing plays
            self.output.discard()
            raise SinkError(f"{self.output.path}: cannot write the video (disk full?): what was written does not play, "
                            f"so {self.output.path.name} was left as it was")
        self.output.commit(whole=whole)
        if not self.output.complete:
            raise SinkError(f"{self.output.path}: cannot write the video (disk full?): the file holds less than its "
                            f"{plural(self.frames, 'frame')}")

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.output.discard()


def _plays(path: str | Path) -> bool:
    """Whether the video at ``path`` gives its first frame."""
    with quiet_opencv():
        capture = cv2.VideoCapture(str(path))
        try:
            return capture.isOpened() and capture.read()[0]
        finally:
            capture.release()


def _holds_frames(path: str | Path, frames: int) -> bool:
    """Whether the video at ``path`` lists ``frames`` frames and its last one can be read. Not a count of
    decodable frames: that would decode a day's video at the end of a day's run. An AVI's header is written
    first, so it can list every frame of a file cut short; its last frame cannot be read. Matroska's count is
    duration x rate, one short at some rates: one frame either way is the container's rounding."""
    with quiet_opencv():
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        try:
            listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
            if listed < 1 or abs(listed - frames) > 1:
                return False
            capture.set(cv2.CAP_PROP_POS_FRAMES, min(listed, frames) - 1)
            return capture.grab()
        finally:
            capture.release()


class WindowSink:
    """A live window of the frames with the overlay (``Outputs`` draws it); 'q' or Esc, or closing the window, asks
    the loop to stop (``stop_requested``)."""

    NAME = "medmamba-edge"
    shows_overlay = True

    def __init__(self):
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise SinkError("--show needs a display (DISPLAY/WAYLAND_DISPLAY is not set); use --save-video instead")
        try:
            cv2.namedWindow(self.NAME, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise SinkError("--show needs OpenCV with GUI support: this one has none (opencv-python-headless); "
                            "pip install opencv-python, or use --save-video") from None
        self.stop_requested = False

    def write(self, record: Record, frame: np.ndarray | None, fps: float) -> None:
        if frame is not None:
            cv2.imshow(self.NAME, frame)
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27) or self._closed():
            self.stop_requested = True

    def _closed(self) -> bool:
        """Whether the user closed the window (its X button): the next imshow would open it again, and the run went
        on. 0 is closed; -1 is a backend that cannot tell (OpenCV's GTK build), which must not stop the run."""
        return cv2.getWindowProperty(self.NAME, cv2.WND_PROP_VISIBLE) == 0

    def close(self) -> None:
        cv2.destroyWindow(self.NAME)


class ConsoleSink:
    """One line per frame, or per second (what a live source wants), on stdout."""

    def __init__(self, every: str, stream: IO[str] | None = None):
        if every not in ("frame", "second", "none"):
            raise SinkError(f"--console must be auto, frame, second or none, got {every!r}")
        self.every, self.stream = every, stream or GuardedStdout()
        self.window_start = time.perf_counter()
        self.window: list[Record] = []
        self.fps = 0.0  # the run's rate as the last record came

    def write(self, record: Record, image, fps: float) -> None:
        if self.every == "frame":
            where = f"{record.source}" + (f" #{record.frame}" if record.frame else "")
            detail = caption(record) if record.status in ("ok", "abstain") else f"{record.status}: {record.reason}"
            latency = f" ({record.latency_ms:.0f} ms capture→result)" if record.latency_ms is not None else ""
            self._line(f"{where}: {detail}{latency}")
        elif self.every == "second":
            self.window.append(record)
            self.fps = fps
            if time.perf_counter() - self.window_start >= 1.0:
                self._flush_window(fps)

    def _flush_window(self, fps: float) -> None:
        if not self.window:
            return
        classified = [r for r in self.window if r.status in ("ok", "abstain")]
        counts = {s: sum(r.status == s for r in self.window) for s in ("skipped", "dropped")}
        outages = sum(r.status == "lost" for r in self.window)
        last = f"last: {caption(classified[-1])}" if classified else "no classified frame"
        extra = "".join(f", {n} {s}" for s, n in counts.items() if n)
        extra += f", {plural(outages, 'outage')}" if outages else ""
        self._line(f"{plural(len(classified), 'frame')}, {fps:.1f} FPS, {last}{extra}")
        self.window_start, self.window = time.perf_counter(), []

    def _line(self, text: str) -> None:
        print(printable(text, self.stream), file=self.stream, flush=True)

    def close(self) -> None:
        if self.every == "second":  # the loop's rate: a window's few records over the ms since its start read 6545 FPS
            self._flush_window(self.fps)


class Outputs:
    """The run's sinks as one: each record goes to every sink still working. A sink that fails (a full
    disk) is closed with what it has, its error kept, and the run asked to stop, like a window's 'q'."""

    def __init__(self, sinks: list[Sink]):
        self.sinks, self.errors = list(sinks), []

    @property
    def stop_requested(self) -> bool:
        return bool(self.errors) or any(getattr(s, "stop_requested", False) for s in self.sinks)

    def write(self, record: Record, image: np.ndarray | None, fps: float) -> None:
        annotated = None  # drawn once a frame for every sink that shows it
        interrupted, sinks, i, called = None, list(self.sinks), 0, False
        # An application's Ctrl-C in one sink (drawing the overlay, a console line), between two or while a failed
        # one closes (a video read back): the record, already counted, still goes to the others, so that no file has
        # a gap in its seq, and then it ends the run. The loop and the failed sink's handling are inside the outer
        # try and pick up where they were: the jump back to the next sink checks for signals too, and one that came
        # while this thread waited for the GIL after a sink's write is raised there.
        while i < len(sinks):
            try:
                while i < len(sinks):
                    sink = sinks[i]
                    shows_overlay = image is not None and getattr(sink, "shows_overlay", False)
                    try:
                        if not (shows_overlay and interrupted is not None):  # a video frame, not a record: not drawn
                            if shows_overlay and annotated is None:
                                annotated = overlay(image, record, fps, self._frame_size())
                            called = True  # from here an interrupt counts this sink as written: it may have written
                            sink.write(record, annotated if shows_overlay else image, fps)
                    except Exception as exc:  # an application's sink (a broker gone: ConnectionError) as much as ours
                        self.errors.append(_sink_error(sink, exc))
                        self.sinks.remove(sink)
                        self._close(sink)
                    i, called = i + 1, False
            except BaseException as exc:
                interrupted = interrupted or exc
                i, called = i + called, False
        if interrupted is not None:
            raise interrupted

    def _frame_size(self) -> tuple[int, int] | None:
        """The size a sink fixed for the frames it shows (a video's, by its first): later frames are fitted to it
        before the text is drawn, which, fitted after, shrank with the frame (a 500×200 frame's to half)."""
        return next((size for sink in self.sinks if (size := getattr(sink, "frame_size", None))), None)

    def close(self) -> None:
        # A second stop signal (its KeyboardInterrupt) while one sink closes, a video read back, still lets the others
        # rename their files into place: the abort is for a run that hangs, not for the records it wrote.
        aborted = None
        for sink in self.sinks:
            try:
                self._close(sink)
            except BaseException as exc:
                aborted = aborted or exc
        if aborted is not None:
            raise aborted

    def _close(self, sink: Sink) -> None:
        try:
            sink.close()
        except Exception as exc:  # the other sinks still close (and rename their files into place)
            self.errors.append(_sink_error(sink, exc))


def _sink_error(sink: Sink, exc: Exception) -> str:
    """A failed sink's error: ours say it in words; anything else keeps its type and the sink's (a bug is reported,
    never hidden)."""
    return str(exc) if isinstance(exc, UserError) else f"{type(sink).__name__}: {type(exc).__name__}: {exc}"


def open_outputs(console: str, live: bool, video: Path | None = None, video_fps: float = 5.0, show: bool = False,
                 jsonl: Path | None = None, csv_path: Path | None = None, reads: Iterable[Path] = ()) -> list[Sink]:
    """The sinks ``run`` asked for. Those that can refuse without touching a file (console mode, display)
    come first; if a file output then cannot be created (a folder, a video format, no permission, one of the
    files the run ``reads``, or another output's file), the ones already created are removed again, so a
    refused run leaves no file behind."""
    video, jsonl, csv_path = (local_output(path, "run") for path in (video, jsonl, csv_path))
    if console == "auto":  # records piped through stdout (--jsonl /dev/stdout) get it to themselves
        console = "none" if any_is_stdout(jsonl, csv_path) else "second" if live else "frame"
    outputs: list[Sink] = [ConsoleSink(console)]
    outputs += [WindowSink()] if show else []
    files: list[Sink] = []
    makers = (("--save-video", lambda p: VideoSink(p, video_fps, measured=live), video),
              ("--jsonl", JsonlSink, jsonl), ("--csv", CsvSink, csv_path))
    check_distinct_outputs([(option, path) for option, _, path in makers], reads,
                           reader="this run reads (the model or a source)", streams_may_share=True)
    try:
        for _, make, path in makers:
            if path is not None:
                files.append(make(path))
    except UserError:
        for sink in files:
            sink.discard()
        raise
    return outputs + files


class LatencyHistogram:
    """Latencies counted in buckets 1 % wide (a log scale from 1 µs), so a run of days keeps a few thousand
    counters at most, where a list of every frame's latency grew 32 bytes a frame (80 MB a day at 30 FPS).
    A percentile is its bucket's geometric middle: within 0.5 % of the exact value."""

    FLOOR_MS, RATIO = 1e-3, 1.01

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, ms: float) -> None:
        bucket = math.floor(math.log(max(ms, self.FLOOR_MS) / self.FLOOR_MS, self.RATIO))
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        buckets = sorted(self.counts)
        cumulative = np.cumsum([self.counts[b] for b in buckets])
        # The bucket of the value at rank round(q/100·(total - 1)): numpy's "nearest" percentile.
        picked = [buckets[int(np.searchsorted(cumulative, round(q / 100 * (self.total - 1)), side="right"))]
                  for q in qs]
        return [self.FLOOR_MS * self.RATIO ** (b + 0.5) for b in picked]


@dataclass
class Stats:
    """What the summary reports. ``model_seconds`` is time inside ``backend.run``; the rest of the wall
    time is overhead (decode, preprocess, bookkeeping, outputs) as far as the main thread waits for it."""

    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    latencies_ms: LatencyHistogram = field(default_factory=LatencyHistogram)
    model_seconds: float = 0.0
    batches: int = 0
    error: str | None = None  # why the run failed: a stream lost for good, an output that failed, failed batches
    # What stopped the run before its source ended: a signal's name (SIGINT) or "a stop request" (the caller's event)
    stopped: str | None = None
    first_skip_reason: str | None = None  # for a run that classified nothing: its console may have shown no reason
    outage_seconds: float = 0.0  # a live source's outages (its "lost" records), together

    def add(self, record: Record) -> None:
        self.counts[record.status] += 1
        if record.outage_s is not None:
            self.outage_seconds += record.outage_s
        if record.status == "skipped" and self.first_skip_reason is None:
            self.first_skip_reason = record.reason
        if record.latency_ms is not None:
            self.latencies_ms.add(record.latency_ms)

    @property
    def classified(self) -> int:
        return self.counts["ok"] + self.counts["abstain"]

    @property
    def wall_seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def fps(self) -> float:
        return self.classified / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def percentiles(self) -> tuple[float, float, float] | None:
        if not self.latencies_ms.total:
            return None
        p50, p95, p99 = self.latencies_ms.percentiles([50, 95, 99])
        return p50, p95, p99

    def summary(self) -> str:
        c = self.counts
        # An outage is counted apart: it is no frame (not in the FPS), and a file source never has one
        outages = f", {plural(c['lost'], 'outage')} ({self.outage_seconds:.1f} s)" if c["lost"] else ""
        text = (f"{plural(self.classified, 'frame')} ({c['abstain']} abstained), {c['skipped']} skipped, "
                f"{c['dropped']} dropped"
                f"{outages} in {self.wall_seconds:.1f} s: {self.fps:.1f} FPS")
        latency = self.percentiles()
        if latency:
            text += "; capture→result latency p50/p95/p99 {:.1f}/{:.1f}/{:.1f} ms (queueing included)".format(*latency)
        if self.wall_seconds > 0 and self.batches:
            text += f"; model {self.model_seconds / self.wall_seconds:.0%} of wall time"
        if self.stopped:  # or it reads as a run that went through its source
            text += f"; stopped by {self.stopped} before the source ended"
        return text
