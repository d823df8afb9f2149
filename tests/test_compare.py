"""`medmamba-edge compare`: a checkpoint and its export agree; two different models do not."""

import re
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from medmamba_edge.cli import app
from medmamba_edge.comparison import TIERS, compare, summary_lines, tolerance_for
from tests.exported_models import bundled_onnx, official_onnx
from tests.shared_data import OFFICIAL_T32, PNEUMONIAMNIST, require_shared
from tests.test_evaluate import one_row_model
from tests.test_export import three_digits_below

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx32(tmp_path_factory):
    return official_onnx(tmp_path_factory)


def test_checkpoint_and_its_onnx_export_agree_on_the_bundled_samples(onnx32):
    report = compare(require_shared(*OFFICIAL_T32), onnx32)
    assert report.passed, report.problems
    assert report.images == 9 and report.tolerance == TIERS["fp32"] and "bundled sample images" in report.data
    assert report.logits.max_abs < 1e-4 and report.top1_agreement == 1.0 and not report.disagreeing
    assert "PyTorch" in report.backends[0] and "plugin scan" in report.backends[1]  # fused scan in ORT


def test_a_difference_in_preprocessing_is_named(onnx32):
    report = compare(require_shared(*OFFICIAL_T32), onnx32, input_size=48)
    assert report.input_differences == ["input_size 48×48 vs 32×32"]
    assert summary_lines(report)[0].startswith("A and B preprocess differently (input_size 48×48 vs 32×32)")
    assert compare(require_shared(*OFFICIAL_T32), onnx32).input_differences == []


