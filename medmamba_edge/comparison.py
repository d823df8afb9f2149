"""``medmamba-edge compare``: the same inputs through two models (any backends), and whether they agree.

Polygraphy cannot run our SS2DScan custom op in ONNX Runtime; here every model goes through our
backends, so plugin-form ONNX runs with the fused scan and checkpoints run in PyTorch.

Tolerances are tiered by the less precise of the two models (``precision`` in their metadata):

- fp32: every logit within ``atol 1e-4 + rtol 1e-4·|a|`` (``numpy.isclose`` with A as the reference):
  a checkpoint and its ONNX export differ by up to ~4e-5 on real images (MedMamba-T at 224).
- fp16: the same check at ``atol 1e-2, rtol 1e-2``: half precision keeps ~3 significant digits, and
  the error grows through the model's depth.
- int8: logits are not compared element by element (quantization shifts them by design); instead at
  least 98% of the images must keep A's top-1 class and the mean over images of the largest
  probability difference must stay ≤ 0.02. A single image's probability may move much more, so its
  maximum is reported but not judged (figures for the official MedMamba-T at 32×32 and its INT8 export in
  docs/evaluation.md).

``--atol``/``--rtol`` replace the logit tolerance and apply the element-wise check at every tier.
Top-1 agreement is always reported; at fp32/fp16 it is not judged, because logits within tolerance may
still swap the order of a near-tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medmamba_edge.errors import plural
from medmamba_edge.runtime.backends import softmax
from medmamba_edge.runtime.bundled import sample_image_paths
from medmamba_edge.runtime.datasets import Dataset, Failure, Sample, open_dataset
from medmamba_edge.runtime.metadata import PRECISIONS, ModelMetadata
from medmamba_edge.runtime.metrics import TIERS, Tolerance, compared_text, logits_outside, tolerance_problem

from .evaluation import (PREPROCESSING_FIELDS, EvaluationError, Progress, check_batch, check_finite, distinct_names,
                         on_cpu, open_models, run_models)


def tolerance_for(precision_a: str, precision_b: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The tier of the less precise model, with the user's logit tolerances where given."""
    tier = TIERS[max(precision_a, precision_b, key=PRECISIONS.index)]
    if atol is None and rtol is None:
        return tier
    return replace(tier, logits_atol=(tier.logits_atol or 0.0) if atol is None else atol,
                   logits_rtol=tier.logits_rtol if rtol is None else rtol)


@dataclass(frozen=True)
class Difference:
    max_abs: float
    max_rel: float  # |a − b| / |a|, A as the reference (large where a is near zero)
    mean_abs: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> Difference:
        error = np.abs(a.astype(np.float64) - b)
        relative = error / np.maximum(np.abs(a), np.finfo(np.float32).tiny)
        return cls(float(error.max()), float(relative.max()), float(error.mean()))


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    limit: str  # "" when only reported
    passed: bool | None  # None: reported, not judged at this tier


@dataclass
class ComparisonReport:
    models: tuple[str, str]
    backends: tuple[str, str]
    cpus: tuple[str | None, str | None]  # Backend.cpu() of A and B
    data: str
    images: int
    tolerance: Tolerance
    logits: Difference
    probabilities: Difference
    top1_agreement: float
    disagreeing: list[str]  # sources of the images whose top-1 class differs
    checks: list[Check]
    failures: list[Failure] = field(default_factory=list)
    input_differences: list[str] = field(default_factory=list)  # how A's preprocessing differs from B's

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.measured} (limit {c.limit})" for c in self.checks if c.passed is False]

    @property
    def passed(self) -> bool:
        return not self.problems


