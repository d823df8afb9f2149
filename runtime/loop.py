"""The run loop, as jetson-inference's imagenet.py: capture → infer → overlay/render → status.

Capture (decode + preprocess) runs in its own thread (``sources.Capture``); this thread batches frames,
runs the backend and hands every frame's ``Record`` to the sinks. A stop request (``stop_on_signals``' event,
which the command line sets on Ctrl-C, SIGTERM and SIGHUP) stops it after the current batch; the sinks are always
closed, so output files are complete, and the caller prints the summary. An output that fails (a full disk) ends
the run the same way, with its error in the stats.
"""

from __future__ import annotations

import numbers
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from medmamba_edge.errors import UserError, first_line, plural

from .backends import Backend, WrongOutputShape, checked_logits, softmax
from .metadata import ModelMetadata, positive_int
from .preprocess import preprocess_one
from .signals import handle_stop_signals
from .sinks import Outputs, Record, Sink, Stats
from .sources import Capture, Frame, Source, SourceError


@dataclass
class RunOptions:
    batch: int = 1
    stride: int = 1
    max_frames: int | None = None
    loop: bool = False
    top_k: int = 3
    threshold: float = 0.0  # abstain when the top-1 probability is below it

    def __post_init__(self):
        counts = (self.batch, self.top_k, self.stride, 1 if self.max_frames is None else self.max_frames)
        # Integers (an application's 1.5 batched by twos, or failed in the capture thread), not bool
        if not all(positive_int(v) for v in counts):
            raise UserError(f"--batch, --top-k, --stride and --max-frames must be integers ≥ 1, got "
                            f"{self.batch!r}, {self.top_k!r}, {self.stride!r}, {self.max_frames!r}")
        if not (isinstance(self.threshold, numbers.Real) and 0.0 <= self.threshold <= 1.0):
            raise UserError(f"--threshold must be between 0 and 1, got {self.threshold}")


@contextmanager
def stop_on_signals(notify, stop: threading.Event | None = None):
    """The first stop signal sets ``stop`` (a new event if None: finish the batch, close outputs); a second one
    aborts at once. Off the main thread no handler can be set: there ``stop`` is the caller's only way."""
    stop = stop if stop is not None else threading.Event()
    messengers: list[threading.Thread] = []

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        # On the event, which run() reads: the summary says which signal stopped the run.
        stop.signal_name = signal.Signals(signum).name
        stop.set()
        # Not notify() here: the handler runs between any two bytecodes of the main thread, which may be inside
        # notify itself (a console mid-print or mid-import is not reentrant). A thread waits its turn instead.
        message = (f"stopping on {signal.Signals(signum).name}: finishing the current batch and closing outputs "
                   f"(again to abort)")
        # Daemon: joined (bounded) on leaving, and a notify stuck on a full pipe must not hold the exit.
        messengers.append(threading.Thread(target=notify, args=(message,), name="stop-message", daemon=True))
        messengers[-1].start()

    main = threading.current_thread() is threading.main_thread()
    previous = handle_stop_signals(handler) if main else {}
    try:
        yield stop
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)
        for messenger in messengers:
            messenger.join(timeout=5)


def capture_still_running(interrupt: KeyboardInterrupt) -> bool:
    """Whether ``run`` let this stop signal's KeyboardInterrupt through (the outputs closed) where it stopped
    Capture.stop()'s wait for a thread still inside OpenCV (an 8000×8000 PNG decoding): Python's own exit would then
    abort the process (SIGABRT, 'terminate called without an active exception', exit 134), so a process that means to
    end on it ends with os._exit, as the command line does. A plain KeyboardInterrupt, marked: an application's
    handler still runs, and uncaught it still exits 130 (Python does so for that class only, not a subclass)."""
    return getattr(interrupt, "capture_still_running", False)


