"""The capture thread: decoding and preprocessing overlap inference, and a frame dropped by a live source
that outruns the model still gets its record.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from .base import Frame, Source, item_error, iterate


class Capture:
    """Reads and preprocesses frames in its own thread into a bounded queue, so decoding overlaps
    inference. A live source that outruns inference loses its oldest waiting frame (kept in ``dropped``
    so that it still gets a record); a file source waits for room and loses nothing."""

    live_stop_timeout_s = 10.0  # how long stop() waits for a live source's read, which can hang for good

    def __init__(self, source: Source, prepare: Callable[[np.ndarray], np.ndarray], size: int, **iterate_options):
        self.source, self.prepare, self.size, self.options = source, prepare, max(size, 1), iterate_options
        self.queue: deque[Frame] = deque()
        self.dropped: deque[Frame] = deque()
        self.ready = threading.Condition()
        self.stopping = threading.Event()
        self.done = False
        self.failure: BaseException | None = None  # what ended the source early; the loop reports or re-raises it
        self.thread = threading.Thread(target=self._read, name="capture", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def running(self) -> bool:
        """Started and not yet through the source (a thread still reading, perhaps inside OpenCV)."""
        return self.thread.ident is not None and not self.done

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

    def next_batch(self, size: int, held: deque[Frame], dropped: deque[Frame], timeout: float = 0.1) -> bool:
        """Moves up to ``size`` frames into ``held``, waiting at most ``timeout`` for each (a live source's batch takes
        only what is waiting: latency first), and the frames dropped before them into ``dropped`` (older: their records
        come first). False once the source is finished and nothing was left."""
        # Moved into the caller's deques as they are taken, never kept here: a KeyboardInterrupt (an application's
        # Ctrl-C) lands anywhere, in the wait for a file's next frame or in a sink writing a dropped frame's record,
        # and a frame in a variable of its own (the batch so far, the other dropped frames) would get no record.
        taken = 0
        with self.ready:
            while taken < size:
                if self.queue:
                    # Under the lock that takes the frame, before it: taken after the batch, they would include those
                    # dropped meanwhile, newer than the batch, with records before the batch's (a camera's frame 7
                    # recorded before its 5 and 6). Dropped while this waits, they are older.
                    self.take_dropped(dropped)
                    held.append(self.queue.popleft())
                    taken += 1
                    self.ready.notify_all()
                elif self.done or (taken and self.source.live) or not self.ready.wait(timeout):
                    break
            return taken > 0 or not self.done or bool(self.queue)

    def take_dropped(self, into: deque[Frame]) -> None:
        """Moves the frames dropped so far into ``into``."""
        with self.ready:  # reentrant (Condition's RLock): next_batch takes them holding it
            while self.dropped:
                into.append(self.dropped.popleft())

    def stop(self) -> deque[Frame]:
        """Stop reading; the frames still waiting (they get records too)."""
        self.stopping.set()
        self.source.stop()
        with self.ready:
            self.ready.notify_all()
        # A file source's thread finishes the file it is decoding (an 8000×8000 PNG takes seconds) and puts it in
        # the queue, so it gets its record; leaving it inside OpenCV made the exit abort (SIGABRT). Only a live
        # source's read can hang for good (a stalled stream): it gets a bound.
        if self.thread.ident is not None:  # started (a thread that could not start cannot be joined)
            self.thread.join(timeout=self.live_stop_timeout_s if self.source.live else None)
        with self.ready:
            left, self.queue = self.queue, deque()
        return left
