"""The signals that stop a command or a run, and the rule for taking them over. Standard library only: the command
line sets them up before any command loads numpy or a model."""

from __future__ import annotations

import signal

# SIGTERM and SIGHUP are how systemd, docker and a closed terminal stop a service: the same as Ctrl-C.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def handle_stop_signals(handler, signals=STOP_SIGNALS) -> dict:
    """Have ``handler`` take each of ``signals``; the handlers it replaced, by signal, to set back. A signal already
    ignored stays ignored: under nohup a closed terminal must not stop the run. Main thread only."""
    return {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
