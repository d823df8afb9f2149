"""The run loop on a video file on the CPU: how much of the wall time is the model, and how much the rest.

Makes an MJPEG video from BUSI frames (256×256, as the data set ships), exports the official MedMamba-T
(../shared) to ONNX at each requested input size (cached in --workdir), and runs ``runtime.loop.run`` over
the video with ONNX Runtime, as ``medmamba-edge run MODEL VIDEO`` does, writing JSONL. Reported per model:
FPS, the model's share of the wall time (time inside ``backend.run``), the rest (decode, preprocess,
bookkeeping, output; decode and preprocess overlap the model in the capture thread), and per-frame decode and
preprocess costs measured alone. Extra ONNX models (e.g. an INT8 one from ``medmamba-edge quantize``) can be
added with --model.

    python benchmarks/bench_run_loop.py [--sizes 224 32] [--frames 120] [--batch 1] [--threads 2] [--model x.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from medmamba_edge.errors import UserError
from medmamba_edge.runtime.backends import open_backend
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.loop import RunOptions, run
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.preprocess import preprocess_one
from medmamba_edge.runtime.sinks import JsonlSink
from medmamba_edge.runtime.signals import handle_stop_signals
from medmamba_edge.runtime.sources import iterate, open_source

from common import at_least, check_thread_count, onnx_file  # benchmarks/common.py, beside this script

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OFFICIAL_T = SHARED / "models/medmamba_t_pneumoniamnist32/medmamba_t_pneumoniamnist32.pth"


def busi_images() -> list[Path]:
    return sorted((SHARED / "data/busi").rglob("*.png"))


def make_video(path: Path, images: list[Path]) -> Path:
    """The video of ``images``, made once: it is written under a temporary name and renamed when complete, so
    that an interrupted run leaves no short video for the next run to reuse as if whole."""
    if path.exists():
        return path
    partial = path.with_name(f"{path.stem}.partial-{os.getpid()}{path.suffix}")  # the suffix picks the container
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"MJPG"), 30, (256, 256))
    try:
        if not writer.isOpened():
            raise SystemExit(f"cannot write {partial}: OpenCV has no MJPEG writer here")
        for image in images:
            writer.write(cv2.cvtColor(read_image(image), cv2.COLOR_RGB2BGR))
        writer.release()
        os.replace(partial, path)
    finally:
        writer.release()
        partial.unlink(missing_ok=True)
    return path


def export(size: int, scan: str, workdir: Path) -> Path:
    path = workdir / f"medmamba_t_{scan}_{size}.onnx"
    if not path.exists():
        from medmamba_edge.exporters.onnx_export import export_onnx

        print(f"exporting MedMamba-T at {size}×{size} ({scan} scan) …", flush=True)
        export_onnx(OFFICIAL_T, path, input_size=size, batch=None, scan=scan, verify=False)
    return path


def measure(model: Path, video: Path, batch: int, threads: int | None, workdir: Path) -> dict:
    backend = open_backend(model, threads=threads)
    meta = backend.metadata
    backend.run(np.zeros((batch, meta.in_chans, *meta.input_size), np.float32))  # warm-up: first-run allocations
    stats = run(backend, open_source(str(video)), [JsonlSink(workdir / f"{model.stem}.jsonl")],
                RunOptions(batch=batch), notify=lambda message: None)
    # Decode and preprocess alone, per frame, for the breakdown.
    started = time.perf_counter()
    frames = [f.image for f in iterate(open_source(str(video)))]
    decode = (time.perf_counter() - started) / len(frames)
    started = time.perf_counter()
    for image in frames:
        preprocess_one(image, meta)
    prep = (time.perf_counter() - started) / len(frames)
    model_share = stats.model_seconds / stats.wall_seconds
    return {"model": f"{model.name} ({meta.precision}, {meta.input_size[0]}×{meta.input_size[1]})",
            "frames": stats.classified, "fps": stats.fps, "model_ms": 1e3 * stats.model_seconds / stats.classified,
            "model_share": model_share, "overhead_share": 1 - model_share, "decode_ms": 1e3 * decode,
            "prep_ms": 1e3 * prep, "p50": stats.percentiles()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[224, 32])
    parser.add_argument("--scan", default="plugin", choices=["plugin", "portable"])
    parser.add_argument("--frames", type=at_least(1), default=120)
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", type=onnx_file, action="append", default=[], help="another .onnx to run (e.g. INT8)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medmamba-edge-bench"))
    args = parser.parse_args()
    check_thread_count(parser, args.threads)
    images = busi_images()
    if args.frames > len(images):  # the video's name and the table would promise frames it does not have
        parser.error(f"--frames must be at most {len(images)} (the BUSI images in {SHARED / 'data/busi'}), got {args.frames}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM and SIGHUP as an exit, so that make_video's finally removes a half-written video then too
    handle_stop_signals(lambda signum, frame: sys.exit(128 + signum))
    try:  # before the video: a --sizes value the model cannot take
        models = [export(size, args.scan, args.workdir) for size in args.sizes] + args.model
    except UserError as exc:
        parser.error(str(exc))
    video = make_video(args.workdir / f"busi_{args.frames}.avi", images[:args.frames])
    try:
        rows = [measure(m, video, args.batch, args.threads, args.workdir) for m in models]
    except UserError as exc:  # a --model ONNX Runtime cannot open
        parser.error(str(exc))
    print(f"\n{video.name}: {args.frames} BUSI frames 256×256 MJPEG, ONNX Runtime on {describe_cpu()}, batch {args.batch}, "
          f"threads {args.threads or 'default'}")
    header = f"{'model':42} {'FPS':>7} {'model ms/frame':>15} {'model share':>12} {'overhead':>9} {'decode ms':>10} {'preproc ms':>11} {'p50 ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:42} {r['fps']:>7.1f} {r['model_ms']:>15.2f} {r['model_share']:>12.1%} {r['overhead_share']:>9.1%} "
              f"{r['decode_ms']:>10.2f} {r['prep_ms']:>11.2f} {r['p50']:>8.1f}")


if __name__ == "__main__":
    main()
