"""Classification metrics as MedMamba's paper reports them, in numpy only (no torch, no scikit-learn).

Overall accuracy (OA) is the fraction of correct top-1 predictions. Precision, sensitivity (recall),
specificity and F1 are computed one-vs-rest per class from the confusion matrix and macro-averaged
(the unweighted mean over classes, so small classes count as much as large ones). AUC is one-vs-rest
per class from the predicted probabilities, macro-averaged; for two classes the reported AUC is the
positive class's (class index 1), the usual binary ROC AUC. A ratio whose denominator is zero (a class
never predicted, say) counts as 0, as scikit-learn's ``zero_division=0``; an AUC is undefined (None)
for a class with no positive or no negative samples and is left out of the average. A class with no images
thus lowers the macro precision, sensitivity and F1: ``Metrics.absent_classes_note`` says so, naming them.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import asdict, dataclass

import numpy as np


# How close two models' logits must be, by the less precise of the two (docs/evaluation.md, "Tolerance tiers"):
# `compare` judges pairs by it, and `export` verifies its graph against PyTorch by the fp32 tier.
@dataclass(frozen=True)
class Tolerance:
    tier: str
    logits_atol: float | None  # None: logits are not compared element by element
    logits_rtol: float = 0.0
    min_top1_agreement: float | None = None  # fraction of images
    max_mean_probability_error: float | None = None


TIERS = {
    "fp32": Tolerance("fp32", 1e-4, 1e-4),
    "fp16": Tolerance("fp16", 1e-2, 1e-2),
    "int8": Tolerance("int8", None, min_top1_agreement=0.98, max_mean_probability_error=0.02),
}


def tolerance_problem(**options: float | None) -> str | None:
    """What is wrong with a user's tolerance or budget (--atol, --rtol, --max-drop), if anything: NaN would pass no
    difference, inf every one."""
    for name, value in options.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"--{name} must be a finite number ≥ 0, got {value}"
    return None


def compared_text(value: float, limit: float, digits: int) -> tuple[str, str]:
    """``value`` and ``limit`` as text that compares as they do, so that a value over (or under) a limit never reads
    as equal to it: a drop of 96 of 524 images, 18.3206 points, printed "18.32 points ... over the --max-drop budget
    of 18.32". The limit as given (%g) where that keeps it on its side of the value, the value to the fewest
    significant digits (at least ``digits``) that keep it on its side of the limit as shown."""
    side = np.sign(value - limit)
    shown = f"{limit:g}"
    if np.sign(value - float(shown)) != side:
        shown = repr(float(limit))
    for figures in range(digits, 18):
        text = f"{value:.{figures}g}"
        if np.sign(float(text) - float(shown)) == side:
            return text, shown
    return repr(float(value)), shown


def logits_outside(logits: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> int:
    """How many ``logits`` lie outside |logit − reference| ≤ atol + rtol·|reference|, judged in float64 as their
    differences are shown: numpy compares float32 logits in float32, where --atol 6.9141387939453e-06 rounded up to
    a largest difference of 6.9141387939453125e-06, which passed beside a limit it was over."""
    return int((~np.isclose(np.asarray(logits, np.float64), np.asarray(reference, np.float64),
                            atol=atol, rtol=rtol)).sum())


def points_lost(reference_percent: float, percent: float) -> float:
    """Top-1 points lost, rounded where float arithmetic leaves crumbs (98.4 − 97.9 is 0.5000000000000142)."""
    return round(reference_percent - percent, 9)


def over_budget(drop: float, budget: float) -> bool:
    """Whether ``drop`` (points_lost) is over a --max-drop ``budget``; a drop equal to it passes, in whichever
    direction the rounding went (27 images of 524 are 5.152671755725191 points, rounded up to 5.152671756)."""
    return drop > budget + 1e-9


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    support: int  # samples whose true label is this class
    precision: float
    sensitivity: float
    specificity: float
    f1: float
    auc: float | None


@dataclass(frozen=True)
class Metrics:
    count: int
    accuracy: float
    precision: float
    sensitivity: float
    specificity: float
    f1: float
    auc: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion: np.ndarray  # confusion[true, predicted]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["confusion"] = self.confusion.tolist()
        return data

    @property
    def absent_classes(self) -> tuple[str, ...]:
        """The classes with no images in the set scored."""
        return tuple(c.name for c in self.per_class if c.support == 0)

    def absent_classes_note(self) -> str | None:
        """What the macro averages count for the classes with no images (zero_division=0): kept comparable with
        the paper and scikit-learn, but said, since on a subset (one class's folder) it drags them down unseen."""
        absent = self.absent_classes
        if not absent:
            return None
        note = (f"no images of {', '.join(absent)} in this set: {'its' if len(absent) == 1 else 'their'} precision, "
                f"sensitivity and F1 count as 0 in the macro averages (as scikit-learn counts them, zero_division=0)")
        present = [c.name for c in self.per_class if c.support]
        if len(present) == 1:  # TN + FP = 0: nothing outside the class to be specific about
            note += f", as does {present[0]}'s specificity"
        return note


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann–Whitney statistic: the chance that a random positive outscores a random
    negative, ties counting half (average ranks), which equals the trapezoidal area under the ROC."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, group, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[group.reshape(-1)]  # 1-based, ties get their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def non_finite_rows(logits: np.ndarray) -> np.ndarray:
    """Indices of the rows with a NaN or infinite logit: answers no metric can score (argmax takes the first NaN's
    index, class 0 as often as not; a ranking puts NaN first), as from a float16 overflow or a broken export."""
    return np.flatnonzero(~np.isfinite(logits).all(axis=1))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> Metrics:
    """Metrics of (N, classes) probabilities (or any scores whose argmax is the prediction and whose order within a
    class is the probabilities', such as log_softmax's: those keep confident answers apart) against integer labels
    in [0, classes)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities)
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"expected ({len(labels)}, {num_classes}) probabilities, got {probabilities.shape}")
    if len(labels) == 0:
        raise ValueError("no samples")
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), num_classes)
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    false_pos = predicted - true_pos
    true_neg = len(labels) - support - false_pos
    precision = _ratio(true_pos, predicted)
    sensitivity = _ratio(true_pos, support)
    specificity = _ratio(true_neg, true_neg + false_pos)
    f1 = _ratio(2 * precision * sensitivity, precision + sensitivity)
    aucs = [binary_auc(labels == k, probabilities[:, k]) for k in range(num_classes)]
    if num_classes == 2:
        auc = aucs[1]
    else:
        defined = [a for a in aucs if a is not None]
        auc = float(np.mean(defined)) if defined else None
    per_class = tuple(
        ClassMetrics(name, int(support[k]), float(precision[k]), float(sensitivity[k]), float(specificity[k]),
                     float(f1[k]), aucs[k])
        for k, name in enumerate(class_names)
    )
    return Metrics(len(labels), float(true_pos.sum() / len(labels)), float(precision.mean()),
                   float(sensitivity.mean()), float(specificity.mean()), float(f1.mean()), auc, per_class, confusion)
