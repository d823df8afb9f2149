"""The wait before reconnecting, one rule for all that reconnects: a live source that stopped delivering
(``sources/video.py``) and a Triton server that did not answer (``backends/triton.py``)."""

from __future__ import annotations

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0


def backoff_s(attempt: int, first: float = BACKOFF_FIRST_S) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first): ``first``, doubling, at most ``BACKOFF_MAX_S``."""
    return min(first * 2 ** (attempt - 1), BACKOFF_MAX_S)
