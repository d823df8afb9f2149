"""`medmamba-edge run` end to end on the bundled model: records for every frame, valid output files, drops
on live sources, Ctrl-C, a stream that goes away, the PyTorch backend, and a torch-free runtime."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from medmamba_edge.runtime.backends import BackendError, open_backend, softmax
from medmamba_edge.runtime.backends.onnxruntime import choose_providers
from medmamba_edge.runtime.bundled import bundled_checkpoint, sample_image_paths
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.loop import RunOptions, run
from medmamba_edge.runtime.preprocess import preprocess
from medmamba_edge.runtime.sources import Frame, Source
from tests.cli_runner import cli, cli_process, read_jsonl, wait_for_records
from tests.shared_data import require_shared
from tests.test_sources import FlakyMjpegServer, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from medmamba_edge.exporters.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(bundled_checkpoint(), path, input_size=32, batch=None, scan="portable", verify=False)
    return path


def test_a_source_with_nothing_classifiable_exits_nonzero_with_its_records(tiny_onnx, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code, output = cli("run", tiny_onnx, broken, "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "broken.png: no frame could be classified (1 skipped" in output
    (record,) = read_jsonl(tmp_path / "r.jsonl")
    assert record["status"] == "skipped" and "not a decodable image" in record["reason"]


@pytest.mark.parametrize("console", ["none", "second"])
def test_nothing_classifiable_says_why_where_no_console_line_did(tiny_onnx, tmp_path, console):
    """With --console none or second no reason was shown, yet the error said "reasons above"."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    code, output = cli("run", tiny_onnx, empty, "--console", console)
    assert code == 1 and f"no frame could be classified (1 skipped; first: {empty}: file is empty" in output, output
    assert "reasons above" not in output
    # A folder of broken files: the reason given is the first file's, not the last one's.
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a_empty.png").write_bytes(b"")
    (folder / "b_cut.png").write_bytes(sample_image_paths("pneumoniamnist")[0].read_bytes()[:50])
    code, output = cli("run", tiny_onnx, folder, "--console", console)
    assert code == 1 and (f"no frame could be classified (2 skipped; first: {folder / 'a_empty.png'}: file is empty"
                          in " ".join(output.split())), output


