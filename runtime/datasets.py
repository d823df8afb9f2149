"""Labelled (or unlabelled) image collections, read the same way by quantize, evaluate and compare.

``open_dataset(spec)`` accepts:
- an ImageFolder directory (one sub-folder per class, as the official ``train.py`` expects),
- a plain folder of images (no labels),
- a MedMNIST-style ``.npz`` (``{split}_images``, ``{split}_labels``; ``split`` chooses which),
- a UTF-8 CSV of ``path,label`` rows (paths relative to the CSV; a header row is optional, see ``_is_header``).
Images are any format ``decode.read_image`` reads, or single-frame DICOM files (as ``run`` reads them).
Labels are mapped to the model's class names; a label the model does not know is an error.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from medmamba_edge.errors import UserError, plural

from .decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageError, read_single_image
from .files import is_special, strip_unless_named
from .metadata import int_at_least, positive_int
from .preprocess import pixels_problem
from .sources.base import item_error
from .sources.files import NOT_REGULAR, folder_files
from .uri import uri_refusal


class DatasetError(UserError):
    """A data set that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Sample:
    source: str  # a path, or "file.npz[val:12]"
    label: int | None  # index into the model's class names; None when unlabelled
    unreadable: str | None = None  # why listing found it cannot be read (a dangling link, a FIFO); not opened


@dataclass(frozen=True)
class Failure:
    """A sample left out, and why."""
    source: str
    reason: str  # one line that names the source


Prepared = TypeVar("Prepared")


@dataclass
class PreparedChunk(Generic[Prepared]):
    """One chunk of a data set: what ``prepare`` made of each usable image, and why the others were left out."""
    end: int  # one past the chunk's last sample index: how far through the data set it reaches
    indices: list[int] = field(default_factory=list)  # of the samples in ``items``, in order
    items: list[Prepared] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


@dataclass
class Dataset:
    description: str
    samples: list[Sample]
    _npz_images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        return all(s.label is not None for s in self.samples)

    def labels(self) -> np.ndarray:
        if not self.labelled:
            raise DatasetError(f"{self.description}: has no labels")
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def image(self, index: int) -> np.ndarray:
        """Decoded image or DICOM (RGB or grayscale, uint8/uint16/float32); raises ImageError for a broken file."""
        if self._npz_images is not None:
            return self._npz_images[index]
        sample = self.samples[index]
        if sample.unreadable:
            raise ImageError(f"{sample.source}: {sample.unreadable}")
        return read_single_image(sample.source)

    def subset(self, indices: Sequence[int]) -> Dataset:
        images = self._npz_images[list(indices)] if self._npz_images is not None else None
        return Dataset(self.description, [self.samples[i] for i in indices], images)

    def sample(self, count: int | None, seed: int = 0) -> Dataset:
        """A deterministic random subset of ``count`` samples (all of them when count is None or larger)."""
        order = self.sample_order(count, seed)
        if count is None or count >= len(self):
            return self
        return self.subset(order[:count])

    def sample_order(self, count: int | None, seed: int = 0) -> list[int]:
        """Every sample index: first the ``count`` that ``sample(count, seed)`` draws, sorted, then the others in the
        random order that draws them, where more are drawn to replace images that cannot be used."""
        if count is not None and not positive_int(count):  # 2.5 was a TypeError in slicing
            raise DatasetError(f"--num-samples must be >= 1, got {count}")
        if not int_at_least(seed, 0):
            raise DatasetError(f"--seed must be >= 0, got {seed}")
        if count is None or count >= len(self):
            return list(range(len(self)))
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(self))]
        return sorted(order[:count]) + order[count:]

    def prepared(self, size: int, prepare: Callable[[np.ndarray], Prepared]) -> Iterator[PreparedChunk[Prepared]]:
        """The samples ``size`` at a time, each image decoded and passed to ``prepare`` on its own, so that one
        unusable image (a broken file, two channels: an ImageError) is left out alone, with its reason; anything
        else one image raises too, named as unexpected (a bug is reported, never hidden, as run's records do)."""
        for start in range(0, len(self), size):
            chunk = PreparedChunk[Prepared](end=min(start + size, len(self)))
            for i in range(start, chunk.end):
                try:
                    item = prepare(self.image(i))
                except Exception as exc:  # one file's problem, as run's records have it: the others are still read
                    source, reason = self.samples[i].source, item_error(self.samples[i].source, exc)
                    # Decoding names the file; preprocessing (a channel count it cannot map) does not.
                    chunk.failures.append(Failure(source, reason if reason.startswith(source) else f"{source}: {reason}"))
                    continue
                chunk.indices.append(i)
                chunk.items.append(item)
            yield chunk


