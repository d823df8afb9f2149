"""A change to the process's own state (OpenCV's log level, the root logger) that overlapping users share."""

from __future__ import annotations

import functools
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager


class SharedChange:
    """``make(undo)`` changes the process's state, each step's undoing pushed on ``undo`` (an ExitStack) before
    the step. Used as ``with change():``, the first block in (of any thread) makes it and the last one out undoes
    it: each making and undoing its own, the first to leave would undo the change under the other still inside, and
    the other, leaving, put back the changed state for good."""

    def __init__(self, make: Callable[[ExitStack], None]):
        self._make, self._lock, self._inside, self._undo = make, threading.Lock(), 0, ExitStack()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        # The count inside the try: a signal's KeyboardInterrupt lands after a call, and the lock's release is one;
        # landing there, before a try that began after it, it left the block counted and the change made for good.
        # Between the count and its note there is no call, so no interrupt.
        counted = False
        try:
            with self._lock:
                if not self._inside:
                    # What an undoing cut short left (a KeyboardInterrupt pending as it began) goes first: its
                    # steps give back the state from before, which a make() over it would take as the state to
                    # give back.
                    self._undo.close()
                    # A make() cut short (an error, or a KeyboardInterrupt after any of its calls or as it
                    # returns) undoes what it made so far: returning its undoing, it left that on for good.
                    try:
                        self._make(self._undo)
                    except BaseException:
                        self._undo.close()
                        raise
                self._inside += 1
                counted = True
            yield
        finally:
            if counted:
                with self._lock:
                    self._inside -= 1
                    if not self._inside:
                        self._undo.close()


def logger_levels(levels: dict[str, int]) -> SharedChange:
    """The named loggers at these levels while any block is inside, then at the levels they had before the first
    block in: an application's own levels for them (torch.onnx's, say, to see its records) stand afterwards."""
    def make(undo: ExitStack) -> None:
        for name, level in levels.items():
            logger = logging.getLogger(name)
            undo.callback(logger.setLevel, logger.level)
            logger.setLevel(level)
    return SharedChange(make)


def _ignore_warnings(undo: ExitStack) -> None:
    undo.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")


# Every warning ignored while any block is inside, the filters as they were before the first block in afterwards:
# catch_warnings alone, entered by two threads at once, had the second keep the first's "ignore" and put it back
# last, every warning of the process ignored for good. Where catch_warnings is the context's own (Python 3.14's
# context_aware_warnings, on by default in free-threaded builds) it is what each block needs: shared, a second
# thread's warnings went unignored, and the first block's thread, its catch_warnings left by another, ignored every
# warning for good.
if getattr(sys.flags, "context_aware_warnings", False):
    ignored_warnings = functools.partial(warnings.catch_warnings, action="ignore")
else:
    ignored_warnings = SharedChange(_ignore_warnings)
