"""Files to pixels: still images (OpenCV) and DICOM (pydicom, imported only when a DICOM file is read), the
same way for ``run``'s file sources, the data sets of evaluate and compare, and quantize's calibration images.
What comes out is what ``preprocess`` takes: RGB or grayscale, uint8/uint16, or float32 in [0, 1].
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np

from medmamba_edge.errors import UserError, clipped, first_line, install_hint, plural

from .shared_change import SharedChange

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded or used."""


# OpenCV's log level: cv2.utils.logging in OpenCV 5, cv2.getLogLevel/setLogLevel in 4.x (the serve extra pins
# opencv-python-headless < 4.12, which has no cv2.utils.logging). 0 is LOG_LEVEL_SILENT in both.
_LOG_LEVEL = getattr(cv2.utils, "logging", cv2)


def _silence_opencv(undo: ExitStack) -> None:
    undo.callback(_LOG_LEVEL.setLogLevel, _LOG_LEVEL.getLogLevel())
    _LOG_LEVEL.setLogLevel(0)


# Silence OpenCV's own WARN lines (a missing camera, a corrupt video): our errors say it in one line. libpng's
# 'libpng error: …' for a truncated PNG is written to the process's stderr itself: it stays (only redirecting file
# descriptor 2 would hide it, and every other thread's messages with it). The level is the process's: the capture
# thread reads under it while the main thread writes the video under it, hence one change both share.
quiet_opencv = SharedChange(_silence_opencv)


def opencv_cannot_name(path: str | Path) -> bool:
    """Whether OpenCV cannot be given ``path``: its paths are UTF-8, and a name holding other bytes (here as
    surrogate escapes) crashed the process (SIGSEGV in cv2.VideoCapture, cv2.VideoWriter; OpenCV 5.1). Images are
    decoded from their bytes, read by Python: only videos go to OpenCV by name."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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


def image_header(data) -> tuple[str, int, int, bool] | None:
    """(format, width, height, grayscale) as a PNG, JPEG or BMP header declares them, without decoding;
    None for other formats (their size is checked after decoding). ``data``: the whole file, any bytes-like
    object: a JPEG's start-of-frame follows its APP segments (ICC profile, EXIF), which can pass 64 KB."""
    head = bytes(data[:26])
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 26:
        width, height = struct.unpack(">II", head[16:24])
        return "PNG", width, height, head[25] in (0, 4)
    if head.startswith(b"BM") and len(head) >= 26 and struct.unpack("<I", head[14:18])[0] >= 40:
        width, height = struct.unpack("<ii", head[18:26])
        return "BMP", abs(width), abs(height), False
    if head.startswith(b"\xff\xd8"):
        header = _jpeg_header(memoryview(data))  # not copied: it may be the whole file
        return ("JPEG", *header) if header else None
    return None


def _netpbm_maxval(data) -> int | None:
    """The largest sample value a PGM/PPM header declares where OpenCV returns the samples as stored (binary P5 and
    P6, and ASCII P2 and P3 over 8 bits; it scales 8-bit ASCII itself); None for other files. As stored, a 12-bit
    PGM (maxval 4095) reached 6 % of full scale."""
    if bytes(data[:1]) != b"P" or bytes(data[1:2]) not in (b"2", b"3", b"5", b"6"):
        return None
    head = bytes(data[2:1 << 20])  # comments may sit between the fields, and be long
    fields = []
    for match in re.finditer(rb"#[^\n\r]*|\S+", head):  # found lazily: the pixels follow the header
        if not match.group().startswith(b"#"):
            fields.append(match.group())
            if len(fields) == 3:
                break
    if len(fields) < 3 or not fields[2].isdigit():
        return None
    maxval = int(fields[2])
    return maxval if bytes(data[1:2]) in (b"5", b"6") or maxval > 255 else None


def _rescaled(image: np.ndarray, maxval: int | None) -> np.ndarray:
    """Samples of a maxval other than their type's full scale brought to it, rounded as PIL's PPM decoder rounds
    them (round(v / maxval * full), train.py's loader): bit for bit the same 8-bit image."""
    full = np.iinfo(image.dtype).max
    if not maxval or maxval == full:
        return image
    return np.minimum(np.round(image / maxval * full), full).astype(image.dtype)


# Per TIFF magic: the first IFD's offset (format, where it is), the entry count's format, an entry's size and where
# in it a value held in place is: classic TIFF (42), BigTIFF (43).
_TIFF_LAYOUTS = {42: ("I", 4, "H", 12, 8), 43: ("Q", 8, "Q", 20, 12)}


def _tiff_tag(data, wanted: int) -> int | None:
    """The first value of SHORT tag ``wanted`` in a TIFF's first image (IFD); None when the file is no TIFF, the
    tag is not there or not a SHORT."""
    head = bytes(data[:16])
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    (magic,) = struct.unpack(order + "H", head[2:4])
    if magic not in _TIFF_LAYOUTS:
        return None
    offset, where, count, size, value_at = _TIFF_LAYOUTS[magic]
    try:
        (ifd,) = struct.unpack_from(order + offset, head, where)
        width = struct.calcsize(count)
        (entries,) = struct.unpack(order + count, bytes(data[ifd:ifd + width]))
        for entry in range(ifd + width, ifd + width + size * entries, size):
            tag, kind = struct.unpack(order + "HH", bytes(data[entry:entry + 4]))
            if tag == wanted:
                if kind != 3:
                    return None
                (values,) = struct.unpack(order + count.replace("H", "I"), bytes(data[entry + 4:entry + value_at]))
                at = entry + value_at  # values held in the entry itself, or (more than fit there) at an offset
                if 2 * values > size - value_at:
                    (at,) = struct.unpack(order + offset, bytes(data[at:at + struct.calcsize(offset)]))
                return struct.unpack(order + "H", bytes(data[at:at + 2]))[0]
    except struct.error:  # an IFD past the end: OpenCV has decoded what it could, the tag unknown
        return None
    return None


