"""Data set readers and the backend factory on real data."""

import csv
import os
import shutil

import cv2
import numpy as np
import pytest

from medmamba_edge.runtime.backends import BackendError, open_backend, run_in_fixed_batches
from medmamba_edge.runtime.datasets import DatasetError, open_dataset
from medmamba_edge.runtime.metadata import MetadataError
from tests.shared_data import PNEUMONIAMNIST, require_shared

BUSI_CLASSES = ["benign", "malignant", "normal"]


def test_imagefolder_maps_folder_names_to_model_classes():
    busi = require_shared("data", "busi")
    data = open_dataset(busi, class_names=BUSI_CLASSES)
    counts = np.bincount(data.labels(), minlength=3)
    assert counts.tolist() == [437, 210, 133]
    assert data.image(0).shape == (256, 256, 3) and data.image(0).dtype == np.uint8
    with pytest.raises(DatasetError, match="label 'benign' is not one of the model's classes"):
        open_dataset(busi, class_names=["normal", "pneumonia"])


def test_npz_split_and_deterministic_sampling():
    npz = require_shared(*PNEUMONIAMNIST)
    val = open_dataset(npz, split="val", class_names=["normal", "pneumonia"])
    assert len(val) == 524 and np.bincount(val.labels()).tolist() == [135, 389]
    assert val.image(3).shape == (28, 28)
    # Each image with its own label, in the file's order: the class counts alone hold under any shift of the labels.
    with np.load(npz) as data:
        assert val.labels().tolist() == data["val_labels"].ravel().tolist()
        assert all(np.array_equal(val.image(i), data["val_images"][i]) for i in (0, 3, 523))
    a, b = val.sample(50, seed=1), val.sample(50, seed=1)
    assert [s.source for s in a.samples] == [s.source for s in b.samples] and len(a) == 50
    with pytest.raises(DatasetError, match="no split 'test'; it has \\['train', 'val'\\]"):
        open_dataset(npz, split="test")
    with pytest.raises(DatasetError, match="label 1 is outside the model's 1 classes"):
        open_dataset(npz, split="val", class_names=["only"])