def run(backend: Backend, source: Source, sinks: list[Sink], options: RunOptions, notify=None,
        stop: threading.Event | None = None) -> Stats:
    """Classify ``source`` until it ends, a sink asks to stop or ``stop`` is set (from any thread: an application's
    own shutdown, or ``stop_on_signals``' event); every frame gets a record and the sinks are closed. An exception
    (Ctrl-C's KeyboardInterrupt) ends it with the sinks closed too and the frames taken recorded, bar one it may
    land on between that frame's leaving the held frames and its record reaching the sinks: where every frame must
    have one, stop through ``stop``. The process's signal handlers are the caller's: the command line wraps the run
    in ``stop_on_signals``, an application keeps its own. ``notify`` hears a stream's reconnects; None leaves the
    source's (open_source's, silent unless given one)."""
    meta, stats, outputs = backend.metadata, Stats(), Outputs(sinks)
    interrupted = stop if stop is not None else threading.Event()
    records = RecordWriter(meta, options, outputs, stats)
    capture = Capture(source, lambda image: preprocess_one(image, meta), 2 * options.batch,
                      stride=options.stride, max_frames=options.max_frames, loop=options.loop)
    if notify is not None:
        source.notify = notify
    # A count and the first message, not a list: a client whose server is down for a day fails every batch.
    failed_batches, first_failure = 0, None
    leaving = None  # what ends the run here, for finish_run: not sys.exc_info(), which a caller's except shares
    try:
        capture.start()  # in the try: a thread that cannot start (the process's limit) still closes the outputs
        while not interrupted.is_set() and not outputs.stop_requested:
            more = capture.next_batch(options.batch, records.held, records.held_dropped)
            records.dropped()
            if not more:
                break
            logits, model_error = infer_batch(backend, list(records.held), stats)
            if model_error:
                failed_batches, first_failure = failed_batches + 1, first_failure or model_error
            records.batch(logits, model_error)
    except BaseException as exc:
        leaving = exc
        raise
    finally:
        finish_run(capture, records, interrupted, leaving)
    if capture.failure is not None and not isinstance(capture.failure, SourceError):
        raise capture.failure
    errors = outputs.errors + ([str(capture.failure)] if capture.failure else [])
    if failed_batches:
        errors.append(f"{failed_batches} of {plural(stats.batches, 'batch', 'batches')} failed in the model, "
                      f"first: {first_failure}")
    stats.error = "; ".join(errors) or None
    return stats


