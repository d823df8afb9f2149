"""Preprocessing parity with the official train.py validation transform, on real images.

The reference is what torchvision does, written with PIL + numpy (torchvision is not a dependency):
``Image.open(p).convert("RGB")`` → ``Resize((H, W))`` = ``img.resize((W, H), BILINEAR)`` → ``ToTensor``
(uint8 / 255 in float32, HWC → CHW) → ``Normalize(mean, std)`` ((x − mean) / std in float32).
Stated tolerance: 8-bit inputs at the sizes MedMamba uses are bit-identical (so are the logits); any
other size is within one 8-bit level (see test_any_size_within_one_level).
"""

import numpy as np
import pytest
from PIL import Image

from medmamba_edge.loaders import open_model
from medmamba_edge.runtime.metadata import ModelMetadata
from medmamba_edge.runtime.decode import ImageError, read_image
from medmamba_edge.runtime.preprocess import preprocess, preprocess_one, resize_like_pil
from tests.shared_data import OFFICIAL_T32, require_shared


def meta(size, in_chans=3) -> ModelMetadata:
    return ModelMetadata(input_size=size, class_names=("a", "b"), in_chans=in_chans,
                         mean=(0.5,) * in_chans, std=(0.5,) * in_chans)


def reference(pil_image: Image.Image, metadata: ModelMetadata) -> np.ndarray:
    height, width = metadata.input_size
    resized = np.asarray(pil_image.convert("RGB").resize((width, height), Image.BILINEAR))
    tensor = resized.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(metadata.mean, np.float32)[:, None, None]
    std = np.asarray(metadata.std, np.float32)[:, None, None]
    return (tensor - mean) / std


@pytest.fixture(scope="module")
def real_images():
    """Every 20th BUSI image (39, all three classes) and the RSNA chest X-ray DICOM, with PIL's decode of each."""
    busi = sorted(require_shared("data", "busi").rglob("*.png"))[::20]
    pairs = [(read_image(p), Image.open(p)) for p in busi]
    pydicom = pytest.importorskip("pydicom")
    # 8-bit MONOCHROME2 without rescale or window: its pixels are the image (decode.read_dicom agrees).
    dicom = pydicom.dcmread(require_shared("data", "dicom", "chest_xray_rsna.dcm")).pixel_array
    return pairs + [(dicom, Image.fromarray(dicom))]


@pytest.mark.parametrize("size", [(32, 32), (224, 224), (28, 28)])
def test_bit_identical_to_train_transform_on_real_images(real_images, size):
    m = meta(size)
    for ours, pil in real_images:
        assert np.array_equal(preprocess_one(ours, m), reference(pil, m))


def test_same_logits_and_top1_through_official_medmamba_t(real_images):
    backend = open_model(require_shared(*OFFICIAL_T32), input_size=32)
    ours = preprocess([im for im, _ in real_images], backend.metadata)
    ref = np.stack([reference(pil, backend.metadata) for _, pil in real_images])
    a, b = backend.run(ours), backend.run(ref)
    assert np.abs(a - b).max() <= 1e-6
    assert (a.argmax(1) == b.argmax(1)).all()


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# BUSI images with colour marks (calipers, text): R and B differ by up to 254 levels, where most BUSI images are gray.
COLOURED_BUSI = ("benign/benign (234).png", "benign/benign (240).png", "malignant/malignant (196).png",
                 "normal/normal (113).png")


@pytest.fixture(scope="module")
def coloured_busi():
    pairs = [(read_image(path), Image.open(path))
             for path in (require_shared("data", "busi", *name.split("/")) for name in COLOURED_BUSI)]
    assert all(np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).max() > 200 for rgb, _ in pairs[:2])
    return pairs


def one_level(metadata: ModelMetadata) -> np.ndarray:
    """One 8-bit level after Normalize, per channel (float32 rounding of the reference allowed)."""
    return (1 + 1e-3) / 255 / np.asarray(metadata.std, np.float32)[:, None, None]


