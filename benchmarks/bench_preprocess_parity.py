"""Preprocessing options against train.py's PIL transform on real BUSI images and the RSNA DICOM.

For each resize option: the largest pixel difference from PIL's ``Resize((H, W))`` (in 8-bit levels),
the largest logit difference and the top-1 agreement through the official MedMamba-T (PyTorch, so the
model adds no error of its own), and the time per 256×256 BUSI image and for the 1024×1024 DICOM, apart (one
mean over both would be neither). Needs ../shared and torch.

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

from medmamba_edge.errors import UserError
from medmamba_edge.loaders import open_model
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.preprocess import resize_like_pil

from common import at_least  # benchmarks/common.py, beside this script

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
    parser.add_argument("--images", type=at_least(1), default=120, help="BUSI images, spread over the data set")
    parser.add_argument("--size", type=at_least(1), default=32)
    args = parser.parse_args()
    try:
        backend = open_model(SHARED / "models/medmamba_t_pneumoniamnist32/medmamba_t_pneumoniamnist32.pth",
                             input_size=args.size)
    except UserError as exc:  # a --size the model cannot take
        parser.error(str(exc))
    meta = backend.metadata
    paths = sorted((SHARED / "data/busi").rglob("*.png"))
    busi = [read_image(p) for p in paths[:: max(1, len(paths) // args.images)][: args.images]]
    dicom = np.repeat(pydicom.dcmread(SHARED / "data/dicom/chest_xray_rsna.dcm").pixel_array[:, :, None], 3, axis=2)
    mean, std = np.float32(meta.mean[0]), np.float32(meta.std[0])

    def batch(resize) -> tuple[np.ndarray, np.ndarray, float, float]:
        def one(image):
            return resize(image, args.size, args.size).reshape(args.size, args.size, -1)

        started = time.perf_counter()
        pixels = [one(im) for im in busi]
        busi_s = (time.perf_counter() - started) / len(busi)
        dicom_s = float("inf")
        for _ in range(3):  # a single image: the best of a few runs, not one run's first-call costs
            started = time.perf_counter()
            dicom_pixels = one(dicom)
            dicom_s = min(dicom_s, time.perf_counter() - started)
        pixels = np.stack(pixels + [dicom_pixels])
        inputs = ((pixels.astype(np.float32) / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
        return pixels, backend.run(np.ascontiguousarray(inputs)), busi_s, dicom_s

    ref_pixels, ref_logits, _, _ = batch(pil_resize)
    print(f"{len(busi)} BUSI images (256×256) + the RSNA DICOM (1024×1024) → {args.size}×{args.size}, official "
          f"MedMamba-T (PyTorch), on {describe_cpu()}")
    print(f"{'option':34} {'max |Δpixel|':>13} {'max |Δlogit|':>13} {'top-1 agree':>12} {'ms/BUSI image':>14} "
          f"{'ms DICOM':>9}")
    for name, resize in OPTIONS.items():
        pixels, logits, busi_s, dicom_s = batch(resize)
        dpix = int(np.abs(pixels.astype(int) - ref_pixels).max())
        dlog = float(np.abs(logits - ref_logits).max())
        agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
        print(f"{name:34} {dpix:>13d} {dlog:>13.2e} {agree:>11.1%} {busi_s * 1e3:>14.2f} {dicom_s * 1e3:>9.2f}")


if __name__ == "__main__":
    main()