def _tiff_white_is_zero(data) -> bool:
    """Whether a TIFF's first image says PhotometricInterpretation 0 (WhiteIsZero: 0 is white). OpenCV inverts
    such 8-bit images and returns 16-bit ones as stored, so this tells which 16-bit ones are inverted."""
    return _tiff_tag(data, 262) == 0


def _ignore_user_warnings(module: str, message: str = "") -> None:
    """Ignore the UserWarnings of ``module`` (a regular expression, as ``warnings.filterwarnings`` takes it) whose
    text ``message`` matches. A filter, not catch_warnings: files are read in the capture thread, and catch_warnings
    swaps the process-wide filters. Last in the list, a default: an application's own filters, set before or after,
    come first (its 'error' or 'always' for pydicom's warnings holds). Added only where the list lacks it, not at
    every read: each filterwarnings call empties Python's once-per-location registry of every warning (an
    application's own warning, shown once, was shown again after each file). Looked for at every read: a caller's
    catch_warnings (pytest's, per test) drops it on leaving."""
    item = ("ignore", re.compile(message, re.I) if message else None, UserWarning, re.compile(module), 0)
    if item not in warnings.filters:  # the entry filterwarnings makes (re caches the compiled patterns)
        warnings.filterwarnings("ignore", message, UserWarning, module, append=True)


# What Pillow's TIFF reader warns about the tags of the files read here (PIL.TiffImagePlugin's warnings.warn calls):
# a message's start, matched case-insensitively, as filterwarnings matches it.
_PILLOW_TIFF_WARNINGS = (r"(possibly )?corrupt exif data|tag offset too large|tag data larger than file|"
                         r"metadata warning")


def _unassociated_rgba(path, data) -> np.ndarray | None:
    """An 8-bit RGBA TIFF whose alpha is unassociated (ExtraSamples 2), decoded by Pillow with its colours as stored:
    OpenCV reads it through libtiff's RGBA interface, which multiplies the colours by the alpha (a BUSI scan with an
    alpha ramp scored 0.995 benign as TIFF, 0.820 as PNG), where train.py's PIL convert("RGB") drops the alpha. None
    where Pillow cannot decode it (it reads no big-endian BigTIFF) or is not installed (it comes with the [dicom]
    extra, not with a base install): OpenCV's decode stands, as it did before (docs/runtime.md says so)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    # Pillow's TIFF reader warns on stderr about the tags it reads past ('Corrupt EXIF data' for a big-endian
    # BigTIFF), between the records: those warnings alone are filtered, not the application's own Pillow calls'.
    _ignore_user_warnings(r"PIL\.TiffImagePlugin", _PILLOW_TIFF_WARNINGS)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGBA"))
    except Exception:  # UnidentifiedImageError, a strip cut short, …: OpenCV has decoded it
        return None


def _over_limit(path, width: int, height: int, kind: str, note: str = "") -> ImageError:
    return ImageError(f"{path}: a {width}×{height} {kind} ({width * height / 1e6:.1f} megapixels) is over the limit of "
                      f"{MAX_IMAGE_PIXELS:,} pixels (decode.MAX_IMAGE_PIXELS){note}; downscale it first")


def read_image(path) -> np.ndarray:
    """Decode an image file to RGB (or grayscale) uint8/uint16, keeping its bit depth. Over
    ``MAX_IMAGE_PIXELS`` a JPEG is decoded reduced and anything else refused (see the constant)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    flags = cv2.IMREAD_UNCHANGED  # which, unlike any other flag, also leaves EXIF orientation unapplied
    header = image_header(data)
    if header and header[1] * header[2] > MAX_IMAGE_PIXELS:
        kind, width, height, gray = header
        factor = next((f for f in (2, 4, 8) if kind == "JPEG" and width * height <= MAX_IMAGE_PIXELS * f * f), None)
        if factor is None:
            raise _over_limit(path, width, height, kind, " even at 1/8 scale" if kind == "JPEG"
                              else "; only JPEG is decoded reduced")
        flags = _REDUCED[gray, factor] | cv2.IMREAD_IGNORE_ORIENTATION  # as full-size JPEGs and train.py's PIL
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
    image = _rescaled(image, _netpbm_maxval(data))
    if image.dtype == np.uint16 and image.ndim == 2 and _tiff_white_is_zero(data):
        image = np.iinfo(np.uint16).max - image  # bright is dense, as 8-bit ones and MONOCHROME1 DICOM are read
    if image.ndim == 3 and image.shape[2] == 4 and image.dtype == np.uint8 and _tiff_tag(data, 338) == 2:
        stored = _unassociated_rgba(path, data)  # ExtraSamples 2: decoded again, as stored (16-bit RGBA already is)
        if stored is not None:
            return stored
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


# ----------------------------------------------------------------------------------------------- DICOM