@pytest.mark.parametrize("size", [(32, 32), (224, 224)])
def test_per_channel_mean_and_std_are_each_channels_own(real_images, coloured_busi, size):
    """ImageNet's mean and std (a model trained with them): uint8 inputs still match train.py's transform bit for bit,
    float32 ones in [0, 1] (DICOM after windowing) within one 8-bit level, each channel with its own mean and std."""
    m = ModelMetadata(input_size=size, class_names=("a", "b"), in_chans=3, **IMAGENET)
    for ours, pil in real_images[::4] + coloured_busi:
        expected = reference(pil, m)
        assert np.array_equal(preprocess_one(ours, m), expected)
        assert (np.abs(preprocess_one(ours.astype(np.float32) / 255, m) - expected) <= one_level(m)).all()


def test_deep_colour_images_keep_their_channel_order(coloured_busi):
    """A 16-bit RGB image (a 16-bit PNG, a colour DICOM): R stays R, within one 8-bit level of the 8-bit file; and into
    a one-channel model, ITU-R 601-2 luma as PIL's convert("L") gives, within one 8-bit level."""
    from medmamba_edge.runtime.preprocess import to_model_channels

    for size in ((32, 32), (36, 44)):
        m = ModelMetadata(input_size=size, class_names=("a", "b"), in_chans=3, **IMAGENET)
        for rgb, pil in coloured_busi:
            deep = preprocess_one(rgb.astype(np.uint16) * 257, m)
            assert (np.abs(deep - reference(pil, m)) <= one_level(m)).all()
    for rgb, pil in coloured_busi:
        luma = to_model_channels(rgb.astype(np.uint16) * 257, 1)[:, :, 0].astype(np.int64)
        assert np.abs(luma - np.asarray(pil.convert("L")).astype(np.int64) * 257).max() <= 257


