"""The one preprocessing function: decoded image → model input, as the model's metadata says.

It reproduces the official ``train.py`` validation transform (PIL ``Resize((H, W))``, ``ToTensor``,
``Normalize(mean, std)``) with numpy, so the runtime needs neither torch nor PIL, and a deployed model
sees the pixels it was validated on. OpenCV's INTER_AREA / INTER_LINEAR are not PIL's antialiased
bilinear filter: on BUSI images at 32×32 they move pixels by up to ~20/255 and logits by ~1e-1, while
the separable triangle filter below matches PIL bit for bit on 8-bit images (docs/runtime.md).
"""

from __future__ import annotations

import functools
import math
import re
import struct
from contextlib import contextmanager

import cv2
import numpy as np

from medmamba_edge.errors import UserError
from medmamba_edge.runtime.metadata import ModelMetadata

# Pillow's fixed-point format for 8-bit resampling (libImaging/Resample.c): 32 bits − 8 for the pixel − 2.
PRECISION_BITS = 32 - 8 - 2


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded or used."""


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
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        luma = image.astype(np.float32) @ weights
        return (luma if image.dtype == np.float32 else luma.round().astype(image.dtype))[:, :, None]
    raise ImageError(f"cannot turn a {image.shape[2]}-channel image into {in_chans} channels")


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


def preprocess_one(image: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """One RGB or grayscale image → float32 (C, H, W). uint8 follows train.py exactly; uint16 (scaled by
    1/65535) and float32 in [0, 1] (DICOM after windowing) keep their precision through the resize."""
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        raise ImageError(f"expected uint8, uint16 or float32 pixels, got {image.dtype}")
    if metadata.resize != "bilinear":
        raise ImageError(f"resize {metadata.resize!r} is not supported (only PIL's bilinear, as train.py)")
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


@contextmanager
def quiet_opencv():
    """Silence OpenCV's own WARN lines (a truncated PNG, a missing camera): our errors say it in one line."""
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


# The file suffixes read_image reads as images (by OpenCV), wherever images are looked for: `run`'s folders
# and globs, data sets for evaluate and quantize, the bundled samples.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

# The most pixels an image is decoded with. 64 megapixels (8192 × 8192; 192 MB as 8-bit RGB) is far more
# than any model input needs and more than radiographs have (a full-field mammogram is ≈ 14 MP), while a
# header declaring 20000 × 20000 would cost ~30 s and gigabytes before the model sees 224 × 224 of it.
# JPEG over the limit is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, no full-size buffer);
# other formats over it are refused with the reason. Images within it decode exactly as before.
MAX_IMAGE_PIXELS = 8192 * 8192
_REDUCED = {(False, 2): cv2.IMREAD_REDUCED_COLOR_2, (False, 4): cv2.IMREAD_REDUCED_COLOR_4,
            (False, 8): cv2.IMREAD_REDUCED_COLOR_8, (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _jpeg_header(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, grayscale) from a JPEG's start-of-frame segment."""
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height, data[i + 9] == 1
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def image_header(data: bytes) -> tuple[str, int, int, bool] | None:
    """(format, width, height, grayscale) as a PNG, JPEG or BMP header declares them, without decoding;
    None for other formats (their size is checked after decoding)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height, data[25] in (0, 4)
    if data.startswith(b"BM") and len(data) >= 26 and struct.unpack("<I", data[14:18])[0] >= 40:
        width, height = struct.unpack("<ii", data[18:26])
        return "BMP", abs(width), abs(height), False
    if data.startswith(b"\xff\xd8"):
        header = _jpeg_header(data)
        return ("JPEG", *header) if header else None
    return None


def _over_limit(path, width: int, height: int, kind: str, note: str = "") -> ImageError:
    return ImageError(f"{path}: a {width}×{height} {kind} ({width * height / 1e6:.1f} megapixels) is over the limit of "
                      f"{MAX_IMAGE_PIXELS:,} pixels (preprocess.MAX_IMAGE_PIXELS){note}; downscale it first")


def read_image(path) -> np.ndarray:
    """Decode an image file to RGB (or grayscale) uint8/uint16, keeping its bit depth. Over
    ``MAX_IMAGE_PIXELS`` a JPEG is decoded reduced and anything else refused (see the constant)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    flags = cv2.IMREAD_UNCHANGED
    header = image_header(data[:65536].tobytes())
    if header and header[1] * header[2] > MAX_IMAGE_PIXELS:
        kind, width, height, gray = header
        factor = next((f for f in (2, 4, 8) if kind == "JPEG" and width * height <= MAX_IMAGE_PIXELS * f * f), None)
        if factor is None:
            raise _over_limit(path, width, height, kind, " even at 1/8 scale" if kind == "JPEG"
                              else "; only JPEG is decoded reduced")
        flags = _REDUCED[gray, factor]
    try:
        with quiet_opencv():
            image = cv2.imdecode(data, flags)
    except cv2.error as exc:  # OpenCV's own checks (its 2^30-pixel limit, a corrupt header): this file only
        detail = re.search(r"error: \(.*?\) (.*)", str(exc))
        detail = detail.group(1) if detail else str(exc).strip()
        raise ImageError(f"{path}: OpenCV cannot decode it ({detail})") from None
    if image is None:
        raise ImageError(f"{path}: not a decodable image (corrupt, truncated or unsupported format)")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:  # a format whose header we do not read (TIFF, WebP)
        raise _over_limit(path, image.shape[1], image.shape[0], "image")
    if image.dtype not in (np.uint8, np.uint16):  # 32-bit TIFF, float EXR: no defined mapping to the model's range
        raise ImageError(f"{path}: {image.dtype} pixels are not supported (8- or 16-bit images only)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image