def _label_index(label: str, class_names: Sequence[str], where: str) -> int:
    if label in class_names:
        return list(class_names).index(label)
    # ASCII digits only: "²".isdigit() holds, yet int() refuses it, and int("١") is 1.
    if label.isascii() and label.isdigit() and int(label) < len(class_names):
        return int(label)
    raise DatasetError(f"{where}: label {label!r} is not one of the model's classes {list(class_names)}")


def _image_samples(folder: Path, label: int | None, recursive: bool) -> list[Sample]:
    """The images in ``folder`` (and below it if ``recursive``), as ``run`` lists them: what cannot be read (a
    dangling link, a FIFO) is a sample that fails to decode, so it is reported. Hidden files and folders are left
    out, not reported: macOS copies a '._' metadata file beside every image."""
    samples = []
    for entry in folder_files(folder, recursive=recursive):
        path, unreadable = entry if isinstance(entry, tuple) else (entry, None)
        if not path.name.startswith("."):
            samples.append(Sample(str(path), label, unreadable))
    return samples


def _same_files(samples: list[Sample]) -> Iterator[tuple[int, int]]:
    """(earlier, later) indices of samples that are one file, by device and inode: through a link, a hard link or
    another spelling of its path. One that cannot be opened is left to fail when it is decoded."""
    first_seen: dict[tuple[int, int], int] = {}
    for index, sample in enumerate(samples):
        if sample.unreadable is not None:
            continue
        try:
            info = os.stat(sample.source)
        except OSError:
            continue
        first = first_seen.setdefault((info.st_dev, info.st_ino), index)
        if first != index:
            yield first, index


def _from_folder(path: Path, class_names: Sequence[str] | None) -> Dataset:
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        # As torchvision's ImageFolder (the official train.py's loader): a class folder's images are every image in
        # it and below it (os.walk), and images beside the class folders would be left out without a word.
        loose = _image_samples(path, None, recursive=False)
        if loose:
            raise DatasetError(f"{path}: {plural(len(loose), 'image')} beside its class folders "
                               f"(e.g. {Path(loose[0].source).name}); "
                               f"an ImageFolder's images go in its class folders")
        samples, class_folders = [], {}
        for folder in subfolders:
            label = _label_index(folder.name, class_names, str(folder)) if class_names else None
            # A class named twice ("normal/" and "0/") would silently pool two folders' images under it.
            if label is not None and class_folders.setdefault(label, folder) != folder:
                raise DatasetError(f"{class_folders[label]} and {folder}: two folders of class {class_names[label]!r} "
                                   f"(a class folder is named by the class or by its index); put its images in one")
            found = _image_samples(folder, label, recursive=True)
            if not found:
                raise DatasetError(f"{folder}: a class folder without images (in it or below it)")
            samples += found
        # An image reached from two class folders (through a link from one to the other, or to the data set's top;
        # followed as torchvision's ImageFolder follows it) would be evaluated under both labels, right once and
        # wrong once. A link within a class stays two samples, as torchvision counts it.
        for a, b in _same_files(samples) if class_names else ():
            first, again = samples[a], samples[b]
            if first.label != again.label:
                raise DatasetError(f"{first.source} and {again.source}: one image in class folders "
                                   f"{class_names[first.label]!r} and {class_names[again.label]!r} (through a link); "
                                   f"an image has one class")
        kind = "ImageFolder"
    else:
        samples = _image_samples(path, None, recursive=False)
        kind = "folder"
    if not samples:
        raise DatasetError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)} "
                           f"and DICOM files without a suffix)")
    return Dataset(f"{path} ({kind}, {plural(len(samples), 'image')})", samples)