def test_any_size_within_one_level():
    # Pillow 13 resizes some unequal-aspect shapes vertically first; we always go horizontal first as
    # Pillow's Resample.c does, so those differ by at most one level after rounding.
    rng = np.random.default_rng(0)
    for _ in range(40):
        (h_in, w_in), (h_out, w_out) = rng.integers(1, 200, 2), rng.integers(1, 200, 2)
        image = rng.integers(0, 256, (h_in, w_in, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(image).resize((w_out, h_out), Image.BILINEAR))
        assert np.abs(resize_like_pil(image, h_out, w_out).astype(int) - ref).max() <= 1


def test_grayscale_rgba_and_deep_inputs_map_like_pil():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    rgba = rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)
    m = meta((32, 32))
    assert np.array_equal(preprocess_one(gray, m), reference(Image.fromarray(gray), m))
    assert np.array_equal(preprocess_one(gray[:, :, None], m), reference(Image.fromarray(gray), m))
    # convert("RGB") drops alpha without compositing.
    assert np.array_equal(preprocess_one(rgba, m), reference(Image.fromarray(rgba, "RGBA"), m))
    # 16-bit and float keep their precision through the resize: within one 8-bit level of the 8-bit path.
    deep = preprocess_one(gray.astype(np.uint16) * 257, m)
    assert np.abs(deep - preprocess_one(gray, m)).max() <= 2 / 255 / 0.5 + 1e-6
    assert np.allclose(preprocess_one(gray.astype(np.float32) / 255, m), deep, atol=1e-5)
    assert preprocess_one(rgba, meta((32, 32), in_chans=1)).shape == (1, 32, 32)
    # RGB into a one-channel model: PIL's convert("L") bit for bit (rounded float luma missed 27 of 65536 pixels).
    from medmamba_edge.runtime.preprocess import to_model_channels

    rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert np.array_equal(to_model_channels(rgb, 1)[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    with pytest.raises(ImageError, match="expected uint8, uint16 or float32"):
        preprocess_one(gray.astype(np.int32), m)


def test_pixels_an_application_gets_wrong_are_refused_not_classified(real_images):
    """From Python, a BUSI image as float32 0..255 (astype(np.float32) without the /255) went through as pixels 255
    times too bright and was classified all the same (the official MedMamba-T at 32×32 on the first 200 validation
    images of PneumoniaMNIST: 95 % right as uint8, 75 % as float32 0..255, all but one called pneumonia), NaN pixels
    gave NaN logits, and an empty array was an IndexError from the resize; .npz data sets already refused the
    first. Views and their contiguous copies agree."""
    image = real_images[0][0]
    m = meta((32, 32))
    for pixels, says in [(image.astype(np.float32), "has float32 pixels from 8 to 255; expected 0..1"),
                         (np.full((8, 8), np.nan, np.float32), "has float32 pixels from nan to nan"),
                         (image[:0], r"has no pixels \(shape \(0, 256, 3\)\)"),
                         (image.astype(np.float64) / 255, "has float64 pixels; expected uint8, uint16 or float32")]:
        with pytest.raises(ImageError, match=f"^the image {says}"):
            preprocess_one(pixels, m)
    for view in (image[::2, ::2], image[..., ::-1], image[:, :, 0], np.asfortranarray(image), image[::-1, 3:200]):
        assert np.array_equal(preprocess_one(view, m), preprocess_one(np.ascontiguousarray(view), m))
        deep = view.astype(np.uint16) * 257
        assert np.array_equal(preprocess_one(deep[::1], m), preprocess_one(np.ascontiguousarray(deep), m))


def test_read_image_keeps_depth_and_rejects_broken_files(tmp_path):
    import cv2

    deep = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    assert read_image(tmp_path / "deep.png").dtype == np.uint16
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="file is empty"):
        read_image(tmp_path / "empty.png")
    cv2.imwrite(str(tmp_path / "ok.png"), deep.astype(np.uint8))
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(ImageError, match="not a decodable image"):
        read_image(tmp_path / "cut.png")


def test_images_over_the_pixel_limit_are_decoded_reduced_or_refused_at_once(tmp_path, monkeypatch):
    import time

    import cv2

    from medmamba_edge.runtime import decode as module
    from tests.test_run_robustness import png_header

    # A header declaring 20000×20000 (400 MP; ~30 s and gigabytes to decode): refused from the header.
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge.png: a 20000×20000 PNG \(400.0 megapixels\) is over the limit of "
                                         r"67,108,864 pixels \(decode.MAX_IMAGE_PIXELS\); only JPEG"):
        read_image(tmp_path / "huge.png")
    assert time.perf_counter() - started < 1.0
    # Past OpenCV's own 2^30-pixel limit, with the constant raised: still this file's ImageError, not cv2.error.
    (tmp_path / "huger.png").write_bytes(png_header(65000, 65000))
    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 65000 * 65000)
    with pytest.raises(ImageError, match="huger.png: OpenCV cannot decode it"):
        read_image(tmp_path / "huger.png")
    # JPEG over the limit: decoded at the largest of 1/2, 1/4, 1/8 that fits, colour or gray as stored.
    rgb = np.random.default_rng(0).integers(0, 256, (1000, 1200, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.jpg"), rgb)
    cv2.imwrite(str(tmp_path / "big_gray.jpg"), rgb[:, :, 0])
    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 400_000)
    assert read_image(tmp_path / "big.jpg").shape == (500, 600, 3)
    assert read_image(tmp_path / "big_gray.jpg").shape == (500, 600)
    # Its start-of-frame past 64 KB of APP segments (a large ICC profile): the header was not found, and the full
    # image decoded before being refused.
    data = (tmp_path / "big.jpg").read_bytes()
    icc = b"\xff\xe2" + (65535).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes(65521)
    (tmp_path / "big_icc.jpg").write_bytes(data[:2] + icc + data[2:])
    assert read_image(tmp_path / "big_icc.jpg").shape == (500, 600, 3)
    # An EXIF orientation (a phone photo's "rotate 90°"): applied by OpenCV's reduced decode unless told not to;
    # never applied at full size, nor by train.py's PIL. Whether an image turned must not depend on its size.
    ifd = (1).to_bytes(2, "little") + bytes.fromhex("1201 0300 01000000 0600 0000") + bytes(4)
    exif = b"Exif\0\0II*\0" + (8).to_bytes(4, "little") + ifd
    (tmp_path / "big_exif.jpg").write_bytes(data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:])
    assert read_image(tmp_path / "big_exif.jpg").shape == (500, 600, 3)
    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match="even at 1/8 scale"):
        read_image(tmp_path / "big.jpg")
    # Within the limit nothing changes: the same pixels as a plain decode.
    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 1200 * 1000)
    plain = cv2.cvtColor(cv2.imread(str(tmp_path / "big.jpg"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert np.array_equal(read_image(tmp_path / "big.jpg"), plain)