def is_dicom(path: Path) -> bool:
    """By suffix, or by the 'DICM' magic after the 128-byte preamble (DICOM files often have no suffix). OSError
    when that cannot be read: a file nobody can tell apart is reported, not passed over as no DICOM."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _pydicom():
    try:
        import pydicom
        from pydicom import pixels
    except ImportError as exc:
        raise ImageError(f"reading DICOM needs pydicom ({exc}): {install_hint('dicom')}") from None
    # pydicom warns on stderr about what it works around, between the records; what matters reaches a record
    # (DicomFrames checks the pixel data's length against the header). See _ignore_user_warnings.
    _ignore_user_warnings(r"pydicom\.")
    return pydicom, pixels


def read_dicom(path: str | Path) -> DicomFrames:
    """A DICOM file's frames, ready for ``preprocess``, decoded one at a time as they are iterated (DicomFrames);
    the header, and a single-frame file's one frame, are checked here. Monochrome images go through the modality
    LUT (rescale slope/intercept) and the VOI LUT or window, in float, then map that output range to [0, 1]
    (MONOCHROME1 inverted so that bright is dense everywhere). An 8-bit image without any of these is
    returned as uint8, identical to the same pixels saved as PNG. PALETTE COLOR goes through its palette
    to RGB; colour images stay RGB; images stored in fewer bits than allocated are scaled from their bit range."""
    pydicom, lut = _pydicom()
    forced = False  # read as pydicom's force=True reads: no preamble and 'DICM' (with the File Meta or without)
    try:
        # Uncompressed pixel data stays on disk (deferred): the frames are read from the file one by one. A
        # deflated file is inflated whole (nothing in it can be read in place), and its frames from that copy.
        try:
            ds, ended, inside = _read_dataset(path)
        except pydicom.errors.InvalidDicomError:
            if Path(path).suffix.lower() not in DICOM_SUFFIXES:
                raise
            ds, ended, inside = _bare_dataset(pydicom, path), None, None  # an image (with its pixel data) or refused
            forced = True
        if _deflated(ds):  # read again, nothing deferred: pydicom reads a deferred value from the file (deflated)
            ds, ended, inside = _read_dataset(path, force=forced, defer_size=None)
    except ImageError:
        raise
    except OSError as exc:  # gone since its folder was listed, no permission: said as for an image
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, …: every way a header can be broken
        raise ImageError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    uid = getattr(ds.file_meta, "TransferSyntaxUID", None)
    # pydicom reads the header of any, but a UID it does not know as a transfer syntax (a vendor's private one, a
    # corrupted header's) fails each of its questions about the pixel data with a bare ValueError
    if uid is not None and not (isinstance(uid, pydicom.uid.UID) and uid.is_transfer_syntax):
        raise ImageError(f"{path}: unknown DICOM transfer syntax {str(uid)!r} (private or malformed): its pixel data "
                         f"cannot be read")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ImageError(f"{path}: DICOM float pixel data (a parametric map) is not supported: it has no stored "
                         f"value range to map to intensities")
    if "PixelData" not in ds:
        raise _without_pixel_data(path, ds, ended, inside)
    # No transfer syntax in the file: a bare data set (no File Meta), or 'DICM' followed by no File Meta or one
    # without TransferSyntaxUID. pydicom, reading its frames from the file, is told the one it read it in.
    syntax = None if "TransferSyntaxUID" in ds.file_meta else _encoding_syntax(path, ds)
    return DicomFrames(path, ds, lut, syntax)


def _read_dataset(path, force: bool = False, defer_size: int | None = 4096):
    """``pydicom.dcmread(path, defer_size=defer_size, force=force)`` with the data set ended where zeros begin that
    end the file, read as an element (0000,0000) of length 0 (and the byte where they begin, in a deflated file's
    inflated data; None where they do not). pydicom reads a file that ends in zeros as an 8-byte element of them
    after another, ~0.5-1 s a MB (a bare data set, or a whole file, padded out with 16 MB of zeros: 8-20 s to read
    what is in its first kilobytes; a deflated file's inflated data as well). Zeros followed by data (a hole in a
    whole file) are read through, as pydicom reads them, and the image after them; only zeros up to the end of the
    file end the data set. A deflated file is read
    by pydicom from its inflated copy, out of this function's sight: the file itself has been read to its end, and
    its data set ends at its first zeros. A command set's element (group 0000, a group length of 4 bytes or a
    value) written into a data set is read as pydicom reads it, the image after it too. A command set that begins
    the data set is read as such by pydicom, before the stop: a file header followed by zeros (a pre-allocated
    file cut after its header; 4 MB: 4-6.5 s) is refused here, from the zeros up to the end.

    Third, how far into its pixel data element a file goes that ends inside it (_inside_pixel_data), None where
    the data set has its pixel data or ends before that element begins: pydicom drops an element the file ends
    in (the value of an encapsulated one, or its header) without a word, as if the file ended before it."""
    from pydicom.filereader import read_partial

    ended = []
    resume = 0  # the first byte after the zeros read through last (those before it are not looked at again)
    pixel_data_read = False
    last = None  # the last element's tag, value length and value offset in the file

    def at_zeros(tag, vr, length) -> bool:
        nonlocal resume, pixel_data_read, last
        if ended:
            return True
        last = (tag, length, f.tell())
        if tag == 0x7FE00010:
            pixel_data_read = True
        if tag != 0 or length != 0:
            return False
        here = f.tell()  # just after the 8 zeros (pydicom reads from f, or a deflated file's f is at its end)
        if here < resume:
            return False
        # After the pixel data only Data Set Trailing Padding comes: zeros end the data set whatever follows them.
        zeros, to_the_end = (0, True) if pixel_data_read else _zeros_ahead(f)
        if to_the_end:
            ended.append(True)
            return True
        resume = here + zeros
        return False

    with open(path, "rb") as f:
        start = _file_header(f, force)
        if start and _only_zeros_ahead(f):  # the File Meta read as pydicom reads it, to say what the file is
            meta = _file_meta(f, force)
            start = f.tell() if meta is not None else 0
            if start and _only_zeros_ahead(f):
                sop = getattr(meta, "MediaStorageSOPClassUID", None)
                raise ImageError(f"{path}: truncated DICOM file: {getattr(sop, 'name', 'a file')} that ends after its "
                                 f"file header (zeros from byte {start} on)")
        f.seek(0)
        try:
            ds = read_partial(f, at_zeros, defer_size=defer_size, force=force)
        except struct.error:  # the file ends in the 4-byte length after an explicit VR (OB, SQ, …): pydicom's unpack
            end = None if last is None or last[1] == 0xFFFFFFFF else last[2] + last[1]  # of the last whole element
            if end is None or not 0 < os.fstat(f.fileno()).st_size - end < 12:
                raise
            f.seek(0)  # what comes before that header, read as such, says what the file is
            ds = read_partial(io.BytesIO(f.read(end)), defer_size=defer_size, force=force)
        deflated = _deflated(ds)  # read from its inflated copy (ds.buffer), where f's offsets do not apply
        at = ds.buffer if deflated else f
        inside = None if ended or deflated or "PixelData" in ds else _inside_pixel_data(f, last)
        return ds, (at.tell() if ended else None), inside


_PIXEL_DATA_TAGS = (struct.pack("<HH", 0x7FE0, 0x0010), struct.pack(">HH", 0x7FE0, 0x0010))


def _inside_pixel_data(f, last) -> str | None:
    """Where in its pixel data element a file ends that pydicom read without it, from ``last`` (the tag, length and
    value offset of the last element it began to read): in the element's header (the bytes after the last whole
    element begin with its tag), or in its encapsulated value (in which item, walked from their 8-byte headers: a
    value of a defined length pydicom keeps however short, and DicomFrames says how short). None where it ends
    before the element."""
    if last is None:
        return None
    tag, length, at = last
    size = os.fstat(f.fileno()).st_size
    if tag != 0x7FE00010:
        if length == 0xFFFFFFFF:  # a sequence of undefined length: where it ends is not known here
            return None
        f.seek(at + length)
        if f.read(4) not in _PIXEL_DATA_TAGS:
            return None
        return f"inside its pixel data element's header ({size - at - length} bytes of it)"
    item, items = at, 0  # the first item is the Basic Offset Table, the fragments follow
    while item + 8 <= size:
        f.seek(item)
        group, element, item_length = struct.unpack("<HHL", f.read(8))
        if (group, element) != (0xFFFE, 0xE000):  # the sequence delimiter, or not an item: pydicom said why not
            return None
        if item + 8 + item_length > size:
            break
        item, items = item + 8 + item_length, items + 1
    whole = "its Basic Offset Table" if items == 1 else f"fragment {items - 1}"  # the last whole item
    if not items:
        where = "in its Basic Offset Table" if item < size else "before its Basic Offset Table"
    elif item == size:
        where = f"after {whole}"
    elif item + 8 > size:  # in an item's header: the next fragment's, or the sequence delimiter
        where = f"in the header of the item after {whole}"
    else:
        where = f"in fragment {items}"
    return f"inside its pixel data (encapsulated, {plural(size - at, 'byte')} of it: the file ends {where})"


def _zeros_ahead(f) -> tuple[int, bool]:
    """How many zero bytes begin what f has from its position on, and whether they run to the end of the file (read
    in 1 MiB chunks: 16 MiB of zeros in ~50 ms, where pydicom reads them at ~1 s a MiB). f's position is kept."""
    here, zeros = f.tell(), 0
    while chunk := f.read(1 << 20):
        run = len(chunk) - len(chunk.lstrip(b"\0"))
        zeros += run
        if run < len(chunk):
            break
    f.seek(here)
    return zeros, not chunk


