"""Preprocessing options against train.py's PIL transform on real BUSI images and the RSNA DICOM.

For each resize option: the largest pixel difference from PIL's ``Resize((H, W))`` (in 8-bit levels),
the largest logit difference and the top-1 agreement through the official MedMamba-T (PyTorch, so the
model adds no error of its own), and the time per 256×256 image. Needs ../shared and torch.

    python benchmarks/bench_preprocess_parity.py [--images 120] [--size 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image

from medmamba_edge.loaders import open_model
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.preprocess import resize_like_pil

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


OPTIONS = {
    "PIL (train.py reference)": pil_resize,
    "ours: triangle filter (numpy)": resize_like_pil,
    "cv2 INTER_AREA when shrinking": lambda im, h, w: cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA),
    "cv2 INTER_LINEAR": lambda im, h, w: cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    backend = open_model(SHARED / "models/medmamba_t_pneumoniamnist32/medmamba_t_pneumoniamnist32.pth",
                         input_size=args.size)
    meta = backend.metadata
    paths = sorted((SHARED / "data/busi").rglob("*.png"))
    images = [read_image(p) for p in paths[:: max(1, len(paths) // args.images)][: args.images]]
    images.append(np.repeat(pydicom.dcmread(SHARED / "data/dicom/chest_xray_rsna.dcm").pixel_array[:, :, None], 3, axis=2))
    mean, std = np.float32(meta.mean[0]), np.float32(meta.std[0])

    def batch(resize) -> tuple[np.ndarray, np.ndarray, float]:
        started = time.perf_counter()
        pixels = np.stack([resize(im, args.size, args.size).reshape(args.size, args.size, -1) for im in images])
        seconds = (time.perf_counter() - started) / len(images)
        inputs = ((pixels.astype(np.float32) / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
        return pixels, backend.run(np.ascontiguousarray(inputs)), seconds

    ref_pixels, ref_logits, _ = batch(pil_resize)
    print(f"{len(images)} real images (BUSI + RSNA DICOM) → {args.size}×{args.size}, official MedMamba-T (PyTorch), "
          f"on {describe_cpu()}")
    print(f"{'option':34} {'max |Δpixel|':>13} {'max |Δlogit|':>13} {'top-1 agree':>12} {'ms/image':>9}")
    for name, resize in OPTIONS.items():
        pixels, logits, seconds = batch(resize)
        dpix = int(np.abs(pixels.astype(int) - ref_pixels).max())
        dlog = float(np.abs(logits - ref_logits).max())
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
        print(f"{name:34} {dpix:>13d} {dlog:>13.2e} {agree:>11.1%} {seconds * 1e3:>9.2f}")


if __name__ == "__main__":
    main()
