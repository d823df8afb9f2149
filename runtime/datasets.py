"""Labelled (or unlabelled) image collections, read the same way by quantize, evaluate and compare.

``open_dataset(spec)`` accepts:
- an ImageFolder directory (one sub-folder per class, as the official ``train.py`` expects),
- a plain folder of images (no labels),
- a MedMNIST-style ``.npz`` (``{split}_images``, ``{split}_labels``; ``split`` chooses which),
- a CSV of ``path,label`` rows (paths relative to the CSV; a header row is optional).
Labels are mapped to the model's class names; a label the model does not know is an error.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmamba_edge.errors import UserError
from medmamba_edge.runtime.preprocess import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class DatasetError(UserError):
    """A data set that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Sample:
    source: str  # a path, or "file.npz[val:12]"
    label: int | None  # index into the model's class names; None when unlabelled


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
        """Decoded image (RGB or grayscale, uint8/uint16); raises ImageError for a broken file."""
        if self._npz_images is not None:
            return self._npz_images[index]
        return read_image(self.samples[index].source)

    def subset(self, indices: Sequence[int]) -> Dataset:
        images = self._npz_images[list(indices)] if self._npz_images is not None else None
        return Dataset(self.description, [self.samples[i] for i in indices], images)

    def sample(self, count: int | None, seed: int = 0) -> Dataset:
        """A deterministic random subset of ``count`` samples (all of them when count is None or larger)."""
        if count is None or count >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))[:count]
        return self.subset(sorted(int(i) for i in order))

    def batches(self, size: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        for start in range(0, len(self), size):
            indices = list(range(start, min(start + size, len(self))))
            yield indices, [self.image(i) for i in indices]


def _label_index(label: str, class_names: Sequence[str], where: str) -> int:
    if label in class_names:
        return list(class_names).index(label)
    if label.isdigit() and int(label) < len(class_names):
        return int(label)
    raise DatasetError(f"{where}: label {label!r} is not one of the model's classes {list(class_names)}")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(path: Path, class_names: Sequence[str] | None) -> Dataset:
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        samples = []
        for folder in subfolders:
            label = _label_index(folder.name, class_names, str(folder)) if class_names else None
            samples += [Sample(str(f), label) for f in _image_files(folder)]
        kind = "ImageFolder"
    else:
        samples = [Sample(str(f), None) for f in _image_files(path)]
        kind = "folder"
    if not samples:
        raise DatasetError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return Dataset(f"{path} ({kind}, {len(samples)} images)", samples)


def _from_npz(path: Path, split: str, class_names: Sequence[str] | None) -> Dataset:
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz ({exc})") from None
    key = f"{split}_images"
    if key not in data:
        splits = sorted(k[: -len("_images")] for k in data.files if k.endswith("_images"))
        raise DatasetError(f"{path}: no split {split!r}; it has {splits}")
    images = data[key]
    labels = data[f"{split}_labels"].reshape(len(images), -1)[:, 0] if f"{split}_labels" in data else None
    if labels is not None and class_names is not None and labels.max(initial=0) >= len(class_names):
        raise DatasetError(f"{path}: label {int(labels.max())} is outside the model's {len(class_names)} classes")
    samples = [Sample(f"{path.name}[{split}:{i}]", None if labels is None else int(labels[i])) for i in range(len(images))]
    if not samples:
        raise DatasetError(f"{path}: split {split!r} is empty")
    return Dataset(f"{path} ({split} split, {len(samples)} images)", samples, images)


def _from_csv(path: Path, class_names: Sequence[str] | None) -> Dataset:
    samples = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (line == 1 and row[0].strip().lower() in ("path", "file", "image")):
                continue
            if len(row) < 2 and class_names is not None:
                raise DatasetError(f"{path}:{line}: expected 'path,label'")
            image = (path.parent / row[0].strip()).resolve()
            label = _label_index(row[1].strip(), class_names, f"{path}:{line}") if class_names and len(row) > 1 else None
            samples.append(Sample(str(image), label))
    if not samples:
        raise DatasetError(f"{path}: no rows")
    return Dataset(f"{path} (CSV, {len(samples)} images)", samples)


def open_dataset(spec: str | Path, split: str = "val", class_names: Sequence[str] | None = None) -> Dataset:
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        return _from_folder(path, class_names)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, split, class_names)
    if suffix == ".csv":
        return _from_csv(path, class_names)
    raise DatasetError(f"{path}: expected an image folder, a .npz or a .csv")