def logit_figures(logits: Difference, tolerance: Tolerance) -> tuple[tuple[str, str], tuple[str, str]]:
    """(max |A−B|, atol) and (max |A−B|/|A|, rtol) as text, where the logits are judged: a logit outside is over
    both, so a FAIL must not read its largest difference as within ("max |A−B| 6.91e-06", "1 of 18 outside
    |A−B| ≤ 6.91e-06 + 0·|A|"). Reported to 3 digits otherwise."""
    if tolerance.logits_atol is None:
        return (f"{logits.max_abs:.3g}", ""), (f"{logits.max_rel:.3g}", "")
    return (compared_text(logits.max_abs, tolerance.logits_atol, 3),
            compared_text(logits.max_rel, tolerance.logits_rtol, 3))


@dataclass(frozen=True)
class LogitPair:
    """A's and B's logits, and what the report and its checks read from them, each computed once."""

    a: np.ndarray
    b: np.ndarray
    logits: Difference
    probabilities: tuple[np.ndarray, np.ndarray]
    same: np.ndarray  # per image: whether B's top-1 class is A's

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> LogitPair:
        return cls(a, b, Difference.of(a, b), (softmax(a), softmax(b)), a.argmax(1) == b.argmax(1))

    @property
    def agreement(self) -> float:
        return float(self.same.mean())


def _checks(pair: LogitPair, tolerance: Tolerance) -> list[Check]:
    """The tier's checks of B's logits against A's."""
    a, b, same, agreement = pair.a, pair.b, pair.same, pair.agreement
    pa, pb = pair.probabilities
    # Each image's largest probability change, averaged: robust to the odd image INT8 moves a lot.
    mean_probability_error = float(np.abs(pa - pb).max(axis=1).mean())
    checks = []
    if tolerance.logits_atol is not None:
        outside = logits_outside(b, a, tolerance.logits_atol, tolerance.logits_rtol)
        (_, atol), (_, rtol) = logit_figures(pair.logits, tolerance)
        checks.append(Check("logits", f"{outside} of {a.size} outside", f"|A−B| ≤ {atol} + {rtol}·|A|", outside == 0))
    # A judged figure is shown to as many digits as keep it on its side of its limit: 979 of 999 images read
    # "98.00%" and failed "≥ 98%".
    limit = tolerance.min_top1_agreement
    shown, limit_text = ((f"{agreement:.2%}", "") if limit is None else
                         (f"{text}%" for text in compared_text(100 * agreement, 100 * limit, 4)))
    checks.append(Check("top-1 agreement", f"{shown} ({int((~same).sum())} of {len(same)} differ)",
                        limit_text and f"≥ {limit_text}", None if limit is None else agreement >= limit))
    limit = tolerance.max_mean_probability_error
    shown, limit_text = ((f"{mean_probability_error:.3g}", "") if limit is None else
                         compared_text(mean_probability_error, limit, 3))
    checks.append(Check("mean per-image max |ΔP|", shown, limit_text and f"≤ {limit_text}",
                        None if limit is None else mean_probability_error <= limit))
    return checks


def input_differences(a: ModelMetadata, b: ModelMetadata) -> list[str]:
    """The preprocessing fields in which two models differ, as "input_size 32×32 vs 48×48"."""
    def shown(name: str, value) -> str:
        return "×".join(map(str, value)) if name == "input_size" else str(value)

    return [f"{name} {shown(name, getattr(a, name))} vs {shown(name, getattr(b, name))}"
            for name in PREPROCESSING_FIELDS if getattr(a, name) != getattr(b, name)]


def bundled_samples() -> Dataset:
    paths = sample_image_paths()
    return Dataset(f"bundled sample images ({len(paths)})", [Sample(str(p), None) for p in paths])


