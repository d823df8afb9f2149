"""The one preprocessing function: decoded image → model input, as the model's metadata says.

It reproduces the official ``train.py`` validation transform (PIL ``Resize((H, W))``, ``ToTensor``,
``Normalize(mean, std)``) with numpy, so the runtime needs neither torch nor PIL, and a deployed model
sees the pixels it was validated on. OpenCV's INTER_AREA / INTER_LINEAR are not PIL's antialiased
bilinear filter: they move pixels by tens of 8-bit levels and change a few percent of the predictions on
real images, while the separable triangle filter below matches PIL bit for bit on 8-bit images (figures in
docs/runtime.md, "Preprocessing parity with training").
"""

from __future__ import annotations

import functools
import math

import numpy as np

from medmamba_edge.errors import plural

from .decode import ImageError
from .metadata import ModelMetadata

# Pillow's fixed-point format for 8-bit resampling (libImaging/Resample.c): 32 bits − 8 for the pixel − 2.
PRECISION_BITS = 32 - 8 - 2


def to_model_channels(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) RGB(A) → (H, W, in_chans); alpha is dropped as PIL's convert("RGB") does."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an (H, W) or (H, W, 1|3|4) image, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == in_chans:
        return image
    if image.shape[2] == 1:
        return np.repeat(image, in_chans, axis=2)
    if in_chans == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
        if image.dtype == np.uint8:  # in PIL's 16-bit fixed point, bit for bit (rounded floats missed 27 of 65536)
            rgb = image.astype(np.uint32)
            return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(
                np.uint8)[:, :, None]
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        luma = image.astype(np.float32) @ weights
        return (luma if image.dtype == np.float32 else luma.round().astype(image.dtype))[:, :, None]
    raise ImageError(f"cannot turn a {image.shape[2]}-channel image into {plural(in_chans, 'channel')}")


@functools.lru_cache(maxsize=64)
def triangle_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` for its bilinear (triangle) filter along one axis, in the same double
    arithmetic: for each output pixel, ``taps`` input indices, their float weights, and the weights in
    Pillow's 8-bit fixed point. The filter widens with the shrink factor, which is PIL's antialiasing."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle's support is 1, scaled
    taps = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int) truncation, then clamp
    count = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    positions = first[:, None] + offsets
    weights = np.clip(1.0 - np.abs((positions - centers[:, None] + 0.5) * (1.0 / filterscale)), 0.0, None)
    weights[offsets >= count[:, None]] = 0.0
    # Pillow sums the weights in order; accumulate does too, where sum() would pair them up and could
    # differ in the last bit, which can flip a fixed-point rounding.
    total = np.add.accumulate(weights, axis=1)[:, -1:]
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    fixed = np.trunc(weights * (1 << PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    # Taps past the edge carry weight 0; clamping keeps their gather in bounds.
    return np.minimum(positions, in_size - 1), weights.astype(np.float32), fixed


def _resample_rows(image: np.ndarray, out_size: int) -> np.ndarray:
    """One separable pass along axis 0 of an (N, M, C) image, where each tap gathers whole rows (contiguous
    copies). uint8 runs in Pillow's fixed point and rounds to uint8 as Pillow does between its passes;
    float32 stays float."""
    index, weights, fixed = triangle_weights(image.shape[0], out_size)
    integer = image.dtype == np.uint8
    taps_weights = (fixed if integer else weights)[:, :, None, None]
    acc = np.full((out_size,) + image.shape[1:], 1 << (PRECISION_BITS - 1) if integer else 0,
                  dtype=np.int32 if integer else np.float32)
    term = np.empty_like(acc)
    for tap in range(index.shape[1]):
        np.multiply(image[index[:, tap]], taps_weights[:, tap], out=term)
        acc += term
    if integer:
        return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return acc


def resize_like_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's ``Image.resize((width, height), BILINEAR)`` of an (H, W, C) uint8 or float32 image: the
    horizontal pass first, then the vertical one, each skipped when that side keeps its size. The
    horizontal pass runs on the transposed image so that both passes gather rows (~1.5× faster)."""
    if image.shape[1] != width:
        image = np.ascontiguousarray(_resample_rows(np.ascontiguousarray(image.transpose(1, 0, 2)), width).transpose(1, 0, 2))
    if image.shape[0] != height:
        image = _resample_rows(image, height)
    return image


@functools.lru_cache(maxsize=16)
def _uint8_lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) table of ``(v / 255 − mean) / std`` in float32, the operations ToTensor and Normalize do."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    return ((values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]).astype(np.float32)


PIXEL_TYPES = (np.uint8, np.uint16, np.float32)  # float32: in [0, 1], as DICOM after windowing


def pixels_problem(pixels: np.ndarray) -> str | None:
    """Why preprocess cannot take these pixels (an image or a stack of them), as words after their name, or None:
    a type of no known scale, no pixels, or float32 outside 0..1 (0..255 in float32, an application's
    astype(np.float32), would be read 255 times too bright and classified all the same)."""
    if pixels.dtype not in PIXEL_TYPES:
        return f"has {pixels.dtype} pixels; expected uint8, uint16 or float32"
    if pixels.size == 0:
        return f"has no pixels (shape {pixels.shape})"
    if pixels.dtype == np.float32:
        low, high = pixels.min(), pixels.max()
        if not (0.0 <= low and high <= 1.0):  # NaN fails both
            return f"has float32 pixels from {low:g} to {high:g}; expected 0..1 (store 0..255 as uint8)"
    return None


def preprocess_one(image: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """One RGB (not OpenCV's BGR) or grayscale image, (H, W) or (H, W, 1|3|4) → float32 (C, H, W). uint8 follows
    train.py exactly; uint16 (scaled by 1/65535) and float32 in [0, 1] (DICOM after windowing) keep their precision
    through the resize. Other pixels are an ImageError (pixels_problem)."""
    if problem := pixels_problem(image):
        raise ImageError(f"the image {problem}")
    if image.dtype == np.uint16:
        image = image.astype(np.float32) * np.float32(1 / 65535)
    single = image.ndim == 2 or image.shape[2] == 1
    # A grayscale image is resized once and then replicated: the same result as PIL's convert("RGB") first.
    image = to_model_channels(image, 1 if single else metadata.in_chans)
    height, width = metadata.input_size
    resized = resize_like_pil(image, height, width)
    if resized.dtype == np.uint8:
        lookup = _uint8_lookup(tuple(metadata.mean), tuple(metadata.std))
        channels = [lookup[c, resized[:, :, 0 if single else c]] for c in range(metadata.in_chans)]
        return np.stack(channels)
    mean = np.asarray(metadata.mean, np.float32)[:, None, None]
    std = np.asarray(metadata.std, np.float32)[:, None, None]
    planes = np.broadcast_to(resized.transpose(2, 0, 1), (metadata.in_chans, height, width))
    return (planes - mean) / std


def preprocess(images: list[np.ndarray], metadata: ModelMetadata) -> np.ndarray:
    """RGB or grayscale uint8/uint16/float32 images of any size → float32 (N, C, H, W) batch."""
    height, width = metadata.input_size
    batch = np.empty((len(images), metadata.in_chans, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess_one(image, metadata)
    return batch