class RecordWriter:
    """Makes each frame's Record (its number in the run, top-k labels, abstain, FPS) and hands it to the outputs
    and the stats."""

    def __init__(self, meta: ModelMetadata, options: RunOptions, outputs: Outputs, stats: Stats):
        self.meta, self.threshold, self.outputs, self.stats = meta, options.threshold, outputs, stats
        self.top_k = min(options.top_k, meta.num_classes)
        # When the last results came, from the run's start on: two whole batches and more, so that a batch's results,
        # all at once, are not a rate of their own (batch 32 read 53787 FPS at 45).
        self.recent = deque([time.perf_counter()], maxlen=max(30, 2 * options.batch) + 1)
        # The batch taken from the capture and the frames dropped before it, until recorded: a KeyboardInterrupt (an
        # application's Ctrl-C) lands anywhere, in the model as often as not, and finish_run still records what it
        # leaves here.
        self.held: deque[Frame] = deque()
        self.held_dropped: deque[Frame] = deque()

    def dropped(self) -> None:
        """Records the held dropped frames."""
        while self.held_dropped:
            self.write(self.held_dropped, "dropped", reason="inference slower than the source")

    def batch(self, logits: np.ndarray, model_error: str | None) -> None:
        """Records the held frames; ``logits``: a row for each frame without an error, in order (none if the model
        failed)."""
        rows = iter(logits)
        while self.held:
            frame = self.held[0]
            if frame.error or model_error:
                self.write(self.held, "skipped", reason=frame.error or model_error)
                continue
            row = next(rows)
            if np.isfinite(row).all():
                self.write(self.held, "ok", softmax(row[None])[0])
            else:  # a broken model or an input it overflows on: no label is better than a random one
                self.write(self.held, "skipped", reason="non-finite model output (NaN or infinite logits)")

    def not_run(self, frames: deque[Frame]) -> None:
        while frames:
            frame = frames[0]
            frame.image = None  # never shown to the model: a record, but no frame of the annotated video
            self.write(frames, "skipped", reason=frame.error or "run stopped before inference")

    def write(self, frames: deque[Frame], status: str, probs: np.ndarray | None = None,
              reason: str | None = None) -> None:
        """Records the first of ``frames``, taken from them only as it is counted: a KeyboardInterrupt while its
        record is made (its labels, its latency) leaves it held, for finish_run to record."""
        stats, recent, frame = self.stats, self.recent, frames[0]
        if frame.outage_s is not None:  # never inferred, so it comes as skipped, dropped or not run: a gap, not a frame
            status, reason = "lost", frame.error
        record = Record(sum(stats.counts.values()), frame.source, frame.index, frame.timestamp, status, reason=reason,
                        outage_s=frame.outage_s)
        if probs is not None:
            best = np.argsort(probs)[::-1][:self.top_k]
            record.labels, record.probabilities = [self.meta.class_names[i] for i in best], [float(probs[i]) for i in best]
            record.latency_ms = (time.perf_counter() - frame.captured) * 1000
            recent.append(time.perf_counter())
            if record.probabilities[0] < self.threshold:
                record.status, record.reason = "abstain", f"top-1 {record.probabilities[0]:.1%} < threshold {100 * self.threshold:g}%"
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        frames.popleft()
        stats.add(record)  # first: a KeyboardInterrupt inside a sink's write must not give the next record its seq
        self.outputs.write(record, frame.image, fps)


def infer_batch(backend: Backend, frames: list[Frame], stats: Stats) -> tuple[np.ndarray, str | None]:
    """The logits of the frames without an error, a row each, or why the model failed on them (then no rows)."""
    usable = [f for f in frames if f.error is None]
    logits, model_error = np.empty((0, backend.metadata.num_classes)), None
    if usable:
        started = time.perf_counter()
        try:
            logits = checked_logits(backend, np.stack([f.tensor for f in usable]))
        except WrongOutputShape as exc:
            model_error = exc.reason
        except Exception as exc:  # this batch only; the run goes on and ends non-zero, every frame recorded
            model_error = f"the model failed on this batch ({type(exc).__name__}: {first_line(exc)})"
        stats.model_seconds, stats.batches = stats.model_seconds + time.perf_counter() - started, stats.batches + 1
    return logits, model_error


def finish_run(capture: Capture, records: RecordWriter, interrupted: threading.Event,
               leaving: BaseException | None) -> None:
    """However the loop ended (``leaving``: the exception ending it, if one did): stop the capture, record the
    frames it still held, close the outputs."""
    stats = records.stats
    try:
        try:
            waiting = capture.stop()
            # The dropped frames held were taken with the held batch and are older than it; the batch came before the
            # frames dropped since, and those left the front of the queue, older than those still waiting: in order.
            records.dropped()
            records.not_run(records.held)
            capture.take_dropped(records.held_dropped)
            records.dropped()
            records.not_run(waiting)
            if interrupted.is_set():
                stats.stopped = getattr(interrupted, "signal_name", None) or "a stop request"
            stats.finished = time.perf_counter()
        finally:
            records.outputs.close()
    except BaseException as exc:  # a signal's KeyboardInterrupt in capture.stop()'s join, or in a video's closing
        leaving = exc
        raise
    finally:
        # Not thread.is_alive(): a join interrupted by the signal marks the thread stopped (CPython's bpo-45274).
        if capture.running and isinstance(leaving, KeyboardInterrupt):
            leaving.capture_still_running = True