def _only_zeros_ahead(f) -> bool:
    """Zeros from f's position to the end of the file, 8 bytes or more (only 8 bytes read where they are not all
    zeros, as a rule). f's position is kept."""
    here = f.tell()
    first = f.read(8)
    f.seek(here)
    if first != bytes(8):
        return False
    return _zeros_ahead(f)[1]


# Explicit VRs with a 4-byte length (pydicom.valuerep.EXPLICIT_VR_LENGTH_32), for _file_header's walk
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))


def _file_header(f, force: bool) -> int:
    """Where the data set begins, after the file header (preamble and 'DICM', File Meta), with f there; 0 where
    that cannot be read (read_partial says why: no 'DICM' unforced, a broken File Meta). Found, as a rule, from the
    File Meta's element headers in its first kilobyte: after 'DICM', elements of group 0002 in explicit VR little
    endian (FileMetaInformationGroupLength, first among them, may be missing or wrong: pydicom reads the elements
    up to the first of another group, as here); where they cannot be walked so (no preamble and 'DICM': read
    forced; an implicit VR File Meta, an element beyond that kilobyte), from the File Meta read as pydicom's
    read_partial reads it (_file_meta), a second read of it."""
    head = f.read(1024)
    if head[128:132] == b"DICM":
        at = 132
        while at + 8 <= len(head):
            if head[at:at + 2] != b"\x02\x00":
                f.seek(at)
                return at
            vr = head[at + 4:at + 6]
            if vr in _LONG_VRS:
                if at + 12 > len(head):
                    break
                at += 12 + struct.unpack_from("<L", head, at + 8)[0]
            elif b"AA" <= vr <= b"ZZ":
                at += 8 + struct.unpack_from("<H", head, at + 6)[0]
            else:  # not explicit VR
                break
        if at == len(head) < 1024:  # the file ends with its File Meta
            f.seek(at)
            return at
    f.seek(0)
    return f.tell() if _file_meta(f, force) is not None else 0


def _file_meta(f, force: bool):
    """The File Meta, read from the start of f as pydicom's read_partial reads it, f left after it; None where it
    cannot be read, or _read_file_meta_info, read_partial's own (private in pydicom 3.0), is not there."""
    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        f.seek(0)
        read_preamble(f, force)
        return _read_file_meta_info(f)
    except Exception:
        return None


def _without_pixel_data(path, ds, ended=None, inside=None) -> ImageError:
    """Why a data set without pixel data gives no image. pydicom reads a cut file up to where it ends, silently: an
    image class or image attributes without the pixels means the pixels were cut off, not that there never were
    any; any other (an RT plan, a structured report) is said to be without them. An image's data set ended by
    zeros (``ended``, see _read_dataset: a file cut, then padded out) says where they begin; one cut inside its
    pixel data element (``inside``) says so, and how far into it."""
    meta = ds.get("file_meta")
    sop = _header(path, ds, "SOPClassUID") or (_header(path, meta, "MediaStorageSOPClassUID") if meta else None)
    image = "Rows" in ds or "Image" in str(getattr(sop, "name", ""))
    if image and ended is not None:
        inflated = " of its inflated data" if _deflated(ds) else ""
        return ImageError(f"{path}: truncated DICOM file: {getattr(sop, 'name', 'an image')} that ends before its "
                          f"pixel data (zeros from byte {ended}{inflated} on)")
    if image:
        return ImageError(f"{path}: truncated DICOM file: {getattr(sop, 'name', 'an image')} that ends "
                          f"{inside or 'before its pixel data'}")
    return ImageError(f"{path}: DICOM without pixel data (modality {_header(path, ds, 'Modality', '?')})")


