"""What every source is: a ``Source`` yields ``Frame``s, a frame that cannot be used carries its ``error``
(it gets a "skipped" record with the reason), a live source's outage comes as a ``Frame`` with ``outage_s`` (a
"lost" record), and ``iterate`` is how a run walks one (stride, limit, loop).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmamba_edge.errors import UserError, first_line

from ..metadata import positive_int


class SourceError(UserError):
    """A source that cannot be opened, or a live source that was lost for good."""


@dataclass
class Frame:
    source: str  # path or URI
    index: int | None  # frame number within its file or stream (0 for a still image); None for an outage
    timestamp: float  # seconds into a video file; wall-clock time (epoch) for live sources and stills
    image: np.ndarray | None = None  # RGB or grayscale, uint8/uint16/float32 in [0, 1]
    error: str | None = None  # why the frame cannot be used; then image is None
    captured: float = field(default_factory=time.perf_counter)  # start of capture→result latency
    tensor: np.ndarray | None = None  # the model input, filled by Capture's thread
    # Set, this is no frame but a live source's outage of that many seconds: ``timestamp`` is when it was lost,
    # ``error`` says it in words, and it gets a "lost" record between the frames before and after it.
    outage_s: float | None = None


class Source(ABC):
    """Base: ``live`` sources drop the oldest frame when inference falls behind; files never drop."""

    description: str = ""
    live: bool = False
    inputs: tuple[Path, ...] = ()  # the files it reads, which no output may overwrite
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


def wall_clock() -> float:
    """Now, as a frame's timestamp: ``time.time()`` to the microsecond, its real precision. Its float as it comes
    (1765152000.1234567, 17 digits) showed noise as digits in every JSONL record."""
    return round(time.time(), 6)


def item_error(path, exc: Exception) -> str:
    """The reason one item failed, as its record gives it. An ImageError already says it in words; anything
    else is unexpected, so its type stays in the reason (a bug is reported, never hidden)."""
    if isinstance(exc, UserError):
        return str(exc)
    detail = first_line(exc)
    return f"{path}: unexpected {type(exc).__name__}" + (f": {detail}" if detail else "")


def iterate(source: Source, stride: int = 1, max_frames: int | None = None, loop: bool = False,
            stop: threading.Event | None = None) -> Iterator[Frame]:
    """The frames a run sees: every ``stride``-th, at most ``max_frames`` (skipped ones count, a live source's
    outages do not), and the whole source again while ``loop`` is set (files only; a pass without one usable
    frame ends it)."""
    if not positive_int(stride):  # an integer, not a bool: 1.5 failed later, a TypeError in slicing the frames
        raise SourceError(f"--stride must be ≥ 1, got {stride}")
    count = 0
    while True:
        usable, frames = False, source.frames(stride)
        # Asked before each read, not after: a frame read when the stop came (a large file takes seconds) is
        # yielded and gets its record, and no file is read past the last one wanted.
        while not (stop is not None and stop.is_set()) and (max_frames is None or count < max_frames):
            frame = next(frames, None)
            if frame is None:
                break
            usable = usable or frame.error is None
            count += frame.outage_s is None
            yield frame
        else:
            return
        if not loop or source.live or not usable:
            return
