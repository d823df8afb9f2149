"""PNG figures for ``evaluate --plots`` and ``benchmark --plot``; matplotlib is optional (the ``plots`` extra)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medmamba_edge.runtime.files import write_bytes_atomically

from .errors import MissingExtraError, install_hint


def pyplot():
    """matplotlib.pyplot, or one clear error naming the extra; called first by commands that will plot."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(f"plots need matplotlib: {install_hint('plots')}") from None
    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def drawable(text: str) -> str:
    """A label as FreeType can draw it: a file name's undecodable bytes (surrogate-escaped by
    Python, which it refuses) written ``\\udcff``, as in the JSONL."""
    return text.encode("utf-8", "backslashreplace").decode()


@contextmanager
def figure_to(path: Path, figsize: tuple[float, float]):
    """The axes of a new figure, written to ``path`` as a PNG when the block ends. Its text is drawn as
    given, never read as mathtext: labels are file and class names, where "cost $5 or $6" would lose its
    dollars and "$\\frac{$" fail to parse."""
    plt = pyplot()
    png = io.BytesIO()
    with plt.rc_context({"text.parse_math": False}):
        figure, axes = plt.subplots(figsize=figsize)
        try:
            yield axes
            figure.savefig(png, format="png", dpi=120, bbox_inches="tight")
        finally:
            plt.close(figure)
    write_bytes_atomically(path, png.getvalue())


def share(fraction: float) -> str:
    """A share to 0.1 %, never rounded to 0 % or 100 % when it is neither: one missed case in 389 is not a
    sensitivity of 100 %."""
    if 0 < fraction < 0.0005:
        return "<0.1%"
    if 0.9995 <= fraction < 1:
        return ">99.9%"
    return f"{fraction:.1%}"


def confusion_matrix_png(confusion: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    size = 2.5 + 0.6 * len(class_names)
    class_names, title = [drawable(name) for name in class_names], drawable(title)
    with figure_to(path, (size, size)) as axes:
        # Colour by the share of each true class so small classes are as readable as large ones.
        rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for (true, predicted), count in np.ndenumerate(confusion):
            axes.text(predicted, true, f"{count}\n{share(rows[true, predicted])}", ha="center", va="center",
                      color="white" if rows[true, predicted] > 0.5 else "black", fontsize=9)
        ticks = range(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=45, ha="right")
        axes.set_yticks(ticks, class_names)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title, fontsize=10)
    return path


def latency_bars_png(labels: Sequence[str], p50: Sequence[float], p90: Sequence[float], p99: Sequence[float],
                     title: str, path: Path) -> Path:
    """Horizontal bars of the median latency with p90 and p99 marks, one bar per measured row."""
    labels, title = [drawable(label) for label in labels], drawable(title)
    with figure_to(path, (8, 1.2 + 0.45 * len(labels))) as axes:
        rows = np.arange(len(labels))[::-1]  # first row at the top, as in the table
        axes.barh(rows, p50, color="tab:blue", label="p50")
        axes.scatter(p90, rows, marker="|", s=200, color="tab:orange", label="p90", zorder=3)
        axes.scatter(p99, rows, marker="|", s=200, color="tab:red", label="p99", zorder=3)
        axes.set_yticks(rows, labels, fontsize=8)
        axes.set_xlabel("latency per batch (ms)")
        axes.set_title(title, fontsize=10)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never over a bar
    return path
