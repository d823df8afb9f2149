"""Regenerate the sample images bundled in medmamba_edge/assets/samples/ from ../shared.

The selection is a fixed rule, not a pick of images the model gets right:

* PneumoniaMNIST: the first 3 normal and the first 3 pneumonia images of the val split, saved unchanged
  (28×28, 8-bit grayscale) as ``val_<index>_<label>.png``.
* BUSI: ``<class> (1).png`` of each class, downscaled from 256×256 to 128×128 with cv2.INTER_AREA to keep
  the repository light, saved as ``<class>_1.png``.

    python examples/make_samples.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA_LABELS = ("normal", "pneumonia")
PER_CLASS = 3
BUSI_CLASSES = ("benign", "malignant", "normal")
BUSI_NUMBER = 1
BUSI_SIZE = 128


def write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def pneumoniamnist_samples(npz: Path, out: Path) -> None:
    data = np.load(npz)
    images, labels = data["val_images"], data["val_labels"].ravel()
    out.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(PNEUMONIA_LABELS):
        for index in np.flatnonzero(labels == label)[:PER_CLASS]:
            write_png(out / f"val_{index:04d}_{name}.png", images[index])


def busi_samples(busi: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in BUSI_CLASSES:
        source = busi / name / f"{name} ({BUSI_NUMBER}).png"
        # IMREAD_UNCHANGED keeps the file's own layout (3 equal channels in this release).
        image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise FileNotFoundError(f"cannot read {source}")
        small = cv2.resize(image, (BUSI_SIZE, BUSI_SIZE), interpolation=cv2.INTER_AREA)
        write_png(out / f"{name}_{BUSI_NUMBER}.png", small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "medmamba_edge/assets/samples")
    args = parser.parse_args()
    pneumoniamnist_samples(args.shared / "data/pneumoniamnist/pneumoniamnist_trainval.npz",
                           args.out / "pneumoniamnist")
    busi_samples(args.shared / "data/busi", args.out / "busi")


if __name__ == "__main__":
    main()