def test_cli_passes_on_real_data(onnx32):
    result = runner.invoke(app, ["compare", str(require_shared(*OFFICIAL_T32)), str(onnx32),
                                 "--data", str(require_shared(*PNEUMONIAMNIST)), "--num-samples", "16"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "16 images of" in result.output


def test_cli_fails_for_two_different_models(onnx32, tmp_path_factory):
    tiny = bundled_onnx(tmp_path_factory)
    result = runner.invoke(app, ["compare", str(onnx32), str(tiny), "--data", str(require_shared(*PNEUMONIAMNIST)),
                                 "--num-samples", "24"])
    assert result.exit_code == 1
    assert "differs from" in result.output and "logits:" in result.output and "outside" in result.output
    # A wide enough logit tolerance lets the same pair pass: the tolerance is what decides.
    wide = runner.invoke(app, ["compare", str(onnx32), str(tiny), "--num-samples", "4", "--atol", "100"])
    assert wide.exit_code == 0, wide.output


def test_a_model_answering_one_row_for_a_batch_is_a_one_line_error(tmp_path):
    """An IndexError ("boolean index did not match") traceback on comparing the rows it did answer."""
    model = one_row_model(tmp_path / "rows.onnx")
    result = runner.invoke(app, ["compare", str(model), str(model)])  # the 9 bundled samples, in one batch
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines() == [f"error: {model}: the model returned 1 row for 9 inputs"]


def test_tolerance_tiers_follow_the_less_precise_model():
    assert tolerance_for("fp32", "fp32") == TIERS["fp32"]
    assert tolerance_for("fp32", "fp16") == TIERS["fp16"] and tolerance_for("int8", "fp16") == TIERS["int8"]
    int8 = TIERS["int8"]
    assert int8.logits_atol is None and int8.min_top1_agreement and int8.max_mean_probability_error
    overridden = tolerance_for("fp32", "int8", atol=0.5)
    assert overridden.logits_atol == 0.5 and overridden.min_top1_agreement == int8.min_top1_agreement
    assert tolerance_for("fp32", "fp32", rtol=1e-2).logits_atol == TIERS["fp32"].logits_atol
    # --atol alone replaces the tier's atol only: its rtol stays (0 made the check stricter than asked, unnoticed).
    assert tolerance_for("fp16", "fp32", atol=0.5).logits_rtol == TIERS["fp16"].logits_rtol


def test_models_with_different_classes_cannot_be_compared(onnx32, tmp_path):
    checkpoint = require_shared(*OFFICIAL_T32)
    result = runner.invoke(app, ["compare", str(onnx32), str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and "no such model file" in result.output
    import shutil

    renamed = tmp_path / "m.pth"
    shutil.copy(checkpoint, renamed)
    (tmp_path / "class_indices.json").write_text('{"0": "healthy", "1": "sick"}')
    result = runner.invoke(app, ["compare", str(onnx32), str(renamed)])
    assert result.exit_code == 1 and "classes ['healthy', 'sick'] differ" in result.output
    assert "name a checkpoint's classes with --classes" in result.output and len(result.output.splitlines()) == 1
    # A checkpoint named otherwise (or not at all: class_0, class_1) is compared with its export by naming them.
    result = runner.invoke(app, ["compare", str(onnx32), str(renamed), "--classes", "normal,pneumonia"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("option, value", [("--atol", "-1"), ("--rtol", "-0.5"), ("--atol", "nan"), ("--rtol", "inf")])
def test_a_tolerance_that_means_nothing_is_a_one_line_error(onnx32, option, value):
    """--atol -1 once ran, and reported 'limit |A−B| ≤ -1 + …' as a mismatch between the models."""
    result = runner.invoke(app, ["compare", str(onnx32), str(onnx32), option, value])
    assert result.exit_code == 1 and f"{option} must be a finite number ≥ 0, got" in result.output
    assert len(result.output.splitlines()) == 1, result.output


def test_every_image_left_out_is_counted(onnx32, tmp_path):
    """Only the first five unusable images were named, and nothing said how many more there were."""
    import shutil

    from medmamba_edge.runtime.bundled import sample_image_paths

    for path in sample_image_paths("pneumoniamnist"):
        shutil.copy(path, tmp_path)
    for k in range(7):
        (tmp_path / f"broken{k}.png").write_bytes(b"not a png")
    lines = summary_lines(compare(onnx32, onnx32, tmp_path))
    assert sum(line.startswith("left out (unusable)") for line in lines) == 5
    assert lines[-1] == "… and 2 more images left out (unusable)"


def test_the_images_said_to_differ_are_those_whose_top1_differs(onnx32, tmp_path_factory, tmp_path):
    """With every image usable, an image's place among the usable ones is its place in the data set, so naming the
    differing images by the first would have gone unnoticed: one unusable image before them and it names each
    one's neighbour. Nor did a test read the differences' figures: max |A−B|/|A| taken over |B| passed."""
    import shutil

    from medmamba_edge.runtime.backends import open_backend
    from medmamba_edge.runtime.bundled import sample_image_paths
    from medmamba_edge.runtime.decode import read_image
    from medmamba_edge.runtime.preprocess import preprocess

    images = sorted(sample_image_paths("pneumoniamnist"))
    for path in images:
        shutil.copy(path, tmp_path)
    (tmp_path / "0_broken.png").write_bytes(b"not a png")
    tiny = bundled_onnx(tmp_path_factory)
    report = compare(onnx32, tiny, tmp_path)
    a, b = (open_backend(m) for m in (onnx32, tiny))
    logits = [m.run(preprocess([read_image(p) for p in images], m.metadata)).astype(np.float64) for m in (a, b)]
    differing = [str(tmp_path / p.name) for p, x, y in zip(images, *(x.argmax(1) for x in logits)) if x != y]
    assert len(report.failures) == 1 and 0 < len(differing) < len(images)
    assert report.disagreeing == differing
    # The differences as the table heads them, A the reference: max |A−B|, max |A−B|/|A|, mean |A−B|.
    error = np.abs(logits[0] - logits[1])
    assert (report.logits.max_abs, report.logits.max_rel, report.logits.mean_abs) == pytest.approx(
        (error.max(), (error / np.abs(logits[0])).max(), error.mean()), rel=1e-4)
    # Past the first five, the rest are counted: as if 8 had differed, 3 more (not 8 more).
    lines = summary_lines(replace(report, disagreeing=[f"image{k}.png" for k in range(8)]))
    assert lines[4:6] == ["top-1 differs on image4.png", "… and on 3 more images"]


def test_two_models_of_the_same_file_name_are_told_apart(onnx32, tmp_path):
    """`compare runs/a/m.onnx runs/b/m.onnx` titled its table "A = m.onnx, B = m.onnx"."""
    import shutil

    from medmamba_edge.comparison import render_tables

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        shutil.copy(onnx32, tmp_path / run / "m.onnx")
    report = compare(tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx")
    assert render_tables(report)[0].title.startswith("A = a/m.onnx, B = b/m.onnx: ")


def test_a_model_onnx_runtime_ran_on_this_cpu_names_the_cpu(onnx32):
    """As evaluate's caption: an INT8 comparison holds for the instruction set it ran on (runtime/cpu.py)."""
    from medmamba_edge.comparison import render_tables
    from medmamba_edge.runtime.cpu import describe_cpu

    report = compare(require_shared(*OFFICIAL_T32), onnx32, num_samples=2)
    a, b = render_tables(report)[0].caption.splitlines()
    assert a == f"A: {report.backends[0]}" and b == f"B: {report.backends[1]} on {describe_cpu()}"


def test_a_judged_figure_never_reads_as_its_limit(onnx32):
    """979 of 999 images agreeing read "98.00%" and failed "≥ 98%"; a mean |ΔP| of 0.02004 read "0.02" and failed
    "≤ 0.02" (the official export and an INT8 one calibrated at the 99th percentile on 8 images, train split)."""
    from medmamba_edge.comparison import LogitPair, _checks
    from medmamba_edge.evaluation import open_models, run_models
    from medmamba_edge.runtime.datasets import open_dataset

    data = open_dataset(require_shared(*PNEUMONIAMNIST), split="train").subset(range(999))
    a = run_models(open_models([onnx32]), data, 128).logits[0]
    swapped = a.copy()
    swapped[:20] = swapped[:20, ::-1]  # 20 answers turned round: 97.998 % agree
    agreement = _checks(LogitPair.of(a, swapped), TIERS["int8"])[0]
    assert (agreement.measured, agreement.limit, agreement.passed) == ("97.998% (20 of 999 differ)", "≥ 98%", False)
    # 20 of 1000 is 98 % exactly, at the limit: "at least 98 %" passes it (a > for the ≥ went unnoticed).
    thousand = np.concatenate([a, a[:1]])
    swapped = thousand.copy()
    swapped[:20] = swapped[:20, ::-1]
    agreement = _checks(LogitPair.of(thousand, swapped), TIERS["int8"])[0]
    assert (agreement.measured, agreement.limit, agreement.passed) == ("98% (20 of 1000 differ)", "≥ 98%", True)
    # Each answer moved t towards class 0 (a + [t, -t]): t found where the mean change is just past 0.02.
    low, high = 0.0, 4.0
    for _ in range(40):
        t = (low + high) / 2
        moved = a + np.float32([t, -t])
        error = _checks(LogitPair.of(a, moved), TIERS["int8"])[-1]
        if error.passed:
            low = t
        elif float(error.measured) - 0.02 > 5e-5:
            high = t
        else:
            break
    assert (error.limit, error.passed) == ("≤ 0.02", False) and float(error.measured) > 0.02, error


def test_mean_probability_change_is_each_images_largest_with_three_classes(tmp_path):
    """With two classes an image's two probabilities move by the same amount, so the mean over every value equals
    the mean of each image's largest change, and every test model has two: the mean over all values went unnoticed.
    A 3-class model's logits on real ultrasound images, B with classes 0 and 1 swapped: each image's largest change
    is |p0 − p1| (p2 stays), where the mean over all three values reads two thirds of it."""
    import torch

    from medmamba_edge.comparison import LogitPair, _checks
    from medmamba_edge.evaluation import open_models, run_models
    from medmamba_edge.model import VSSM
    from medmamba_edge.runtime.datasets import open_dataset

    torch.manual_seed(0)
    checkpoint = tmp_path / "three.pth"
    torch.save(VSSM(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=3).state_dict(), checkpoint)
    data = open_dataset(require_shared("data", "busi")).sample(12, 0)
    a = run_models(open_models([checkpoint], 32), data, 32).logits[0].astype(np.float64)
    p = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    expected = np.abs(p[:, 0] - p[:, 1]).mean()
    error = _checks(LogitPair.of(a, a[:, [1, 0, 2]]), TIERS["int8"])[-1]
    assert error.name == "mean per-image max |ΔP|" and error.measured == f"{expected:.3g}", (error, expected)


def test_a_model_with_non_finite_logits_is_a_one_line_error(onnx32, tmp_path):
    """It was compared as numbers: against itself 'nan.onnx differs from nan.onnx: logits: 16 of 32 outside', and
    against an INT8 model its NaN rows (argmax: class 0) agreed with that model's class 0 answers."""
    from tests.test_evaluate import one_line_error, with_nan_logits

    broken = with_nan_logits(onnx32, tmp_path / "nan.onnx")
    one_line_error(["compare", str(broken), str(broken), "--data", str(require_shared(*PNEUMONIAMNIST)),
                    "--num-samples", "16"],
                   f"{broken}: non-finite logits (NaN or infinite) for 16 of 16 images (first: "
                   f"pneumoniamnist_trainval.npz[val:")


def test_a_failed_logit_check_never_reads_its_largest_difference_as_within(tmp_path):
    """A logit outside is over atol, yet the official T-32 against its 40×40 export (largest difference 6.914e-06),
    with --atol 6.91e-06 --rtol 0, showed 'max |A−B| 6.91e-06' beside '1 of 18 outside |A−B| ≤ 6.91e-06 + 0·|A|'."""
    from medmamba_edge.comparison import render_tables
    from medmamba_edge.exporters.onnx_export import export_onnx

    official = require_shared(*OFFICIAL_T32)
    onnx40 = export_onnx(official, tmp_path / "t40.onnx", input_size=40).path
    atol = three_digits_below(compare(official, onnx40, input_size=40).logits.max_abs)  # as the table showed it
    report = compare(official, onnx40, input_size=40, atol=atol, rtol=0.0)
    [problem] = report.problems
    assert re.fullmatch(rf"logits: [1-9]\d* of 18 outside \(limit \|A−B\| ≤ {re.escape(f'{atol:g}')} \+ 0·\|A\|\)",
                        problem), problem
    assert float(render_tables(report)[0].columns[1]._cells[0]) > atol


def test_a_largest_difference_over_atol_is_judged_outside(tmp_path):
    """numpy judged float32 logits in float32: the official T-32 against its 40×40 export (largest difference
    6.9141387939453125e-06) with --atol 6.9141387939453e-06 --rtol 0 passed, 'max |A−B| 6.91414e-06' beside
    '0 of 18 outside |A−B| ≤ 6.9141387939453e-06 + 0·|A|'."""
    from medmamba_edge.exporters.onnx_export import export_onnx

    official = require_shared(*OFFICIAL_T32)
    onnx40 = export_onnx(official, tmp_path / "t40.onnx", input_size=40).path
    largest = compare(official, onnx40, input_size=40).logits.max_abs
    atol = float(np.nextafter(largest, 0))  # below it, yet the same number in float32
    assert np.float32(atol) == np.float32(largest), "the case needs an atol that float32 rounds to the difference"
    report = compare(official, onnx40, input_size=40, atol=atol, rtol=0.0)
    assert report.problems == [f"logits: 1 of 18 outside (limit |A−B| ≤ {atol!r} + 0·|A|)"]
