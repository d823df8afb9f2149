"""The one base class for errors a user can act on (bad input, a missing part).

The CLI prints such an error as one line and exits non-zero; anything else is a bug and keeps its
traceback. Torch-free, so the runtime and the plugin tools share it.
"""

import signal


class UserError(Exception):
    """Bad input or a missing part; the message names the file and what is wrong."""


class MissingExtraError(UserError, ImportError):
    """An optional part (an extra of pyproject.toml) is not installed; the message says which to install."""


def install_hint(extra: str) -> str:
    """The command that adds one of pyproject.toml's extras, from an index or from a checkout."""
    return f"pip install 'medmamba-edge[{extra}]' (from a checkout: pip install '.[{extra}]')"


def only_with(needed: str, missing: bool, **options) -> str | None:
    """The error for options (name=value, None when not given) that mean something only with ``needed``, given
    without it (``missing``): ignoring them would run something other than what was asked for."""
    given = [f"--{name.replace('_', '-')}" for name, value in options.items()
             if value is not None and value is not False]  # 0 is given (`0 in (None, False)` is true)
    if missing and given:
        return f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with {needed}"
    return None


def process_ending(returncode: int) -> str:
    """How a child process ended, from its return code (negative: the signal that ended it), for a message."""
    return f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"


def clipped(text: str, limit: int = 300) -> str:
    """Another program's message cut to ``limit`` characters: a proxy's error page or a server's log line can be
    one line of tens of kilobytes, which a message repeats in every record and console line it reaches."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 outage', '2 outages' (``nouns`` where the plural is not the noun with an s: '1 class', '2 classes'): a
    count in a message."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (ONNX Runtime and TensorRT append pages of context), '' if none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