def _read_npz_split(path: Path, split: str, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The split's arrays, read in full now: an npz reads each member lazily, so a truncated, CRC-corrupt or
    pickled member would otherwise fail at first use, deep inside quantize or evaluate. ``labelled``: its labels
    are required."""
    key, labels_key = f"{split}_images", f"{split}_labels"
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load's error for any other bytes names allow_pickle
        raise DatasetError(f"{path}: not a readable .npz (not a zip archive, as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            # Without a split to name, what it does hold: "it has []" told nothing of an npz of images/labels.
            expected = (f"expected {key} and {labels_key} (MedMNIST's names); it holds "
                        f"{', '.join(data.files) or 'no arrays'}")
            if key not in data.files:
                splits = sorted(k[: -len("_images")] for k in data.files if k.endswith("_images"))
                raise DatasetError(f"{path}: no split {split!r}; {f'it has {splits}' if splits else expected}")
            if labelled and labels_key not in data.files:
                raise DatasetError(f"{path}: split {split!r} has no labels; {expected}")
            images = data[key]
            labels = data[labels_key] if labelled else None
    # EOFError (an empty file) must not escape: click turns it into a bare "Aborted.".
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = "it holds object arrays, which would need pickle" if "allow_pickle" in str(exc) else exc
        raise DatasetError(f"{path}: not a readable .npz ({reason})") from None
    return images, labels


def _from_npz(path: Path, split: str, class_names: Sequence[str] | None) -> Dataset:
    images, labels = _read_npz_split(path, split, labelled=class_names is not None)
    where = f"{path}: {split}_images"
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)) or 0 in images.shape[1:]:
        raise DatasetError(f"{where} has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3|4)")
    if len(images) == 0:
        raise DatasetError(f"{path}: split {split!r} is empty")
    if problem := pixels_problem(images):  # what preprocess() takes, checked for the whole split at once
        raise DatasetError(f"{where} {problem}")
    if labels is not None:  # what needs no labels (calibration, compare) reads the images alone, whatever they hold
        labels = _npz_labels(labels, len(images), f"{path}: {split}_labels", class_names)
    samples = [Sample(f"{path.name}[{split}:{i}]", None if labels is None else int(labels[i])) for i in range(len(images))]
    return Dataset(f"{path} ({split} split, {plural(len(samples), 'image')})", samples, images)


def _npz_labels(labels: np.ndarray, count: int, where: str, class_names: Sequence[str] | None) -> np.ndarray:
    """MedMNIST stores (N, 1) integer labels; the first column is the class index."""
    if labels.dtype.kind not in "iu" or labels.ndim not in (1, 2) or len(labels) != count or labels.size < count:
        raise DatasetError(f"{where}: expected {count} integer class indices, got {labels.dtype} of shape {labels.shape}")
    if labels.ndim == 2 and labels.shape[1] != 1:  # ChestMNIST's 14 findings per image
        raise DatasetError(f"{where}: {labels.shape[1]} label columns (multi-label?); expected one class index per "
                           f"image")
    labels = labels.reshape(count)
    if labels.min() < 0:
        raise DatasetError(f"{where}: label {int(labels.min())} is negative")
    if class_names is not None and labels.max() >= len(class_names):
        raise DatasetError(f"{where}: label {int(labels.max())} is outside the model's {len(class_names)} classes")
    return labels


def _is_header(row: list[str], folder: Path) -> bool:
    """Whether a CSV's first row names its columns (``path,label``, ``file,class``, ``image,…``): a file that is
    really called ``image`` (a DICOM file without a suffix) is a sample all the same."""
    name = row[0].strip()
    return name.lower() in ("path", "file", "image") and not (folder / name).is_file()


def _from_csv(path: Path, class_names: Sequence[str] | None) -> Dataset:
    # Excel starts a UTF-8 CSV with a byte-order mark, which would otherwise hide the header.
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                           f"save the CSV as UTF-8") from None
    if "\0" in text:  # no file name or label holds one (Python 3.10's csv refuses it, 3.11's passes it to the OS)
        raise DatasetError(f"{path}:{text.count(chr(10), 0, text.index(chr(0))) + 1}: holds a NUL character")
    samples, lines = [], []  # lines: where each sample's row ends
    rows = csv.reader(io.StringIO(text, newline=""))
    for count in itertools.count(1):
        try:
            row = next(rows, None)
        except csv.Error as exc:  # a field over csv's limit (128 KiB), …
            raise DatasetError(f"{path}:{rows.line_num}: not a CSV row ({exc})") from None
        if row is None:
            break
        line = rows.line_num  # where the row ends (a quoted field may hold line breaks)
        if not row or (count == 1 and _is_header(row, path.parent)):
            continue
        if len(row) < 2 and class_names is not None:
            raise DatasetError(f"{path}:{line}: expected 'path,label'")
        # Named as listed from the CSV's real folder: resolved, a link into a hashed store was reported by its
        # target's name; joined as text (abspath), "../images" left a linked folder the wrong way.
        image = path.parent.resolve() / strip_unless_named(row[0], path.parent)
        label = _label_index(row[1].strip(), class_names, f"{path}:{line}") if class_names and len(row) > 1 else None
        samples.append(Sample(str(image), label, NOT_REGULAR if is_special(image) else None))
        lines.append(line)
    if not samples:
        raise DatasetError(f"{path}: no rows")
    # An image on two rows is read twice: evaluated under two labels right once and wrong once, or under one (and in
    # compare, in calibration) counted double. A CSV has no torchvision reading to keep; a repeated row is a
    # listing's mistake, labelled or not.
    if pair := next(_same_files(samples), None):
        a, b = pair
        first, again = samples[a], samples[b]
        spelt = "" if first.source == again.source else f" ({first.source})"
        if first.label != again.label:
            raise DatasetError(f"{path}:{lines[b]}: {again.source} labelled {class_names[again.label]!r}, the image "
                               f"line {lines[a]} labels {class_names[first.label]!r}{spelt}; an image has one class")
        raise DatasetError(f"{path}:{lines[b]}: {again.source} again, the image of line {lines[a]}{spelt}; an image "
                           f"is listed once")
    return Dataset(f"{path} (CSV, {plural(len(samples), 'image')})", samples)


def open_dataset(spec: str | Path, split: str | None = None, class_names: Sequence[str] | None = None, *,
                 default_split: str = "val", command: str = "medmamba-edge", split_option: str = "--split") -> Dataset:
    """``split``: a .npz's, ``default_split`` if None; given for a folder or a CSV, which have none, it is refused
    (ignored, the run would read other images than asked for), naming ``split_option``, the option it came from.
    ``command`` (quantize, evaluate, compare) is named where ``spec`` is a URI: a data set is read from a local file
    or folder only."""
    if problem := uri_refusal(spec, command, "a local data set (file or folder)"):
        raise DatasetError(problem)
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if split is not None and (path.is_dir() or suffix != ".npz"):
        raise DatasetError(f"{path}: {split_option} {split} applies to a MedMNIST .npz; a folder or a CSV has no "
                           f"splits")
    if path.is_dir():
        return _from_folder(path, class_names)
    if suffix == ".npz":
        return _from_npz(path, split or default_split, class_names)
    if suffix == ".csv":
        return _from_csv(path, class_names)
    raise DatasetError(f"{path}: expected an image folder, a .npz or a .csv")
