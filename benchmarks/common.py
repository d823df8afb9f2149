"""What the benchmark scripts share: how their arguments are checked, the MedMamba-T 224×224 model under test
and how sessions are made.

torch is imported only where the model is built: the scripts that time the torch-free runtime (bench_run_loop,
bench_triton, bench_scan_cpu) check their arguments here too.
"""

from __future__ import annotations

import argparse
import json
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnxruntime as ort

from medmamba_edge.benchmarking import SETTLED_S
from medmamba_edge.errors import UserError
from medmamba_edge.runtime import scan_cpu
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from medmamba_edge.runtime.backends import ONNX_SUFFIXES
from medmamba_edge.runtime.cpu import check_threads
from medmamba_edge.runtime.metadata import int_at_least

if TYPE_CHECKING:
    from medmamba_edge.checkpoint import LoadedCheckpoint


def at_least(least: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``least``, so that a count of 0 or -3 is refused in one line
    naming the option instead of running on nothing, or on everything (a slice step of -3)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if not int_at_least(value, least):
            raise argparse.ArgumentTypeError(f"must be an integer of at least {least}, got {text!r}")
        return value
    return parse


def int_list(least: int = 1) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated integers of at least ``least`` (batch sizes, client counts), each
    once, in the order given."""
    one = at_least(least)

    def parse(text: str) -> list[int]:
        try:
            values = [one(item.strip()) for item in text.split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated integers of at least {least}, got {text!r}") from None
        return list(dict.fromkeys(values))
    return parse


def choice_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names out of ``choices``, each once; a typo would otherwise label
    another form's numbers with itself."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        values = [item.strip() for item in text.split(",")]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}: choose from {', '.join(allowed)}")
        return list(dict.fromkeys(values))
    return parse


def onnx_file(text: str) -> Path:
    """An argparse ``type``: an existing ONNX file, refused at parsing: a script opens its models only after its
    preparation (bench_run_loop's exports and video take minutes), so a model.txt was refused only then."""
    path = Path(text)
    if path.suffix.lower() not in ONNX_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: not an ONNX model (expected {', '.join(ONNX_SUFFIXES)})")
    try:
        info = path.stat()
    except OSError as exc:  # missing, a dangling link, a name too long
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise argparse.ArgumentTypeError(f"{text}: {'a folder' if stat.S_ISDIR(info.st_mode) else 'not a file'}, "
                                         f"not an ONNX model")
    return path


def check_thread_count(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """The runtime's --threads rule (1 to the usable CPUs), as the script's usage error."""
    try:
        check_threads(threads)
    except UserError as exc:
        parser.error(str(exc))


def thread_count(parser: argparse.ArgumentParser, threads: int | None) -> int:
    """--threads as given, checked, else the scan's default ($MEDMAMBA_EDGE_SCAN_THREADS, or the usable CPUs): a
    default the user did not type is not refused as if typed."""
    if threads is None:
        return scan_cpu.default_num_threads()
    check_thread_count(parser, threads)
    return threads


def medmamba_t(parser: argparse.ArgumentParser, checkpoint: Path | None) -> LoadedCheckpoint:
    """The given checkpoint, or MedMamba-T with seeded random weights (speed does not depend on them). A
    checkpoint that cannot be read is the script's usage error (its --checkpoint), not a traceback."""
    import torch

    from medmamba_edge.checkpoint import LoadedCheckpoint, ModelConfig, load_checkpoint

    if checkpoint:
        try:
            return load_checkpoint(checkpoint)
        except UserError as exc:
            parser.error(str(exc))
    torch.manual_seed(0)
    config = ModelConfig(depths=[2, 2, 4, 2], dims=[96, 192, 384, 768], num_classes=6)
    return LoadedCheckpoint(config.build().eval(), config, [f"c{i}" for i in range(6)], Path("random"), "")


def cpu_session(model: onnx.ModelProto, threads: int, fused: bool = False, spinning: bool = False) -> ort.InferenceSession:
    """A CPU session. ``spinning`` False: one that can be timed interleaved with others in one process, its
    idle workers not spinning (they would steal the cores of the session being timed); True: ONNX Runtime's
    default, as `medmamba-edge run` has it, for sessions timed one after the other. ``fused``: a plugin-form
    model on the native SS2DScan op."""
    if fused:
        options = custom_ops.fused_session_options(threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def library_options(library: Path, threads: int) -> ort.SessionOptions:
    """SessionOptions on a given build of the SS2DScan custom-op library (this checkout's:
    custom_ops.fused_session_options)."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


BLOCK = 5  # timed runs per model and turn


def interleaved(runs: dict[str, callable], warmup: int, iterations: int, block: int) -> dict[str, list[float]]:
    """``iterations`` timed runs of each model after ``warmup`` untimed ones, the models taking turns of ``block``
    runs; a turn of several runs follows a pause (SETTLED_S, `medmamba-edge benchmark`'s), so it starts with one
    untimed run that wakes the session's workers."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in runs}
    while len(samples[next(iter(runs))]) < iterations:
        for name, fn in runs.items():
            if block > 1:
                fn()
            for _ in range(min(block, iterations - len(samples[name]))):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1000)
            if block > 1:
                time.sleep(SETTLED_S)
    return samples


def profile_nodes(model: onnx.ModelProto, feed: dict, threads: int, runs: int = 5,
                  library: Path | None = None) -> dict[tuple[str, str], float]:
    """ONNX Runtime's own kernel time per node, ms per run over ``runs`` runs after one warm-up run, keyed by
    (node name, op type) as the profile names them (after ONNX Runtime's fusions). A plugin-form model runs
    on the fused C scan: this checkout's, or the custom-op ``library`` given."""
    options = custom_ops.fused_session_options(threads) if library is None else library_options(library, threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = f"{tmp}/profile"
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    warm_up = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed_from = warm_up["ts"] + warm_up["dur"]
    totals: dict[tuple[str, str], float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            key = (event["name"].removesuffix("_kernel_time"), event["args"]["op_name"])
            totals[key] = totals.get(key, 0.0) + event["dur"] / 1000 / runs
    return totals


def profile_by_op_type(model: onnx.ModelProto, feed: dict, threads: int, runs: int = 5) -> list[tuple[str, float]]:
    """Kernel time summed by op type (ms per run), largest first."""
    totals: dict[str, float] = {}
    for (_, op_type), ms in profile_nodes(model, feed, threads, runs).items():
        totals[op_type] = totals.get(op_type, 0.0) + ms
    return sorted(totals.items(), key=lambda item: -item[1])