def test_every_file_gets_a_record_and_outputs_are_complete(tiny_onnx, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    samples = sample_image_paths("pneumoniamnist")
    for path in samples:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "zz_empty.png").write_bytes(b"")
    (images / "zz_cut.png").write_bytes(samples[0].read_bytes()[:50])
    out = tmp_path / "out"
    code, output = cli("run", tiny_onnx, images, "--batch", 4, "--threshold", 0.905, "--jsonl", out / "r.jsonl",
                       "--csv", out / "r.csv", "--save-video", out / "r.mp4")
    assert code == 0, output
    records = read_jsonl(out / "r.jsonl")
    assert [r["seq"] for r in records] == list(range(len(samples) + 2))
    assert {r["status"] for r in records[:-2]} <= {"ok", "abstain"} and [r["status"] for r in records[-2:]] == ["skipped"] * 2
    assert "not a decodable image" in records[-2]["reason"] and "file is empty" in records[-1]["reason"]
    classified = records[:-2]
    assert all(r["labels"][0] in ("normal", "pneumonia") and r["latency_ms"] > 0 for r in classified)
    assert all((r["status"] == "abstain") == (r["probabilities"][0] < 0.905) for r in classified)
    abstained = [r for r in classified if r["status"] == "abstain"]
    assert abstained and all(r["reason"].endswith("< threshold 90.5%") for r in abstained)
    # Labels best first: labels[0] is the argmax of the model's softmax for that image, probabilities descending.
    backend = open_backend(tiny_onnx)
    probs = softmax(backend.run(preprocess([read_image(images / Path(r["source"]).name) for r in classified],
                                           backend.metadata)))
    assert [r["labels"][0] for r in classified] == [backend.metadata.class_names[i] for i in probs.argmax(1)]
    assert np.allclose([r["probabilities"][0] for r in classified], probs.max(1), atol=1e-6)
    assert all(r["probabilities"] == sorted(r["probabilities"], reverse=True) for r in classified)
    assert len({r["labels"][0] for r in classified}) == 2  # both classes appear: a reversed order cannot agree
    rows = list(csv.DictReader(open(out / "r.csv")))
    assert [row["status"] for row in rows] == [r["status"] for r in records]
    # The CSV's label and probability columns are the record's top-1, as in the JSONL.
    assert [row["label"] for row in rows] == [r["labels"][0] if r["labels"] else "" for r in records]
    assert all(abs(float(row["probability"]) - r["probabilities"][0]) <= 1e-6 for row, r in zip(rows, classified))
    video = cv2.VideoCapture(str(out / "r.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(classified) and video.get(cv2.CAP_PROP_FPS) == 5
    assert sorted(p.name for p in out.iterdir()) == ["r.csv", "r.jsonl", "r.mp4"]  # no partial files left
    # --stride picks every other file; stills have no frame rate to divide
    strided, strided_output = cli("run", tiny_onnx, images, "--stride", 2, "--save-video", tmp_path / "s.mp4")
    assert strided == 0 and cv2.VideoCapture(str(tmp_path / "s.mp4")).get(cv2.CAP_PROP_FPS) == 5, strided_output
    assert f"{len(classified)} frames" in output and "2 skipped" in output and "p50/p95/p99" in output


def test_every_csv_row_says_what_its_jsonl_record_says(tiny_onnx, tmp_path):
    """The CSV was checked for its status, label and top-1 probability only: its top_k column could have paired
    the labels with each other's probabilities, and its timestamps lost their fraction of a second, unnoticed."""
    images = tmp_path / "images"
    images.mkdir()
    for path in sample_image_paths("pneumoniamnist"):
        (images / path.name).write_bytes(path.read_bytes())
    (images / "zz_empty.png").write_bytes(b"")
    code, output = cli("run", tiny_onnx, images, "--threshold", 0.95, "--jsonl", tmp_path / "r.jsonl",
                       "--csv", tmp_path / "r.csv")
    assert code == 0, output
    records = read_jsonl(tmp_path / "r.jsonl")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and {r["status"] for r in records} == {"ok", "abstain", "skipped"}
    for row, record in zip(rows, records):
        assert (int(row["seq"]), row["source"], row["status"], row["reason"]) == (
            record["seq"], record["source"], record["status"], record["reason"] or "")
        assert row["frame"] == str(record["frame"]) and abs(float(row["timestamp"]) - record["timestamp"]) <= 1e-6
        assert row["top_k"] == ";".join(f"{label}:{p:.6f}" for label, p in zip(record["labels"],
                                                                                record["probabilities"]))
        assert row["latency_ms"] == ("" if record["latency_ms"] is None else str(record["latency_ms"]))
        assert row["outage_s"] == ""


class FastLiveSource(Source):
    """A live source that delivers frames faster than the (slowed) model can take them."""

    live = True
    description = "fake camera"

    def __init__(self, count):
        self.count = count

    def frames(self, stride=1):
        for i in range(self.count):
            time.sleep(0.002)
            yield Frame("fake", i, time.time(), np.full((40, 40, 3), i % 256, np.uint8))


class SlowBackend:
    def __init__(self, inner, delay):
        self.inner, self.delay, self.metadata = inner, delay, inner.metadata

    def run(self, batch):
        time.sleep(self.delay)
        return self.inner.run(batch)


class Collect:
    def __init__(self):
        self.records = []

    def write(self, record, image, fps):
        self.records.append(record)

    def close(self):
        pass


def test_live_source_drops_oldest_but_records_every_frame(tiny_onnx):
    backend = SlowBackend(open_backend(tiny_onnx), delay=0.02)
    sink = Collect()
    stats = run(backend, FastLiveSource(120), [sink], RunOptions(batch=2))
    statuses = [r.status for r in sink.records]
    assert len(sink.records) == 120 and sorted(r.frame for r in sink.records) == list(range(120))
    assert stats.counts["dropped"] > 0 and statuses.count("dropped") == stats.counts["dropped"]
    assert stats.counts["ok"] + stats.counts["dropped"] == 120
    # A file source is lossless however slow the model is.
    sink = Collect()
    FastLiveSource.live = False
    try:
        stats = run(backend, FastLiveSource(30), [sink], RunOptions(batch=4))
    finally:
        FastLiveSource.live = True
    assert stats.counts["ok"] == 30 and stats.counts["dropped"] == 0
    assert stats.stopped is None and "stopped" not in stats.summary()


class FlakyLiveSource(FastLiveSource):
    """A live source that loses its stream after every 5th frame, faster than the (slowed) model takes frames."""

    def frames(self, stride=1):
        for frame in super().frames(stride):
            yield frame
            if frame.index % 5 == 4:
                yield Frame("fake", None, time.time(), error=f"stream fake lost after frame {frame.index}",
                            outage_s=0.01)


def test_an_outage_dropped_behind_a_slow_model_keeps_its_own_reason(tiny_onnx):
    """An outage is no frame: dropped from the queue with the frames around it, its lost record must still say what
    was lost and when, not 'inference slower than the source', which hid the outage among the drops."""
    sink = Collect()
    stats = run(SlowBackend(open_backend(tiny_onnx), delay=0.02), FlakyLiveSource(100), [sink], RunOptions(batch=2))
    lost = [r for r in sink.records if r.status == "lost"]
    assert stats.counts["dropped"] > 0 and stats.counts["lost"] == len(lost) == 20
    assert [r.reason for r in lost] == [f"stream fake lost after frame {i}" for i in range(4, 100, 5)]


def test_the_summary_adds_up_every_outage(tiny_onnx):
    """The summary's outage seconds are all the outages' together: one test had two outages but read only their
    count, so a total kept as the last outage's length would have passed."""
    stats = run(open_backend(tiny_onnx), FlakyLiveSource(100), [Collect()], RunOptions(batch=2))
    assert stats.counts["lost"] == 20 and stats.outage_seconds == pytest.approx(20 * 0.01)
    assert "20 outages (0.2 s)" in stats.summary()


def test_a_live_sources_records_stay_in_frame_order_when_frames_drop_while_a_batch_is_taken(tiny_onnx, monkeypatch):
    """The loop took the dropped frames after the batch: frames the camera dropped in between, newer than the batch,
    got their records before it (frame 7 dropped, then 5 and 6 classified), though every record comes in order."""
    from medmamba_edge.runtime.sources import Capture

    next_batch = Capture.next_batch

    def preempted(self, *args, **kwargs):
        taken = next_batch(self, *args, **kwargs)
        time.sleep(0.02)  # the main thread descheduled right after taking its batch; the camera goes on
        return taken

    monkeypatch.setattr(Capture, "next_batch", preempted)
    sink = Collect()
    stats = run(open_backend(tiny_onnx), FastLiveSource(200), [sink], RunOptions(batch=2))
    assert stats.counts["dropped"] > 0 and [r.frame for r in sink.records] == list(range(200))


def test_a_ctrl_c_while_a_batch_is_taken_or_a_dropped_frame_recorded_leaves_no_frame_without_its_record(tiny_onnx):
    """The frames taken from the capture sat in the loop's own variables until the held batch had them: a Ctrl-C in
    the wait for a file's next frame lost the batch so far, one in a sink writing a dropped frame's record lost the
    batch and the other dropped frames (a fake camera run interrupted at random: 21 runs of 60 with a gap)."""

    class Interrupting(Collect):  # Ctrl-C as the first dropped frame's record is written (a console's print)
        def write(self, record, image, fps):
            super().write(record, image, fps)
            if record.status == "dropped" and [r.status for r in self.records].count("dropped") == 1:
                raise KeyboardInterrupt

    sink = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        run(SlowBackend(open_backend(tiny_onnx), delay=0.02), FastLiveSource(100_000), [sink], RunOptions(batch=2))
    assert [r.frame for r in sink.records] == list(range(len(sink.records)))
    assert [r.seq for r in sink.records] == list(range(len(sink.records)))
    assert any(r.status == "skipped" for r in sink.records[-6:])  # the batch the interrupt came before

    class Files(FastLiveSource):  # its second file comes late, Ctrl-C arriving as the batch waits for it
        live = False

        def frames(self, stride=1):
            for i, frame in enumerate(super().frames(stride)):
                if i == 1:
                    time.sleep(0.03)  # within the batch's 0.1 s wait for its next frame
                    os.kill(os.getpid(), signal.SIGINT)
                yield frame

    sink = Collect()
    with pytest.raises(KeyboardInterrupt):
        run(open_backend(tiny_onnx), Files(5), [sink], RunOptions(batch=4))
    assert [(r.frame, r.reason) for r in sink.records][:1] == [(0, "run stopped before inference")]
    assert [r.frame for r in sink.records] == list(range(len(sink.records)))


def test_a_ctrl_c_while_a_record_is_made_leaves_its_frame_to_be_recorded(tiny_onnx, monkeypatch):
    """The record writer took a frame from the held batch before making its record: a Ctrl-C in the making (the
    softmax, the labels) left that frame with none (1 run of 40 interrupted at random, after the previous fix)."""
    from medmamba_edge.runtime import loop

    calls, softmax_ = [], loop.softmax

    def interrupted_once(logits):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return softmax_(logits)

    class Files(FastLiveSource):  # none dropped: the third softmax is frame 2's
        live = False

    monkeypatch.setattr(loop, "softmax", interrupted_once)
    sink = Collect()
    with pytest.raises(KeyboardInterrupt):
        run(open_backend(tiny_onnx), Files(10), [sink], RunOptions(batch=2))
    assert [r.frame for r in sink.records] == list(range(len(sink.records))) and len(sink.records) >= 3
    assert (sink.records[2].status, sink.records[2].reason) == ("skipped", "run stopped before inference")


def test_latency_is_the_capture_to_result_time_in_milliseconds(tiny_onnx):
    """Only its sign was checked: a latency off by a factor of ten (a wrong unit) would have gone into every record
    and the summary's percentiles. A model taking 250 ms a frame gives each frame at least that, and no frame more
    than the whole run."""
    sink = Collect()
    started = time.perf_counter()
    stats = run(SlowBackend(open_backend(tiny_onnx), delay=0.25), FastLiveSource(3), [sink], RunOptions(batch=1))
    wall_ms = (time.perf_counter() - started) * 1000
    latencies = [r.latency_ms for r in sink.records if r.status == "ok"]
    assert latencies and all(250 <= ms <= wall_ms for ms in latencies), (latencies, wall_ms)
    p50, _, p99 = stats.percentiles()
    assert min(latencies) * 0.99 <= p50 <= p99 <= max(latencies) * 1.01


def test_a_top1_probability_equal_to_the_threshold_is_not_below_it(tiny_onnx):
    """--threshold P abstains below P (docs/runtime.md): an image whose top-1 probability is P exactly is
    classified, as is every image at or above it."""
    from medmamba_edge.runtime.sources import open_source

    folder = str(sample_image_paths("pneumoniamnist")[0].parent)
    first = Collect()
    run(open_backend(tiny_onnx), open_source(folder), [first], RunOptions())
    probability = first.records[0].probabilities[0]
    again = Collect()
    run(open_backend(tiny_onnx), open_source(folder), [again], RunOptions(threshold=probability))
    assert again.records[0].probabilities[0] == probability and again.records[0].status == "ok"
    assert all((r.status == "abstain") == (r.probabilities[0] < probability) for r in again.records)


def test_a_record_carries_top_k_labels_or_every_class_if_fewer(tiny_onnx):
    """Only labels[0] was read: records cut one label short passed. The default top-k (3) of a two-class model gives
    both classes, --top-k 1 the best one."""
    from medmamba_edge.runtime.sources import open_source

    folder = str(sample_image_paths("pneumoniamnist")[0].parent)
    for top_k, count in ((3, 2), (1, 1)):
        sink = Collect()
        run(open_backend(tiny_onnx), open_source(folder), [sink], RunOptions(top_k=top_k))
        assert sink.records and all(len(r.labels) == len(r.probabilities) == count for r in sink.records)


def test_the_rate_sinks_are_given_is_the_runs_whatever_the_batch(tiny_onnx):
    """A batch's results come all at once: over the last 30 records, batch 32 read 53787 FPS where the run went at 45
    (the console's lines and the video overlay show it)."""
    class Rates(Collect):
        def __init__(self):
            super().__init__()
            self.rates = []

        def write(self, record, image, fps):
            self.rates.append(fps)

    backend, sink = SlowBackend(open_backend(tiny_onnx), delay=0.05), Rates()
    FastLiveSource.live = False
    try:
        run(backend, FastLiveSource(64), [sink], RunOptions(batch=16))
    finally:
        FastLiveSource.live = True
    assert len(sink.rates) == 64 and 0 < max(sink.rates) < 16 / 0.05 * 1.25, sink.rates


def test_an_application_sink_that_raises_is_an_error_and_the_other_outputs_complete(tiny_onnx, tmp_path):
    """A sink of an application's own (a broker gone away) raised ConnectionError through run(): the JSONL beside it
    was left as a .partial file, and the frame it failed on had no record."""
    from medmamba_edge.runtime.sinks import open_outputs

    class Broker(Collect):
        def write(self, record, image, fps):
            if len(self.records) == 2:
                raise ConnectionError("broker gone")
            super().write(record, image, fps)

    class FailingClose(Collect):
        def close(self):
            raise RuntimeError("cannot flush")

    frames = FastLiveSource(12)
    frames.live = False
    jsonl = tmp_path / "r.jsonl"
    stats = run(open_backend(tiny_onnx), frames, [Broker(), FailingClose(), *open_outputs("none", False, jsonl=jsonl)],
                RunOptions())
    assert "Broker: ConnectionError: broker gone" in stats.error and "FailingClose: RuntimeError" in stats.error
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records and [r["seq"] for r in records] == list(range(len(records))) and len(records) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


@pytest.mark.parametrize("options", [dict(batch=0), dict(batch=1.5), dict(stride=1.5), dict(top_k=True),
                                     dict(max_frames=0), dict(threshold=1.5), dict(threshold=float("nan"))])
def test_run_options_an_application_gets_wrong_are_one_line_errors(options):
    """batch=1.5 ran in batches of two; stride=1.5 failed with a TypeError in the capture thread."""
    from medmamba_edge.errors import UserError

    with pytest.raises(UserError) as error:
        RunOptions(**options)
    assert "\n" not in str(error.value) and ("integers ≥ 1" in str(error.value) or "--threshold" in str(error.value))


def test_frames_waiting_at_a_stop_keep_their_own_reason(tiny_onnx):
    """A broken file still queued when the run stopped was recorded 'run stopped before inference', as if a rerun
    would classify it."""
    import threading

    class HalfBroken(Source):
        live, description = False, "files"

        def frames(self, stride=1):
            for i in range(40):
                yield (Frame(f"f{i}.png", 0, time.time(), error=f"f{i}.png: not a decodable image") if i % 2 else
                       Frame(f"f{i}.png", 0, time.time(), np.zeros((40, 40, 3), np.uint8)))

    stop, sink = threading.Event(), Collect()
    sink.write = lambda record, image, fps: (sink.records.append(record), stop.set())  # stop after the first
    run(SlowBackend(open_backend(tiny_onnx), delay=0.2), HalfBroken(), [sink], RunOptions(batch=1), stop=stop)
    waiting = sink.records[1:]
    assert waiting and [r.source for r in sink.records] == [f"f{i}.png" for i in range(len(sink.records))]
    assert all(r.status == "skipped" for r in waiting)
    assert [r.reason for r in waiting] == [f"{r.source}: not a decodable image" if int(r.source[1:-4]) % 2
                                           else "run stopped before inference" for r in waiting]


def test_an_undecodable_frame_keeps_its_own_reason_when_its_batch_fails_in_the_model(tiny_onnx):
    """A broken file batched with good ones whose model call fails: its record says why it could not be read, not
    the model's failure (a rerun with the model fixed would still not classify it)."""
    class Failing(SlowBackend):
        def run(self, batch):
            raise RuntimeError("device lost")

    class Mixed(Source):
        live, description = False, "files"

        def frames(self, stride=1):
            yield Frame("good0.png", 0, time.time(), np.zeros((40, 40, 3), np.uint8))
            yield Frame("bad1.png", 0, time.time(), error="bad1.png: not a decodable image")
            yield Frame("good2.png", 0, time.time(), np.zeros((40, 40, 3), np.uint8))

    sink = Collect()
    stats = run(Failing(open_backend(tiny_onnx), 0), Mixed(), [sink], RunOptions(batch=3))
    assert [(r.source, r.status) for r in sink.records] == [("good0.png", "skipped"), ("bad1.png", "skipped"),
                                                            ("good2.png", "skipped")]
    model_failure = "the model failed on this batch (RuntimeError: device lost)"
    assert [r.reason for r in sink.records] == [model_failure, "bad1.png: not a decodable image", model_failure]
    assert stats.first_skip_reason == model_failure and "1 of 1 batch failed in the model" in stats.error


def test_an_application_stops_a_run_on_another_thread_with_every_frame_recorded(tiny_onnx):
    """No signal handler can be set off the main thread: the caller's event is how an application stops it."""
    import threading

    sink, stop, result = Collect(), threading.Event(), {}
    worker = threading.Thread(target=lambda: result.update(stats=run(
        SlowBackend(open_backend(tiny_onnx), delay=0.01), FastLiveSource(100_000), [sink], RunOptions(), stop=stop)))
    worker.start()
    deadline = time.monotonic() + 30
    while len(sink.records) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive() and 20 <= len(sink.records) < 100_000
    assert sorted(r.frame for r in sink.records) == list(range(len(sink.records)))  # none lost, none twice
    assert sum(result["stats"].counts.values()) == len(sink.records)
    assert result["stats"].summary().endswith("; stopped by a stop request before the source ended")


class SignallingAt(Collect):
    """A sink that sends this process ``signum`` as it gets record ``at``: a signal arriving mid-run."""

    def __init__(self, signum, at):
        super().__init__()
        self.signum, self.at, self.closed = signum, at, False

    def write(self, record, image, fps):
        super().write(record, image, fps)
        if len(self.records) == self.at:
            os.kill(os.getpid(), self.signum)

    def close(self):
        self.closed = True


def test_a_run_on_the_main_thread_leaves_the_applications_signals_to_it(tiny_onnx):
    """A library must not take over its host's signals: run() on the main thread set its own SIGINT, SIGTERM and
    SIGHUP handlers for the run, so an application's SIGTERM handler never heard a `systemctl stop` (the run just
    returned, 'stopped by SIGTERM', and the application went on), and Ctrl-C returned as a finished run where
    Python raises KeyboardInterrupt (a loop over sources went on to the next one)."""
    heard = []
    sink = SignallingAt(signal.SIGTERM, at=5)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    try:
        stats = run(open_backend(tiny_onnx), FastLiveSource(20), [sink], RunOptions(), notify=lambda message: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert heard == [signal.SIGTERM] and stats.stopped is None and sum(stats.counts.values()) == 20

    # Ctrl-C is Python's KeyboardInterrupt, wherever it lands (here in a sink, then in the model), and still every
    # frame taken from the source gets one record, the batch the model was running too.
    sink = SignallingAt(signal.SIGINT, at=5)
    with pytest.raises(KeyboardInterrupt):
        run(open_backend(tiny_onnx), FastLiveSource(20), [sink], RunOptions(), notify=lambda message: None)
    assert sink.closed and [r.seq for r in sink.records] == list(range(len(sink.records)))
    assert sorted(r.frame for r in sink.records) == list(range(len(sink.records)))

    class InterruptedInTheThirdBatch(SlowBackend):
        def run(self, batch):
            self.delay += 1
            if self.delay == 3:
                raise KeyboardInterrupt
            return self.inner.run(batch)

    class Files(FastLiveSource):  # frames waited for, none dropped: the third batch is frames 4 and 5
        live = False

    sink = Collect()
    with pytest.raises(KeyboardInterrupt):
        run(InterruptedInTheThirdBatch(open_backend(tiny_onnx), 0), Files(20), [sink], RunOptions(batch=2),
            notify=lambda message: None)
    assert sorted(r.frame for r in sink.records) == list(range(len(sink.records)))
    assert [r.status for r in sink.records if r.frame in (4, 5)] == ["skipped", "skipped"]


def test_a_ctrl_c_in_one_sink_still_gives_the_record_to_the_others(tiny_onnx, tmp_path):
    """A KeyboardInterrupt inside one sink's write (an application's Ctrl-C in --save-video's overlay, 22 ms a 1080p
    frame, or a console line) skipped the sinks after it, the record already counted: a 1080p BUSI video run from
    Python with a video, JSONL and CSV, interrupted, had JSONL and CSV going from seq 22 to 24 in 3 runs of 6."""
    from medmamba_edge.runtime.sinks import open_outputs
    from medmamba_edge.runtime.sources import open_source

    source = open_source(str(sample_image_paths("pneumoniamnist")[0].parent))
    sink = SignallingAt(signal.SIGINT, at=2)
    with pytest.raises(KeyboardInterrupt):
        run(open_backend(tiny_onnx), source, [sink, *open_outputs("none", False, jsonl=tmp_path / "r.jsonl")],
            RunOptions())
    records = read_jsonl(tmp_path / "r.jsonl")
    assert [r["seq"] for r in records] == list(range(len(records))) and len(records) >= 2
    assert [r["status"] for r in records[:2]] == ["ok", "ok"] and len({r["source"] for r in records}) == len(records)


@pytest.mark.parametrize("after", [1, 2, 3])
def test_a_ctrl_c_between_two_sinks_still_gives_the_record_to_the_second(tiny_onnx, tmp_path, after):
    """A signal that comes while the main thread waits for the GIL after a sink's write is raised at the next check,
    which was the sink loop's jump back, outside its try: the sinks after it never had the record (the command over a
    video with --jsonl, --csv and --save-video, stopped twice at random: 1 run of 50 had a CSV without a record its
    JSONL had). Here the KeyboardInterrupt is raised at each of the first lines Outputs.write runs after the JSONL
    sink has the third record."""
    from medmamba_edge.runtime.sinks import JsonlSink, Outputs, open_outputs
    from medmamba_edge.runtime.sources import open_source

    state = {}

    def in_outputs_write(frame, event, arg):
        if event == "line" and "lines" in state:
            state["lines"] += 1
            if state["lines"] == after:
                del state["lines"]
                raise KeyboardInterrupt
        return in_outputs_write

    def in_jsonl_write(frame, event, arg):
        if event == "return" and frame.f_locals["record"].seq == 2:
            state["lines"] = 0
        return in_jsonl_write

    def tracer(frame, event, arg):
        return {Outputs.write.__code__: in_outputs_write, JsonlSink.write.__code__: in_jsonl_write}.get(frame.f_code)

    source = open_source(str(sample_image_paths("pneumoniamnist")[0].parent))
    sinks = open_outputs("none", False, jsonl=tmp_path / "r.jsonl", csv_path=tmp_path / "r.csv")
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(open_backend(tiny_onnx), source, sinks, RunOptions())
    finally:
        sys.settrace(None)
    seqs = [r["seq"] for r in read_jsonl(tmp_path / "r.jsonl")]
    with open(tmp_path / "r.csv", newline="") as f:
        assert [int(row["seq"]) for row in csv.DictReader(f)] == seqs == list(range(len(seqs))) and len(seqs) >= 3


def test_a_ctrl_c_while_a_failed_sink_closes_still_gives_the_record_to_the_sinks_after_it(tiny_onnx, tmp_path):
    """A sink that fails (a full disk) is closed in Outputs.write, which for the video means reading it back: seconds,
    in which an application's Ctrl-C left Outputs.write from its error handler, outside the try, and the JSONL and CSV
    after it never had that record (a gap in both files' seq)."""
    from medmamba_edge.runtime.sinks import CsvSink, JsonlSink
    from medmamba_edge.runtime.sources import open_source

    class FullDisk:
        def write(self, record, image, fps):
            if record.seq == 2:
                raise OSError(28, "No space left on device")

        def close(self):
            raise KeyboardInterrupt  # the Ctrl-C while it closes

    source = open_source(str(sample_image_paths("pneumoniamnist")[0].parent))
    sinks = [FullDisk(), JsonlSink(tmp_path / "r.jsonl"), CsvSink(tmp_path / "r.csv")]
    with pytest.raises(KeyboardInterrupt):
        run(open_backend(tiny_onnx), source, sinks, RunOptions())
    seqs = [r["seq"] for r in read_jsonl(tmp_path / "r.jsonl")]
    with open(tmp_path / "r.csv", newline="") as f:
        assert [int(row["seq"]) for row in csv.DictReader(f)] == seqs == list(range(len(seqs))) and len(seqs) >= 3


def test_sigint_flushes_outputs_and_prints_summary(tiny_onnx, tmp_path):
    video = write_video(tmp_path / "loop.avi", count=10)
    jsonl = tmp_path / "records.jsonl"
    # Killed and reaped at the test's end if it is still running (a failed test once left this --loop run going).
    process = cli_process("run", tiny_onnx, video, "--loop", "--batch", "4", "--console", "none", "--jsonl", jsonl,
                          "--save-video", tmp_path / "annotated.avi")
    wait_for_records(process, tmp_path, 30)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 300 s after SIGINT")
    assert process.returncode == 0, stderr
    records = read_jsonl(jsonl)  # every line parses: nothing half-written
    assert len(records) >= 30 and [r["seq"] for r in records] == list(range(len(records)))
    assert not list(tmp_path.glob(".records.*"))
    assert "stopping" in stderr and f"{sum(r['status'] == 'ok' for r in records)} frames" in stdout
    # Frames still queued get a record but are no frame of the annotated video, which shows what was classified
    annotated = cv2.VideoCapture(str(tmp_path / "annotated.avi"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == sum(r["status"] == "ok" for r in records)
    assert "FPS" in stdout and "capture→result latency p50/p95/p99" in stdout


def test_a_stream_that_drops_and_comes_back_gets_one_lost_record_between_its_frames(tiny_onnx, tmp_path):
    """A stream that dropped and was reconnected carried on with the next frame number as if nothing had happened:
    only a console notice and a gap in the timestamps told a lost stream from a quiet one. The outage is a record of
    its own, no frame: --max-frames 8 still takes 8 frames."""
    server = FlakyMjpegServer()  # 4 frames, dropped, 4 more after the reconnect
    try:
        code, output = cli("run", tiny_onnx, server.url, "--reconnect", 1, "--max-frames", 8,
                           "--jsonl", tmp_path / "s.jsonl", "--csv", tmp_path / "s.csv")
    finally:
        server.close()
    assert code == 0, output
    records = read_jsonl(tmp_path / "s.jsonl")
    assert [r["status"] == "lost" for r in records] == [False] * 4 + [True] + [False] * 4
    assert [r["frame"] for r in records] == [0, 1, 2, 3, None, 4, 5, 6, 7]
    lost = records[4]
    assert lost["reason"] == (f"stream {server.url} lost for {lost['outage_s']:.1f} s; reconnected after 1 reconnect "
                              f"attempt") and lost["labels"] == [] and lost["latency_ms"] is None
    # Lost when the frames stopped, for as long as it took to get the next one: at least the 0.5 s back-off
    assert records[3]["timestamp"] <= lost["timestamp"] < records[5]["timestamp"]
    assert 0.5 <= lost["outage_s"] <= records[5]["timestamp"] - lost["timestamp"] + 0.01 and lost["outage_s"] < 5
    assert all(r["outage_s"] is None for r in records if r["status"] != "lost")
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == [r["status"] for r in records] and list(rows[0])[-1] == "outage_s"
    assert (rows[4]["frame"], rows[4]["reason"], float(rows[4]["outage_s"])) == ("", lost["reason"], lost["outage_s"])
    summary = re.search(r"(\d+) frames \(0 abstained\), 0 skipped, (\d+) dropped, 1 outage \((\d+\.\d) s\) in ", output)
    assert summary and int(summary[1]) + int(summary[2]) == 8 and abs(float(summary[3]) - lost["outage_s"]) <= 0.051


def test_a_run_from_python_prints_nothing_an_application_did_not_ask_for(tiny_onnx, capsys):
    """run() defaulted its notify to print, so an application's run of a stream that dropped wrote 'stream
    http://…: no frames; reconnecting in 0.5 s (attempt 1/1)' on the application's stdout (its own output, a pipe of
    JSON), where open_source, given no notify, says nothing. Without one run now leaves the source's; given one,
    that one hears it."""
    from medmamba_edge.runtime.sources import open_source

    heard = []
    for given in ({}, {"notify": heard.append}):
        server = FlakyMjpegServer()
        try:
            sink = Collect()
            run(open_backend(tiny_onnx), open_source(server.url, reconnect=1), [sink], RunOptions(max_frames=8),
                **given)
        finally:
            server.close()
        assert [r.status for r in sink.records].count("lost") == 1
    assert capsys.readouterr() == ("", "") and len(heard) == 1 and "reconnecting" in heard[0]


def test_files_have_no_outage_even_where_reads_fail(tiny_onnx, tmp_path):
    """A video whose reads fail at its cut end, and a folder, are read as they are: their records carry the outage
    column, empty, and never a lost record."""
    video = write_video(tmp_path / "cut.avi", count=12)
    video.write_bytes(video.read_bytes()[:len(video.read_bytes()) * 2 // 3])
    folder = sample_image_paths("pneumoniamnist")[0].parent
    for source, skipped in ((video, True), (folder, False)):
        code, output = cli("run", tiny_onnx, source, "--jsonl", tmp_path / "r.jsonl", "--csv", tmp_path / "r.csv")
        assert code == 0 and "dropped in " in output and " lost: " not in output, output
        records = read_jsonl(tmp_path / "r.jsonl")
        assert any(r["status"] == "skipped" for r in records) == skipped
        assert all(r["status"] != "lost" and r["outage_s"] is None for r in records)
        with open(tmp_path / "r.csv", newline="") as f:
            assert {row["outage_s"] for row in csv.DictReader(f)} == {""}


def test_a_stream_given_up_gets_its_outage_recorded_then_the_error(tiny_onnx, tmp_path):
    server = FlakyMjpegServer()
    try:
        code, output = cli("run", tiny_onnx, server.url, "--reconnect", 1, "--jsonl", tmp_path / "s.jsonl")
    finally:
        server.close()
    assert code == 1 and re.search(r"^error: stream .*: lost; no frames after 1 reconnect attempt$", output, re.M), output
    records = read_jsonl(tmp_path / "s.jsonl")
    assert [r["status"] for r in records].count("lost") == 2 and len(records) == 8 + 2
    assert records[-1]["status"] == "lost" and records[-1]["frame"] is None
    assert records[-1]["reason"].endswith("; given up after 1 reconnect attempt") and records[-1]["outage_s"] >= 0.5
    assert "reconnecting in" in output and "2 outages (" in output


def test_a_stop_during_an_outage_records_it_and_exits_as_a_stop_does(tiny_onnx, tmp_path):
    """A run stopped while its stream was away ended with the stream's last frame: the outage up to the stop had no
    record."""
    server = FlakyMjpegServer(good_connections=1)  # 4 frames, then every reconnect refused
    jsonl = tmp_path / "records.jsonl"
    try:
        process = cli_process("run", tiny_onnx, server.url, "--reconnect", 50, "--console", "none", "--jsonl", jsonl)
        wait_for_records(process, tmp_path, 4)
        time.sleep(1.5)  # the reconnects' back-off: 0.5 s, then 1 s
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        server.close()
    assert process.returncode == 0, stderr
    records = read_jsonl(jsonl)
    assert [r["status"] == "lost" for r in records] == [False] * 4 + [True]
    assert records[-1]["reason"].endswith("; the run was stopped while reconnecting")
    assert 1.5 <= records[-1]["outage_s"] < 30 and "1 outage (" in stdout and "stopped by SIGTERM" in stdout


def test_checkpoint_backend_agrees_with_onnx(tiny_onnx, tmp_path):
    folder = sample_image_paths("pneumoniamnist")[0].parent
    assert cli("run", tiny_onnx, folder, "--jsonl", tmp_path / "onnx.jsonl")[0] == 0
    code, output = cli("run", bundled_checkpoint(), folder, "--input-size", 32, "--jsonl", tmp_path / "pth.jsonl")
    assert code == 0 and "PyTorch" in output and "does not record its training size" not in output, output
    # Without --input-size a checkpoint runs at 224, whatever it was trained at: run says so.
    code, output = cli("run", bundled_checkpoint(), folder / "val_0000_pneumonia.png", "--console", "none")
    assert code == 0 and "does not record its training size: running it at 224×224" in output, output
    a, b = read_jsonl(tmp_path / "onnx.jsonl"), read_jsonl(tmp_path / "pth.jsonl")
    assert [r["labels"][0] for r in a] == [r["labels"][0] for r in b]
    assert np.allclose([r["probabilities"] for r in a], [r["probabilities"] for r in b], atol=1e-4)


def test_option_and_backend_errors_are_one_line(tiny_onnx, tmp_path):
    assert choose_providers(None, open_backend(tiny_onnx).metadata)[-1][0] == "CPUExecutionProvider"
    with pytest.raises(BackendError, match="CUDAExecutionProvider is not in this onnxruntime build"):
        open_backend(tiny_onnx, providers="cuda")
    image = sample_image_paths("busi")[0]
    for args, message in [(("--threshold", 2), "--threshold must be between 0 and 1"),
                          (("--save-video", tmp_path / "x.gif"), "--save-video needs one of"),
                          (("--show",), "--show needs"),
                          (("--backend", "pytorch"), "--backend pytorch: expected one of auto, tensorrt"),
                          # An exported model carries its input size and classes: asking for others is refused, not
                          # silently ignored; so is a precision for a model that is not being built.
                          (("--input-size", "64"), "input_size cannot be set for an exported model"),
                          (("--classes", "a,b"), "classes cannot be set for an exported model"),
                          (("--precision", "fp16"), "precision cannot be set for a model opened as it is")]:
        code, output = cli("run", tiny_onnx, image, *args)
        assert code == 1 and message in output and "Traceback" not in output, output
    with pytest.raises(BackendError, match="plugin cannot be set for an ONNX model"):
        open_backend(tiny_onnx, plugin=tmp_path / "libplugin.so")
    with pytest.raises(BackendError, match="a PyTorch checkpoint is opened with torch"):
        open_backend(bundled_checkpoint())


def test_backends_close_and_work_as_context_managers(tiny_onnx):
    from medmamba_edge.loaders import open_model

    image = np.zeros((1, 3, 32, 32), np.float32)
    for path in (tiny_onnx, bundled_checkpoint()):
        with open_model(path, input_size=32 if path.suffix == ".pth" else None) as backend:
            assert backend.run(image).shape == (1, 2)
        backend.close()  # closing twice is harmless
    with pytest.raises(BackendError, match="the model was closed"):
        backend = open_backend(tiny_onnx)
        backend.close()
        backend.run(image)


@pytest.fixture(scope="module")
def tiny_plugin_onnx(tmp_path_factory):
    from medmamba_edge.exporters.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("model") / "tiny_plugin.onnx"
    export_onnx(bundled_checkpoint(), path, input_size=32, batch=None, scan="plugin", verify=False)
    return path


@pytest.mark.parametrize("form", ["portable", "plugin"])
def test_runtime_never_imports_torch(form, tiny_onnx, tiny_plugin_onnx, tmp_path):
    """The whole run path (CLI included) on an ONNX model, in a fresh interpreter: torch stays out, for the
    portable form and for the plugin form with its custom-op library."""
    model = tiny_onnx if form == "portable" else tiny_plugin_onnx
    script = f"""
import sys
from medmamba_edge.cli import app
try:
    app(["run", {str(model)!r}, {str(sample_image_paths()[0].parents[1])!r}, "--jsonl", {str(tmp_path / 'r.jsonl')!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
import medmamba_edge.runtime.datasets, medmamba_edge.runtime.bundled, medmamba_edge.runtime.backends.onnxruntime
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "PIL")))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    assert len(read_jsonl(tmp_path / "r.jsonl")) == len(sample_image_paths())


def test_the_per_second_console_ends_with_the_runs_rate_not_its_last_windows():
    """A window closed a few ms after its start (a batch's records arriving at once) read 6545.6 FPS on its last
    line, where the run went at 2.5."""
    import io

    from medmamba_edge.runtime.sinks import ConsoleSink, Record

    stream = io.StringIO()
    console = ConsoleSink("second", stream)
    for seq in range(3):
        console.write(Record(seq, "cam", seq, 0.0, "ok", ["normal"], [0.9]), None, 2.5)
    console.close()
    assert stream.getvalue().startswith("3 frames, 2.5 FPS"), stream.getvalue()


def test_the_per_second_console_counts_an_outage_beside_the_frames_not_as_one():
    import io

    from medmamba_edge.runtime.sinks import ConsoleSink, Record

    stream = io.StringIO()
    console = ConsoleSink("second", stream)
    console.write(Record(0, "cam", 7, 0.0, "ok", ["normal"], [0.9]), None, 2.5)
    console.write(Record(1, "cam", None, 0.0, "lost", reason="camera 0 lost for 3.0 s; ...", outage_s=3.0), None, 2.5)
    console.close()
    assert stream.getvalue() == "1 frame, 2.5 FPS, last: normal 90.0%, 1 outage\n"


def test_closing_the_window_stops_the_run_as_q_does(monkeypatch):
    """Closing the --show window with its X button neither stopped the run nor kept the window closed: OpenCV opened
    it again at the next frame. There is no display here: the two calls that ask OpenCV about the window (waitKey
    for a key, getWindowProperty for its visibility) are stood in for, to check what the sink makes of their
    answers: a window closed (0) stops the run, one shown (1) or a backend that cannot tell (-1, GTK) does not."""
    from medmamba_edge.runtime import sinks
    from medmamba_edge.runtime.sinks import Outputs, Record, WindowSink

    monkeypatch.setenv("DISPLAY", ":0")
    for name, fake in (("namedWindow", lambda *args: None), ("imshow", lambda name, frame: None),
                       ("waitKey", lambda delay: -1), ("destroyWindow", lambda name: None)):
        monkeypatch.setattr(sinks.cv2, name, fake)
    image = read_image(sorted(require_shared("data", "busi", "normal").glob("*.png"))[0])
    for visible, stops in ((1.0, False), (-1.0, False), (0.0, True)):
        asked = (WindowSink.NAME, cv2.WND_PROP_VISIBLE)
        monkeypatch.setattr(sinks.cv2, "getWindowProperty", lambda *args: visible if args == asked else 1.0)
        outputs = Outputs([WindowSink()])
        outputs.write(Record(0, "cam", 0, 0.0, "ok", ["normal"], [0.9]), image, 12.5)
        assert outputs.stop_requested is stops, visible
        outputs.close()


def test_show_and_save_video_draw_the_overlay_once_a_frame_and_show_the_same_frame(tmp_path, monkeypatch):
    """--show --save-video drew the overlay twice a frame, each sink on its own copy (22 ms a 1080p frame here, twice
    over a 33 ms frame budget at 30 FPS). The window is faked (no display here): it keeps what it is shown."""
    from medmamba_edge.runtime import sinks
    from medmamba_edge.runtime.sinks import Outputs, Record, open_outputs, overlay

    shown, drawn = [], []
    monkeypatch.setenv("DISPLAY", ":0")
    for name, fake in (("namedWindow", lambda *args: None), ("imshow", lambda name, frame: shown.append(frame)),
                       ("waitKey", lambda delay: -1), ("getWindowProperty", lambda name, prop: 1.0),
                       ("destroyWindow", lambda name: None)):
        monkeypatch.setattr(sinks.cv2, name, fake)
    monkeypatch.setattr(sinks, "overlay", lambda *args: drawn.append(overlay(*args)) or drawn[-1])
    video = tmp_path / "annotated.avi"
    outputs = Outputs(open_outputs("none", False, video=video, video_fps=5.0, show=True))
    images = [np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8) for seed in range(3)]
    records = [Record(seq, "cam", seq, 0.0, "ok", ["normal"], [0.9]) for seq in range(len(images))]
    for record, image in zip(records, images):
        outputs.write(record, image, 12.5)
    outputs.close()
    assert not outputs.errors and len(drawn) == len(images), f"{len(drawn)} overlays drawn for {len(images)} frames"
    once = [overlay(image, record, 12.5) for record, image in zip(records, images)]
    assert all(np.array_equal(a, b) for a, b in zip(shown, once, strict=True))

    # MJPG encodes a frame the same way every time: one overlay, written directly, is what the video must hold.
    reference = tmp_path / "reference.avi"
    writer = cv2.VideoWriter(str(reference), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, once[0].shape[1::-1])
    for frame in once:
        writer.write(frame)
    writer.release()

    def frames(path):
        capture, read = cv2.VideoCapture(str(path)), []
        while (frame := capture.read()[1]) is not None:
            read.append(frame)
        capture.release()
        return read

    saved = frames(video)
    assert len(saved) == len(images) and all(np.array_equal(a, b) for a, b in zip(saved, frames(reference)))


def test_deep_frames_are_shown_and_saved_as_their_8_bit_pixels():
    """A 16-bit frame (a 16-bit PNG, DICOM, a deep camera) is drawn from its high byte: its low byte is the fine detail
    8 bits cannot show (here another pixel's value, as unrelated to the picture as sensor noise; v × 257 would repeat
    v there and hide a frame drawn from the low byte). A float frame in [0, 1] is drawn from v / 255, rounded (fed
    (v - 0.4) / 255 here, which truncation would show as v - 1). All give the same picture as the 8-bit file, in
    OpenCV's BGR order: the bundled BUSI samples are gray, so their channels are made to differ first."""
    from medmamba_edge.runtime.sinks import to_display

    for path in sample_image_paths("busi"):
        gray_rgb = read_image(path)
        rgb = np.stack([gray_rgb[:, :, 0], 255 - gray_rgb[:, :, 1], gray_rgb[:, :, 2] // 2], axis=-1)
        expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        deep = (rgb.astype(np.uint16) << 8) | rgb[::-1, ::-1]
        assert np.array_equal(to_display(rgb), expected), path
        assert np.array_equal(to_display(deep), expected), path
        assert np.array_equal(to_display(np.clip(rgb.astype(np.float32) - 0.4, 0, None) / 255), expected), path
        gray = deep[:, :, 1]
        assert np.array_equal(to_display(gray), cv2.cvtColor(rgb[:, :, 1], cv2.COLOR_GRAY2BGR)), path


def test_save_video_keeps_each_frames_aspect_and_enlarges_a_tiny_one_for_its_caption(tmp_path):
    """A folder of BUSI ultrasound images of several shapes: the first (256×256) fixes the video's size and a later
    500×200 one was stretched into it, the lesion 2.5 times taller than it is and the caption with it. It is now
    fitted, black above and below. A 28×28 PneumoniaMNIST frame had its caption drawn 0.03 points high, a smudge
    of a few pixels: the frame is enlarged by a whole factor (sharp pixels) before the text is drawn."""
    from medmamba_edge.runtime.sinks import Record, VideoSink, overlay

    busi = read_image(sorted(require_shared("data", "busi", "benign").glob("*.png"))[0])
    wide = cv2.resize(busi, (500, 200), interpolation=cv2.INTER_AREA)
    video = tmp_path / "mixed.avi"
    sink = VideoSink(video, 5.0)
    for seq, image in enumerate((busi, wide)):
        record = Record(seq, "busi", 0, 0.0, "ok", ["benign"], [0.9])
        sink.write(record, overlay(image, record, 5.0), 5.0)
    sink.close()
    capture = cv2.VideoCapture(str(video))
    saved = [capture.read()[1] for _ in range(2)]
    capture.release()
    assert saved[1].shape == (256, 256, 3)
    band = (256 - round(200 * 256 / 500)) // 2  # 77 rows of black above the fitted frame, 77 below
    assert saved[1][:band - 2].max() < 16 and saved[1][-band + 2:].max() < 16
    picture = saved[1][band + 2:-band - 2, :, 0].astype(float)
    expected = cv2.resize(cv2.cvtColor(wide, cv2.COLOR_RGB2BGR), (256, 256 - 2 * band))[2:-2, :, 0]
    assert np.abs(picture - expected)[60:].mean() < 8  # below the caption, the picture as it is (JPEG's error)

    tiny = np.load(require_shared("data", "pneumoniamnist", "pneumoniamnist_trainval.npz"))["val_images"][0]
    drawn = overlay(tiny, Record(0, "x.png", 0, 0.0, "ok", ["pneumonia"], [0.99]), 5.0)
    assert drawn.shape == (280, 280, 3)  # 10 × 28
    below_caption = drawn[80:]  # each source pixel a 10×10 square of its value
    assert np.array_equal(below_caption[::10, ::10, 0], tiny[8:])
    assert np.array_equal(below_caption[9::10, 9::10, 0], tiny[8:])


def test_a_frame_fitted_into_the_video_has_its_caption_as_large_as_the_first_frames(tmp_path):
    """The overlay was drawn at a frame's own size and the frame then fitted to the video's: a 500×200 BUSI frame
    after a 256×256 one had its caption shrunk with it, to half the first frame's height (the text of a tall frame
    smaller still). Frames are now fitted first and the text drawn on the video's frame."""
    from medmamba_edge.runtime.sinks import Outputs, Record, open_outputs

    busi = read_image(sorted(require_shared("data", "busi", "benign").glob("*.png"))[0])
    video = tmp_path / "mixed.avi"
    outputs = Outputs(open_outputs("none", False, video=video, video_fps=5.0))
    for seq, image in enumerate((busi, cv2.resize(busi, (500, 200), interpolation=cv2.INTER_AREA))):
        outputs.write(Record(seq, "busi", 0, 0.0, "ok", ["benign"], [0.9]), image, 5.0)
    outputs.close()
    capture = cv2.VideoCapture(str(video))
    saved = [capture.read()[1].astype(int) for _ in range(2)]
    capture.release()

    def caption_rows(frame):  # the rows where the green caption is drawn
        green = (frame[:, :, 1] > 150) & (frame[:, :, 1] - frame[:, :, 2] > 60)
        return np.flatnonzero(green.any(axis=1))

    first, fitted = caption_rows(saved[0]), caption_rows(saved[1])
    assert len(first) > 5 and abs(len(fitted) - len(first)) <= 2 and abs(fitted[0] - first[0]) <= 2, (first, fitted)


def test_the_overlay_cuts_a_class_name_too_long_for_the_frame_and_keeps_the_probability():
    """A long class name (from --classes) ran off a BUSI frame's right edge, the probability after it never seen. It
    is now cut ('...'), the probability drawn after it. Names in scripts OpenCV's font lacks are cut as they are
    drawn (one '?' a character)."""
    from medmamba_edge.runtime.sinks import Record, overlay

    busi = read_image(sorted(require_shared("data", "busi", "benign").glob("*.png"))[0])
    for name, drawn_as in (("normal chest radiograph without findings of any kind whatsoever",
                            "normal chest radiograph without..."),
                           ("肺炎" * 30, "肺炎" * 13 + "肺...")):
        given, expected = (overlay(busi, Record(0, "b.png", 0, 0.0, "ok", [label], [0.821]), 5.0)
                           for label in (name, drawn_as))
        assert np.array_equal(given, expected), name


def test_the_overlay_cuts_a_very_long_class_name_in_a_few_measures(monkeypatch):
    """The overlay cut a class name too long for the frame a letter at a time, measuring the text after each: a
    2000-letter name (a class_indices.json holding a description) took 0.44 s a 256-pixel BUSI frame, a 300-letter
    one 11 ms, a third of a 30 fps frame's time. The cut is now bisected (a few measures, counted here rather than
    timed), and the same as one a letter at a time."""
    from medmamba_edge.runtime import sinks
    from medmamba_edge.runtime.sinks import Record, overlay

    busi = read_image(sorted(require_shared("data", "busi", "benign").glob("*.png"))[0])
    name = " ".join(["normal chest radiograph without findings"] * 50)
    measures, measure = [], cv2.getTextSize
    monkeypatch.setattr(sinks.cv2, "getTextSize", lambda *args: measures.append(args) or measure(*args))
    given = overlay(busi, Record(0, "b.png", 0, 0.0, "ok", [name], [0.821]), 5.0)
    assert len(measures) <= 2 + len(name).bit_length(), len(measures)
    expected = overlay(busi, Record(0, "b.png", 0, 0.0, "ok", ["normal chest radiograph without..."], [0.821]), 5.0)
    assert np.array_equal(given, expected)


def test_the_overlay_draws_a_class_name_whole_where_it_fits_but_its_cut_would_not():
    """A name that fits whole was cut when the same name one letter shorter plus '...' did not fit ('M' * 20 + 'i'
    in 244 pixels drawn 'M' * 19 + '...'): the bisection took the whole name for one more cut."""
    from medmamba_edge.runtime.sinks import Record, _overlay_caption

    def width(text):
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 3)[0][0]

    names = ["M" * k + "i" for k in range(1, 60)]
    whole = [name for name in names if width(f"{name} 82.1%") <= 244 < width(f"{name[:-1]}... 82.1%")]
    assert whole  # such a name exists for this font, or the test shows nothing
    for name in whole:
        assert _overlay_caption(Record(0, "b.png", 0, 0.0, "ok", [name], [0.821]), 244, 0.42, 3) == f"{name} 82.1%"


def test_a_live_sources_video_is_saved_at_the_rate_its_frames_came(tmp_path):
    """FFmpeg says 25 fps for any MJPEG stream, and the video of a live run was written at the rate the source said:
    an 8 fps MJPEG camera's 23 frames made a video of 0.9 s for 2.5 s of run. A live source's video is now at the
    rate its first frames were captured, by their median gap (the first few came in a burst, read while FFmpeg
    probed the stream); a video too short to tell keeps the source's figure."""
    from medmamba_edge.runtime.sinks import Outputs, Record, open_outputs

    busi = [read_image(path) for path in sorted(require_shared("data", "busi", "normal").glob("*.png"))[:12]]
    captured = [0.0, 0.003, 0.006] + [0.006 + 0.125 * i for i in range(1, 10)]  # a burst, then 8 fps
    for count, fps in ((12, 8.0), (3, 25.0)):
        video = tmp_path / f"camera{count}.avi"
        outputs = Outputs(open_outputs("none", True, video=video, video_fps=25.0))
        for seq, (image, at) in enumerate(zip(busi[:count], captured)):
            outputs.write(Record(seq, "http://cam/video.mjpg", seq, 1e9 + at, "ok", ["normal"], [0.9]), image, 8.0)
        outputs.close()
        capture = cv2.VideoCapture(str(video))
        assert not outputs.errors and capture.get(cv2.CAP_PROP_FRAME_COUNT) == count
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, rel=1e-3), count
        capture.release()


def test_a_live_sources_measured_rate_is_one_the_video_can_be_written_at(tmp_path):
    """The rate measured from a live source's first frames went to OpenCV as it came: a camera sending a frame every
    15 ms (66.667 fps, which OpenCV makes 66667/1000 and mp4v takes no denominator over 65535) and a stream's ten
    buffered frames read 1 ms apart (1000 fps) both failed the video ('OpenCV cannot write a 256×256 mp4v video
    here'). The rate is now kept to hundredths, and a burst faster than any camera keeps the source's figure. A
    file's rate went to OpenCV as it came too, and still failed so (a 200 fps video with --stride 3)."""
    from medmamba_edge.runtime.sinks import Outputs, Record, open_outputs

    busi = [read_image(path) for path in sorted(require_shared("data", "busi", "normal").glob("*.png"))[:10]]
    for live, gap, fps in ((True, 0.015, 66.67), (True, 0.001, 25.0), (False, 0.1, 66.67)):
        video = tmp_path / f"camera{live}{gap}.mp4"
        outputs = Outputs(open_outputs("none", live, video=video, video_fps=25.0 if live else 200 / 3))
        for seq, image in enumerate(busi):
            outputs.write(Record(seq, "rtsp://cam/stream", seq, 1e9 + gap * seq, "ok", ["normal"], [0.9]), image, 8.0)
        outputs.close()
        assert not outputs.errors, outputs.errors
        capture = cv2.VideoCapture(str(video))
        assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == len(busi)
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, rel=1e-3), (live, gap)
        capture.release()


def test_a_live_run_too_short_to_measure_leaves_no_temporary_video_where_opencv_refuses_it(tmp_path, monkeypatch):
    """A live run of fewer frames than the rate is measured from opens its video only at the end: where OpenCV then
    refused it, the error was reported but the temporary '.v.*.partial.mp4' was left in the folder. A writer that
    cannot open is stood in for (what refuses one depends on the OpenCV build); the frames are BUSI's."""
    from medmamba_edge.runtime import sinks
    from medmamba_edge.runtime.sinks import Outputs, Record, open_outputs

    class Refused:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

    monkeypatch.setattr(sinks.cv2, "VideoWriter", Refused)
    busi = [read_image(path) for path in sorted(require_shared("data", "busi", "normal").glob("*.png"))[:3]]
    outputs = Outputs(open_outputs("none", True, video=tmp_path / "v.mp4", video_fps=25.0))
    for seq, image in enumerate(busi):
        outputs.write(Record(seq, "rtsp://cam/stream", seq, 1e9 + 0.1 * seq, "ok", ["normal"], [0.9]), image, 8.0)
    outputs.close()
    assert [error.endswith("mp4v video here") for error in outputs.errors] == [True]
    assert os.listdir(tmp_path) == []


class StalledCamera(Source):
    live, description = True, "a camera whose read hangs"

    def frames(self, stride=1):
        yield Frame("cam", 0, time.time(), np.zeros((40, 40, 3), np.uint8))
        time.sleep(3)  # deaf to stop(): a stalled stream


def test_a_run_ending_normally_inside_a_callers_except_marks_nothing(tiny_onnx, monkeypatch):
    """run() marked the KeyboardInterrupt its caller was handling (sys.exc_info() in its finally sees the caller's)
    as one that left a capture thread running, though run itself returned normally."""
    import threading

    from medmamba_edge.runtime.loop import capture_still_running
    from medmamba_edge.runtime.sources.capture import Capture

    monkeypatch.setattr(Capture, "live_stop_timeout_s", 0.2)
    stop, sink = threading.Event(), Collect()
    sink.write = lambda record, image, fps: (sink.records.append(record), stop.set())
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as handled:
        stats = run(open_backend(tiny_onnx), StalledCamera(), [sink], RunOptions(), stop=stop)
        caller = handled
    assert stats.stopped == "a stop request" and [r.status for r in sink.records] == ["ok"]
    assert not capture_still_running(caller)


def test_a_ctrl_c_while_the_outputs_close_is_marked_when_the_capture_still_runs(tiny_onnx, monkeypatch):
    """A second Ctrl-C while a video writer finished its file (the outputs' close) left run unmarked though a live
    stream's read still hung in its thread: the CLI did not end with os._exit, and Python's exit aborted."""
    import threading

    from medmamba_edge.runtime.loop import capture_still_running
    from medmamba_edge.runtime.sources.capture import Capture

    monkeypatch.setattr(Capture, "live_stop_timeout_s", 0.2)
    stop, sink = threading.Event(), Collect()
    sink.write = lambda record, image, fps: (sink.records.append(record), stop.set())

    def interrupted_close():
        raise KeyboardInterrupt  # the signal's, as it arrives inside the close

    sink.close = interrupted_close
    with pytest.raises(KeyboardInterrupt) as interrupt:
        run(open_backend(tiny_onnx), StalledCamera(), [sink], RunOptions(), stop=stop)
    assert capture_still_running(interrupt.value)


def test_a_capture_that_cannot_start_still_closes_the_outputs(tiny_onnx, tmp_path, monkeypatch):
    """capture.start() was outside run's try: at the process's thread limit ("can't start new thread") the JSONL
    was left as a .partial file and the sinks never closed."""
    from medmamba_edge.runtime.sinks import open_outputs
    from medmamba_edge.runtime.sources.capture import Capture

    def cannot_start(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Capture, "start", cannot_start)
    closed = Collect()
    closed.close = lambda: closed.records.append("closed")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        run(open_backend(tiny_onnx), FastLiveSource(3), [closed, *open_outputs("none", False, jsonl=tmp_path / "r.jsonl")],
            RunOptions())
    assert closed.records == ["closed"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"] and (tmp_path / "r.jsonl").read_text() == ""