def compare(model_a: str | Path, model_b: str | Path, data: str | Path | None = None, *, split: str | None = None,
            num_samples: int | None = None, atol: float | None = None, rtol: float | None = None,
            input_size: int | tuple[int, int] | None = None, batch_size: int = 32, seed: int = 0,
            classes: str | Sequence[str] | None = None, progress: Progress | None = None) -> ComparisonReport:
    if problem := tolerance_problem(atol=atol, rtol=rtol):
        raise EvaluationError(problem)
    check_batch(batch_size)
    backends = open_models([model_a, model_b], input_size, classes=classes)
    # Labels play no part in a comparison, so any images will do (class_names=None accepts unknown labels).
    if data is None and split is not None:
        raise EvaluationError(f"--split {split} applies to --data, a MedMNIST .npz")
    dataset = bundled_samples() if data is None else open_dataset(data, split=split, command="compare")
    dataset = dataset.sample(num_samples, seed)
    outputs = run_models(backends, dataset, batch_size, progress)
    check_finite(backends, outputs, dataset)  # NaN never equals itself, and its argmax (class 0) would agree
    compared = LogitPair.of(*outputs.logits)
    tolerance = tolerance_for(backends[0].metadata.precision, backends[1].metadata.precision, atol, rtol)
    return ComparisonReport(
        models=(str(backends[0].path), str(backends[1].path)),
        backends=(backends[0].describe(), backends[1].describe()),
        cpus=(backends[0].cpu(), backends[1].cpu()),
        data=dataset.description,
        images=len(compared.a),
        tolerance=tolerance,
        logits=compared.logits,
        probabilities=Difference.of(*compared.probabilities),
        top1_agreement=compared.agreement,
        disagreeing=[dataset.samples[i].source for i in outputs.indices[~compared.same]],
        checks=_checks(compared, tolerance),
        failures=outputs.failures,
        input_differences=input_differences(backends[0].metadata, backends[1].metadata),
    )


def render_tables(report: ComparisonReport) -> list:
    """Rich tables of the differences and the checks; plain text (file names) as in evaluation.render_tables."""
    from rich.table import Table
    from rich.text import Text

    a, b = distinct_names([str(m) for m in report.models])
    differences = Table(title=f"A = {a}, B = {b}: {plural(report.images, 'image')} of {report.data}",
                        caption=f"A: {report.backends[0]}{on_cpu(report.cpus[0])}\n"
                                f"B: {report.backends[1]}{on_cpu(report.cpus[1])}")
    for column in ("output", "max |A−B|", "max |A−B|/|A|", "mean |A−B|"):
        differences.add_column(column, justify="left" if column == "output" else "right")
    (largest, _), (relative, _) = logit_figures(report.logits, report.tolerance)
    differences.add_row("logits", largest, relative, f"{report.logits.mean_abs:.3g}")
    probabilities = report.probabilities
    differences.add_row("probabilities", f"{probabilities.max_abs:.3g}", f"{probabilities.max_rel:.3g}",
                        f"{probabilities.mean_abs:.3g}")
    checks = Table(title=f"checks ({report.tolerance.tier} tier)")
    for column in ("check", "measured", "limit", "result"):
        checks.add_column(column)
    verdicts = {True: Text("pass", style="green"), False: Text("FAIL", style="bold red"), None: "reported"}
    for check in report.checks:
        checks.add_row(check.name, check.measured, check.limit, verdicts[check.passed])
    return [differences, checks]


def summary_lines(report: ComparisonReport, limit: int = 5) -> Sequence[str]:
    """The images whose top-1 class differs (first ``limit``) and those left out as unusable (undecodable, or a channel count preprocessing cannot map)."""
    lines = [f"A and B preprocess differently ({'; '.join(report.input_differences)}): the difference is "
             f"the input's as well as the model's"] if report.input_differences else []
    lines += [f"top-1 differs on {source}" for source in report.disagreeing[:limit]]
    if len(report.disagreeing) > limit:
        lines.append(f"… and on {len(report.disagreeing) - limit} more images")
    lines += [f"left out (unusable): {f.reason}" for f in report.failures[:limit]]
    if len(report.failures) > limit:
        lines.append(f"… and {len(report.failures) - limit} more images left out (unusable)")
    return lines