def _header(path, ds, keyword: str, default=None):
    """A header value as pydicom converts it, on first use; one it cannot convert makes the file unreadable, said as
    such."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:  # a US Rows of 3 bytes (BytesLengthException), a VR garbled to 'CW' (NotImplemented…)
        raise ImageError(f"{path}: malformed DICOM header ({keyword}: {clipped(first_line(exc), 150)})") from None


def _bare_dataset(pydicom, path):
    """A file named as DICOM without the Part 10 header (no 'DICM' after a 128-byte preamble, no File Meta: older
    modalities and some exports write the bare data set), read as pydicom finds it encoded (read_dicom takes its
    transfer syntax from that encoding: _encoding_syntax). pydicom's own refusal ends "Use force=True", an option
    the CLI does not have: it is read as that option would read it."""
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    # Forced, pydicom reads anything as elements: 16 MB of zeros as two million empty ones (12 s to refuse). A data
    # set begins with an element of a group from 0002 (File Meta) to 7FE0 (pixel data), SOP Common's 0008 as a rule;
    # zeros (group 0000, the network's command set) and the like are refused from their first bytes, and a file
    # shorter than a tag (group and element, 4 bytes) from those it has.
    if len(head) < 4 or not any(2 <= struct.unpack(order + "H", head[:2])[0] <= 0x7FE0 for order in "<>"):
        raise ImageError(f"{path}: not a readable DICOM file (no DICOM file header, and its first bytes "
                         f"({head[:4].hex(' ')}) begin no DICOM element)")
    without = None  # a data set of a kind with no pixels (an RT plan), said as the same file with its header is
    ended = None  # where the data set ends in zeros, if it does
    try:
        ds, ended, inside = _read_dataset(path, force=True)
        image = "PixelData" in ds and "Rows" in ds
        # named by a value, not by zeros read as one (an element's header, then zeros)
        if "PixelData" not in ds and any(str(ds.get(key) or "").strip("\0 ") for key in ("SOPClassUID", "Modality")):
            without = _without_pixel_data(path, ds, ended, inside)
    except ImageError:  # a file header followed by zeros (_read_dataset)
        raise
    except Exception:  # forced, any bytes are read as elements until they make no sense
        image = False
    if without is not None:
        raise without
    if not image:  # forced, a text file or zeros read as a few odd elements: nothing says it is DICOM
        zeros = "" if ended is None else f": from byte {ended} on its bytes begin no DICOM element (zeros)"
        raise ImageError(f"{path}: not a readable DICOM file (no DICOM file header, and no image when read as a "
                         f"data set without one{zeros})")
    return ds


def _encoding_syntax(path, ds):
    """The transfer syntax of a data set read from a file that names none (no File Meta, or one without
    TransferSyntaxUID), as pydicom found it encoded; set in ``ds.file_meta``, where the length check and the LUT
    functions read it."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if ds.get_item("PixelData", keep_deferred=True).length == 0xFFFFFFFF:  # encapsulated: JPEG, RLE, … unnamed
        raise ImageError(f"{path}: DICOM without a transfer syntax (no file header, or none in it) whose pixel data "
                         f"is compressed: without the header's transfer syntax nothing says how")
    syntax = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
              (False, False): ExplicitVRBigEndian}.get(tuple(ds.original_encoding))
    if syntax is None:
        raise ImageError(f"{path}: not a readable DICOM file (no transfer syntax in a file header, and a data set in "
                         f"no transfer syntax DICOM has: implicit VR big endian)")
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def _command_set_first(path, ds) -> bool:
    """Whether the data set begins with a command set (group 0000), as zeros after the File Meta read (an element
    (0000,0000) of length 0 each): pydicom reads it before the data set, but reading pixel data from the file it
    takes its first element for the data set's and its encoding from it (an explicit VR data set read as
    implicit: 'no Pixel Data element'). Such a file's frames are read from the data set (its pixel data whole)."""
    if not any(tag >> 16 == 0 for tag in ds.keys()):  # as a rule, no group 0000: the file is not read again
        return False
    with open(path, "rb") as f:
        start = _file_header(f, True)
        return bool(start) and f.read(2) == b"\0\0"


def _deflated(ds) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return syntax == "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


