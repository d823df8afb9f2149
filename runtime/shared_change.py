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
    """``make()`` changes the process's state and returns what undoes it. Used as ``with change():``, the first
    block in (of any thread) makes it and the last one out undoes it: each making and undoing its own, the first
    to leave would undo the change under the other still inside, and the other, leaving, put back the changed
    state for good."""

    def __init__(self, make: Callable[[], Callable[[], None]]):
        self._make, self._lock, self._inside, self._undo = make, threading.Lock(), 0, None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        # The count inside the try: a signal's KeyboardInterrupt lands after a call, and the lock's release is one;
        # landing there, before a try that began after it, it left the block counted and the change made for good.
        # Between the count and its note there is no call, so no interrupt.
        counted = False
        try:
            with self._lock:
                if not self._inside:
                    self._undo = self._make()
                self._inside += 1
                counted = True
            yield
        finally:
            if counted:
                with self._lock:
                    self._inside -= 1
                    if not self._inside:
                        self._undo()


def logger_levels(levels: dict[str, int]) -> SharedChange:
    """The named loggers at these levels while any block is inside, then at the levels they had before the first
    block in: an application's own levels for them (torch.onnx's, say, to see its records) stand afterwards."""
    def make() -> Callable[[], None]:
        before = {name: logging.getLogger(name).level for name in levels}
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

        def undo() -> None:
            for name, level in before.items():
                logging.getLogger(name).setLevel(level)
        return undo
    return SharedChange(make)


def _ignore_warnings() -> Callable[[], None]:
    held = ExitStack()
    held.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return held.close


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