def test_csv_paths_relative_to_the_csv(tmp_path):
    busi = require_shared("data", "busi")
    rows = [("path", "label"), (str(busi / "benign" / "benign (1).png"), "benign"), (str(busi / "normal" / "normal (1).png"), "2")]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = open_dataset(tmp_path / "list.csv", class_names=BUSI_CLASSES)
    assert data.labels().tolist() == [0, 2]
    # Spaces around a path are dropped (as spreadsheets write "a.png, 1"), unless the name as given is a file.
    (tmp_path / " lead.png").write_bytes((busi / "benign" / "benign (1).png").read_bytes())
    with open(tmp_path / "spaced.csv", "w", newline="") as f:
        csv.writer(f).writerows([(" lead.png", "0"), (f" {busi / 'normal' / 'normal (1).png'} ", "2")])
    spaced = open_dataset(tmp_path / "spaced.csv", class_names=BUSI_CLASSES)
    with open(tmp_path / "long.csv", "w", newline="") as f:  # a name the file system refuses is a sample that fails
        csv.writer(f).writerows([("x" * 300 + ".png", "0")])
    assert len(open_dataset(tmp_path / "long.csv", class_names=BUSI_CLASSES)) == 1
    assert [s.source for s in spaced.samples] == [str(tmp_path / " lead.png"), str(busi / "normal" / "normal (1).png")]
    # "../images" from a CSV reached through a linked folder ("current" → releases/v3/labels) is the release's, as
    # the shell's ls finds it: joined as text, it named tmp_path/images, missing or other files.
    (tmp_path / "releases" / "v3" / "labels").mkdir(parents=True)
    (tmp_path / "releases" / "v3" / "images").mkdir()
    shutil.copy(busi / "benign" / "benign (1).png", tmp_path / "releases" / "v3" / "images" / "a.png")
    (tmp_path / "releases" / "v3" / "labels" / "labels.csv").write_text("path,label\n../images/a.png,benign\n")
    (tmp_path / "current").symlink_to("releases/v3/labels")
    (sample,) = open_dataset(tmp_path / "current" / "labels.csv", class_names=BUSI_CLASSES).samples
    assert os.path.samefile(sample.source, tmp_path / "releases" / "v3" / "images" / "a.png")
    # A row's link is named as listed, not by its target (a data set of links into a hashed store).
    (tmp_path / "case1.png").symlink_to(busi / "benign" / "benign (1).png")
    (tmp_path / "case2.png").symlink_to("/nonexistent/1.2.840.113619.png")
    (tmp_path / "links.csv").write_text("case1.png,0\ncase2.png,1\n")
    assert [s.source for s in open_dataset(tmp_path / "links.csv", class_names=BUSI_CLASSES).samples] == [
        str(tmp_path / "case1.png"), str(tmp_path / "case2.png")]
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([("x.png", "tumour")])
    with pytest.raises(DatasetError, match=r"bad\.csv:1: label 'tumour'"):
        open_dataset(tmp_path / "bad.csv", class_names=BUSI_CLASSES)
    # A line is the file's, not the row's: a quoted name holding a line break takes two lines, and the row after it
    # is on line 4 (a row count, 3, passed every other case).
    shutil.copy(busi / "benign" / "benign (1).png", tmp_path / "two\nlines.png")
    with open(tmp_path / "broken_name.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), ("two\nlines.png", "benign"), ("x.png", "tumour")])
    with pytest.raises(DatasetError, match=r"broken_name\.csv:4: label 'tumour'"):
        open_dataset(tmp_path / "broken_name.csv", class_names=BUSI_CLASSES)


def test_bad_data_paths(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match="expected an image folder, a .npz or a .csv"):
        open_dataset(tmp_path / "x.txt")


def test_images_an_imagefolder_would_leave_out_without_a_word_are_refused(tmp_path):
    """Loose images beside the class folders were left out: an evaluation of 6 of 30 images, exit 0. A class
    folder's sub-folders are its images, as torchvision's ImageFolder walks them (they were refused, or left out
    beside images of the class folder's own); one with no image in it or below it is refused."""
    image = np.zeros((8, 8), np.uint8)
    for name in ("normal/a.png", "normal/deeper/c.png", "pneumonia/deeper/b.png"):
        (tmp_path / "nested" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "nested" / name), image)
    data = open_dataset(tmp_path / "nested", class_names=["normal", "pneumonia"])
    assert [(s.source[len(str(tmp_path / "nested")) + 1:], s.label) for s in data.samples] == [
        ("normal/a.png", 0), ("normal/deeper/c.png", 0), ("pneumonia/deeper/b.png", 1)]
    (tmp_path / "nested" / "other" / "empty").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"nested/other: a class folder without images \(in it or below it\)"):
        open_dataset(tmp_path / "nested")
    for name in ("loose/normal/a.png", "loose/pneumonia/b.png", "loose/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / name), image)
    with pytest.raises(DatasetError, match=r"loose: 1 image beside its class folders \(e\.g\. c\.png\)"):
        open_dataset(tmp_path / "loose")


def test_an_image_reached_from_two_class_folders_is_refused(tmp_path):
    """Class folders are walked following links, as torchvision's ImageFolder walks them: a link from one class
    folder to another's sub-folder (or a link to the data set's top) evaluated its images under both labels, the
    set one image larger for each, exit 0."""
    busi = require_shared("data", "busi")
    for name in ("normal/normal (1).png", "pneumonia/patient/malignant (1).png"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(busi / ("normal" if name.startswith("normal") else "malignant") / name.rsplit("/", 1)[1],
                    tmp_path / "data" / name)
    (tmp_path / "data" / "normal" / "from_pneumonia").symlink_to("../pneumonia/patient")
    with pytest.raises(DatasetError, match=r"data/normal/from_pneumonia/malignant \(1\)\.png and \S*/data/pneumonia/"
                                           r"patient/malignant \(1\)\.png: one image in class folders 'normal' "
                                           r"and 'pneumonia' \(through a link\); an image has one class"):
        open_dataset(tmp_path / "data", class_names=["pneumonia", "normal"])
    # Unlabelled (calibration), the linked image is there twice to draw from, as torchvision would read it.
    assert len(open_dataset(tmp_path / "data")) == 3


def test_an_image_on_two_rows_of_a_csv_is_refused_naming_both_lines(tmp_path):
    """A CSV giving one BUSI image two classes (as itself, and through a path of its own) was evaluated under both,
    right once and wrong once, exit 0; ImageFolder's links were refused so. Refused then without the rows' lines
    (which a CSV's every other refusal names), and the same image twice under one label was counted double."""
    busi = require_shared("data", "busi")
    (tmp_path / "normal.png").symlink_to(busi / "normal" / "normal (1).png")
    (tmp_path / "labels.csv").write_text(f"path,label\n{busi}/normal/normal (1).png,normal\n"
                                         f"{busi}/benign/benign (1).png,benign\n./normal.png,malignant\n")
    with pytest.raises(DatasetError, match=r"labels\.csv:4: \S*/normal\.png labelled 'malignant', the image line 2 "
                                           r"labels 'normal' \(\S*busi/normal/normal \(1\)\.png\); an image has one "
                                           r"class$"):
        open_dataset(tmp_path / "labels.csv", class_names=BUSI_CLASSES)
    (tmp_path / "twice.csv").write_text(f"{busi}/benign/benign (1).png,benign\n{busi}/normal/normal (1).png,normal\n"
                                        f"{busi}/normal/normal (1).png,2\n")
    with pytest.raises(DatasetError, match=r"twice\.csv:3: \S*busi/normal/normal \(1\)\.png again, the image of "
                                           r"line 2; an image is listed once$"):
        open_dataset(tmp_path / "twice.csv", class_names=BUSI_CLASSES)
    # Unlabelled (compare, calibration) both were read as 3 images, one counted double in compare's every figure.
    with pytest.raises(DatasetError, match=r"labels\.csv:4: \S*/normal\.png again, the image of line 2 "
                                           r"\(\S*busi/normal/normal \(1\)\.png\); an image is listed once$"):
        open_dataset(tmp_path / "labels.csv")
    with pytest.raises(DatasetError, match=r"twice\.csv:3: \S*busi/normal/normal \(1\)\.png again, the image of "
                                           r"line 2; an image is listed once$"):
        open_dataset(tmp_path / "twice.csv")


def test_multi_label_npz_labels_are_refused(tmp_path):
    """ChestMNIST-style (N, 14) labels were read as class indices from their first column."""
    np.savez(tmp_path / "chest.npz", val_images=np.zeros((4, 28, 28), np.uint8), val_labels=np.zeros((4, 14), np.int64))
    with pytest.raises(DatasetError, match=r"chest\.npz: val_labels: 14 label columns \(multi-label\?\)"):
        open_dataset(tmp_path / "chest.npz", split="val", class_names=["a", "b"])
    # What needs no labels (calibration, compare) reads its images, whatever the labels hold (float, negative, too
    # few: calibration refused such a set for labels it never reads).
    assert len(open_dataset(tmp_path / "chest.npz", split="val")) == 4
    for labels in (np.zeros((4, 1), np.float32), np.full(4, -1), np.zeros(2, np.int64)):
        np.savez(tmp_path / "odd.npz", val_images=np.zeros((4, 28, 28), np.uint8), val_labels=labels)
        assert len(open_dataset(tmp_path / "odd.npz", split="val")) == 4


def test_a_label_one_past_the_last_class_or_below_zero_is_refused(tmp_path):
    """A class folder "2" for a model of two classes (indices 0 and 1), and an .npz label of -1: a bound off by one
    let either through unnoticed, to fail in the metrics' confusion matrix as a traceback, or be scored."""
    busi = require_shared("data", "busi")
    for folder in ("0", "2"):
        (tmp_path / "folder" / folder).mkdir(parents=True)
        shutil.copy(busi / "normal" / "normal (1).png", tmp_path / "folder" / folder)
    with pytest.raises(DatasetError, match=r"/2: label '2' is not one of the model's classes \['normal', 'pneumonia'\]"):
        open_dataset(tmp_path / "folder", class_names=["normal", "pneumonia"])
    with np.load(require_shared(*PNEUMONIAMNIST)) as data:
        images, labels = data["val_images"], data["val_labels"].astype(np.int64)  # as a tool writing signed labels
    labels[7] = -1
    np.savez(tmp_path / "val.npz", val_images=images, val_labels=labels)
    with pytest.raises(DatasetError, match=r"val\.npz: val_labels: label -1 is negative"):
        open_dataset(tmp_path / "val.npz", split="val", class_names=["normal", "pneumonia"])


def test_fixed_batch_padding_keeps_every_result():
    seen = []

    def run_fixed(chunk):
        seen.append(len(chunk))
        return chunk.reshape(len(chunk), -1)[:, :1] * 2

    batch = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    out = run_in_fixed_batches(run_fixed, batch, fixed=3)
    assert seen == [3, 3, 3] and out[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 12]


def test_an_empty_batch_gives_no_rows_in_every_backend(tmp_path_factory):
    """A batch of 0 frames (an application batching however many arrived) was numpy's 'need at least one array to
    concatenate' from ONNX Runtime's backend and a reshape's RuntimeError from PyTorch's, neither naming the model."""
    from medmamba_edge.loaders import open_model
    from medmamba_edge.runtime.bundled import bundled_checkpoint
    from tests.exported_models import bundled_onnx

    for backend in (open_backend(bundled_onnx(tmp_path_factory)), open_model(bundled_checkpoint(), input_size=32)):
        with backend:
            empty = backend.run(np.empty((0, 3, 32, 32), np.float32))
            one = backend.run(np.zeros((1, 3, 32, 32), np.float32))
            assert empty.shape == (0, one.shape[1]) and empty.dtype == one.dtype == np.float32


def test_a_checkpoints_thread_count_holds_for_its_own_calls_only(monkeypatch):
    """PyTorchBackend(threads=N) set torch's thread count for the whole process when opened and never put it back:
    an application's evaluate(threads=1) left its own torch work on one thread after it."""
    import torch

    from medmamba_edge.loaders import open_model
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    backend = open_model(bundled_checkpoint(), input_size=32, threads=wanted)
    assert torch.get_num_threads() == before
    model, seen = backend.checkpoint.model, []
    monkeypatch.setattr(backend.checkpoint, "model", lambda x: (seen.append(torch.get_num_threads()), model(x))[1])
    with backend:
        assert backend.run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 2)
    assert seen == [wanted] and torch.get_num_threads() == before


def test_backend_factory_errors(tmp_path):
    with pytest.raises(BackendError, match="no such model file"):
        open_backend(tmp_path / "m.onnx")
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(BackendError, match="unknown model type .tflite"):
        open_backend(tmp_path / "m.tflite")
    (tmp_path / "model_best.pth.tar").write_bytes(b"x")  # timm's name: a checkpoint, not a ".tar" model
    with pytest.raises(BackendError, match="model_best.pth.tar: a PyTorch checkpoint is opened with torch"):
        open_backend(tmp_path / "model_best.pth.tar")
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(MetadataError, match="broken.onnx: not a readable ONNX model"):
        open_backend(tmp_path / "broken.onnx")


def test_imagefolder_reads_dicom_as_run_does(tmp_path):
    """evaluate's and quantize's data sets decode DICOM (suffixed or not) with the same function as `run`."""
    pytest.importorskip("pydicom")
    from medmamba_edge.runtime.decode import ImageError, read_dicom
    from tests.test_sources import synthetic_dicom

    dicom = require_shared("data", "dicom", "chest_xray_rsna.dcm")
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    (tmp_path / "normal" / "study.dcm").write_bytes(dicom.read_bytes())
    (tmp_path / "pneumonia" / "IM0001").write_bytes(dicom.read_bytes())  # PACS exports often have no suffix
    (tmp_path / "pneumonia" / "notes.txt").write_text("not an image")
    data = open_dataset(tmp_path, class_names=["normal", "pneumonia"])
    assert data.labels().tolist() == [0, 1]
    (expected,) = read_dicom(dicom)
    for index in range(2):
        assert np.array_equal(data.image(index), expected)
    # One label per file: a multi-frame file in a labelled set is a per-file error, not frames silently dropped.
    frames = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(8, 5)
    synthetic_dicom(tmp_path / "normal" / "cine.dcm", frames, Rows=4, NumberOfFrames=2)
    data = open_dataset(tmp_path, class_names=["normal", "pneumonia"])
    index = [s.source for s in data.samples].index(str(tmp_path / "normal" / "cine.dcm"))
    with pytest.raises(ImageError, match="cine.dcm: a DICOM file of 2 frames; a data set takes one image per file"):
        data.image(index)


def test_csv_rows_are_samples_whatever_their_first_character_and_a_header_names_no_file(tmp_path):
    pytest.importorskip("pydicom")
    from tests.test_sources import synthetic_dicom

    for name in ("#0003.png", "#0004.png", "p0.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8), np.uint8))
    synthetic_dicom(tmp_path / "image", np.zeros((8, 8), np.uint8))  # a DICOM file without a suffix, named "image"
    classes = ["normal", "pneumonia"]
    cases = {
        b'"#0003.png",normal\n#0004.png,normal\np0.png,pneumonia\n': ["#0003.png", "#0004.png", "p0.png"],
        b"image,normal\np0.png,pneumonia\n": ["image", "p0.png"],
        b"\xef\xbb\xbfpath,label\r\np0.png,pneumonia\r\n": ["p0.png"],  # as Excel saves UTF-8: a byte-order mark
        b"file,label\n\np0.png,1\n": ["p0.png"],
    }
    for text, names in cases.items():
        (tmp_path / "list.csv").write_bytes(text)
        data = open_dataset(tmp_path / "list.csv", class_names=classes)
        assert [s.source for s in data.samples] == [str(tmp_path / name) for name in names], text
        assert [data.image(i).shape for i in range(len(data))] == [(8, 8)] * len(names)


def test_csv_that_is_not_utf8_is_a_one_line_error(tmp_path):
    (tmp_path / "latin1.csv").write_bytes(b"p0.png,pneumonia\nn7.png,normal\nr\xe9sum\xe9.png,normal\n")
    with pytest.raises(DatasetError, match=r"latin1\.csv:3: not UTF-8 text \(byte 0xe9\); save the CSV as UTF-8$"):
        open_dataset(tmp_path / "latin1.csv", class_names=["normal", "pneumonia"])


def test_csv_header_beside_a_folder_of_that_name_is_a_header(tmp_path):
    (tmp_path / "image").mkdir()  # the ordinary layout: image,label rows naming image/a.png
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / "image" / f"{name}.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "labels.csv").write_text("image,label\nimage/a.png,normal\nimage/b.png,pneumonia\n")
    assert open_dataset(tmp_path / "labels.csv", class_names=["normal", "pneumonia"]).labels().tolist() == [0, 1]
    (tmp_path / "nul.csv").write_text("a\x00b.png,normal\n")
    with pytest.raises(DatasetError, match=r"nul\.csv:1: holds a NUL character$"):
        open_dataset(tmp_path / "nul.csv", class_names=["normal", "pneumonia"])


def test_csv_that_cannot_be_read_is_a_one_line_error(tmp_path):
    (tmp_path / "x.csv").symlink_to("/proc/self/mem")  # unreadable even for root: offset 0 is never mapped
    with pytest.raises(DatasetError, match=r"x\.csv: cannot read \(Input/output error\)$"):
        open_dataset(tmp_path / "x.csv", class_names=["normal", "pneumonia"])


@pytest.mark.parametrize("name", ["²", "١"])  # str.isdigit() holds for both; int() refuses the first, reads 1 in the second
def test_class_folder_named_by_a_non_ascii_digit_is_not_an_index(tmp_path, name):
    for folder in ("normal", name):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "x.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=f"{name}: label '{name}' is not one of the model's classes"):
        open_dataset(tmp_path, class_names=["normal", "pneumonia"])
    (tmp_path / name).rename(tmp_path / "1")
    assert open_dataset(tmp_path, class_names=["normal", "pneumonia"]).labels().tolist() == [1, 0]


def test_two_class_folders_of_one_class_are_refused(tmp_path):
    """"normal/" and "0/" (class normal's index) were pooled as normal without a word."""
    for folder in ("normal", "0", "pneumonia"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "x.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=f"^{tmp_path}/0 and {tmp_path}/normal: two folders of class 'normal' "):
        open_dataset(tmp_path, class_names=["normal", "pneumonia"])
    assert len(open_dataset(tmp_path)) == 3  # unlabelled (compare, calibration): the folders are only images


def test_imagefolder_entries_that_cannot_be_read_are_samples_that_fail_to_decode(tmp_path):
    from medmamba_edge.runtime.decode import ImageError

    (tmp_path / "normal").mkdir(), (tmp_path / "pneumonia").mkdir()
    cv2.imwrite(str(tmp_path / "normal" / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "normal" / "dangling.png").symlink_to("missing.png")
    os.mkfifo(tmp_path / "pneumonia" / "pipe.png")  # reading it would wait for a writer forever
    (tmp_path / "pneumonia" / "._a.png").write_bytes(b"macOS metadata: left out, not reported")
    (tmp_path / "pneumonia" / "sub").mkdir()  # a class folder's sub-folders hold its images too, as torchvision's
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pneumonia" / "c.gif")  # no image to an ImageFolder
    cv2.imwrite(str(tmp_path / "pneumonia" / "sub" / "b.png"), np.zeros((8, 8), np.uint8))
    data = open_dataset(tmp_path, class_names=["normal", "pneumonia"])
    assert [(s.source[len(str(tmp_path)) + 1:], s.label) for s in data.samples] == [
        ("normal/a.png", 0), ("normal/dangling.png", 0), ("pneumonia/pipe.png", 1), ("pneumonia/sub/b.png", 1)]
    assert data.image(0).shape == (8, 8)
    with pytest.raises(ImageError, match=r"dangling\.png: a dangling symbolic link \(to missing\.png\)"):
        data.image(1)
    with pytest.raises(ImageError, match=r"pipe\.png: not a regular file \(a FIFO, socket or device\), not read"):
        data.image(2)


def test_a_csv_row_csv_cannot_read_is_one_line(tmp_path):
    """A field over csv's 128 KiB limit raised _csv.Error through evaluate (and on Python 3.10, JetPack 6's, so did a
    NUL anywhere)."""
    (tmp_path / "big.csv").write_text("a.png,normal\n\"" + "x" * 200_000 + "\",normal\n")
    with pytest.raises(DatasetError, match=r"big\.csv:2: not a CSV row \(field larger than field limit"):
        open_dataset(tmp_path / "big.csv", class_names=["normal", "pneumonia"])


def test_a_split_given_for_data_without_splits_is_refused(tmp_path):
    """`evaluate --data folder/ --split test` ran on the whole folder without a word."""
    (tmp_path / "normal").mkdir()
    cv2.imwrite(str(tmp_path / "normal" / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "list.csv").write_text("normal/a.png,normal\n")
    for data in (tmp_path, tmp_path / "list.csv"):
        with pytest.raises(DatasetError, match=r"--split test applies to a MedMNIST \.npz; a folder or a CSV has no "):
            open_dataset(data, split="test", class_names=["normal"])
        assert len(open_dataset(data, class_names=["normal"])) == 1
    np.savez(tmp_path / "d.npz", val_images=np.zeros((2, 8, 8), np.uint8), train_images=np.zeros((3, 8, 8), np.uint8))
    assert len(open_dataset(tmp_path / "d.npz")) == 2 and len(open_dataset(tmp_path / "d.npz", default_split="train")) == 3


def test_a_csv_row_naming_a_fifo_fails_alone_and_one_unexpected_error_does_not_end_the_set(tmp_path, monkeypatch):
    """A FIFO named by a CSV row hung evaluate (reading it waits for a writer); a malformed DICOM header raised a
    ValueError that ended evaluate with a traceback, the other images never evaluated."""
    from medmamba_edge.runtime import datasets

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    os.mkfifo(tmp_path / "pipe.png")
    cv2.imwrite(str(tmp_path / "b.png"), np.full((8, 8), 9, np.uint8))
    (tmp_path / "data.csv").write_text("path,label\na.png,normal\npipe.png,normal\nb.png,pneumonia\n")
    data = open_dataset(tmp_path / "data.csv", class_names=["normal", "pneumonia"])
    real_read = datasets.read_single_image

    def read(path):  # b.png's decoder fails as nothing should: a bug, reported as one
        if path.endswith("b.png"):
            raise ValueError("boom")
        return real_read(path)

    monkeypatch.setattr(datasets, "read_single_image", read)
    (chunk,) = data.prepared(8, lambda image: image.shape)
    assert chunk.indices == [0] and chunk.items == [(8, 8)]
    assert [f.reason for f in chunk.failures] == [
        f"{tmp_path / 'pipe.png'}: not a regular file (a FIFO, socket or device), not read",
        f"{tmp_path / 'b.png'}: unexpected ValueError: boom"]