class DicomFrames:
    """A DICOM file's frames, each read from the file, decoded and mapped as the iteration reaches it: one frame's
    memory, where decoding the whole file at once cost ~26 bytes a pixel (a 48-frame 2048² study: 5 GB, more than
    a Jetson has). Each item is the frame, or the ImageError saying why that frame is unusable: the frames after a
    corrupt one are still read. A frame over MAX_IMAGE_PIXELS is refused from the header, as any image over it."""

    def __init__(self, path, ds, lut, syntax=None):
        self.path, self.ds, self.lut = path, ds, lut
        # where pydicom reads the frames from: the file, as a rule (see _command_set_first)
        self.source = ds if _deflated(ds) or _command_set_first(path, ds) else str(path)
        # A file without the File Meta header: pydicom reading its frames from the file is told the transfer syntax
        self.options = {"transfer_syntax_uid": syntax} if syntax else {}
        self.count = max(self._header_int("NumberOfFrames", 1) or 1, 1)
        rows, columns = self._header_int("Rows", 0), self._header_int("Columns", 0)
        if rows * columns > MAX_IMAGE_PIXELS:
            raise _over_limit(path, columns, rows, "DICOM frame", "; DICOM is not decoded reduced")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        self.photometric = str(_header(path, ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
        # Native 4:2:2 data (Y Y Cb Cr for each pair of pixels) is read by index, frame by frame: pydicom 3.0's
        # iterator takes every frame after the first as YBR_FULL (three samples a pixel), from the wrong offsets.
        self.by_index = False
        self.fragments = None  # each frame's fragments, where frames of several are located once (_locate_frames)
        if syntax is not None and not syntax.is_compressed:
            # Read frame by frame, pixel data for more frames than the header says would pass without a word, and
            # a cut one fail only at the frame it ends in: the header decides, checked on the whole.
            from pydicom.pixels.utils import get_expected_length

            element = ds.get_item("PixelData", keep_deferred=True)
            if element.value is not None:  # small enough to have been read, or inflated
                stored = len(element.value)
            else:  # deferred: what the file holds of the length its header declares
                stored = min(element.length, os.path.getsize(path) - element.value_tell)
            try:
                expected = get_expected_length(ds)
            except (TypeError, ValueError, AttributeError) as exc:  # SamplesPerPixel not a number, Rows missing
                raise ImageError(f"{path}: malformed DICOM header ({type(exc).__name__}: {first_line(exc)})") from None
            # Uncompressed YBR_PARTIAL_422 is laid out as YBR_FULL_422 is (two samples a pixel), which pydicom alone
            # unpacks and sizes (three samples a pixel for YBR_PARTIAL_422): read as that, left YBR (the partial
            # range is converted by _colour). Not when it holds more than two samples a pixel: pydicom's own
            # decompress() of a JPEG YBR_PARTIAL_422 file writes three under the same name, read as stored (and
            # converted the same); one cut short (between the two lengths) is that file truncated, said as such.
            if self.photometric == "YBR_PARTIAL_422" and stored <= expected // 3 * 2 + 1:  # + an odd length's pad
                expected = expected // 3 * 2
                self.options.update(photometric_interpretation="YBR_FULL_422", as_rgb=False)
            self.by_index = self.options.get("photometric_interpretation", self.photometric) == "YBR_FULL_422"
            if stored < expected:
                raise ImageError(f"{path}: truncated DICOM file (the pixel data is cut short: {stored} of the "
                                 f"{expected} bytes its header describes)")
            if stored > expected + 1:  # one byte pads an odd length
                raise ImageError(f"{path}: DICOM pixel data of {stored} bytes, more than the {expected} its header "
                                 f"describes (NumberOfFrames, Rows, Columns, SamplesPerPixel, BitsAllocated)")
        elif syntax is not None and syntax.is_encapsulated and self.count > 1:
            self._locate_frames(ds.get_item("PixelData", keep_deferred=True))
        self.bits = self._header_int("BitsStored", self._header_int("BitsAllocated", 8))
        self.range = None  # a classic file's monochrome output range, found with the first frame mapped
        # One frame: decoded now, so that its error is the file's (read_dicom raises it).
        self.single = self._map(self._decode(0), 0) if self.count == 1 else None

    def _locate_frames(self, element) -> None:
        """Compressed frames without a Basic Offset Table are found by walking the fragments before them, and
        pydicom asked for a frame by index walks every fragment of the file again (parse_fragments; for frames of
        several fragments it reads them all up to the frame): N frames cost N² (1000 frames: 3.8 s, of two
        fragments each 11 s), from the first frame on and again after a bad one. The fragments are walked here
        once. One a frame: given to pydicom as an Extended Offset Table (the offsets from the first fragment, the
        lengths), which it reads each frame from directly. Several a frame, each frame ending in a fragment with
        the JPEG end marker (pydicom's rule): the frame's fragments are kept (self.fragments) and each frame is
        decoded from its own bytes (_frame). Anything else (a Basic or Extended Offset Table of the file's own,
        items that are not fragments, fragments that make another number of frames) is left to pydicom."""
        if "ExtendedOffsetTable" in self.ds or element.length != 0xFFFFFFFF:
            return
        fragments, ends = [], []  # (where its value begins, its length); whether it ends a frame
        try:
            with (io.BytesIO(element.value) if element.value is not None else open(self.path, "rb")) as f:
                if element.value is None:
                    f.seek(element.value_tell)
                head = f.read(8)
                if len(head) < 8 or struct.unpack("<HHL", head) != (0xFFFE, 0xE000, 0):  # a Basic Offset Table
                    return
                while True:
                    head = f.read(8)
                    if len(head) < 8:
                        break
                    group, element_number, length = struct.unpack("<HHL", head)
                    if (group, element_number) == (0xFFFE, 0xE0DD):  # the sequence delimiter
                        break
                    if (group, element_number) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
                        return
                    fragments.append((f.tell(), length))
                    tail = min(length, 10)
                    f.seek(length - tail, 1)
                    ends.append(b"\xff\xd9" in f.read(tail))  # JPEG's EOI (JPEG 2000's EOC is the same bytes)
        except OSError:
            return  # the frames' reads say what is wrong
        if len(fragments) == self.count:
            start = fragments[0][0] - 8
            self.options["extended_offsets"] = ([at - 8 - start for at, _ in fragments],
                                                [length for _, length in fragments])
        elif len(fragments) > self.count and sum(ends) == self.count and ends[-1] and element.value is None:
            self.fragments, frame = [], []
            for fragment, end in zip(fragments, ends):
                frame.append(fragment)
                if end:
                    self.fragments.append(frame)
                    frame = []

    def _frame(self, index: int):
        """Frame ``index`` of several fragments (see _locate_frames), as a one-frame data set pydicom decodes as it
        would that frame of the file: the file's Image Pixel attributes (group 0028), its fragments joined."""
        from pydicom.dataset import Dataset
        from pydicom.encaps import encapsulate

        # The frame's fragments lie one after another (each after its 8-byte item header): read in one read and
        # joined once. Joined as read (data += fragment), a frame cost its size times its fragment count (3 JPEG
        # frames of 2048² in 2 KB fragments: 7 s, where the file read whole by pydicom takes 0.5 s).
        fragments = self.fragments[index]
        start = fragments[0][0]
        with open(self.path, "rb") as f:
            f.seek(start)
            span = memoryview(f.read(fragments[-1][0] + fragments[-1][1] - start))
        data = b"".join(span[at - start:at - start + length] for at, length in fragments)
        frame = Dataset()
        frame.file_meta = self.ds.file_meta
        # copies of the file's elements: the one-frame data set's NumberOfFrames is its own (set on an element the
        # file's data set shared, it made the file's NumberOfFrames 1)
        for element in self.ds.group_dataset(0x0028):
            frame.add(copy.copy(element))
        frame.NumberOfFrames = 1
        frame.PixelData = encapsulate([data])
        return frame

    def _header_int(self, keyword: str, default: int) -> int:
        """A header value that sizes the pixel data, as an int; a value that is not one (an IS of 'abc', a
        multi-valued Rows) makes the file unreadable, said as such."""
        value = _header(self.path, self.ds, keyword, default)
        try:
            return default if value is None or value == "" else int(value)
        except (TypeError, ValueError):
            raise ImageError(f"{self.path}: malformed DICOM header ({keyword} {str(value)!r} is not a number)") from None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray | ImageError]:
        if self.single is not None:
            yield self.single
            return
        # In order from one reader (a frame's place in compressed data without an offset table is found by
        # parsing the fragments before it: asked for by index, each frame would parse them all again). A frame the
        # reader fails on is asked for by its index (which says why, or decodes it), and a new reader takes the
        # frames after it.
        # Native 4:2:2 data is asked for by index, every frame (see __init__).
        frames = None if self.by_index else self._reader(0)
        for index in range(self.count):
            if frames is None:
                pixels = self._attempt(index)
            else:
                try:
                    pixels = next(frames)
                except Exception:  # StopIteration (fewer frames than the header says) too: by index, it says
                    pixels = self._attempt(index)
                    frames = self._reader(index + 1)
            if isinstance(pixels, ImageError):
                yield pixels
                continue
            try:
                yield self._map(pixels, index)
            except ImageError as exc:
                yield exc

    def _where(self, index: int) -> str:
        return f"{self.path}" + (f" frame {index}" if self.count > 1 else "")

    def _reader(self, start: int) -> Iterator[np.ndarray]:
        if self.fragments is not None:
            return (self._pixels(index) for index in range(start, self.count))
        return self.lut.iter_pixels(self.source, indices=range(start, self.count), **self.options)

    def _pixels(self, index: int) -> np.ndarray:
        if self.fragments is not None:  # each frame from its own fragments (see _locate_frames)
            return self.lut.pixel_array(self._frame(index), index=0, **self.options)
        return self.lut.pixel_array(self.source, index=index, **self.options)

    def _attempt(self, index: int) -> np.ndarray | ImageError:
        try:
            return self._decode(index)
        except ImageError as exc:
            return exc

    def _decode(self, index: int) -> np.ndarray:
        try:
            return self._pixels(index)
        except Exception as exc:
            raise self._decode_error(index, exc) from None

    def _decode_error(self, index: int, exc: Exception) -> ImageError:
        """A frame that does not decode: missing decoder plugin, corrupt compressed data, the data cut short."""
        message = " ".join(str(exc).split())  # pydicom lists each plugin's failure on a line of its own
        if "less than expected" in message:
            return ImageError(f"{self._where(index)}: truncated DICOM file (the pixel data is cut short: {message})")
        syntax = getattr(getattr(self.ds, "file_meta", None), "TransferSyntaxUID", None)
        # pydicom's message names the plugins this transfer syntax needs (pillow alone decodes none of JPEG
        # Lossless or JPEG-LS): pointing at one of them, not at a fixed pair
        hint = " (install one of the decoding plugins named)" if "missing dependencies" in message else ""
        return ImageError(f"{self._where(index)}: cannot decode DICOM pixel data ({getattr(syntax, 'name', syntax)}): "
                          f"{clipped(message)}{hint}")

    def _map(self, pixels: np.ndarray, index: int) -> np.ndarray:
        try:
            if self.photometric == "PALETTE COLOR":  # the stored values are indices into the palette
                return self.lut.apply_color_lut(pixels, self.ds)
            if self.ds.get("SamplesPerPixel", 1) != 1:
                return self._colour(pixels, index)
            return self._monochrome(pixels, index)
        except ImageError:
            raise
        except Exception as exc:  # a WindowWidth of 0, a palette without its tables: the file's values, not ours
            raise ImageError(f"{self._where(index)}: DICOM {self.photometric} pixels cannot be mapped to "
                             f"intensities ({type(exc).__name__}: {first_line(exc)})") from None

    def _colour(self, pixels: np.ndarray, index: int) -> np.ndarray:
        """RGB as pydicom gives it (it converts YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT), YBR_PARTIAL converted
        here (pydicom leaves it as stored); stored in fewer bits than allocated (12 of 16): scaled from the range its
        bits hold, as monochrome is (preprocess would divide 12-bit values by 65535: a white of 0.06)."""
        if self.photometric in ("YBR_PARTIAL_420", "YBR_PARTIAL_422"):
            return _partial_ybr_to_rgb(pixels, self.bits)
        if self.photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            raise ImageError(f"{self._where(index)}: DICOM photometric interpretation {self.photometric} with "
                             f"{self.ds.get('SamplesPerPixel')} samples per pixel is not supported (RGB or YBR)")
        if self.bits >= pixels.dtype.itemsize * 8:
            return pixels
        return (pixels * np.float32(1 / ((1 << self.bits) - 1))).astype(np.float32)

    def _monochrome(self, pixels: np.ndarray, index: int) -> np.ndarray:
        lut, photometric, bits = self.lut, self.photometric, self.bits
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ImageError(f"{self.path}: DICOM photometric interpretation {photometric} with one sample per "
                             f"pixel is not supported (MONOCHROME1/2 or PALETTE COLOR)")
        ds = self._lut_attributes(index)
        transformed = any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
                                            "WindowCenter", "VOILUTSequence"))
        if pixels.dtype == np.uint8 and bits == 8 and not transformed:
            return 255 - pixels if photometric == "MONOCHROME1" else pixels
        if ds is self.ds and self.range is not None:  # a classic file's transforms are every frame's
            low, high = self.range
        else:
            # The output range of the same transforms applied to the extremes the stored bits can hold: the window's
            # or LUT's range when there is one, else the modality range of the stored values.
            signed = int(ds.get("PixelRepresentation", 0)) == 1
            extremes = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1],
                                dtype=np.int64 if signed else np.uint64).astype(pixels.dtype)
            # Sorted: a negative RescaleSlope maps the largest stored value to the lowest.
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is said below, in the record
                low, high = sorted(float(v) for v in lut.apply_voi_lut(lut.apply_modality_lut(extremes, ds), ds))
            # A RescaleSlope of 1e308 takes the range to infinity: every pixel NaN, and the record blamed the model
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ImageError(f"{self._where(index)}: DICOM value range is not finite ({low}..{high}: rescale "
                                 f"slope/intercept or window out of range)")
            if not high > low:
                raise ImageError(f"{self._where(index)}: DICOM value range is empty ({low}..{high})")
            if ds is self.ds:
                self.range = low, high
        values = lut.apply_voi_lut(lut.apply_modality_lut(pixels, ds), ds)
        scaled = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return 1.0 - scaled if photometric == "MONOCHROME1" else scaled

    def _lut_attributes(self, index: int):
        """What pydicom's modality and VOI LUT functions read, for frame ``index``: the top level's attributes, with
        an enhanced multi-frame file's (Enhanced CT/MR, tomosynthesis) Pixel Value Transformation and Frame VOI LUT
        functional groups laid over them, the frame's own over the shared ones: such files hold their rescale and
        window there alone. A value left empty (a RescaleSlope without one) counts as absent."""
        from pydicom.dataset import Dataset

        layers = [self.ds]
        shared, per_frame = self.ds.get("SharedFunctionalGroupsSequence"), self.ds.get("PerFrameFunctionalGroupsSequence")
        for groups in (shared[0] if shared else None, per_frame[index] if per_frame and index < len(per_frame) else None):
            layers += [groups[name][0] for name in _FRAME_LUT_GROUPS if groups is not None and groups.get(name)]
        if len(layers) == 1 and all(self.ds[k].VM > 0 for k in _LUT_KEYWORDS if k in self.ds):
            return self.ds  # a classic file as it is
        attributes = Dataset()
        # pydicom unpacks an OW LUT by the file's byte order, which it reads from file_meta
        attributes.file_meta = self.ds.file_meta
        for layer in layers:
            for keyword in _LUT_KEYWORDS:
                if keyword in layer and layer[keyword].VM > 0:
                    attributes[keyword] = layer[keyword]
        return attributes


