"""`medmamba-edge evaluate` on real data: the official checkpoint, its ONNX export and its INT8 export
side by side on PneumoniaMNIST val; metrics against scikit-learn; bad data → one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from medmamba_edge.cli import app
from medmamba_edge.evaluation import evaluate
from medmamba_edge.runtime.bundled import sample_image_paths
from tests.exported_models import bundled_onnx, official_int8_onnx, official_onnx
from tests.shared_data import OFFICIAL_T32, PNEUMONIAMNIST, require_shared
from tests.test_metrics import assert_matches_sklearn, sklearn_auc
from tests.test_model import official_val_accuracy

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx32(tmp_path_factory):
    return official_onnx(tmp_path_factory)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """The INT8 export, or the reason it is missing (`quantize` is another module; skip only its case)."""
    try:
        return official_int8_onnx(tmp_path_factory)
    except pytest.skip.Exception as skipped:
        return str(skipped)


@pytest.fixture(scope="module")
def side_by_side(onnx32, int8):
    """The checkpoint (PyTorch), its export (ONNX Runtime, fused scan) and its INT8 export on the whole
    val split, in one run."""
    models = [require_shared(*OFFICIAL_T32), onnx32] + ([int8] if not isinstance(int8, str) else [])
    return evaluate(models, require_shared(*PNEUMONIAMNIST), split="val", max_drop=3)


def test_checkpoint_reproduces_the_recorded_val_accuracy(side_by_side):
    pth = side_by_side.models[0]
    assert pth.metrics.count == 524 and not side_by_side.failures
    assert pth.input_size == (32, 32)  # taken from the ONNX model beside it
    assert 100 * pth.metrics.accuracy == pytest.approx(official_val_accuracy(), abs=0.01)


def test_every_metric_matches_sklearn(side_by_side):
    labels = side_by_side.labels
    assert labels.tolist() == np.load(require_shared(*PNEUMONIAMNIST))["val_labels"][:, 0].tolist()
    for model in side_by_side.models:
        assert_matches_sklearn(model.metrics, labels, model.probabilities)
        assert model.metrics.auc == pytest.approx(sklearn_auc(labels, model.probabilities), abs=1e-12)


def test_onnx_export_scores_as_the_checkpoint(side_by_side):
    pth, onnx = side_by_side.models[:2]
    assert np.abs(pth.probabilities - onnx.probabilities).max() < 1e-5
    assert onnx.drop == 0 and onnx.metrics.accuracy == pth.metrics.accuracy
    assert "ONNX Runtime" in onnx.backend and "PyTorch" in pth.backend


def test_int8_export_stays_within_3_points(side_by_side, int8):
    if isinstance(int8, str):
        pytest.skip(int8)
    quantized = side_by_side.models[2]
    assert quantized.precision == "int8" and quantized.drop <= 3 and not side_by_side.gate_failures


def test_cli_writes_plots_and_json_and_fails_the_max_drop_gate(onnx32, tmp_path_factory, tmp_path):
    # The first 100 val images: the official model gets 97 right, the bundled tiny one 95 (2 points lower).
    val = np.load(require_shared(*PNEUMONIAMNIST))
    np.savez(tmp_path / "val100.npz", val_images=val["val_images"][:100], val_labels=val["val_labels"][:100])
    tiny = bundled_onnx(tmp_path_factory)
    result = runner.invoke(app, ["evaluate", str(onnx32), str(tiny), "--data", str(tmp_path / "val100.npz"),
                                 "--plots", str(tmp_path / "plots"), "--json", str(tmp_path / "eval.json"),
                                 "--max-drop", "1"])
    assert result.exit_code == 1, result.output
    assert "bundled32.onnx: top-1 accuracy 95.00% is 2 points below" in result.output  # to 4 digits, as quantize
    assert "(--max-drop 1)" in result.output and "AUC" in result.output
    # The table's Δ top-1 is accuracy gained: 2 points lost read +2.00 in a test that never looked.
    assert "-2.00" in result.output and "+2.00" not in result.output, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    official, other = report["models"]
    assert report["evaluated"] == 100 and not report["gate_passed"] and report["failed_to_decode"] == []
    assert official["metrics"]["accuracy"] == 0.97 and other["top1_drop_points"] == pytest.approx(2)
    assert set(official["metrics"]) >= {"accuracy", "precision", "sensitivity", "specificity", "f1", "auc",
                                        "per_class", "confusion"}
    for name in ("official32.onnx.confusion.png", "bundled32.onnx.confusion.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def xray_folder(folder):
    """The bundled PneumoniaMNIST samples as an ImageFolder (val_0003_normal.png goes to normal/)."""
    for path in sample_image_paths("pneumoniamnist"):
        label = path.stem.rsplit("_", 1)[-1]
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / label / path.name)
    return folder


def test_images_that_fail_to_decode_are_counted_and_reported(onnx32, tmp_path):
    folder = xray_folder(tmp_path / "xrays")
    for i in range(6):
        (folder / "normal" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    total = len(sample_image_paths("pneumoniamnist")) + 6
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(folder), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["evaluated"] == total - 6 and len(report["failed_to_decode"]) == 6
    assert report["failed_to_decode"][0]["source"].endswith("broken0.png")
    # Each image scored against its own label: the broken files come first, and labels taken by position among the
    # usable images (the first 6 of 12) would make every image normal.
    classes = [path.stem.rsplit("_", 1)[-1] for path in sample_image_paths("pneumoniamnist")]
    per_class = report["models"][0]["metrics"]["per_class"]
    assert [c["support"] for c in per_class] == [classes.count("normal"), classes.count("pneumonia")]
    assert "6 images could not be used" in result.output and "broken4.png" in result.output
    assert "broken5.png" not in result.output and f"… and 1 more (all in {tmp_path / 'e.json'})" in result.output
    # Without --json the console is the only list: every one is named ("all in --json" once pointed nowhere).
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(folder)])
    assert all(f"broken{i}.png" in result.output for i in range(6)) and "more" not in result.output


def test_an_image_that_decodes_but_cannot_be_preprocessed_is_left_out_by_name(tmp_path_factory, tmp_path):
    """Decoding names the file in its error, preprocessing does not ('expected an (H, W) or (H, W, 1|3|4) image'),
    and no test had an image that decodes yet cannot be preprocessed, so left-out lists without the file's name
    passed. A gray+alpha PAM named .ppm (OpenCV goes by its P7 signature) decodes to two channels."""
    from tests.exported_models import quantizer_or_skip

    model = bundled_onnx(tmp_path_factory)
    folder = xray_folder(tmp_path / "xrays")
    gray = cv2.imread(str(sample_image_paths("pneumoniamnist")[0]), cv2.IMREAD_GRAYSCALE)
    two = folder / "normal" / "gray_alpha.ppm"
    header = b"P7\nWIDTH %d\nHEIGHT %d\nDEPTH 2\nMAXVAL 255\nTUPLTYPE GRAYSCALE_ALPHA\nENDHDR\n" % gray.shape[::-1]
    two.write_bytes(header + np.dstack([gray, np.full_like(gray, 255)]).tobytes())
    named = f"{two}: expected an (H, W) or (H, W, 1|3|4) image, got shape (28, 28, 2)"
    for command in (["evaluate", str(model), "--data", str(folder)],
                    ["compare", str(model), str(model), "--data", str(folder)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and named in result.output.replace("\n", " "), result.output
    quantizer_or_skip()
    result = runner.invoke(app, ["quantize", str(model), "--calib", str(folder), "-o", str(tmp_path / "q.onnx"),
                                 "--num-samples", str(len(sample_image_paths("pneumoniamnist")) + 1)])
    assert result.exit_code == 0 and named in result.output.replace("\n", " "), result.output


def test_classes_without_images_are_said_with_the_macro_averages(onnx32, tmp_path):
    """A folder of pneumonia images only: the model right on each scored 50% macro sensitivity, precision,
    specificity and F1, with nothing saying that normal, with no images, counted as 0 in each."""
    folder = xray_folder(tmp_path / "xrays")
    shutil.rmtree(folder / "normal")
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(folder), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    note = ("no images of normal in this set: its precision, sensitivity and F1 count as 0 in the macro averages "
            "(as scikit-learn counts them, zero_division=0), as does pneumonia's specificity")
    assert report["classes_without_images"] == ["normal"] and report["macro_averages_note"] == note
    assert f"warning: {note}" in " ".join(result.output.split())  # wrapped at the console's width
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(xray_folder(tmp_path / "all")), "--json",
                                 str(tmp_path / "all.json")])
    report = json.loads((tmp_path / "all.json").read_text())
    assert report["classes_without_images"] == [] and report["macro_averages_note"] is None
    assert "warning" not in result.output


def with_nan_logits(model, path):
    """``model`` whose first class's logit is NaN, the others finite (as a float16 overflow breaks one logit): argmax
    would call each image class 0 (numpy's argmax takes the first NaN), and a row is no answer however many of its
    logits are finite."""
    import onnx
    from onnx import helper, numpy_helper

    graph = (m := onnx.load(model)).graph
    logits = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{name}_finite" if name == logits else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([np.nan, 0.0], np.float32), "nan"))
    graph.node.append(helper.make_node("Add", [f"{logits}_finite", "nan"], [logits]))
    onnx.save(m, path)
    return path


def test_a_model_with_non_finite_logits_is_not_scored(tmp_path_factory, tmp_path):
    from medmamba_edge.exporters.quantize import top1_accuracy

    broken = with_nan_logits(bundled_onnx(tmp_path_factory), tmp_path / "nan.onnx")
    folder = xray_folder(tmp_path / "xrays")
    total = len(sample_image_paths("pneumoniamnist"))
    one_line_error(["evaluate", str(broken), "--data", str(folder)],
                   f"nan.onnx: non-finite logits (NaN or infinite) for {total} of {total} images (first: "
                   f"{folder / 'normal' / 'val_0003_normal.png'})")
    # The first is named among the images scored, not by its place among them: behind an image left out it was
    # named as that image's.
    (folder / "normal" / "0_broken.png").write_bytes(b"not a png")
    one_line_error(["evaluate", str(broken), "--data", str(folder)],
                   f"nan.onnx: non-finite logits (NaN or infinite) for {total} of {total} images (first: "
                   f"{folder / 'normal' / 'val_0003_normal.png'})")
    # quantize's accuracy gate: no answer is a wrong one, not the class 0 argmax names (all labels 0 here).
    assert top1_accuracy(broken, [np.zeros((4, 3, 32, 32), np.float32)], np.zeros(4, np.int64)) == 0.0


def one_row_model(path, classes=("normal", "pneumonia")):
    """A valid dynamic-batch ONNX (x (N, 3, 32, 32) → mean per channel → the first row's first logits) whose output
    is fixed [1, classes]: one row whatever the batch, as a model exported with a batch-1 reshape answers."""
    import json

    import onnx
    from onnx import TensorProto, helper

    k = len(classes)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["logits"])]
    graph = helper.make_graph(
        nodes, "one_row", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
         helper.make_tensor("ends", TensorProto.INT64, [2], [1, k]),
         helper.make_tensor("axes", TensorProto.INT64, [2], [0, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "medmamba_edge", json.dumps({"input_size": [32, 32], "class_names": list(classes),
                                                          "batch": None})
    onnx.save(model, str(path))
    return path


def test_a_model_answering_one_row_for_a_batch_is_a_one_line_error(tmp_path):
    """evaluate ended in "ValueError: expected (524, 2) probabilities, got (66, 2)", a traceback; quantize's
    accuracy gate scored the rows it got."""
    from medmamba_edge.exporters.quantize import top1_accuracy
    from medmamba_edge.runtime.backends import WrongOutputShape

    model = one_row_model(tmp_path / "rows.onnx")
    one_line_error(["evaluate", str(model), "--data", str(xray_folder(tmp_path / "xrays")), "--batch", "4"],
                   f"{model}: the model returned 1 row for 4 inputs")
    with pytest.raises(WrongOutputShape, match="the model returned 1 row for 8 inputs"):
        top1_accuracy(model, [np.zeros((8, 3, 32, 32), np.float32)], np.zeros(8, np.int64))


def test_outputs_that_would_replace_each_other_or_join_the_data_are_refused(onnx32, tmp_path):
    """--json onto a planned confusion plot replaced it silently; --plots in a class folder added an image to it."""
    folder = xray_folder(tmp_path / "xrays")
    images = sorted(str(p) for p in folder.rglob("*"))
    plot = tmp_path / "plots" / f"{onnx32.name}.confusion.png"
    one_line_error(["evaluate", str(onnx32), "--data", str(folder), "--plots", str(plot.parent), "--json", str(plot)],
                   f"{onnx32.name}.confusion.png: given for two outputs")
    one_line_error(["evaluate", str(onnx32), "--data", str(folder), "--plots", str(folder / "normal")],
                   f"normal/{onnx32.name}.confusion.png: lies in")
    one_line_error(["evaluate", str(onnx32), "--data", str(folder), "--json", str(onnx32)],
                   "the output would overwrite a file this command reads")
    assert sorted(str(p) for p in folder.rglob("*")) == images and not plot.parent.exists()


def one_line_error(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1, result.output


def test_bad_data_is_a_one_line_error(onnx32, tmp_path):
    model = str(onnx32)
    one_line_error(["evaluate", model, "--data", str(tmp_path / "missing")], "no such file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(["evaluate", model, "--data", str(tmp_path / "empty")], "no images found")
    # BUSI's classes are not the PneumoniaMNIST model's.
    one_line_error(["evaluate", model, "--data", str(require_shared("data", "busi"))],
                   "label 'benign' is not one of the model's classes ['normal', 'pneumonia']")
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    shutil.copy(sample_image_paths("pneumoniamnist")[0], unlabelled)
    one_line_error(["evaluate", model, "--data", str(unlabelled)], "evaluation needs labels")
    one_line_error(["evaluate", model, "--data", str(require_shared(*PNEUMONIAMNIST)), "--split", "test"],
                   "no split 'test'")
    one_line_error(["evaluate", str(tmp_path / "nope.onnx"), "--data", str(unlabelled)], "no such model file")


@pytest.mark.parametrize("names, refusal", [
    # Refused as "no split 'val'; it has []", naming neither the arrays looked for nor those there.
    (("images", "labels"), "no split 'val'"),
    # Refused as "evaluation needs labels (an ImageFolder, a labelled .npz split or a path,label CSV)", as unnamed.
    (("val_images", "labels"), "split 'val' has no labels"),
])
def test_an_npz_of_other_array_names_is_refused_naming_what_it_holds(onnx32, tmp_path, names, refusal):
    """The real val split saved under other names than MedMNIST's."""
    with np.load(require_shared(*PNEUMONIAMNIST)) as data:
        np.savez(tmp_path / "renamed.npz", **dict(zip(names, (data["val_images"], data["val_labels"]))))
    one_line_error(["evaluate", str(onnx32), "--data", str(tmp_path / "renamed.npz")],
                   f"renamed.npz: {refusal}; expected val_images and val_labels (MedMNIST's names); it holds "
                   f"{', '.join(names)}")


def test_dangling_links_and_fifos_in_an_imagefolder_are_reported_as_not_decoded(onnx32, tmp_path):
    folder = xray_folder(tmp_path / "xrays")
    (folder / "normal" / "dangling.png").symlink_to("missing.png")
    os.mkfifo(folder / "pneumonia" / "pipe.png")
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "normal" / "x.gif")  # a video to `run`, no image here
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(folder), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["evaluated"] == len(sample_image_paths("pneumoniamnist"))
    assert [f["source"].rsplit("/", 2)[-2:] for f in report["failed_to_decode"]] == [
        ["normal", "dangling.png"], ["pneumonia", "pipe.png"]]
    assert "2 images could not be used" in result.output and "a dangling symbolic link" in result.output


def test_csv_that_is_not_utf8_is_a_one_line_error(onnx32, tmp_path):
    shutil.copy(sample_image_paths("pneumoniamnist")[0], tmp_path / "a.png")
    (tmp_path / "latin1.csv").write_bytes(b"a.png,normal\n# r\xe9sum\xe9\n")
    one_line_error(["evaluate", str(onnx32), "--data", str(tmp_path / "latin1.csv")],
                   "latin1.csv:2: not UTF-8 text (byte 0xe9); save the CSV as UTF-8")


def test_a_checkpoint_run_at_the_default_size_is_said_by_every_command(tmp_path_factory, tmp_path):
    # The official T-32 checkpoint at 224 scores 74 % top-1 (every image one class), at 32 93 %: only `run` said so.
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    checkpoint, folder = str(bundled_checkpoint()), str(xray_folder(tmp_path / "xrays"))
    said = "does not record its training size: running it at 224×224 (--input-size gives another)"
    for args in (["evaluate", checkpoint, "--data", folder], ["compare", checkpoint, checkpoint, "--data", folder]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and said in result.output, result.output
    # Sized by the export beside it, or by --input-size: nothing to say.
    for args in (["evaluate", checkpoint, str(bundled_onnx(tmp_path_factory)), "--data", folder],
                 ["evaluate", checkpoint, "--input-size", "32", "--data", folder]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and said not in result.output, result.output


def test_a_timm_pth_tar_checkpoint_is_opened_by_run_and_evaluate(tmp_path):
    """export took timm's model_best.pth.tar, run and evaluate said "unknown model type .tar": two tables of
    checkpoint names, now one (runtime/backends is_checkpoint_name)."""
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    checkpoint = tmp_path / "ck" / "model_best.pth.tar"
    checkpoint.parent.mkdir()
    shutil.copy(bundled_checkpoint(), checkpoint)
    shutil.copy(bundled_checkpoint().parent / "class_indices.json", checkpoint.parent)  # its classes, beside it
    folder = xray_folder(tmp_path / "xrays")
    result = runner.invoke(app, ["run", str(checkpoint), str(folder / "normal"), "--input-size", "32"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "0 skipped" in result.output and ": normal " in result.output
    result = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(folder), "--input-size", "32"])
    assert result.exit_code == 0 and "PyTorch" in result.output, result.output


def test_confusion_shares_are_never_rounded_to_none_or_all():
    from medmamba_edge.plots import share

    # The official checkpoint's pneumonia row, 388 | 1 of 389: it was drawn "100%" and "0%".
    assert [share(1 / 389), share(388 / 389)] == ["0.3%", "99.7%"]
    assert [share(1 / 5000), share(4999 / 5000), share(0.0), share(1.0)] == ["<0.1%", ">99.9%", "0.0%", "100.0%"]


def test_plot_labels_are_drawn_as_given(onnx32, tmp_path):
    # "$...$" is mathtext to matplotlib ("$\frac{$" does not parse); a file name's undecodable byte (surrogate-
    # escaped by Python) is a string FreeType refuses. Both crashed the plot, after the evaluation.
    name = os.fsdecode(b"m$\\frac{$ \xff.onnx")
    model = tmp_path / name
    shutil.copy(onnx32, model)
    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    result = runner.invoke(app, ["evaluate", str(model), "--data", str(tmp_path / "data.npz"), "--plots",
                                 str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plots" / f"{name}.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from medmamba_edge.plots import latency_bars_png

    latency_bars_png([f"{name} (fp32), batch 1", "cost $5 or $6.onnx (fp32), batch 1"], [1.0, 2.0], [1.5, 2.5],
                     [2.0, 3.0], "$\\frac{$", tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_name_near_the_file_systems_limit_gets_its_plot(onnx32, tmp_path):
    model = tmp_path / ("é" * 120 + ".onnx")  # 246 bytes: the plot's name would be 260
    shutil.copy(onnx32, model)
    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    result = runner.invoke(app, ["evaluate", str(model), str(model), "--data", str(tmp_path / "data.npz"),
                                 "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert len(plots) == 2 and all(len(os.fsencode(p)) <= 255 and p.endswith(".confusion.png") for p in plots)
    assert [p[:2] for p in plots] == ["1-", "2-"]


def test_a_file_named_as_a_prefixed_plot_gets_a_plot_of_its_own(onnx32, tmp_path):
    """`evaluate a/m.onnx 1-m.onnx b/m.onnx` was refused: a/m.onnx's plot, prefixed 1-, was 1-m.onnx's."""
    models = [tmp_path / "a" / "m.onnx", tmp_path / "1-m.onnx", tmp_path / "b" / "m.onnx"]
    for model in models:
        model.parent.mkdir(exist_ok=True)
        shutil.copy(onnx32, model)
    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    result = runner.invoke(app, ["evaluate", *map(str, models), "--data", str(tmp_path / "data.npz"),
                                 "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "1-m.onnx.confusion.png", "2-1-m.onnx.confusion.png", "3-m.onnx.confusion.png"]


def test_the_report_files_are_written_before_a_stdout_that_fails(onnx32, tmp_path):
    """A long evaluation's --json outlives a stdout that cannot take the tables (a full disk, `| head` gone)."""
    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "evaluate", str(onnx32), "--data",
                                 str(tmp_path / "data.npz"), "--json", str(tmp_path / "e.json")],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: stdout: cannot write (No space left on device)"]
    assert json.loads((tmp_path / "e.json").read_text())["models"][0]["metrics"]["count"] == 2


def test_json_onto_stdout_gets_stdout_to_itself(onnx32, tmp_path):
    """`--json /dev/stdout | reader`: the tables and 'wrote' lines followed the JSON on stdout ("Extra data")."""
    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "evaluate", str(onnx32), "--data",
                             str(tmp_path / "data.npz"), "--json", "/dev/stdout"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["metrics"]["count"] == 2
    assert "wrote /dev/stdout" in result.stderr


def test_models_that_normalise_differently_each_see_their_own_inputs(tmp_path_factory, tmp_path):
    """Models equal in every preprocessing field share one preprocessed copy of each image; no test had two that
    differ in mean alone, so a key leaving mean out, which feeds the second the first one's inputs, passed."""
    import onnx

    from medmamba_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata

    tiny = bundled_onnx(tmp_path_factory)
    model = onnx.load(str(tiny))
    write_onnx_metadata(model, read_onnx_metadata(tiny).replace(mean=(0.4, 0.4, 0.4)))
    onnx.save(model, str(tmp_path / "mean04.onnx"))
    folder = xray_folder(tmp_path / "xrays")
    together = evaluate([tiny, tmp_path / "mean04.onnx"], folder)
    alone = evaluate([tmp_path / "mean04.onnx"], folder)
    assert np.array_equal(together.models[1].probabilities, alone.models[0].probabilities)
    assert not np.array_equal(together.models[0].probabilities, together.models[1].probabilities)


def test_models_of_the_same_file_name_are_told_apart(tmp_path_factory, tmp_path, monkeypatch):
    """`evaluate runs/a/model.onnx runs/b/model.onnx`: both rows, captions and plot titles read "model.onnx"."""
    import medmamba_edge.plots as plots
    from medmamba_edge.evaluation import render_tables, write_confusion_plots

    models = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        models.append(shutil.copy(bundled_onnx(tmp_path_factory), tmp_path / run / "model.onnx"))
    report = evaluate(models, xray_folder(tmp_path / "xrays"))
    assert list(render_tables(report)[0].columns[0].cells) == ["a/model.onnx", "b/model.onnx"]
    titles = []
    monkeypatch.setattr(plots, "confusion_matrix_png", lambda confusion, names, title, path: titles.append(title))
    write_confusion_plots(report, tmp_path / "plots")
    assert [t.split(" (")[0] for t in titles] == ["a/model.onnx", "b/model.onnx"]


def test_figures_from_onnx_runtime_on_this_cpu_name_the_cpu(onnx32, tmp_path, monkeypatch):
    """INT8 kernels differ with the instruction set (runtime/cpu.py): the caption, the JSON and the plot title of a
    model ONNX Runtime ran on the CPU name that CPU; a checkpoint's (PyTorch) figures hold on any."""
    import medmamba_edge.plots as plots
    from medmamba_edge.evaluation import render_tables, write_confusion_plots
    from medmamba_edge.runtime.cpu import describe_cpu

    np.savez(tmp_path / "data.npz", val_images=np.full((2, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1]]))
    report = evaluate([require_shared(*OFFICIAL_T32), onnx32], tmp_path / "data.npz")
    checkpoint, exported = report.to_dict()["models"]
    assert exported["machine"] == {"cpu": describe_cpu()} and checkpoint["machine"] is None
    caption = render_tables(report)[0].caption.splitlines()
    assert caption[2] == f"official32.onnx: {report.models[1].backend} on {describe_cpu()}"
    assert caption[1].endswith("(CPU, float32)")  # PyTorch's line as before
    titles = []
    monkeypatch.setattr(plots, "confusion_matrix_png", lambda confusion, names, title, path: titles.append(title))
    write_confusion_plots(report, tmp_path / "plots")
    assert titles[1].endswith(f"% on {describe_cpu()}") and titles[0].endswith("%")
