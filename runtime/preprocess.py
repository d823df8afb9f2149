"""The one preprocessing function: decoded image → model input, as the model's metadata says.

It reproduces the official ``train.py`` validation transform (PIL ``Resize((H, W))``, ``ToTensor``,
``Normalize(mean, std)``) with OpenCV and numpy, so the runtime needs neither torch nor PIL.
"""

from __future__ import annotations

import cv2
import numpy as np

from medmamba_edge.errors import UserError
from medmamba_edge.runtime.metadata import ModelMetadata


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
        return (image.astype(np.float32) @ weights)[:, :, None].round().astype(image.dtype)
    raise ImageError(f"cannot turn a {image.shape[2]}-channel image into {in_chans} channels")


def preprocess(images: list[np.ndarray], metadata: ModelMetadata) -> np.ndarray:
    """RGB or grayscale uint8/uint16 images of any size → float32 (N, C, H, W) batch."""
    height, width = metadata.input_size
    mean = np.asarray(metadata.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(metadata.std, dtype=np.float32)
    batch = np.empty((len(images), metadata.in_chans, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        if image.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"expected uint8 or uint16 pixels, got {image.dtype}")
        image = to_model_channels(image, metadata.in_chans)
        # PIL's bilinear resize antialiases when shrinking; INTER_AREA is OpenCV's equivalent there.
        shrinking = image.shape[0] > height or image.shape[1] > width
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        resized = resized.reshape(height, width, metadata.in_chans)
        scale = 1.0 / np.iinfo(image.dtype).max
        batch[i] = ((resized.astype(np.float32) * scale - mean) * inv_std).transpose(2, 0, 1)
    return batch


def read_image(path) -> np.ndarray:
    """Decode an image file to RGB (or grayscale) uint8/uint16, keeping its bit depth."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{path}: not a decodable image (corrupt, truncated or unsupported format)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image