# What pydicom's LUT functions read (pydicom.pixels.apply_modality_lut, apply_voi_lut), and the functional groups
# of enhanced multi-frame files that hold some of them per frame.
_LUT_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation", "RescaleSlope",
                 "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
                 "VOILUTFunction", "VOILUTSequence")
_FRAME_LUT_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


# DICOM PS3.3 C.7.6.3.1.2, YBR_PARTIAL from 8-bit RGB: (Y, Cb, Cr) = M (R, G, B) + (16, 128, 128), the ranges of
# ITU-R BT.601 (Y 16-235, Cb and Cr 16-240).
_RGB_TO_PARTIAL_YBR = np.array([[0.2568, 0.5041, 0.0979], [-0.1482, -0.2910, 0.4392], [0.4392, -0.3678, -0.0714]])
_PARTIAL_YBR_OFFSETS = np.array([16.0, 128.0, 128.0])


def _partial_ybr_to_rgb(pixels: np.ndarray, bits: int) -> np.ndarray:
    """YBR_PARTIAL_420/422 samples (as decoded, full resolution) to RGB in [0, 1]; offsets and range scaled from
    8 bits to ``bits``."""
    scale = float(1 << (bits - 8)) if bits > 8 else 1.0
    ybr = pixels.astype(np.float64) - _PARTIAL_YBR_OFFSETS * scale
    rgb = ybr @ np.linalg.inv(_RGB_TO_PARTIAL_YBR).T / (255.0 * scale)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def read_still(path: Path) -> list[np.ndarray] | DicomFrames:
    """An image or DICOM file's frames: one, except multi-frame DICOM, whose frames are decoded as they are iterated
    (an item is an ImageError where that frame is unusable)."""
    try:  # an image suffix is taken at its word: a second open per image costs a round trip on a network share
        dicom = path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return read_dicom(path) if dicom else [read_image(path)]


def read_single_image(path: str | Path) -> np.ndarray:
    """The one image of an image or single-frame DICOM file: a labelled data set has one label per file."""
    frames = read_still(Path(path))
    if len(frames) != 1:
        raise ImageError(f"{path}: a DICOM file of {len(frames)} frames; a data set takes one image per file "
                         f"(`medmamba-edge run` classifies every frame)")
    (image,) = frames  # one frame is decoded when its file is read: an error there was raised already
    return image


def is_still(path: Path) -> bool:
    """Whether ``path`` names what ``read_still`` reads: an image or DICOM suffix, or a DICOM by its magic whatever
    its name (OSError if that file cannot be read). Not only suffix-less names: PACS exports name files by their
    UID (``CR.1.2.276.0.7230010.3.1.4.8323329``), whose last digits read as a suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)
