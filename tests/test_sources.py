"""Sources: the URI grammar, broken inputs, DICOM mapping, video files and a network stream that drops."""

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from medmamba_edge.runtime.sources import video
from medmamba_edge.runtime.decode import ImageError
from medmamba_edge.runtime.decode import read_dicom
from medmamba_edge.runtime.sources import SourceError, file_url_path, iterate, open_source
from medmamba_edge.runtime.sources.files import glob_files
from medmamba_edge.runtime.uri import without_password
from tests.shared_data import require_shared

pydicom = pytest.importorskip("pydicom")


def write_video(path, count=12, size=(64, 48), fourcc="MJPG", fps=10):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    rng = np.random.default_rng(0)  # noise: the frames, not the container, make up the file
    for _ in range(count):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def synthetic_dicom(path, pixels, photometric="MONOCHROME2", pixel_data=None, **tags):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
    ds.save_as(path, enforce_file_format=True)
    return path


def resave(path, syntax) -> None:
    """The DICOM file at ``path`` written again in transfer syntax ``syntax`` (pydicom encodes its pixel data)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)


def test_uri_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match=r"camera 99: cannot be opened \(no such device"):
        open_source("99")
    monkeypatch.setattr(video, "has_gstreamer", lambda: False)
    with pytest.raises(SourceError, match=r"no GStreamer support.*python3-opencv"):
        open_source("csi://0")
    with pytest.raises(SourceError, match="unknown scheme ftp://"):
        open_source("ftp://host/x.mp4")
    for attempts in (-1, 1.5):  # -1 was taken as 0: "cannot be opened after -1 attempts"
        with pytest.raises(SourceError, match=f"--reconnect must be an integer ≥ 0, got {attempts}"):
            open_source("http://127.0.0.1:9/x", reconnect=attempts)
    with pytest.raises(SourceError, match="no such file, folder, camera or stream"):
        open_source(str(tmp_path / "missing.png"))
    with pytest.raises(SourceError, match="١: no such file, folder, camera or stream"):
        open_source("١")  # an Arabic-Indic digit one: a file name, not camera 1
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="unsupported file type .txt"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images or DICOM files found"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no image or DICOM file matches"):
        open_source(str(tmp_path / "*.png"))
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(SourceError, match="video file is empty"):
        open_source(str(tmp_path / "zero.mp4"))
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(SourceError, match="cannot be opened as a video"):
        open_source(str(tmp_path / "noise.mp4"))
    for empty in ("", "  "):  # an unset "$SOURCE": not the current folder
        with pytest.raises(SourceError, match="SOURCE is empty"):
            open_source(empty)
    # Spaces around a spec are dropped, unless the name as given is a file (" scan.png" was "no such file").
    cv2.imwrite(str(tmp_path / " spaced.png"), np.zeros((8, 8), np.uint8))
    assert [f.error for f in open_source(str(tmp_path / " spaced.png")).frames()] == [None]
    with pytest.raises(SourceError, match="no such file"):
        open_source(f"  {tmp_path / 'spaced.png'}  ")
    with pytest.raises(SourceError, match="names a file on this machine .* not on otherhost"):
        open_source(f"file://otherhost{tmp_path / 'zero.mp4'}")


def test_a_url_that_names_no_host_file_or_device_or_does_not_parse_is_refused_at_once(tmp_path, monkeypatch):
    """rtsp:// went through FFmpeg's six attempts (15 s) to 'cannot be opened', file:// read the current folder,
    v4l2:// was 'camera : cannot be opened' and rtsp://[::1/x ended in urllib's ValueError traceback."""
    cv2.imwrite(str(tmp_path / "scan.png"), np.zeros((8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)  # where file:// found scan.png and classified it
    started = time.monotonic()
    for spec, names in [("rtsp://", "host; expected rtsp://HOST"), ("rtsp:///live", "host"), ("HTTP://", "host"),
                        ("file://", "file; expected file:///path"), ("file://localhost", "file"),
                        ("v4l2://", "device; expected v4l2:///dev/videoN")]:
        with pytest.raises(SourceError, match=f"^{re.escape(spec)}: names no {re.escape(names)}"):
            open_source(spec)
    assert time.monotonic() - started < 1
    with pytest.raises(SourceError, match=r"^rtsp://admin:\*\*\*@\[::1/x: not a valid URL \(Invalid IPv6 URL\)"):
        open_source("rtsp://admin:secret@[::1/x")


def test_a_camera_index_past_opencv_s_c_int_is_no_such_device_not_a_traceback():
    """`run m.onnx 2147483648` ended in cv2.error's 'Overload resolution failed: ... integer won't fit into a C int'."""
    for index in ("2147483648", "99999999999999999999"):
        with pytest.raises(SourceError, match=f"^camera {index}: no such device \\(a camera index is at most 2147483647\\)$"):
            open_source(index)
    with pytest.raises(SourceError, match="^camera 2147483647: cannot be opened"):
        open_source("2147483647")


def test_folder_skips_broken_files_and_keeps_going(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a_rgb.png"), rgb)
    cv2.imwrite(str(tmp_path / "b_gray.png"), rgb[:, :, 0])
    cv2.imwrite(str(tmp_path / "c_rgba.png"), np.dstack([rgb, rgb[:, :, :1]]))
    cv2.imwrite(str(tmp_path / "d_deep.png"), rgb[:, :, 0].astype(np.uint16) * 257)
    (tmp_path / "e_zero.png").write_bytes(b"")
    (tmp_path / "f_cut.png").write_bytes((tmp_path / "a_rgb.png").read_bytes()[:80])
    synthetic_dicom(tmp_path / "g_nosuffix", rgb[:, :, 0].copy())
    synthetic_dicom(tmp_path / "h.1.2.826.0.1.3680043.8.498.10001", rgb[:, :, 1].copy())  # a PACS export's UID name
    (tmp_path / "notes.txt").write_text("not an image: not listed")
    frames = list(open_source(str(tmp_path)).frames())
    assert [f.source.rsplit("/", 1)[-1] for f in frames] == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_deep.png",
                                                            "e_zero.png", "f_cut.png", "g_nosuffix",
                                                            "h.1.2.826.0.1.3680043.8.498.10001"]
    assert [f.image.shape if f.image is not None else None for f in frames][:4] == [(40, 50, 3), (40, 50), (40, 50, 4), (40, 50)]
    assert frames[3].image.dtype == np.uint16
    assert "file is empty" in frames[4].error and "not a decodable image" in frames[5].error
    assert np.array_equal(frames[6].image, rgb[:, :, 0])
    # A glob, every 2nd file, and --loop with --max-frames.
    picked = list(iterate(open_source(str(tmp_path / "*.png")), stride=2, max_frames=5, loop=True))
    assert [f.source.rsplit("/", 1)[-1] for f in picked] == ["a_rgb.png", "c_rgba.png", "e_zero.png", "a_rgb.png", "c_rgba.png"]


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    stored = np.array([[0, 1000, 2000, 3000], [4000, 4095, 2048, 100]], dtype=np.uint16)
    # Rescale to HU-like values (−1024..3071), window centre 1000 width 2000 → output 0..1 over 0..2000 HU.
    path = synthetic_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                           WindowCenter=1000, WindowWidth=2000)
    (x,) = read_dicom(path)
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    hu = stored.astype(float) - 1024
    expected = np.clip((hu - (1000 - 0.5)) / (2000 - 1) + 0.5, 0, 1)  # DICOM's LINEAR window function
    assert np.allclose(x, expected, atol=1e-3)
    # MONOCHROME1: high stored values are dark; inverted so that bright means dense as in MONOCHROME2.
    (y,) = read_dicom(synthetic_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", BitsStored=12))
    assert np.allclose(y, 1 - stored / 4095, atol=1e-6)
    # A negative slope maps the largest stored value to the lowest: the range is the same, the other way round.
    (z,) = read_dicom(synthetic_dicom(tmp_path / "neg.dcm", stored, BitsStored=12, RescaleSlope=-1, RescaleIntercept=0))
    assert np.allclose(z, 1 - stored / 4095, atol=1e-6)
    # 16-bit without any LUT keeps its precision: no two stored values collapse.
    assert len(np.unique(next(iter(read_dicom(synthetic_dicom(tmp_path / "raw.dcm", stored)))))) == len(np.unique(stored))


def test_broken_dicom_and_the_real_one(tmp_path):
    good = synthetic_dicom(tmp_path / "ok.dcm", np.zeros((8, 8), np.uint16))
    (tmp_path / "cut.dcm").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="cut.dcm"):
        read_dicom(tmp_path / "cut.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(ImageError, match="not a readable DICOM file"):
        read_dicom(tmp_path / "junk.dcm")
    # Two frames' pixels under a header for one: pydicom warns and decodes the first; the header decides.
    pixels = np.zeros((64, 64), np.uint8)
    with pytest.raises(ImageError, match=r"rows\.dcm: DICOM pixel data of 4096 bytes, more than the 2048 its header"):
        read_dicom(synthetic_dicom(tmp_path / "rows.dcm", pixels, Rows=32))
    float_map = synthetic_dicom(tmp_path / "float.dcm", pixels)
    ds = pydicom.dcmread(float_map)
    del ds.PixelData
    ds.FloatPixelData = np.zeros((64, 64), np.float32).tobytes()
    ds.save_as(float_map)
    with pytest.raises(ImageError, match="float pixel data .* is not supported"):  # complete, not "truncated"
        read_dicom(float_map)
    real = require_shared("data", "dicom", "chest_xray_rsna.dcm")
    (image,) = read_dicom(real)
    # 8-bit MONOCHROME2 without LUTs: exactly its stored pixels, as if saved as PNG.
    assert image.dtype == np.uint8 and np.array_equal(image, pydicom.dcmread(real).pixel_array)


def real_dicom_as(path, **changes):
    """The real RSNA chest radiograph (8-bit MONOCHROME2, no LUTs) with ``changes`` to its header (and pixels), saved
    at ``path``."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(require_shared("data", "dicom", "chest_xray_rsna.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    if "PixelData" in changes:  # new pixels, stored uncompressed
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path)
    return path


def test_the_real_radiograph_as_monochrome1_windowed_or_signed_is_mapped_by_its_header(tmp_path):
    """Each header field that changes what the pixels mean, on real pixels: inverted when stored as MONOCHROME1 (8-bit,
    returned as uint8), through its VOI window (DICOM's LINEAR function), and a signed 12-bit image over its signed
    range (read as unsigned, every negative value would be clipped to black)."""
    stored = pydicom.dcmread(require_shared("data", "dicom", "chest_xray_rsna.dcm")).pixel_array
    (inverted,) = read_dicom(real_dicom_as(tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert inverted.dtype == np.uint8 and np.array_equal(inverted, 255 - stored)
    (windowed,) = read_dicom(real_dicom_as(tmp_path / "window.dcm", WindowCenter=150, WindowWidth=100))
    expected = np.clip((stored.astype(float) - (150 - 0.5)) / (100 - 1) + 0.5, 0, 1)
    assert windowed.dtype == np.float32 and np.allclose(windowed, expected, atol=1e-3)
    assert (windowed == 0).mean() > 0.1 and (windowed == 1).mean() > 0.1  # the window cuts both ends
    signed = stored.astype(np.int16) * 16 - 2048  # −2048..2032, as a signed 12-bit CT stores them
    (image,) = read_dicom(real_dicom_as(tmp_path / "signed.dcm", BitsAllocated=16, BitsStored=12, HighBit=11,
                                        PixelRepresentation=1, PixelData=signed.tobytes()))
    assert (signed < 0).mean() > 0.2 and np.allclose(image, (signed + 2048) / 4095, atol=1e-6)


def test_a_multi_frame_dicom_is_decoded_frame_by_frame_each_with_its_record(tmp_path, monkeypatch):
    """Frame by frame: a 48-frame 2048² study decoded at once took 5 GB. A corrupt frame gets its own record and
    the others theirs (one record for the file lost its good frames); a frame over the pixel limit is refused
    from the header, as any other image over it."""
    from pydicom.encaps import encapsulate, generate_fragmented_frames
    from pydicom.uid import RLELossless

    from medmamba_edge.runtime import decode

    frames = np.stack([np.full((16, 16), value, np.uint8) for value in (10, 20, 30)])
    ds = pydicom.dcmread(synthetic_dicom(tmp_path / "cine.dcm", frames[0], NumberOfFrames=3,
                                         pixel_data=frames.tobytes()))
    ds.compress(RLELossless)
    encoded = [b"".join(parts) for parts in generate_fragmented_frames(ds.PixelData, number_of_frames=3)]
    for broken in (1, 0):  # the first one too: it was decoded when the file was opened, and took the others along
        ds.PixelData = encapsulate([part[:20] if k == broken else part for k, part in enumerate(encoded)])
        ds.save_as(tmp_path / "cine.dcm")
        records = [(f.index, None if f.image is None else int(f.image.max()), f.error)
                   for f in open_source(str(tmp_path / "cine.dcm")).frames()]
        assert [r[:2] for r in records] == [(k, None if k == broken else 10 * (k + 1)) for k in range(3)]
        assert records[broken][2].startswith(f"{tmp_path / 'cine.dcm'} frame {broken}: cannot decode DICOM pixel "
                                             f"data (RLE Lossless)")
    # Deflated (the whole data set compressed): read from the inflated copy, not the file (it was refused as cut).
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    deflated = pydicom.dcmread(synthetic_dicom(tmp_path / "deflated.dcm", frames[0], NumberOfFrames=3,
                                               pixel_data=frames.tobytes()))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < frames.nbytes
    assert [int(f.image.max()) for f in open_source(str(tmp_path / "deflated.dcm")).frames()] == [10, 20, 30]
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 255)
    with pytest.raises(ImageError, match=r"cine.dcm: a 16×16 DICOM frame .* over the limit of 255 pixels"):
        read_dicom(tmp_path / "cine.dcm")


@pytest.mark.parametrize("fragments", [1, 2])
def test_compressed_frames_without_an_offset_table_are_located_once_each_and_a_bad_one_keeps_its_record(
        tmp_path, monkeypatch, fragments):
    """JPEG frames without a Basic Offset Table: pydicom, asked for each frame by index, walked every fragment of
    the file again (parse_fragments) for each one, N² item headers: 1000 frames took 3.8 s, 3.8 ms a frame (of two
    fragments each, 11 s), from the first frame on and after a bad one. The fragments are walked once; the frames
    decode as before, the bad one with its own reason and the frames after it read."""
    import io

    import pydicom.encaps
    from PIL import Image
    from pydicom.encaps import encapsulate, itemize_frame
    from pydicom.uid import JPEGBaseline8Bit

    count, bad = 300, 7
    codes = []
    for k in range(count):
        jpeg = io.BytesIO()
        Image.fromarray(np.full((16, 16), k % 250, np.uint8)).save(jpeg, "JPEG", quality=95)
        codes.append(jpeg.getvalue())
    ds = pydicom.dcmread(synthetic_dicom(tmp_path / "cine.dcm", np.zeros((16, 16), np.uint8), NumberOfFrames=count,
                                         pixel_data=bytes(16 * 16 * count)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    damaged = codes[bad][:-40] + bytes(38) + codes[bad][-2:]  # its end marker kept: the frame's end is found
    stored = [damaged if k == bad else code for k, code in enumerate(codes)]
    if fragments == 1:
        ds.PixelData = encapsulate(stored, has_bot=False)
    else:  # an empty Basic Offset Table, then each frame in two fragments
        ds.PixelData = encapsulate([], has_bot=False) + b"".join(
            b"".join(itemize_frame(code, nr_fragments=2)) for code in stored)
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "cine.dcm")
    walks = []
    parse_fragments = pydicom.encaps.parse_fragments
    monkeypatch.setattr(pydicom.encaps, "parse_fragments", lambda *a, **k: walks.append(1) or parse_fragments(*a, **k))
    frames = list(open_source(str(tmp_path / "cine.dcm")).frames())
    assert len(walks) <= 1  # was one walk of all the fragments a frame
    assert [f.index for f in frames] == list(range(count))
    assert frames[bad].image is None and frames[bad].error.startswith(
        f"{tmp_path / 'cine.dcm'} frame {bad}: cannot decode DICOM pixel data (JPEG Baseline")
    for frame, code in zip(frames, codes):  # the others: the pixels their JPEG holds
        if frame.index != bad:
            assert frame.error is None and np.array_equal(frame.image, np.asarray(Image.open(io.BytesIO(code))))


def test_compressed_dicom_frames_of_many_fragments_are_read_in_one_read_each_and_leave_the_file_s_header_alone(
        tmp_path, monkeypatch):
    """A frame of several fragments (no Basic Offset Table) is decoded from its own fragments (DicomFrames._frame):
    they were read one read a fragment and joined as read (data += fragment), a frame's size times its fragment
    count (3 JPEG frames of 2048² in 2 KB fragments: 7 s, where the file read whole by pydicom took 0.5 s); and the
    one-frame data set shared the file's elements, so that its NumberOfFrames = 1 made the file's 1. Each frame's
    fragments are read in one read, joined once: pydicom's own pixels; the file's header as it was."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate, itemize_frame
    from pydicom.pixels import iter_pixels
    from pydicom.uid import JPEGBaseline8Bit

    import medmamba_edge.runtime.decode as decode

    count, rng = 3, np.random.default_rng(0)
    codes = []
    for _ in range(count):  # noise: ~60 KB of JPEG a frame, in 256-byte fragments
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(jpeg, "JPEG", quality=90)
        codes.append(jpeg.getvalue())
    path = synthetic_dicom(tmp_path / "cine.dcm", np.zeros((256, 256), np.uint8), NumberOfFrames=count,
                           pixel_data=bytes(256 * 256 * count))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([], has_bot=False) + b"".join(
        b"".join(itemize_frame(code, nr_fragments=len(code) // 256)) for code in codes)
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path)
    frames = read_dicom(path)
    assert frames.fragments is not None and min(map(len, frames.fragments)) > 200  # decoded by _frame

    reads = []  # the sizes read from the file as the frames are decoded

    class Counted:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            reads.append(size)
            return self.f.read(size)

    monkeypatch.setattr(decode, "open", lambda *a, **k: Counted(open(*a, **k)), raising=False)
    images = list(frames)
    assert len(reads) == count  # one read a frame, where there was one a fragment (over 200 a frame here)
    for image, expected in zip(images, iter_pixels(path), strict=True):
        assert np.array_equal(image, expected)
    assert frames.ds.NumberOfFrames == count  # the file's data set: was 1 after its frames


def test_video_stride_loop_and_truncation(tmp_path):
    video = write_video(tmp_path / "clip.avi", count=12)
    source = open_source(str(video))
    assert not source.live and source.fps == pytest.approx(10)
    frames = list(iterate(source, stride=3))
    assert [f.index for f in frames] == [0, 3, 6, 9] and frames[0].image.shape == (48, 64, 3)
    assert [f.index for f in iterate(open_source(str(video)), stride=5, loop=True, max_frames=6)] == [0, 5, 10, 0, 5, 10]
    data = video.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    # A frame's bytes zeroed mid-file: FFmpeg passes over it and the frames after it decode (11 of 12 here,
    # which once went unrecorded).
    (tmp_path / "hole.avi").write_bytes(data[: len(data) // 2] + bytes(300) + data[len(data) // 2 + 300:])
    for broken in ("cut.avi", "hole.avi"):
        *decoded, last = iterate(open_source(str(tmp_path / broken)))
        assert 0 < len(decoded) < 12 and all(f.error is None for f in decoded), broken
        assert f"{12 - len(decoded)} of the 12 frames the video lists did not decode" in last.error
        assert last.timestamp == pytest.approx(len(decoded) / 10)
    # A frame whose JPEG header is damaged fails its read: the run ended there (exit 0, frames 6-11 never read).
    sof = bytearray(data)
    start = [m.start() for m in re.finditer(b"\xff\xc0", data)][5]
    sof[start:start + 16] = bytes(b ^ 0xA5 for b in sof[start:start + 16])
    (tmp_path / "sof.avi").write_bytes(sof)
    for stride, kept in ((1, range(12)), (5, (0, 5, 10)), (2, range(0, 12, 2))):
        frames = list(iterate(open_source(str(tmp_path / "sof.avi")), stride=stride))
        assert [f.index for f in frames] == list(kept)
        assert [f.index for f in frames if f.error] == ([5] if 5 in kept else [])
        assert all("frame 5 does not decode (corrupt)" in f.error for f in frames if f.error)
    # A raw MJPEG recording (an IP camera's, `curl http://cam/mjpg > rec.mjpeg`) lists no frame count: it ended at
    # its first damaged frame, with no record for that frame or the rest.
    jpegs = [cv2.imencode(".jpg", np.full((48, 64, 3), 20 * i, np.uint8))[1].tobytes() for i in range(12)]
    jpegs[5] = jpegs[5].replace(b"\xff\xc0", b"\x00\xc0", 1)
    (tmp_path / "raw.mjpeg").write_bytes(b"".join(jpegs))
    frames = list(iterate(open_source(str(tmp_path / "raw.mjpeg"))))
    assert [f.index for f in frames] == list(range(12)) and [f.index for f in frames if f.error] == [5]
    # A damaged stretch past FILE_READ_FAILURES ends the reading, said as such (what follows was not read).
    from medmamba_edge.runtime.sources.video import FILE_READ_FAILURES

    data = write_video(tmp_path / "long.avi", count=40).read_bytes()
    damaged = bytearray(data)
    for start in [m.start() for m in re.finditer(b"\xff\xc0", data)][3:3 + FILE_READ_FAILURES + 1]:
        damaged[start] = 0
    (tmp_path / "long.avi").write_bytes(damaged)
    *read, last = iterate(open_source(str(tmp_path / "long.avi")))
    assert [f.index for f in read] == [0, 1, 2] and last.index == 3
    assert f"{FILE_READ_FAILURES + 1} frames in a row from frame 3 on did not decode, and the rest of the 40 " \
           f"frames the video lists was not read (truncated or corrupt)" in last.error
    # From the first frame on, the same (it was "no frame decodes", though the frames after the stretch do).
    (tmp_path / "head.avi").write_bytes(damaged.replace(b"\xff\xc0", b"\x00\xc0", 3))
    (only,) = iterate(open_source(str(tmp_path / "head.avi")))
    assert only.index == 0 and "frames in a row from frame 0 on did not decode, and the rest" in only.error


class FlakyMjpegServer:
    """An MJPEG stream on 127.0.0.1 that closes each connection after a few frames and refuses (503)
    every connection after the first two: a camera that drops and then goes away."""

    def __init__(self, frames_per_connection=4, good_connections=2):
        jpegs = [cv2.imencode(".jpg", np.full((48, 64, 3), 40 * i, np.uint8))[1].tobytes() for i in range(frames_per_connection)]
        self.connections, self.paths = 0, []  # the paths asked for, query included
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.connections += 1
                outer.paths.append(self.path)
                if outer.connections > good_connections:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for jpeg in jpegs:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
                    self.wfile.flush()
                    time.sleep(0.01)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_an_outage_is_timed_on_a_clock_that_nothing_sets(monkeypatch):
    """outage_s was the wall clock's difference: NTP stepping the clock back an hour while the stream reconnected (a
    board without a real-time clock, synced once its network is back) gave an outage of -3600 s. Its timestamp stays
    the wall clock's, as the frames' are."""
    server = FlakyMjpegServer()
    stepped = []
    wall = lambda: time.time() - 3600 * bool(stepped)  # noqa: E731  set back an hour at the first back-off
    monkeypatch.setattr(video, "wall_clock", wall)
    try:
        source = open_source(server.url, reconnect=1)
        source.backoff, source.notify = 0.2, stepped.append
        frames = []
        for frame in source.frames():
            frames.append(frame)
            if len(frames) == 6:  # 4 frames, the outage, the first frame after it
                break
    finally:
        server.close()
    before, outage, after = frames[3], frames[4], frames[5]
    assert outage.index is None and 0.2 <= outage.outage_s < 5, outage.outage_s
    assert before.timestamp <= outage.timestamp and after.timestamp < outage.timestamp - 3000


def test_a_stop_while_a_stream_waits_to_reconnect_opens_nothing_more():
    """A stop during the back-off still reconnected: a stalled server held SIGTERM another 5 s (FFmpeg's timeout),
    past docker stop's 10 s grace, and the outputs were left .partial."""
    opened = []
    source = video.VideoSource(lambda: opened.append(1) or cv2.VideoCapture(), "stream x", "http://x", live=True)
    threading.Timer(0.1, source.stop).start()
    started = time.monotonic()
    (outage,) = source.frames()  # the stream never delivered: its outage, ended by the stop, is all it gives
    assert len(opened) == 1 and time.monotonic() - started < 0.4
    assert outage.error.endswith("; the run was stopped while reconnecting") and 0.05 < outage.outage_s < 0.4


@pytest.mark.parametrize("reconnect", [0, 5])
def test_a_read_the_stop_finds_waiting_ends_the_stream_without_a_reconnect_or_a_loss(reconnect):
    """A stop during a stalled stream's read (FFmpeg's 5 s timeout) was followed by 'no frames; reconnecting in 0.5 s
    (attempt 1/5)' under 'stopping on SIGTERM: …', and with --reconnect 0 by 'lost; no frames after 0 reconnect
    attempts', exit 1, for a run the user had stopped."""
    source = None

    class StalledCapture:
        def read(self):  # returns when FFmpeg's read timeout expires, the stop having come meanwhile
            source.stop()
            return False, None

        get = lambda self, prop: 0.0  # noqa: E731
        release = lambda self: None  # noqa: E731

    source = video.VideoSource(StalledCapture, "stream x", "http://x", live=True, reconnect=reconnect)
    notices = []
    source.notify = notices.append
    assert list(source.frames()) == [] and notices == []


def test_frame_timestamps_hold_what_the_source_knows_not_float_noise(tmp_path):
    """A 10 fps video's frames 3 and 6 were at 0.30000000000000004 and 0.6000000000000001 s in their JSONL records
    (CAP_PROP_POS_MSEC / 1000), and a still's wall-clock time had 17 digits (1765152000.1234567) where time.time()
    knows microseconds. A file's position is now to the microsecond, as is the time given to a frame
    that did not decode; wall-clock time to the microsecond."""
    video = write_video(tmp_path / "clip.avi", count=12)
    assert [json.dumps(f.timestamp) for f in iterate(open_source(str(video)))] == [str(i / 10) for i in range(12)]
    data = video.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) * 3 // 4])
    *decoded, last = iterate(open_source(str(tmp_path / "cut.avi")))
    assert last.error and json.dumps(last.timestamp) == str(len(decoded) / 10)
    folder = tmp_path / "stills"
    folder.mkdir()
    for name in "abcd":
        cv2.imwrite(str(folder / f"{name}.png"), np.zeros((8, 8), np.uint8))
    stills = list(iterate(open_source(str(folder))))
    assert len(stills) == 4 and all(abs(f.timestamp - time.time()) < 60 for f in stills)
    assert [len(json.dumps(f.timestamp).partition(".")[2]) <= 6 for f in stills] == [True] * 4


def test_a_video_files_timestamps_keep_its_time_base_finer_than_a_millisecond(tmp_path):
    """Rounded to the millisecond, a 29.97 fps (30000/1001) clip's frames, 33.3667 ms apart, were at 0.033, 0.067,
    0.1 and 0.133 s: 33 or 34 ms apart and each up to 0.5 ms off (and a clip over 1000 fps would give two frames
    one time). Its records now hold the position to the microsecond."""
    video = write_video(tmp_path / "ntsc.avi", count=5, fps=30000 / 1001)
    assert [f.timestamp for f in iterate(open_source(str(video)))] == [round(i * 1001 / 30000, 6) for i in range(5)]


def test_a_video_file_on_a_web_server_is_read_once_and_whole_as_a_file_is(tmp_path):
    """`run m.onnx http://host/clip.avi` (a 20-frame BUSI clip) read the file as a camera's stream: 266 records in
    7.6 s, 173 of them 'dropped', the clip replayed from its start at each end (a 'reconnect'), until stopped."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler

    write_video(tmp_path / "clip.avi", count=12)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
        source = open_source(url)
        assert not source.live and source.description == f"video {url}"
        frames = list(iterate(source, max_frames=30))
    finally:
        server.shutdown()
        server.server_close()
    assert [(f.index, f.error) for f in frames] == [(i, None) for i in range(12)]
    assert [round(f.timestamp, 3) for f in frames[:3]] == [0.0, 0.1, 0.2]  # its own time, as a file's


@contextlib.contextmanager
def web_server_cutting_short(data: bytes, end: int, stall: bool):
    """A web server's URL of a video whose answer lists all of ``data``'s length and sends its first ``end`` bytes,
    then stalls past FFmpeg's 5 s read timeout (``stall``) or closes the connection."""
    released = threading.Event()

    class CuttingShort(BaseHTTPRequestHandler):
        log_message = lambda self, *args: None  # noqa: E731

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:end])
            self.wfile.flush()
            if stall:
                released.wait(10)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), CuttingShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
    finally:
        released.set()
        server.shutdown()
        server.server_close()


def test_a_video_on_a_web_server_whose_connection_stalls_is_not_blamed_on_the_file(tmp_path):
    """A stall while reading http://host/clip.avi ended with '11 of the 20 frames the video lists did not decode
    (truncated or corrupt)': the file was blamed for a lost connection."""
    data = write_video(tmp_path / "clip.avi", count=20).read_bytes()
    with web_server_cutting_short(data, len(data) // 2, stall=True) as url:
        frames = list(iterate(open_source(url), max_frames=30))
    *read, last = frames
    assert 0 < len(read) < 20 and all(f.error is None for f in read) and last.index == len(read)
    assert last.error == (f"{url}: {20 - len(read)} of the 20 frames the video lists did not decode (the connection "
                          f"stalled or dropped, or the file on the server is truncated or corrupt), from frame "
                          f"{len(read)} on")


def test_a_video_on_a_web_server_whose_connection_drops_before_its_first_frame_is_not_blamed_on_the_file(tmp_path):
    """A 20-frame clip whose server closed the connection after its header ended with 'the video opens but no frame
    decodes (no frames, or corrupt or unsupported video data)': the file was blamed for a lost connection."""
    data = write_video(tmp_path / "clip.avi", count=20).read_bytes()
    # the header and frame index's start, no frame
    with web_server_cutting_short(data, data.index(b"movi") + 4, stall=False) as url:
        (only,) = iterate(open_source(url, reconnect=0), max_frames=30)
    assert only.index == 0 and only.error == (f"{url}: the video opens but no frame decodes (unsupported video data, "
                                              f"or the connection stalled or dropped, or the file on the server is "
                                              f"truncated or corrupt)")


def test_a_stalled_stream_s_read_timeout_is_said_by_the_notice_alone(tmp_path):
    """OpenCV printed '[ WARN:0@11.050] global cap_ffmpeg_impl.hpp:435 _opencv_ffmpeg_interrupt_callback Stream
    timeout triggered after 5008.994569 ms' on stderr at each stall, under the run's own reconnect notice."""
    stall = threading.Event()
    jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()

    class Stalling(BaseHTTPRequestHandler):
        log_message = lambda self, *args: None  # noqa: E731

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
                self.wfile.flush()
            stall.wait(10)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    child = ("import sys\n"
             "from medmamba_edge.runtime.sources import SourceError, open_source, video\n"
             "video.NETWORK_TIMEOUT_MS = 500\n"
             "source = open_source(sys.argv[1], reconnect=0)\n"
             "try:\n    print(len(list(source.frames())))\nexcept SourceError as exc:\n    print(exc)\n")
    try:
        done = subprocess.run([sys.executable, "-c", child, f"http://127.0.0.1:{server.server_address[1]}/s.mjpg"],
                              capture_output=True, text=True, timeout=60)
    finally:
        stall.set()
        server.shutdown()
        server.server_close()
    assert "lost; no frames after 0 reconnect attempts" in done.stdout
    assert "WARN" not in done.stderr and "timeout" not in done.stderr, done.stderr


def test_the_capture_thread_s_read_stays_quiet_while_the_main_thread_writes_the_video_under_its_own_quiet():
    """With --save-video the capture thread reads, and the main thread writes each frame, inside quiet_opencv: each put
    back the level it had found, so a write that ended during a read turned OpenCV's warnings back on for the rest of
    it (the stall's 'Stream timeout triggered' printed again), and the read, ending, left them off for good."""
    from medmamba_edge.runtime.decode import _LOG_LEVEL, quiet_opencv

    level = _LOG_LEVEL.getLogLevel()
    assert level != 0
    writing, reading, write_done, read_levels = threading.Event(), threading.Event(), threading.Event(), []

    def read():  # the capture thread: its read starts while a write is under way and outlasts it
        writing.wait(5)
        with quiet_opencv():
            reading.set()
            write_done.wait(5)
            read_levels.append(_LOG_LEVEL.getLogLevel())
    reader = threading.Thread(target=read)
    reader.start()
    with quiet_opencv():  # the main thread's video write
        writing.set()
        reading.wait(5)
    write_done.set()
    reader.join(5)
    assert read_levels == [0] and _LOG_LEVEL.getLogLevel() == level


def test_stream_reconnects_with_backoff_then_gives_up():
    server = FlakyMjpegServer()
    try:
        source = open_source(server.url, reconnect=3)
        source.backoff = 0.05
        notices = []
        source.notify = notices.append
        assert source.live
        received = []
        with pytest.raises(SourceError, match="lost; no frames after 3 reconnect attempts"):
            for frame in source.frames():
                received.append(frame)
        outages = [i for i, frame in enumerate(received) if frame.outage_s is not None]
        assert len(received) == 10 and outages == [4, 9] and received[0].image.shape == (48, 64, 3)
        assert received[4].error.endswith("; reconnected after 1 reconnect attempt")
        assert received[9].error.endswith("; given up after 3 reconnect attempts")
        assert server.connections == 2 + 3  # two good ones, then the bounded attempts
        assert "reconnecting in" in notices[0] and notices[-1].endswith("(attempt 3/3)")
    finally:
        server.close()
    first_notices = []  # the first connection's retries are said as they happen, not only after them
    with pytest.raises(SourceError, match="cannot be opened after 2 attempts"):  # the first and one retry
        open_source(server.url, reconnect=1, notify=first_notices.append)
    assert len(first_notices) == 1 and first_notices[0].endswith("reconnecting in 0.5 s (attempt 1/1)")


def test_a_stream_s_password_is_given_to_ffmpeg_only_never_to_records_or_messages():
    """rtsp://admin:secret@cam/stream (how IP cameras are addressed) was each record's source, the console's
    'source: stream http://alice:s3cr@t@…' and every reconnect notice and error: logs and tickets held the password."""
    server = FlakyMjpegServer(good_connections=1)
    port = server.server.server_address[1]
    try:
        source = open_source(f"http://alice:s3cr@t@127.0.0.1:{port}/stream.mjpg", reconnect=1)
        source.backoff, notices = 0.01, []
        source.notify = notices.append
        frames = []
        with pytest.raises(SourceError) as lost:
            frames.extend(source.frames())
        assert len(frames) == 4 + 1 and frames[0].error is None  # the password reached the server: it answered
        shown = f"http://alice:***@127.0.0.1:{port}/stream.mjpg"
        assert {f.source for f in frames} == {shown} and source.description == f"stream {shown}"
        assert shown in str(lost.value) and shown in notices[0]
    finally:
        server.close()
    with pytest.raises(SourceError) as refused:
        open_source(f"rtsp://admin:secret@127.0.0.1:{port}/live", reconnect=0)
    assert str(refused.value).startswith(f"rtsp://admin:***@127.0.0.1:{port}/live: cannot be opened")
    with pytest.raises(SourceError, match=r"^ftp://admin:\*\*\*@host/x: unknown scheme"):
        open_source("ftp://admin:secret@host/x")
    assert "secret" not in str(pytest.raises(SourceError, open_source, "file://admin:secret@host/x").value)


def read_until_lost(url: Callable[[FlakyMjpegServer], str]) -> tuple[FlakyMjpegServer, list, str, str]:
    """A one-connection MJPEG stream read at ``url(server)`` until it is lost: the server (the paths it was asked
    for), the records, the source's description and the closing error."""
    server = FlakyMjpegServer(good_connections=1)
    try:
        source = open_source(url(server), reconnect=0)
        frames = []
        with pytest.raises(SourceError) as lost:
            frames.extend(source.frames())
    finally:
        server.close()
    assert len(frames) == 4 + 1 and frames[0].error is None  # the URL reached the server: it answered (+ the outage)
    return server, frames, source.description, str(lost.value)


def test_a_token_given_as_the_user_part_and_a_password_holding_a_slash_are_not_shown():
    """https://TOKEN@relay/stream and rtsp://APIKEY@cam/live (how cloud relays and some cameras take a token) were
    shown whole, as was the part after the '/' of a password holding one (rtsp://admin:pa/ss@cam/x)."""
    server, frames, description, lost = read_until_lost(lambda server: server.url.replace("://", "://T0KEN@"))
    port = server.server.server_address[1]
    shown = f"http://***@127.0.0.1:{port}/stream.mjpg"
    assert {f.source for f in frames} == {shown} and description == f"stream {shown}" and shown in lost
    for password in ["pa/ss", "p@ss/word", "pa?ss", "pa#ss"]:  # FFmpeg reads no such host: it never connects
        with pytest.raises(SourceError) as refused:
            open_source(f"rtsp://admin:{password}@127.0.0.1:{port}/live", reconnect=0)
        assert str(refused.value).startswith(f"rtsp://admin:***@127.0.0.1:{port}/live: cannot be opened")
    # A lone token before a host with a port, where the path holds an "@" too: the ":" is the port's, no password's.
    with pytest.raises(SourceError) as refused:
        open_source(f"rtsp://T0KEN@127.0.0.1:{port}/live@main", reconnect=0)
    assert str(refused.value).startswith("rtsp://***@main: cannot be opened")
    # An "@" of a working URL's query or path stays: it is no password's.
    assert without_password("rtsp://admin:pw@cam/x?notify=a@b.c") == "rtsp://admin:***@cam/x?notify=a@b.c"
    assert without_password("http://[::1]:80/users/a@b.c/feed") == "http://[::1]:80/users/a@b.c/feed"


def test_a_file_url_names_the_file_as_this_system_does(tmp_path, monkeypatch):
    """On Windows file:///C:/scans/a.png was read as the path /C:/scans/a.png: a folder "C:" under the current drive's
    root, which Windows refuses, so no file URL with a drive letter could be opened there."""
    sample = Path(__file__).parents[1] / "medmamba_edge/assets/samples/pneumoniamnist/val_0000_pneumonia.png"
    shutil.copy(sample, tmp_path / "chest x-ray.png")
    frame, = open_source("file://" + str(tmp_path / "chest%20x-ray.png")).frames()
    assert frame.source == str(tmp_path / "chest x-ray.png") and frame.error is None
    assert np.array_equal(frame.image, cv2.imread(str(sample), cv2.IMREAD_UNCHANGED))
    import urllib.request

    nturl2path = pytest.importorskip("nturl2path")  # what urllib.request reads with on Windows before 3.14

    # The reading alone, as on Windows (the rest of os stays this system's): urllib.request's reader there, and no
    # nturl2path module, which Python 3.19 removes (3.14 warned at its import). Read inside, asserted outside: with
    # os.name at "nt", pytest cannot report a failure.
    with monkeypatch.context() as windows:
        windows.setattr(os, "name", "nt")
        windows.setattr(urllib.request, "url2pathname", nturl2path.url2pathname)
        windows.setitem(sys.modules, "nturl2path", None)
        paths = [file_url_path("/C:/scans/chest%20x-ray.png"), file_url_path("/scans/a.png")]
    assert paths == ["C:\\scans\\chest x-ray.png", "\\scans\\a.png"]  # the second on the current drive


def test_a_url_naming_no_host_or_port_before_its_credentials_does_not_show_them():
    """A slash too many (rtsp:///admin:secret@cam) or a password starting with one (admin:/secret@cam) leaves FFmpeg
    no host or an empty port: 'names no host' and 'cannot be opened' showed the password, and a token, as typed."""
    for typed, shown in [("rtsp:///admin:s3cret@cam/live", "rtsp:///admin:***@cam/live"),
                         ("rtsp:///T0KEN@cam/live", "rtsp:///***@cam/live")]:
        with pytest.raises(SourceError) as refused:
            open_source(typed, reconnect=0)
        assert str(refused.value) == f"{shown}: names no host; expected rtsp://HOST[:PORT]/…"
    for typed in ["rtsp://admin:/s3cret@127.0.0.1:9/live", "rtsp://:9/s3cret@127.0.0.1:9/live"]:
        with pytest.raises(SourceError) as refused:
            open_source(typed, reconnect=0)
        assert "s3cret" not in str(refused.value) and "@127.0.0.1:9/live: cannot be opened" in str(refused.value)


def test_a_credential_in_a_stream_s_query_is_given_to_ffmpeg_only():
    """IP cameras and cloud relays take their credentials in the query (?user=admin&pwd=…, ?token=…, a signed URL's
    X-Amz-Signature): every record's source and every message held them, where a password before the host was
    masked."""
    query = "?user=admin&PWD=s3cret&fps=20&access_token=t0k&X-Amz-Signature=51g&monkey=1&key=&apiKey=k3y&accessToken=t0k"
    server, frames, description, lost = read_until_lost(lambda server: f"{server.url}{query}")
    assert server.paths == [f"/stream.mjpg{query}"]  # the server was given them
    shown = f"{server.url}?user=admin&PWD=***&fps=20&access_token=***&X-Amz-Signature=***&monkey=1&key=&apiKey=***&accessToken=***"
    assert {f.source for f in frames} == {shown} and description == f"stream {shown}" and shown in lost
    # An Azure SAS URL's signature is its sig= (the pattern names it, no test did: dropped from it, it was shown).
    assert (without_password("https://acct.blob.core.windows.net/cams/a.mp4?sv=2022-11-02&sr=b&sig=AbC%2Fd%3D") ==
            "https://acct.blob.core.windows.net/cams/a.mp4?sv=2022-11-02&sr=b&sig=***")


def test_an_srt_stream_s_passphrase_is_not_shown():
    """SRT's encryption password is its query's passphrase= (FFmpeg's libsrt option): 'cannot be opened' showed it."""
    with pytest.raises(SourceError) as refused:
        open_source("srt://127.0.0.1:9?mode=caller&passphrase=s3cr3tphrase&pbkeylen=16", reconnect=0)
    assert str(refused.value).startswith("srt://127.0.0.1:9?mode=caller&passphrase=***&pbkeylen=16: cannot be opened")


@pytest.mark.parametrize("spec", ["0", "/dev/video0", "v4l2:///dev/video0"])
def test_a_camera_that_stops_delivering_is_lost_after_the_reconnect_attempts_asked_for(spec, monkeypatch):
    class SilentCamera:  # opens, then delivers nothing: a camera unplugged mid-run (no camera on CI machines)
        opened = 0

        def __init__(self, *args):
            SilentCamera.opened += 1

        isOpened = lambda self: True  # noqa: E731
        read = lambda self: (False, None)  # noqa: E731
        get = lambda self, prop: 0.0  # noqa: E731
        release = lambda self: None  # noqa: E731

    monkeypatch.setattr(video.cv2, "VideoCapture", SilentCamera)
    source = open_source(spec, reconnect=2)
    source.backoff, source.notify = 0.001, lambda message: None
    with pytest.raises(SourceError, match="lost; no frames after 2 reconnect attempts"):
        list(source.frames())
    assert SilentCamera.opened == 1 + 2


def test_palette_colour_and_one_bit_dicom_are_mapped_not_read_as_raw_values(tmp_path):
    indices = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    ramp = (np.arange(256, dtype=np.uint16) * 257)
    lut = {f"{c}PaletteColorLookupTable{part}": value for c, data in (("Red", ramp), ("Green", ramp[::-1]),
                                                                      ("Blue", np.zeros(256, np.uint16)))
           for part, value in (("Descriptor", [256, 0, 16]), ("Data", data.tobytes()))}
    (rgb,) = read_dicom(synthetic_dicom(tmp_path / "palette.dcm", indices, photometric="PALETTE COLOR", **lut))
    assert rgb.shape == (8, 8, 3)
    assert np.array_equal(rgb[:, :, 0], ramp[indices]) and np.array_equal(rgb[:, :, 1], ramp[::-1][indices])
    # 1 bit per pixel: 0 and 1 are black and white, not two shades of black.
    bits = (np.arange(64).reshape(8, 8) % 3 == 0).astype(np.uint8)
    (mask,) = read_dicom(synthetic_dicom(tmp_path / "mask.dcm", bits, BitsAllocated=1, BitsStored=1, HighBit=0,
                                         pixel_data=pydicom.pixels.pack_bits(bits)))
    assert mask.dtype == np.float32 and np.array_equal(mask, bits.astype(np.float32))
    # RGB in 12 of 16 bits: scaled from 4095 as monochrome is, not passed on as uint16 (a white of 4095/65535).
    stored = np.random.default_rng(0).integers(0, 4096, (8, 8, 3), dtype=np.uint16)
    (colour,) = read_dicom(synthetic_dicom(tmp_path / "rgb12.dcm", stored[:, :, 0], photometric="RGB",
                                           SamplesPerPixel=3, PlanarConfiguration=0, BitsStored=12, HighBit=11,
                                           pixel_data=stored.tobytes()))
    assert colour.dtype == np.float32 and np.allclose(colour, stored / 4095, atol=1e-6)


def test_dicom_that_cannot_be_mapped_or_is_cut_says_so(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    with pytest.raises(ImageError, match=r"zero.dcm: DICOM MONOCHROME2 pixels cannot be mapped to intensities \(ValueError"):
        read_dicom(synthetic_dicom(tmp_path / "zero.dcm", stored, WindowCenter=40, WindowWidth=0))
    whole = synthetic_dicom(tmp_path / "whole.dcm", np.zeros((64, 64), np.uint16)).read_bytes()
    for cut in (400, 500, len(whole) - 4000, len(whole) - 1):
        (tmp_path / "cut.dcm").write_bytes(whole[:cut])
        with pytest.raises(ImageError, match="cut.dcm: truncated DICOM file"):
            read_dicom(tmp_path / "cut.dcm")


def test_a_dicom_cut_inside_its_pixel_data_element_says_so_not_before_it(tmp_path):
    """The real chest radiograph (JPEG, encapsulated pixel data of undefined length) cut at half its size was
    'truncated DICOM file: ... that ends before its pixel data', though its Pixel Data element begins and half of it
    is there: pydicom drops an element the file ends in without a word. Cut before the element it still says
    'before'; inside its header or its value, it says so, how much of it is there and in which item it ends.
    Uncompressed pixel data (pydicom keeps the part there is) says how many of its declared bytes it holds."""
    from pydicom.data import get_testdata_file

    def cut(source, *offsets):
        """The messages of ``source`` cut ``offsets`` bytes after the start of its pixel data's value."""
        data = source.read_bytes()
        value = pydicom.dcmread(source, defer_size=64).get_item("PixelData", keep_deferred=True).value_tell
        messages = []
        for offset in offsets:
            (tmp_path / "cut.dcm").write_bytes(data[:value + offset])
            with pytest.raises(ImageError) as refused:
                list(read_dicom(tmp_path / "cut.dcm"))
            messages.append(str(refused.value).removeprefix(f"{tmp_path / 'cut.dcm'}: truncated DICOM file"))
        return messages

    chest = require_shared("data", "dicom", "chest_xray_rsna.dcm")  # an empty offset table, one fragment
    value = pydicom.dcmread(chest, defer_size=64).get_item("PixelData", keep_deferred=True).value_tell
    half, end = chest.stat().st_size // 2 - value, chest.stat().st_size - 10 - value
    that = ": Secondary Capture Image Storage that ends "
    inside = that + "inside its pixel data (encapsulated, "
    assert cut(chest, -500, -13, -12, -8, -2, 0, 3, 8, 20, half, end) == [that + "before its pixel data"] * 3 + [
        that + "inside its pixel data element's header (4 bytes of it)",  # its tag; then before its length, which
        that + "inside its pixel data element's header (10 bytes of it)",  # pydicom failed on (struct.error)
        inside + "0 bytes of it: the file ends before its Basic Offset Table)",
        inside + "3 bytes of it: the file ends in its Basic Offset Table)",
        inside + "8 bytes of it: the file ends after its Basic Offset Table)",
        inside + "20 bytes of it: the file ends in fragment 1)",
        inside + f"{half} bytes of it: the file ends in fragment 1)",
        inside + f"{end} bytes of it: the file ends in fragment 1)"]
    # one fragment a frame (664 bytes each), after an offset table of two entries (8 bytes)
    rle = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert cut(rle, 16, 20, 688, 700, 1360, 1362) == [
        inside + "16 bytes of it: the file ends after its Basic Offset Table)",
        inside + "20 bytes of it: the file ends in the header of the item after its Basic Offset Table)",
        inside + "688 bytes of it: the file ends after fragment 1)",
        inside + "700 bytes of it: the file ends in fragment 2)",
        inside + "1360 bytes of it: the file ends after fragment 2)",  # before its sequence delimiter
        inside + "1362 bytes of it: the file ends in the header of the item after fragment 2)"]
    mr = Path(get_testdata_file("MR_small.dcm"))  # explicit VR, 8192 bytes uncompressed
    that = ": MR Image Storage that ends "
    assert cut(mr, -500, -13, -8, -4, 0, 4096) == [that + "before its pixel data"] * 2 + [
        that + "inside its pixel data element's header (4 bytes of it)",
        that + "inside its pixel data element's header (8 bytes of it)",
        " (the pixel data is cut short: 0 of the 8192 bytes its header describes)",
        " (the pixel data is cut short: 4096 of the 8192 bytes its header describes)"]


def test_folder_follows_links_to_folders_once_and_reports_what_it_cannot_read(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), elsewhere.mkdir()
    cv2.imwrite(str(elsewhere / "linked.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(data / "a.png"), np.zeros((8, 8), np.uint8))
    (data / "link").symlink_to(elsewhere)
    (data / "link_again").symlink_to(elsewhere)
    (data / "notes.txt").write_text("not an image: not listed")
    (data / ".DS_Store").write_bytes(b"metadata: not listed")
    frames = list(open_source(str(data)).frames())
    assert [(f.source.split("data/")[1], f.error is None) for f in frames] == [
        ("a.png", True), ("link/linked.png", True), ("link_again", False)]
    assert "a link to a folder already listed" in frames[2].error


def frames_without_file_permissions_overridden(spec) -> list[tuple[str, str | None]]:
    """(source, error) of each frame of ``spec``, listed by a process that file modes bind. Root's
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH ignore them, so as root it runs under setpriv without those two."""
    code = ("import json, sys; from medmamba_edge.runtime.sources import open_source; "
            "print(json.dumps([(f.source, f.error) for f in open_source(sys.argv[1]).frames()]))")
    command = [sys.executable, "-c", code, str(spec)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, which reads any file, and setpriv (util-linux) is not here to drop that")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [tuple(frame) for frame in json.loads(done.stdout)]


def test_a_dicom_file_removed_before_its_turn_gets_the_record_an_image_does(tmp_path):
    """docs/runtime.md: a file removed or renamed after the listing gets 'cannot read (No such file or directory)'; a
    DICOM file's was 'not a readable DICOM file (FileNotFoundError: [Errno 2] No such file or directory: ...)'."""
    shutil.copy(require_shared("data", "dicom", "chest_xray_rsna.dcm"), tmp_path / "chest.dcm")
    shutil.copy(require_shared("data", "busi", "benign", "benign (1).png"), tmp_path / "scan.png")
    source = open_source(str(tmp_path))
    (tmp_path / "chest.dcm").unlink(), (tmp_path / "scan.png").unlink()
    assert [f.error for f in source.frames()] == [f"{tmp_path / name}: cannot read (No such file or directory)"
                                                  for name in ("chest.dcm", "scan.png")]


def test_a_dicom_file_of_a_transfer_syntax_pydicom_does_not_know_says_so(tmp_path):
    """A vendor's private transfer syntax (GE's implicit big endian), an unknown UID or an empty one in the File Meta
    got the record 'unexpected ValueError: UID is not a transfer syntax.' (pydicom's answer to whether its pixel data
    is compressed), or 'unexpected AttributeError: 'str' object has no attribute 'is_compressed'', as for a bug."""
    import pydicom

    for uid in ("1.2.840.113619.5.2", "1.2.3.4", ""):
        ds = pydicom.dcmread(require_shared("data", "dicom", "chest_xray_rsna.dcm"))
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(tmp_path / "chest.dcm", enforce_file_format=False)
        [frame] = open_source(str(tmp_path / "chest.dcm")).frames()
        assert frame.error == (f"{tmp_path / 'chest.dcm'}: unknown DICOM transfer syntax {uid!r} (private or "
                               f"malformed): its pixel data cannot be read")


def test_a_dicom_element_of_a_garbled_value_representation_says_the_header_is_malformed(tmp_path):
    """pydicom converts an element's value when it is first asked for, and a VR it does not know (two bytes of a
    header garbled: 6 of 2,400 mutations of the RSNA radiograph's first kilobyte) raises NotImplementedError then:
    the PhotometricInterpretation of an image, the SOPClassUID of one cut before its pixel data got the record
    'unexpected NotImplementedError: Unknown Value Representation 'CW' in tag (0028,0004)', as for a bug."""
    data = Path(require_shared("data", "dicom", "chest_xray_rsna.dcm")).read_bytes()
    pixels = data.index(b"\xe0\x7f\x10\x00")
    for tag, vr, keyword, cut in ((b"\x28\x00\x04\x00", b"CS", "PhotometricInterpretation", len(data)),
                                  (b"\x08\x00\x16\x00", b"UI", "SOPClassUID", pixels)):
        (tmp_path / "chest.dcm").write_bytes(data[:cut].replace(tag + vr, tag + b"CW", 1))
        [frame] = open_source(str(tmp_path / "chest.dcm")).frames()
        assert frame.error == (f"{tmp_path / 'chest.dcm'}: malformed DICOM header ({keyword}: Unknown Value "
                               f"Representation 'CW' in tag ({tag[1]:02X}{tag[0]:02X},{tag[3]:02X}{tag[2]:02X}))")


def test_a_dicom_header_reason_cut_short_says_so(tmp_path):
    """pydicom's reason was cut at 150 characters with no mark, mid-sentence: a Rows of 3 bytes said '... with
    length 3 and struct format 'H' which corresponds)', as if that were all."""
    data = Path(require_shared("data", "dicom", "chest_xray_rsna.dcm")).read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")  # (0028,0010) Rows, 2 bytes: given 3
    (tmp_path / "chest.dcm").write_bytes(data[:rows] + b"\x28\x00\x10\x00US\x03\x00" + data[rows + 8:rows + 10] + b"\x00"
                                         + data[rows + 10:])
    [frame] = open_source(str(tmp_path / "chest.dcm")).frames()
    assert frame.error.startswith(f"{tmp_path / 'chest.dcm'}: malformed DICOM header (Rows: Expected total bytes")
    assert "with length 3" in frame.error and frame.error.endswith("…)")


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_a_link_gone_between_the_listing_and_its_examination_gets_a_record_not_a_traceback(tmp_path):
    """/dev/fd lists the descriptor of its own listing, a link gone once the listing is closed: `run m.onnx /` (or
    file:///, or a folder with a link to /dev/fd) ended in 'FileNotFoundError: ... fd/3' from reading where the
    vanished link led."""
    cv2.imwrite(str(tmp_path / "scan.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "fd").symlink_to("/dev/fd")
    records = [(Path(f.source).name, f.error) for f in open_source(str(tmp_path)).frames()]
    assert ("scan.png", None) in records
    assert any(error and error.endswith("gone since its folder was listed, not read") for _, error in records)


def test_entries_of_a_folder_that_can_be_listed_but_not_searched_get_a_record(tmp_path):
    (tmp_path / "ok").mkdir(), (tmp_path / "noexec").mkdir()
    cv2.imwrite(str(tmp_path / "ok" / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "noexec" / "b.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "noexec" / "IM0001").write_bytes(b"a DICOM file or a folder: nothing tells which")
    (tmp_path / "noexec" / "CR.1.2.276.0.7230010.3.1.4.8323329").write_bytes(b"as much a DICOM file by its name")
    (tmp_path / "noexec" / "notes.txt").write_text("DICOM files are found by content: this one may be one too")
    (tmp_path / "noexec").chmod(0o644)  # its names can be read, nothing else about them
    try:
        for spec, found in ((tmp_path, ["noexec/CR.1.2.276.0.7230010.3.1.4.8323329", "noexec/IM0001", "noexec/b.png",
                                        "noexec/notes.txt", "ok/a.png"]),
                            (tmp_path / "*" / "*.png", ["noexec/b.png", "ok/a.png"])):
            frames = frames_without_file_permissions_overridden(spec)
            assert [source.split(f"{tmp_path.name}/")[1] for source, _ in frames] == found
            assert all(error.endswith("cannot be examined (Permission denied), not read") for _, error in frames[:-1])
            assert frames[-1][1] is None
    finally:
        (tmp_path / "noexec").chmod(0o755)  # so that pytest can remove it


def test_an_unreadable_dicom_without_a_suffix_gets_a_record(tmp_path):
    """IM0002 mode 600 of another user vanished from its study: only reading it tells a DICOM file apart."""
    study = tmp_path / "study"
    study.mkdir()
    for name in ("IM0001", "IM0002"):
        synthetic_dicom(study / name, np.zeros((8, 8), np.uint16))
    (study / "IM0002").chmod(0o000)
    try:
        frames = frames_without_file_permissions_overridden(study)
        assert [(source.rsplit("/", 1)[1], error) for source, error in frames] == [
            ("IM0001", None), ("IM0002", f"{study / 'IM0002'}: cannot be read (Permission denied), not read")]
    finally:
        (study / "IM0002").chmod(0o644)


def test_recursive_glob_with_two_links_into_the_tree_returns(tmp_path):
    """glob.glob followed both links at every level: the paths it walked doubled per level until it never
    returned (a run that never started). Each folder is entered once."""
    (tmp_path / "gl" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "gl" / "a" / "x.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "gl" / "a" / "up").symlink_to("..")
    (tmp_path / "gl" / "a" / "again").symlink_to("../a")
    frames = []
    listing = threading.Thread(target=lambda: frames.extend(open_source(str(tmp_path / "gl" / "**" / "*.png")).frames()),
                               daemon=True)  # a regression hangs that thread, not the suite
    listing.start()
    listing.join(60)
    assert not listing.is_alive(), "listing the glob did not return"
    assert [(f.source.split("gl/")[1], f.error) for f in frames] == [("a/x.png", None)]


def test_glob_matches_what_glob_glob_matches_in_a_tree_without_links(tmp_path):
    for name in ("a/b/c.png", "a/.hidden/d.png", "a/e.PNG", "f.png", "a/b/.g.png", "a/notes.txt", "h/i/j/k.dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for pattern in ("**/*.png", "a/**/*.png", "*/b/*.png", "**/.*.png", "a/*", "**", "**/*.dcm", "a/**/c.png",
                    "h/*/j/*.dcm", "nothing/**/*.png", "a/b//*.png", "**/b/**/*.png", "**/**/*.png", "*/**/*.dcm"):
        # As a set: glob.glob gives a file once per way "**/**" reaches it
        expected = sorted({Path(p) for p in glob.glob(str(tmp_path / pattern), recursive=True)
                           if Path(p).is_file() and Path(p).suffix != ".txt"})  # images and DICOM only
        assert [p for p in glob_files(str(tmp_path / pattern)) if not isinstance(p, tuple)] == expected, pattern


def test_a_folder_deeper_than_pythons_recursion_limit_is_listed(tmp_path):
    """The folder walk recursed once a folder: a tree 1 100 folders deep ended `run` and `evaluate` in a
    RecursionError traceback, where a glob of it (``**``) listed its images."""
    scan = require_shared("data", "busi", "benign", "benign (1).png")
    deepest = tmp_path / "study"
    deepest.mkdir()
    os.link(scan, deepest / "top.png")
    for _ in range(1100):
        deepest /= "a"
        deepest.mkdir()
    os.link(scan, deepest / "deep.png")
    try:
        for spec in (tmp_path / "study", tmp_path / "study" / "**" / "*.png"):
            frames = list(open_source(str(spec)).frames())
            assert [(f.source, f.error, f.image.shape) for f in frames] == [
                (str(deepest / "deep.png"), None, (256, 256, 3)), (str(tmp_path / "study" / "top.png"), None, (256, 256, 3))]
    finally:  # from the bottom up: shutil.rmtree, pytest's cleanup, recurses a folder at a time too
        (deepest / "deep.png").unlink()
        while deepest != tmp_path / "study":
            deepest.rmdir()
            deepest = deepest.parent


def test_a_glob_lists_what_a_folder_lists(tmp_path):
    """A glob kept every file it matched: a good video and notes.txt were skipped as corrupt images, and a run's own
    --jsonl from the last run was one of its inputs (the same command refused the second time)."""
    study = tmp_path / "study"
    study.mkdir()
    cv2.imwrite(str(study / "a.png"), np.zeros((8, 8), np.uint8))
    write_video(study / "clip.avi", count=3)
    (study / "notes.txt").write_text("x")
    (study / "results.jsonl").write_text("{}\n")
    for spec in (study, study / "*", study / "**"):
        assert [(f.source, f.error) for f in open_source(str(spec)).frames()] == [(str(study / "a.png"), None)], spec
    with pytest.raises(SourceError, match=r"clip\*\.avi: no image or DICOM file matches \(a video is a source of "):
        open_source(str(study / "clip*.avi"))


def test_recursive_glob_gives_each_file_once_through_links_to_folders(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "a").mkdir(parents=True), elsewhere.mkdir()
    cv2.imwrite(str(data / "a" / "img.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(elsewhere / "linked.png"), np.zeros((8, 8), np.uint8))
    (data / "a" / "up").symlink_to("..")  # a loop: a/up/a/up/… until the system refuses the path
    (data / "link").symlink_to(elsewhere)
    (data / "link_again").symlink_to(elsewhere)
    (data / "a" / "same.png").symlink_to("img.png")  # a second name in the same folder: listed, as a folder lists it
    (data / "a" / "deep" / "deeper").mkdir(parents=True)
    (data / "a" / "deep" / "deeper" / "again").symlink_to(elsewhere)  # a longer way to elsewhere: not its name
    for pattern in ("**/*.png", "*/**/*.png"):  # nearest first from all of '**''s starting folders at once
        frames = list(open_source(str(data / pattern)).frames())
        assert [(f.source.split("data/")[1], f.error) for f in frames] == [
            ("a/img.png", None), ("a/same.png", None), ("link/linked.png", None)], pattern


def test_pgm_and_ppm_samples_are_scaled_from_their_maxval_as_pil_reads_them(tmp_path):
    """OpenCV returns PxM samples as stored: a 12-bit PGM (maxval 4095) reached 6 % of full scale, and an 8-bit
    one with maxval 100 a white of 0.39; PIL, train.py's loader, scales them to full range."""
    from PIL import Image

    from medmamba_edge.runtime.decode import read_image

    rng = np.random.default_rng(0)
    for maxval in (100, 255, 1023, 4095, 65535):
        gray = rng.integers(0, maxval + 1, (5, 7))
        samples = gray.astype(">u2" if maxval > 255 else np.uint8).tobytes()
        path = tmp_path / f"m{maxval}.pgm"
        path.write_bytes(b"P5\n# a comment between the fields\n7 5\n%d\n" % maxval + samples)
        ours = read_image(path)
        assert ours.dtype == (np.uint16 if maxval > 255 else np.uint8)
        assert np.array_equal(ours.astype(np.int64), np.asarray(Image.open(path)).astype(np.int64)), maxval
    rgb = rng.integers(0, 101, (5, 7, 3)).astype(np.uint8)
    (tmp_path / "c.ppm").write_bytes(b"P6 7 5 100\n" + rgb.tobytes())
    assert np.array_equal(read_image(tmp_path / "c.ppm"), np.asarray(Image.open(tmp_path / "c.ppm")))
    # A header comment past the first 512 bytes (its maxval was missed); ASCII, which OpenCV scales itself at 8
    # bits (it was scaled twice: 4 of 15 became 255) and returns as stored above them.
    twelve = rng.integers(0, 4096, (5, 7)).astype(">u2")
    (tmp_path / "long.pgm").write_bytes(b"P5\n#" + b"x" * 600 + b"\n7 5\n4095\n" + twelve.tobytes())
    assert np.array_equal(read_image(tmp_path / "long.pgm"), np.round(twelve / 4095 * 65535))
    for maxval, values in ((15, [4, 8, 12, 15]), (4095, [4, 1000, 4000, 4095])):
        (tmp_path / "ascii.pgm").write_text(f"P2\n4 1\n{maxval}\n" + " ".join(map(str, values)) + "\n")
        expected = np.round(np.array(values) / maxval * (255 if maxval < 256 else 65535))
        assert np.array_equal(read_image(tmp_path / "ascii.pgm")[0], expected), maxval


def _tiff(path, pixels, photometric, order="<", big=False):
    """An uncompressed one-strip grayscale TIFF (or BigTIFF), written by hand: OpenCV and PIL write MinIsBlack only."""
    import struct

    raw = pixels.astype(f"{order}u{pixels.dtype.itemsize}").tobytes()
    field, header = ("Q", 16) if big else ("I", 8)  # offsets, counts and values: 8 bytes in a BigTIFF
    entries = [(256, 3, pixels.shape[1]), (257, 3, pixels.shape[0]), (258, 3, pixels.dtype.itemsize * 8), (259, 3, 1),
               (262, 3, photometric), (273, 16 if big else 4, header), (277, 3, 1), (278, 3, pixels.shape[0]),
               (279, 16 if big else 4, len(raw))]
    magic = struct.pack(order + "HHH", 43, 8, 0) if big else struct.pack(order + "H", 42)
    data = (b"II" if order == "<" else b"MM") + magic + struct.pack(order + field, header + len(raw)) + raw
    data += struct.pack(order + ("Q" if big else "H"), len(entries))
    for tag, kind, value in entries:
        packed = struct.pack(order + "H", value).ljust(struct.calcsize(field), b"\0") if kind == 3 else struct.pack(order + field, value)
        data += struct.pack(order + "HH" + field, tag, kind, 1) + packed
    path.write_bytes(data + bytes(struct.calcsize(field)))  # no next IFD
    return path


def test_a_16_bit_white_is_zero_tiff_is_inverted_as_8_bit_ones_are(tmp_path):
    """OpenCV inverts an 8-bit WhiteIsZero TIFF and returned a 16-bit one as stored: black lungs read as dense."""
    from medmamba_edge.runtime.decode import read_image

    stored = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    for order in "<>":
        assert np.array_equal(read_image(_tiff(tmp_path / "w16.tif", stored, 0, order)), 65535 - stored)
        assert np.array_equal(read_image(_tiff(tmp_path / "b16.tif", stored, 1, order)), stored)
        eight = (stored // 257).astype(np.uint8)
        assert np.array_equal(read_image(_tiff(tmp_path / "w8.tif", eight, 0, order)), 255 - eight)
        assert np.array_equal(read_image(_tiff(tmp_path / "big16.tif", stored, 0, order, big=True)), 65535 - stored)


def test_enhanced_multi_frame_dicom_takes_its_window_from_the_functional_groups(tmp_path):
    """Enhanced CT/MR and tomosynthesis files hold rescale and window in functional groups, not at the top level:
    they were mapped from the whole stored range, no window (a normal study read as pneumonia, 99.9 %)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.array([[0, 1000, 2000, 3000], [4000, 4095, 2048, 100]], dtype=np.uint16)
    (classic,) = read_dicom(synthetic_dicom(tmp_path / "classic.dcm", stored, BitsStored=12, RescaleSlope=1,
                                            RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=2000))
    (narrow,) = read_dicom(synthetic_dicom(tmp_path / "narrow.dcm", stored, BitsStored=12, RescaleSlope=1,
                                           RescaleIntercept=-1024, WindowCenter=500, WindowWidth=400))

    def group(**values):
        item = Dataset()
        for key, value in values.items():
            setattr(item, key, value)
        return Sequence([item])

    shared = Dataset()
    shared.PixelValueTransformationSequence = group(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")
    shared.FrameVOILUTSequence = group(WindowCenter=1000, WindowWidth=2000)
    second = Dataset()  # the second frame's own window, over the shared one
    second.FrameVOILUTSequence = group(WindowCenter=500, WindowWidth=400)
    path = synthetic_dicom(tmp_path / "enhanced.dcm", np.vstack([stored, stored]), BitsStored=12, Rows=2,
                           NumberOfFrames=2, SharedFunctionalGroupsSequence=Sequence([shared]),
                           PerFrameFunctionalGroupsSequence=Sequence([Dataset(), second]))
    first, other = read_dicom(path)
    assert np.array_equal(first, classic) and np.array_equal(other, narrow)
    # A classic file's VOI LUT with its data as OW (every implicit-VR file's): pydicom unpacks it by the file's byte
    # order, which a copy of the attributes without file_meta lost (a regression of the functional groups' reading).
    from pydicom.uid import ImplicitVRLittleEndian

    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 10]
    lut.add_new(0x00283006, "OW", (np.arange(4096) // 4).astype("<u2").tobytes())  # LUTData: 0..1023
    voi = synthetic_dicom(tmp_path / "voi.dcm", stored, BitsStored=12, VOILUTSequence=Sequence([lut]))
    implicit = pydicom.dcmread(voi)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    for path in (voi, tmp_path / "implicit.dcm"):
        (mapped,) = read_dicom(path)
        assert np.allclose(mapped, (stored // 4) / 1023, atol=1e-6), path
    # A Rescale Slope and Intercept present but left empty are no rescale: the file was unusable (a TypeError).
    (empty,) = read_dicom(synthetic_dicom(tmp_path / "empty.dcm", stored, BitsStored=12, RescaleSlope=None,
                                          RescaleIntercept=None))
    assert np.allclose(empty, stored / 4095, atol=1e-6)


def test_colour_dicom_in_partial_range_ybr_is_converted_and_other_interpretations_refused(tmp_path):
    """pydicom converts YBR_FULL(_422) to RGB but leaves YBR_PARTIAL_422 as stored: raw Y, Cb, Cr reached the
    model as RGB (a grey X-ray read as pneumonia, 57 %, status ok)."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    jpeg = io.BytesIO()
    Image.fromarray(np.dstack([gray] * 3)).save(jpeg, "JPEG", quality=100, subsampling=2)  # YCbCr 4:2:0 codestream
    decoded = {}
    for photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        ds = pydicom.dcmread(synthetic_dicom(tmp_path / "x.dcm", gray))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, photometric
        ds.BitsAllocated = ds.BitsStored = 8
        ds.PixelData = encapsulate([jpeg.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.save_as(tmp_path / f"{photometric}.dcm", enforce_file_format=True)
        (decoded[photometric],) = read_dicom(tmp_path / f"{photometric}.dcm")
    full = decoded["YBR_FULL_422"].astype(np.float64) / 255
    partial = decoded["YBR_PARTIAL_422"]
    assert partial.dtype == np.float32 and partial.shape == (16, 32, 3)
    assert np.abs(partial - partial[..., :1]).max() < 2 / 255  # grey stays grey: no chroma offsets left in
    # The same codestream read as BT.601's partial range: black at 16, white at 235.
    assert np.abs(partial - np.clip((full * 255 - 16) / 219, 0, 1)).max() < 3 / 255
    ds = pydicom.dcmread(tmp_path / "YBR_FULL_422.dcm")
    ds.PhotometricInterpretation = "HSV"  # retired: no RGB without its own conversion
    ds.save_as(tmp_path / "hsv.dcm")
    with pytest.raises(ImageError, match=r"hsv\.dcm: DICOM photometric interpretation HSV with 3 samples per pixel "
                                         r"is not supported \(RGB or YBR\)"):
        read_dicom(tmp_path / "hsv.dcm")


def test_a_header_value_that_is_not_a_number_is_a_malformed_header_not_a_crash(tmp_path):
    """A NumberOfFrames of 'abc' raised a ValueError: evaluate ended with a traceback, run called it unexpected."""
    path = synthetic_dicom(tmp_path / "nf.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00280008, "LO", "abc")  # NumberOfFrames, text where a number belongs (pydicom reads it as given)
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"nf\.dcm: malformed DICOM header \(NumberOfFrames 'abc' is not a number\)"):
        read_dicom(path)
    del ds.NumberOfFrames, ds.Rows  # pixel data without the rows that size it: "unexpected AttributeError"
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"nf\.dcm: malformed DICOM header \(AttributeError: .*Rows"):
        read_dicom(path)


def test_an_rgba_tiff_with_unassociated_alpha_keeps_its_colours_as_stored(tmp_path, monkeypatch):
    """OpenCV reads an ExtraSamples 2 TIFF through libtiff's RGBA interface, which multiplies the colours by the
    alpha; train.py's PIL convert("RGB") drops the alpha (a BUSI scan with an alpha ramp: 0.995 benign as TIFF,
    0.820 as PNG)."""
    import sys

    from PIL import Image

    from medmamba_edge.runtime.decode import read_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 8).astype(np.uint8), (6, 1))])
    Image.fromarray(rgba).save(tmp_path / "pil.tif")  # ExtraSamples 2, as PIL writes RGBA
    Image.fromarray(rgba).save(tmp_path / "big.tif", big_tiff=True)
    Image.fromarray(rgba).save(tmp_path / "same.png")
    for name in ("pil.tif", "big.tif"):
        assert Image.open(tmp_path / name).tag_v2[338] in (2, (2,))
        assert np.array_equal(read_image(tmp_path / name), rgba), name
        assert np.array_equal(read_image(tmp_path / name)[..., :3], np.asarray(Image.open(tmp_path / "same.png").convert("RGB")))
    # OpenCV's own RGBA TIFF (no ExtraSamples: as stored already) and 16-bit RGBA are read by OpenCV as before.
    cv2.imwrite(str(tmp_path / "cv.tif"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "cv16.tif"), cv2.cvtColor(rgba.astype(np.uint16) * 257, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(read_image(tmp_path / "cv.tif"), rgba)
    assert np.array_equal(read_image(tmp_path / "cv16.tif"), rgba.astype(np.uint16) * 257)
    # Pillow is optional in the runtime (the [dicom] extra brings it): without it the file is read by OpenCV, its
    # colours multiplied by the alpha, as before Pillow was asked and as a file Pillow cannot open is; not refused.
    opencv = cv2.cvtColor(cv2.imread(str(tmp_path / "pil.tif"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert np.abs(opencv[..., :3].astype(int) - rgba[..., :3] * (rgba[..., 3:] / 255)).max() <= 1  # premultiplied
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert np.array_equal(read_image(tmp_path / "pil.tif"), opencv)
    assert np.array_equal(read_image(tmp_path / "cv.tif"), rgba)


def test_a_gif_in_a_folder_or_glob_gets_a_record_naming_it_as_a_source_of_its_own(tmp_path):
    """A .gif (a video suffix: OpenCV reads it as one) was passed over in a folder as notes.txt is: no record. The
    run it names is a command to paste (the path quoted); a glob that matches only GIFs is the error any glob of
    videos alone gets."""
    from PIL import Image

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    gif = tmp_path / "b c.gif"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gif)
    write_video(tmp_path / "c.avi", count=2)  # a video is no image: not listed, as before
    (tmp_path / "notes.txt").write_text("not an image: not listed")
    for spec, where in ((tmp_path, "a folder's images"), (tmp_path / "*", "the images a glob matches")):
        frames = list(open_source(str(spec)).frames())
        assert [f.source.rsplit("/", 1)[-1] for f in frames] == ["a.png", "b c.gif"]
        assert frames[-1].image is None and frames[-1].error == (
            f"{gif}: a GIF is read as a video, a source of its own (medmamba-edge run MODEL '{gif}'), not among "
            f"{where}")
    with pytest.raises(SourceError, match=r"\*\.gif: no image or DICOM file matches \(a video is a source of its "
                                          r"own: one per run\)$"):
        open_source(str(tmp_path / "*.gif"))
    # A folder holding only GIFs is refused before the run starts, as such a glob is and an empty folder is: it loaded
    # the model, wrote the GIFs' records and failed 'no frame could be classified'.
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(gif, only / "b c.gif")
    with pytest.raises(SourceError, match=r"only: no images or DICOM files found \(looked for \.png, .*\.dicom; 1 GIF "
                                          r"file, read as video: a video is a source of its own, one per run\)$"):
        open_source(str(only))
    shutil.copy(gif, only / "d.gif")
    with pytest.raises(SourceError, match=r"only: .*; 2 GIF files, read as video: a video is a source of its own"):
        open_source(str(only))



def test_the_run_a_gif_s_record_names_does_not_read_a_name_starting_with_a_dash_as_an_option(tmp_path, monkeypatch):
    """'medmamba-edge run MODEL -clip.gif' failed 'No such option: -c': a relative name starting with '-' is named
    ./-clip.gif (a glob in the current folder lists it as -clip.gif)."""
    import shlex

    from PIL import Image

    from tests.cli_runner import cli

    monkeypatch.chdir(tmp_path)
    cv2.imwrite("a.png", np.zeros((8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save("-clip.gif")
    frame, png = open_source("*").frames()  # sorted: '-' before 'a'
    assert png.error is None
    assert frame.error == ("-clip.gif: a GIF is read as a video, a source of its own (medmamba-edge run MODEL "
                           "./-clip.gif), not among the images a glob matches")
    (named,) = shlex.split(re.search(r"\(medmamba-edge run MODEL (.*)\), not among", frame.error).group(1))
    assert "No such option" in cli("run", "model.onnx", "-clip.gif")[1]  # the name as it was given
    code, output = cli("run", "model.onnx", named)
    assert code != 0 and "No such option" not in output and "model.onnx" in output  # an argument: the model is missing


def test_a_dicom_data_set_without_the_file_header_is_read_as_pydicom_finds_it_encoded(tmp_path):
    """No preamble, no 'DICM', no File Meta (older modalities, some exports): the file was skipped with pydicom's
    "… Use force=True to force reading.", an option the CLI does not have; an empty .dcm the same."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    stored = np.random.default_rng(0).integers(0, 4096, (2, 64, 64), dtype=np.uint16)  # 16 kB: read deferred

    def bare(name, implicit, little, **tags):
        ds = pydicom.dcmread(synthetic_dicom(tmp_path / "full.dcm", stored[0], BitsStored=12, **tags))
        ds.Rows, ds.NumberOfFrames = 64, 2
        ds.PixelData = stored.astype("<u2" if little else ">u2").tobytes()
        ds["PixelData"].VR = "OW"
        f = DicomBytesIO()
        f.is_implicit_VR, f.is_little_endian = implicit, little
        write_dataset(f, ds)  # the data set alone
        (tmp_path / name).write_bytes(f.getvalue())
        return tmp_path / name

    for implicit, little in ((True, True), (False, True), (False, False)):
        path = bare("bare.dcm", implicit, little)
        assert not path.read_bytes()[128:132] == b"DICM"
        frames = list(read_dicom(path))
        assert len(frames) == 2 and all(np.allclose(f, s / 4095, atol=1e-6) for f, s in zip(frames, stored))
    # As a folder's entry: an ok record, as the same file with its header gets.
    path = bare("bare.dcm", True, True, WindowCenter=2048, WindowWidth=1000)
    (tmp_path / "full.dcm").unlink()
    assert [(f.index, f.error) for f in open_source(str(tmp_path)).frames()] == [(0, None), (1, None)]
    # Nothing that reads as an image, and an empty file: the reason, without "Use force=True".
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("not a DICOM file\n" * 20)
    with pytest.raises(ImageError, match=r"^\S*empty\.dcm: file is empty$"):
        read_dicom(tmp_path / "empty.dcm")
    with pytest.raises(ImageError, match=r"notes\.dcm: not a readable DICOM file \(no DICOM file header, and no "
                                         r"image when read as a data set without one\)$"):
        read_dicom(tmp_path / "notes.dcm")


def test_an_uncompressed_ybr_partial_422_dicom_is_unpacked_as_ybr_full_422_is_and_converted(tmp_path):
    """Y Y Cb Cr for each pair of pixels, 2 bytes a pixel: pydicom sizes and unpacks that for YBR_FULL_422 only,
    and a complete 64×64 file was 'truncated ... 8192 of the 12288 bytes'."""
    rng = np.random.default_rng(0)
    rgb = np.repeat(rng.integers(0, 256, (64, 32, 3)), 2, axis=1).astype(np.uint8)  # pairs alike: 4:2:2 loses nothing
    to_ybr = np.array([[0.2568, 0.5041, 0.0979], [-0.1482, -0.2910, 0.4392], [0.4392, -0.3678, -0.0714]])
    ybr = np.clip(np.round(rgb @ to_ybr.T + [16, 128, 128]), 0, 255).astype(np.uint8)  # DICOM PS3.3 C.7.6.3.1.2
    packed = np.stack([ybr[:, 0::2, 0], ybr[:, 1::2, 0], ybr[:, 0::2, 1], ybr[:, 0::2, 2]], axis=-1)
    path = synthetic_dicom(tmp_path / "partial.dcm", rgb[:, :, 0], photometric="YBR_PARTIAL_422", SamplesPerPixel=3,
                           PlanarConfiguration=0, pixel_data=packed.tobytes())
    (image,) = read_dicom(path)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert np.abs(image - rgb / 255).max() < 3 / 255
    whole = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:-2])
    with pytest.raises(ImageError, match=r"cut\.dcm: truncated DICOM file \(the pixel data is cut short: 8190 of the "
                                         r"8192 bytes"):
        read_dicom(tmp_path / "cut.dcm")


def test_a_rescale_that_takes_the_value_range_to_infinity_is_the_file_s_record_not_a_nan_image(tmp_path):
    """RescaleSlope 1e308: the range's top was inf, every pixel NaN, and the record said 'non-finite model output'."""
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64
    path = synthetic_dicom(tmp_path / "huge.dcm", stored, BitsStored=12, RescaleSlope="1e308", RescaleIntercept=0)
    with pytest.raises(ImageError, match=r"huge\.dcm: DICOM value range is not finite \(0\.0\.\.inf: rescale "
                                         r"slope/intercept or window out of range\)"):
        read_dicom(path)
    (frame,) = open_source(str(path)).frames()
    assert frame.image is None and "huge.dcm: DICOM value range is not finite (0.0..inf" in frame.error
    # Large but finite: mapped as any rescale is.
    (image,) = read_dicom(synthetic_dicom(tmp_path / "large.dcm", stored, BitsStored=12, RescaleSlope="1e300"))
    assert np.allclose(image, stored / 4095, atol=1e-6)


_TO_PARTIAL_YBR = np.array([[0.2568, 0.5041, 0.0979], [-0.1482, -0.2910, 0.4392], [0.4392, -0.3678, -0.0714]])


def test_an_uncompressed_ybr_partial_422_dicom_with_three_samples_a_pixel_is_read_as_stored(tmp_path):
    """pydicom's own ds.decompress() of a JPEG YBR_PARTIAL_422 file writes three samples a pixel and keeps the name:
    read as stored, and converted from the partial range, as before; reading it as 4:2:2 refused it ('pixel data of
    768 bytes, more than the 512 its header describes')."""
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)  # no pairs alike: all 3 samples
    ybr = np.clip(np.round(rgb @ _TO_PARTIAL_YBR.T + [16, 128, 128]), 0, 255).astype(np.uint8)
    path = synthetic_dicom(tmp_path / "as3.dcm", rgb[:, :, 0], photometric="YBR_PARTIAL_422", SamplesPerPixel=3,
                           PlanarConfiguration=0, pixel_data=ybr.tobytes())
    (image,) = read_dicom(path)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert np.abs(image - rgb / 255).max() < 3 / 255
    # More than three samples a pixel is still more than the header describes.
    synthetic_dicom(tmp_path / "over.dcm", rgb[:, :, 0], photometric="YBR_PARTIAL_422", SamplesPerPixel=3,
                    PlanarConfiguration=0, pixel_data=ybr.tobytes() + bytes(2))
    with pytest.raises(ImageError, match=r"over\.dcm: DICOM pixel data of 770 bytes, more than the 768 its header"):
        read_dicom(tmp_path / "over.dcm")
    # Cut short, but longer than two samples a pixel (512 bytes): that file truncated, not 4:2:2 with too much data
    # ('pixel data of 700 bytes, more than the 512 its header describes').
    (tmp_path / "cut.dcm").write_bytes(path.read_bytes()[:-68])
    with pytest.raises(ImageError, match=r"cut\.dcm: truncated DICOM file \(the pixel data is cut short: 700 of the "
                                         r"768 bytes its header describes\)$"):
        read_dicom(tmp_path / "cut.dcm")


@pytest.mark.parametrize("photometric", ["YBR_PARTIAL_422", "YBR_FULL_422"])
def test_every_frame_of_an_uncompressed_multi_frame_422_dicom_is_unpacked_from_its_own_offset(tmp_path, photometric):
    """pydicom 3.0's iter_pixels takes every frame after the first as YBR_FULL (three samples a pixel): frames 1..
    of a native 4:2:2 file came out as garbage read from the wrong offsets. Each frame is read by its index."""
    rng = np.random.default_rng(2)
    frames = np.repeat(rng.integers(0, 256, (4, 16, 8, 3)), 2, axis=2).astype(np.uint8)  # pairs alike: lossless
    if photometric == "YBR_PARTIAL_422":
        to_ybr, offsets = _TO_PARTIAL_YBR, [16, 128, 128]
    else:  # full range, PS3.3 C.7.6.3.1.2
        to_ybr = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
        offsets = [0, 128, 128]
    ybr = np.clip(np.round(frames @ to_ybr.T + offsets), 0, 255).astype(np.uint8)
    packed = np.stack([ybr[:, :, 0::2, 0], ybr[:, :, 1::2, 0], ybr[:, :, 0::2, 1], ybr[:, :, 0::2, 2]], axis=-1)
    path = synthetic_dicom(tmp_path / "mf.dcm", frames[0, :, :, 0], photometric=photometric, SamplesPerPixel=3,
                           PlanarConfiguration=0, NumberOfFrames=4, pixel_data=packed.tobytes())
    images = list(read_dicom(path))
    assert len(images) == 4
    for index, (image, rgb) in enumerate(zip(images, frames)):
        assert isinstance(image, np.ndarray) and image.shape == (16, 16, 3), index
        scaled = image if image.dtype == np.float32 else image / 255
        assert np.abs(scaled - rgb / 255).max() < 3 / 255, index


def test_a_zero_filled_dcm_is_refused_from_its_first_bytes_without_a_forced_read(tmp_path, monkeypatch):
    """Forced, pydicom read 16 MB of zeros as two million empty elements (12 s to say it is no image): a data set
    begins with a tag of group 0002..7FE0, zeros with group 0000. A bare data set is still read forced."""
    import pydicom.filereader

    forced = []
    read_partial = pydicom.filereader.read_partial  # what dcmread and the reader's _read_dataset read with

    def spy(*args, **kwargs):
        forced.append(kwargs.get("force", False))
        return read_partial(*args, **kwargs)

    monkeypatch.setattr(pydicom.filereader, "read_partial", spy)
    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as f:
        f.truncate(4 << 20)  # 4 MB of zeros
    with pytest.raises(ImageError, match=r"zeros\.dcm: not a readable DICOM file \(no DICOM file header, and its "
                                         r"first bytes \(00 00 00 00\) begin no DICOM element\)$"):
        read_dicom(path)
    assert forced == [False]  # the plain read that finds no header, and no forced one
    (frame,) = open_source(str(path)).frames()
    assert frame.image is None and "begin no DICOM element" in frame.error
    # A data set without the file header (group 0008 first) is read forced, as before.
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ds = pydicom.dcmread(synthetic_dicom(tmp_path / "full.dcm", stored))
    bare = DicomBytesIO()
    bare.is_implicit_VR, bare.is_little_endian = True, True
    write_dataset(bare, ds)
    (tmp_path / "bare.dcm").write_bytes(bare.getvalue())
    forced.clear()
    (image,) = read_dicom(tmp_path / "bare.dcm")
    assert forced == [False, True] and np.array_equal(image, stored)


def test_a_dicom_data_set_padded_out_with_zeros_is_read_up_to_them(tmp_path):
    """pydicom read zeros after a data set as 8-byte elements of group 0000, one after another: a bare data set (no
    file header, read forced) or a whole file followed by 16 MB of zeros took 8-20 s (0.5-1 s a MB) to give the
    image in its first kilobytes, and an element's header followed by zeros as long to be 'DICOM without pixel
    data (modality ?)'. The data set ends at the zeros: the same image, at once; the header alone, refused."""
    import time

    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    full = synthetic_dicom(tmp_path / "full.dcm", stored)
    bare = _bare(pydicom.dcmread(full), tmp_path / "bare.dcm")
    head = tmp_path / "head.dcm"
    head.write_bytes(bare.read_bytes()[:8])  # (0008,0016) and its length, then zeros for its value and on
    for path in (full, bare, head):
        with open(path, "r+b") as f:
            f.truncate(16 << 20)  # zeros up to 16 MB
    for path in (full, bare):
        start = time.perf_counter()
        (image,) = read_dicom(path)
        assert np.array_equal(image, stored) and time.perf_counter() - start < 2  # was 8-20 s
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"head\.dcm: not a readable DICOM file \(no DICOM file header, and no image "
                                         r"when read as a data set without one: from byte 34 on its bytes begin no "
                                         r"DICOM element \(zeros\)\)$"):
        read_dicom(head)
    assert time.perf_counter() - start < 2
    (frame,) = open_source(str(head)).frames()  # as a run's source: the same reason in its record
    assert frame.image is None and frame.error.endswith("begin no DICOM element (zeros))")


def test_a_deflated_dicom_whose_inflated_data_ends_in_zeros_is_read_up_to_them(tmp_path, monkeypatch):
    """A deflated file was read twice: through the stop at zeros (_read_dataset), then whole again by
    pydicom.dcmread without it, its inflated zeros read as 8-byte elements one after another (a 9 KB file of 8 MB
    of them: 4.7-10 s). Both reads stop at the zeros: the same image, at once."""
    import time
    import zlib

    import pydicom.filereader
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = synthetic_dicom(tmp_path / "deflated.dcm", stored)
    resave(path, DeflatedExplicitVRLittleEndian)
    whole = path.read_bytes()
    start = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength  # the deflated data set's
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    inflated = zlib.decompress(whole[start:], -zlib.MAX_WBITS) + bytes(4 << 20)  # then 4 MB of zeros
    path.write_bytes(whole[:start] + deflate.compress(inflated) + deflate.flush())
    stops = []  # each read of the file, with the stop or without
    read_partial = pydicom.filereader.read_partial
    monkeypatch.setattr(pydicom.filereader, "read_partial", lambda *a, **k: stops.append(
        (a[1] if len(a) > 1 else k.get("stop_when")) is not None) or read_partial(*a, **k))
    began = time.perf_counter()
    (image,) = read_dicom(path)
    assert np.array_equal(image, stored) and time.perf_counter() - began < 2  # was 2.5-5 s
    assert stops and all(stops)  # was [True] and pydicom.dcmread's read without it


def test_a_dicom_file_header_followed_by_zeros_is_refused_from_them(tmp_path, monkeypatch):
    """A Part 10 file cut after its File Meta and padded out with zeros (a pre-allocated file): pydicom reads what
    follows the header as a command set (group 0000) before any data set, the zeros as its 8-byte elements, one
    after another (4 MB: 4-6.5 s), before the stop at zeros applies; then 'truncated DICOM file: ... that
    ends before its pixel data'. Refused from the zeros' first 8 bytes, without reading a data set; with the File
    Meta but no preamble (read forced) too."""
    import pydicom.filereader

    path = synthetic_dicom(tmp_path / "full.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8))
    header = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength
    whole = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:header] + bytes(4 << 20))
    (tmp_path / "bare.dcm").write_bytes(whole[132:header] + bytes(4 << 20))  # no preamble, no 'DICM'
    reads = []  # pydicom's reads of the file, forced or not
    read_partial = pydicom.filereader.read_partial
    monkeypatch.setattr(pydicom.filereader, "read_partial",
                        lambda *a, **k: reads.append(k.get("force", False)) or read_partial(*a, **k))
    for name, start, tried in (("cut.dcm", header, []), ("bare.dcm", header - 132, [False])):
        reads.clear()
        with pytest.raises(ImageError, match=rf"{name}: truncated DICOM file: Secondary Capture Image Storage that "
                                             rf"ends after its file header \(zeros from byte {start} on\)$"):
            read_dicom(tmp_path / name)
        assert reads == tried  # no data set read (was 4 MB of command set elements): bare.dcm's plain read, which
        # finds no 'DICM', and no forced one
        (frame,) = open_source(str(tmp_path / name)).frames()  # as a run's source: the same reason in its record
        assert frame.image is None and frame.error.endswith(f"(zeros from byte {start} on)")


def three_frame_dicoms(tmp_path, stored):
    """``stored`` (3 frames) as a DICOM file in explicit and in implicit VR little endian: (syntax, path) each."""
    from pydicom.uid import ImplicitVRLittleEndian

    for syntax in ("explicit", "implicit"):
        path = synthetic_dicom(tmp_path / f"{syntax}.dcm", stored[0], NumberOfFrames=3, pixel_data=stored.tobytes())
        if syntax == "implicit":
            resave(path, ImplicitVRLittleEndian)
        yield syntax, path


def test_zeros_inside_a_whole_dicom_data_set_are_read_through_as_pydicom_reads_them(tmp_path):
    """A data set was ended by its first 8 zero bytes (an element (0000,0000) of length 0): a whole file with 8 zero
    bytes in the middle of it was 'truncated DICOM file: ... (zeros from byte 486 on)' where pydicom reads the
    image. Only zeros up to the end of the file end it; those followed by data are read through, as pydicom reads
    them, in explicit and implicit VR: the image pydicom gives, every frame (a hole of 64 KiB + 8 was taken for the
    file's end, when zeros were looked through for 64 KiB only)."""
    import time

    stored = np.random.default_rng(1).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    for syntax, path in three_frame_dicoms(tmp_path, stored):
        whole = path.read_bytes()
        at = whole.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows
        for size in (8, 64, (64 << 10) + 8):
            hole = tmp_path / f"hole_{syntax}_{size}.dcm"
            hole.write_bytes(whole[:at] + bytes(size) + whole[at:])
            began = time.perf_counter()
            frames = list(read_dicom(hole))
            assert time.perf_counter() - began < 2
            assert np.array_equal(pydicom.dcmread(hole).pixel_array, stored)
            assert len(frames) == 3 and all(np.array_equal(a, b) for a, b in zip(frames, stored)), (syntax, size)
        # After the pixel data, zeros end the data set whatever follows them (a stray byte took 10 s for 16 MB)
        (tmp_path / "tail.dcm").write_bytes(whole + bytes(16 << 20) + b"\n")
        began = time.perf_counter()
        frames = list(read_dicom(tmp_path / "tail.dcm"))
        assert time.perf_counter() - began < 2 and all(np.array_equal(a, b) for a, b in zip(frames, stored))
        (tmp_path / "cut.dcm").write_bytes(whole[:at] + bytes(4 << 20))  # zeros to the end: the data set's end
        with pytest.raises(ImageError, match=rf"cut\.dcm: truncated DICOM file: Secondary Capture Image Storage that "
                                             rf"ends before its pixel data \(zeros from byte {at} on\)$"):
            read_dicom(tmp_path / "cut.dcm")


def test_zeros_after_the_dicom_file_meta_followed_by_a_data_set_are_read_as_pydicom_reads_them(tmp_path):
    """A file whose File Meta was followed by 8 zero bytes was refused as 'truncated DICOM file: ... that ends
    after its file header': zeros followed by a data set are read as pydicom reads them (a command set of empty
    elements, then the data set), with a preamble or without (read forced), explicit and implicit VR. pydicom's
    own reading of pixel data from the file takes the zeros for the data set's first element (an explicit VR data
    set read as implicit: 'no Pixel Data element'): its frames are read from the data set read, pydicom's."""
    stored = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    for syntax, path in three_frame_dicoms(tmp_path, stored):
        header = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength
        whole = path.read_bytes()
        for size in (8, 1024):
            for name, data in ((f"after_{syntax}_{size}.dcm", whole[:header] + bytes(size) + whole[header:]),
                               (f"bare_{syntax}_{size}.dcm", whole[132:header] + bytes(size) + whole[header:])):
                (tmp_path / name).write_bytes(data)
                assert np.array_equal(pydicom.dcmread(tmp_path / name, force=True).pixel_array, stored)
                frames = list(read_dicom(tmp_path / name))
                assert len(frames) == 3 and all(np.array_equal(a, b) for a, b in zip(frames, stored)), name
                records = [(f.index, f.error) for f in open_source(str(tmp_path / name)).frames()]
                assert records == [(0, None), (1, None), (2, None)], name


def test_the_dicom_data_set_is_found_from_the_file_meta_group_length_without_reading_the_file_meta_twice(
        tmp_path, monkeypatch):
    """_read_dataset read the File Meta twice, to see whether zeros follow it (pydicom's _read_file_meta_info), then
    in read_partial (300 small files: 1.31 -> 1.55 ms a file): where the data set begins is found from the File
    Meta's element headers after 'DICM' (as pydicom, up to the first element of another group: its (0002,0000)
    FileMetaInformationGroupLength missing or wrong too); the File Meta is read as pydicom reads it where there is
    no preamble (read forced), and before a refusal, to name the file's class."""
    import struct

    import pydicom.filereader

    from medmamba_edge.runtime.decode import _read_dataset

    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = synthetic_dicom(tmp_path / "full.dcm", stored)
    whole = path.read_bytes()
    header = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength
    assert whole[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    reads = []
    read_meta = pydicom.filereader._read_file_meta_info
    monkeypatch.setattr(pydicom.filereader, "_read_file_meta_info", lambda f: reads.append(f.tell()) or read_meta(f))
    ds, ended, inside = _read_dataset(path)
    # read_partial's own read only (was [132, 132])
    assert reads == [132] and ended is None and inside is None and "PixelData" in ds
    short = whole[:140] + struct.pack("<L", header - 144 - 10) + whole[144:]  # a group length 10 bytes short
    variants = {"without.dcm": (whole[:132] + whole[144:], header - 12),  # no (0002,0000)
                "short.dcm": (short, header), "bare.dcm": (whole[132:], header - 132)}  # no preamble: forced
    for name, (data, start) in variants.items():
        (tmp_path / name).write_bytes(data)
        assert np.array_equal(read_dicom(tmp_path / name).single, stored), name
        (tmp_path / name).write_bytes(data[:start] + bytes(1 << 20))  # cut after the File Meta, padded out
        with pytest.raises(ImageError, match=rf"{name}: truncated DICOM file: Secondary Capture Image Storage that "
                                             rf"ends after its file header \(zeros from byte {start} on\)$"):
            read_dicom(tmp_path / name)


def test_a_dicom_data_set_ends_at_zeros_not_at_a_command_set_element(tmp_path):
    """A data set is read up to zeros (_read_dataset): an image cut there and padded out says where they begin (in
    a deflated file, where in its inflated data). A stray command set element (group 0000) among a whole file's
    own elements is read through, as pydicom reads it: stopping at any group 0000 made that file 'truncated'."""
    import struct
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = synthetic_dicom(tmp_path / "full.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8))
    whole = path.read_bytes()
    samples = struct.pack("<HH", 0x0028, 0x0002) + b"US"  # SamplesPerPixel, before the pixel data
    at = whole.index(samples)
    stray = struct.pack("<HH", 0x0000, 0x0902) + b"LO" + struct.pack("<H", 4) + b"ABCD"  # (0000,0902) ErrorComment
    (tmp_path / "stray.dcm").write_bytes(whole[:at] + stray + whole[at:])
    (tmp_path / "padded.dcm").write_bytes(whole[:at] + bytes(1 << 20))  # cut there, then zeros
    resave(path, DeflatedExplicitVRLittleEndian)
    whole = path.read_bytes()
    start = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength  # the deflated data set's
    inflated = zlib.decompress(whole[start:], -zlib.MAX_WBITS)
    inflated_at = inflated.index(samples)

    def deflate_all(data: bytes) -> bytes:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflate.compress(data) + deflate.flush()

    (tmp_path / "deflated.dcm").write_bytes(whole[:start] + deflate_all(inflated[:inflated_at] + stray + inflated[inflated_at:]))
    for name in ("stray.dcm", "deflated.dcm"):
        assert read_dicom(tmp_path / name).single.tolist() == np.arange(64, dtype=np.uint8).reshape(8, 8).tolist()
    (tmp_path / "deflated.dcm").write_bytes(whole[:start] + deflate_all(inflated[:inflated_at] + bytes(1 << 20)))
    for name, where in (("padded.dcm", at), ("deflated.dcm", f"{inflated_at} of its inflated data")):
        with pytest.raises(ImageError, match=rf"{name}: truncated DICOM file: Secondary Capture Image Storage that "
                                             rf"ends before its pixel data \(zeros from byte {where} on\)$"):
            read_dicom(tmp_path / name)


def test_a_deflated_dicom_with_its_file_meta_but_no_preamble_is_inflated_as_read(tmp_path):
    """Read forced (no preamble, no 'DICM'), then inflated by a second read that was not: pydicom's '... Use
    force=True to force reading' came back as the file's record."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    stored = np.arange(64, dtype=np.uint8).reshape(8, 8)
    full = synthetic_dicom(tmp_path / "full.dcm", stored)
    resave(full, DeflatedExplicitVRLittleEndian)
    whole = full.read_bytes()
    assert whole[128:132] == b"DICM"
    (tmp_path / "deflated.dcm").write_bytes(whole[132:])  # File Meta (group 0002) first
    (image,) = read_dicom(tmp_path / "deflated.dcm")
    assert np.array_equal(image, stored)
    full.unlink()
    assert [(f.index, f.error) for f in open_source(str(tmp_path)).frames()] == [(0, None)]


def test_an_rgba_tiff_pillow_cannot_open_is_read_by_opencv_as_before_without_pillow_s_warnings(tmp_path):
    """Pillow opens no big-endian BigTIFF: such an ExtraSamples 2 RGBA file was refused ('Pillow cannot decode this
    RGBA TIFF (UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x...>)') with Pillow's
    'Corrupt EXIF data' UserWarning printed between the records. OpenCV's decode (its colours multiplied by the
    alpha) stands, as it did before Pillow was asked."""
    import warnings

    from medmamba_edge.runtime.decode import read_image

    rgba, path = big_endian_bigtiff(tmp_path)
    opencv = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert np.abs(opencv[..., :3].astype(int) - rgba[..., :3] * (rgba[..., 3:] / 255)).max() <= 1  # premultiplied
    with warnings.catch_warnings(record=True) as caught:  # Python's own filters: a UserWarning is shown
        image = read_image(path)
    assert np.array_equal(image, opencv)
    assert [str(w.message) for w in caught] == []


def big_endian_bigtiff(tmp_path):
    """An RGBA TIFF with ExtraSamples 2 that Pillow cannot open (warning 'Corrupt EXIF data'), and its pixels."""
    import struct

    rgba = np.dstack([np.full((4, 6, 3), 200, np.uint8), np.tile(np.linspace(0, 255, 6).astype(np.uint8), (4, 1))])
    pixels = rgba.tobytes()
    tags = [(256, 3, [6]), (257, 3, [4]), (258, 3, [8] * 4), (259, 3, [1]), (262, 3, [2]), (273, 16, [0]),
            (277, 3, [4]), (278, 3, [4]), (279, 16, [len(pixels)]), (338, 3, [2])]  # 338: ExtraSamples 2
    data_at = 16 + 8 + 20 * len(tags) + 8
    ifd = struct.pack(">Q", len(tags))
    for tag, kind, values in tags:
        values = [data_at] if tag == 273 else values
        ifd += struct.pack(">HHQ", tag, kind, len(values)) + struct.pack(">" + "HQ"[kind == 16] * len(values),
                                                                         *values).ljust(8, b"\0")
    path = tmp_path / "big_endian_bigtiff.tif"
    path.write_bytes(b"MM" + struct.pack(">HHHQ", 43, 8, 0, 16) + ifd + bytes(8) + pixels)
    return rgba, path


def test_an_application_s_own_warning_filters_come_before_the_decoders(tmp_path):
    """The decoders' filters went in front of every other at the first read: an application's own choice for
    Pillow's or pydicom's warnings made before it (shown always, or errors) was overridden from then on."""
    import warnings

    from medmamba_edge.runtime.decode import read_image

    _, path = big_endian_bigtiff(tmp_path)
    dicom = synthetic_dicom(tmp_path / "scan.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.")
        warnings.filterwarnings("error", category=UserWarning, module=r"pydicom\.")
        mine = list(warnings.filters)
        list(read_dicom(dicom))
        for _ in range(2):
            read_image(path)
        assert warnings.filters[:len(mine)] == mine
    messages = [str(w.message) for w in caught]  # Pillow's, at each read: 'always' holds
    assert len(messages) >= 2 and all(m.startswith("Corrupt EXIF data") for m in messages)


def test_the_decoders_warning_filters_are_added_once_and_leave_other_warnings_shown(tmp_path):
    """The filters for Pillow's and pydicom's warnings were added again at every read: each filterwarnings call
    empties Python's once-per-location registry, so an application's own warning, shown once, was shown after every
    file; and module=r'PIL\\.' hid the application's own Pillow warnings. Pillow's TIFF tag warnings alone are
    filtered (the big-endian BigTIFF test above holds that), added once."""
    import warnings

    from PIL import Image

    from medmamba_edge.runtime.decode import read_image

    rgba = np.dstack([np.full((4, 6, 3), 200, np.uint8), np.tile(np.linspace(0, 255, 6).astype(np.uint8), (4, 1))])
    Image.fromarray(rgba).save(tmp_path / "rgba.tif")  # ExtraSamples 2: decoded by Pillow
    dicom = synthetic_dicom(tmp_path / "scan.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per location
        assert np.array_equal(read_image(tmp_path / "rgba.tif"), rgba)
        list(read_dicom(dicom))
        filters = list(warnings.filters)
        for _ in range(3):
            assert np.array_equal(read_image(tmp_path / "rgba.tif"), rgba)
            list(read_dicom(dicom))
            assert warnings.filters == filters
            warnings.warn("the application's own", UserWarning)  # one location: shown once
        palette = Image.new("P", (4, 4))
        palette.info["transparency"] = bytes(256)
        palette.convert("RGB")  # the application's own Pillow call: PIL.Image warns
    messages = [str(w.message) for w in caught]
    assert messages[0] == "the application's own" and messages.count("the application's own") == 1
    assert len(messages) == 2 and "Transparency expressed in bytes" in messages[1]


def test_a_dcm_shorter_than_a_tag_is_refused_from_its_bytes(tmp_path):
    """A 1-byte .dcm read 'not a readable DICOM file (error: unpack requires a buffer of 2 bytes)'."""
    for name, data, shown in (("one.dcm", b"\x08", "08"), ("three.dcm", b"\x08\x00\x05", "08 00 05")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=rf"{name[:-4]}\.dcm: not a readable DICOM file \(no DICOM file header, "
                                             rf"and its first bytes \({shown}\) begin no DICOM element\)$"):
            read_dicom(tmp_path / name)


def _bare(ds, path, implicit=True, little=True, preamble=b"", meta=None):
    """``ds`` written without the Part 10 header (or with the preamble and 'DICM' and ``meta`` as File Meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    f = DicomBytesIO()
    f.write(preamble)
    if meta is not None:
        write_file_meta_info(f, meta, enforce_standard=False)
    f.is_implicit_VR, f.is_little_endian = implicit, little
    write_dataset(f, ds)
    path.write_bytes(f.getvalue())
    return path


def test_a_dicom_data_set_without_pixel_data_reads_the_same_without_its_file_header(tmp_path):
    """A bare RT plan (no file header) read 'not a readable DICOM file (no DICOM file header, and no image when read
    as a data set without one)' where the same with its header reads 'DICOM without pixel data (modality RTPLAN)'."""
    from pydicom.uid import RTPlanStorage, generate_uid

    plan = pydicom.Dataset()
    plan.SOPClassUID, plan.SOPInstanceUID, plan.Modality = RTPlanStorage, generate_uid(), "RTPLAN"
    plan.PatientName, plan.RTPlanLabel = "Anonymous", "PLAN1"
    with_header = tmp_path / "with_header.dcm"
    plan.file_meta = pydicom.dataset.FileMetaDataset()
    plan.file_meta.MediaStorageSOPClassUID, plan.file_meta.MediaStorageSOPInstanceUID = RTPlanStorage, plan.SOPInstanceUID
    plan.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    plan.save_as(with_header, enforce_file_format=True)
    # An image cut before its pixel data: 'truncated', with its header or without.
    image = pydicom.dcmread(synthetic_dicom(tmp_path / "image.dcm", np.zeros((8, 8), np.uint8)))
    del image.PixelData
    image.save_as(tmp_path / "cut_with_header.dcm", enforce_file_format=True)
    for full, name in ((with_header, "plan"), (tmp_path / "cut_with_header.dcm", "cut")):
        with pytest.raises(ImageError) as headed:
            read_dicom(full)
        for implicit, little in ((True, True), (False, True), (False, False)):
            path = _bare(pydicom.dcmread(full), tmp_path / f"{name}.dcm", implicit, little)
            with pytest.raises(ImageError) as bare:
                read_dicom(path)
            assert str(bare.value) == str(headed.value).replace(str(full), str(path)), (name, implicit, little)
    assert str(headed.value).endswith("truncated DICOM file: Secondary Capture Image Storage that ends before its "
                                      "pixel data")
    with pytest.raises(ImageError, match=r"plan\.dcm: DICOM without pixel data \(modality RTPLAN\)$"):
        read_dicom(tmp_path / "plan.dcm")


def test_a_dicom_with_dicm_but_no_transfer_syntax_is_read_as_pydicom_finds_it_encoded(tmp_path):
    """A preamble and 'DICM', then no File Meta or one without TransferSyntaxUID: 'cannot decode DICOM pixel data
    (None): 'transfer_syntax_uid' is required'. The syntax is the encoding pydicom read the data set in, as for a
    data set without the file header."""
    from pydicom.dataset import FileMetaDataset

    stored = np.random.default_rng(0).integers(0, 4096, (64, 64), dtype=np.uint16)  # 8 kB: read deferred
    full = synthetic_dicom(tmp_path / "full.dcm", stored, BitsStored=12)
    (expected,) = read_dicom(full)
    ds = pydicom.dcmread(full)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPClassUID  # no TransferSyntaxUID
    meta.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    head = bytes(128) + b"DICM"
    for name, implicit, kind in (("no_meta_explicit.dcm", False, None), ("no_meta_implicit.dcm", True, None),
                                 ("no_syntax.dcm", False, meta)):
        path = _bare(ds, tmp_path / name, implicit, True, preamble=head, meta=kind)
        assert pydicom.dcmread(path).file_meta.get("TransferSyntaxUID") is None
        (image,) = read_dicom(path)
        assert np.array_equal(image, expected), name
