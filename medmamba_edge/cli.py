"""The ``medmamba-edge`` command. Thin: each command parses options, calls one library function, and
turns the library's errors into one clear line and a non-zero exit. Heavy imports happen inside the
commands so ``--help`` is instant and optional parts stay optional."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.models import TyperPath

from medmamba_edge.runtime.files import GuardedStdout, any_is_stdout, local_output, printable
from medmamba_edge.runtime.metadata import DEFAULT_INPUT_SIZE
from medmamba_edge.runtime.signals import STOP_SIGNALS, handle_stop_signals
from medmamba_edge.runtime.triton_defaults import (DEFAULT_HOST, DEFAULT_INSTANCES, DEFAULT_KIND, DEFAULT_MAX_BATCH,
                                                   DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_MODEL_NAME, DEFAULT_PORT)

from .errors import UserError, only_with, plural

app = typer.Typer(
    name="medmamba-edge",
    help="MedMamba from a PyTorch checkpoint to fast, quantized inference on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Messages name the user's files and classes: neither console turns ":name:" into an emoji. stderr's lines
# are rich markup with the user's strings escaped; stdout prints results as given, never read as markup
# (a path "res[/x].jsonl" or a class "[/]" would vanish or crash the print after the work is done), so
# its styles come as rich Text. A stdout that cannot be written (`| head` gone, a full disk) is a one-line error.
console = Console(stderr=True, emoji=False)
out = Console(markup=False, emoji=False, file=GuardedStdout())
# A report moved off stdout is still results: on stderr's markup console a model "x[red]y.onnx" read "xy.onnx".
report_on_stderr = Console(stderr=True, markup=False, emoji=False)


def report_console(*outputs) -> Console:
    """Where a command's tables and 'wrote' lines go: stdout, unless one of its outputs is stdout (--json
    /dev/stdout, `--json F > F`), which then gets stdout to itself, as run's records do."""
    return report_on_stderr if any_is_stdout(*outputs) else out


# Off a terminal rich assumes 80 columns and folds table cells mid-word ("medmam│ba_t_p"); a file or a CI log
# has no width, so there tables and lines get the room they need.
UNBOUNDED_WIDTH = 1000


def _print_version(asked: bool) -> None:
    if asked:
        from medmamba_edge import __version__

        try:  # an eager option runs before any command's one-line error handling
            out.print(f"medmamba-edge {__version__}")
        except UserError as exc:
            fail(str(exc))
        raise typer.Exit()


@app.callback()
def _fit_output_to_its_destination(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    for stream in (out, console, report_on_stderr):
        stream.width = None if stream.is_terminal else UNBOUNDED_WIDTH
    # A file name's undecodable bytes (surrogate-escaped by Python) print as \udcff, as in the JSONL and as
    # stderr always writes them; a UTF-8 locale's stdout would raise UnicodeEncodeError after the work is done.
    if hasattr(out.file, "reconfigure"):
        out.file.reconfigure(errors="backslashreplace")


def shown(text: str) -> str:
    """A user's string (a file or class name) in a stderr line: control characters and undecodable bytes as
    escapes, as the console sink writes them (a name's ESC [2J would clear the terminal), and no markup."""
    return escape(printable(str(text), console.file))


def checkpoint_input_size(input_size: str | None, models: list) -> tuple[int, int] | None:
    """--input-size parsed; and, said on stderr, when a checkpoint among ``models`` runs at the default size for
    want of one (the models' own sizes are read once they are opened)."""
    from .evaluation import defaulted_checkpoint

    size = parse_input_size(input_size) if input_size else None
    checkpoint = defaulted_checkpoint(models, size)
    if checkpoint is not None:
        say_default_size(checkpoint, "running it")
    return size


def say_default_size(checkpoint, done: str) -> None:
    console.print(f"[yellow]{shown(checkpoint)}: a checkpoint does not record its training size: {done} at "
                  f"{DEFAULT_INPUT_SIZE}×{DEFAULT_INPUT_SIZE} (--input-size gives another)[/]", highlight=False,
                  soft_wrap=True)


def fail(message: str) -> None:
    # Escaped: sources such as "file.npz[val:12]" would otherwise be read as rich markup and vanish.
    console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def command(name: str | None = None):
    """``app.command`` whose library errors (UserError, anywhere in the command) end as one line and exit 1."""

    def register(function):
        @functools.wraps(function)
        def reporting_user_errors(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except UserError as exc:
                fail(str(exc))
            except OSError as exc:
                # A full disk is a condition, not a bug: most often the temporary folder (calibration models,
                # a lowered graph), whose writes carry no file name.
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                import tempfile

                fail(f"{exc.filename + ': ' if exc.filename else ''}no space left on the device; temporary files go "
                     f"to {tempfile.gettempdir()} (TMPDIR chooses another folder)")

        return app.command(name)(reporting_user_errors)

    return register


@contextmanager
def spinner(text: str):
    """A transient status line on stderr; yields the function that replaces its text, shown as given:
    library messages name the user's files ("loading ck[/x].pth")."""
    with console.status(text) as status:
        yield lambda message: status.update(Text(message))


def progress_bars(*columns):
    """Transient progress bars on stderr. None off a terminal: there they draw nothing and leave a blank line,
    which would come before an error's one line."""
    from rich.progress import Progress

    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def write_json(path: Path, data: dict) -> None:
    import json

    from medmamba_edge.runtime.files import write_bytes_atomically

    write_bytes_atomically(path, json.dumps(data, indent=2).encode())


def check_outputs(*files: Path | None, folder: Path | None = None, plots: bool = False, reads=()) -> None:
    """Before the long work: an output (--json, a plot, a folder of plots) that cannot be written, that would
    replace one of the files the command ``reads`` or another output, a plot inside a folder it reads, or plots
    without matplotlib, fail now."""
    from medmamba_edge.runtime.decode import IMAGE_SUFFIXES
    from medmamba_edge.runtime.files import OutputError, check_distinct_outputs, check_writable

    if folder:  # first: its files' own checks would only say it is not a folder in more words
        check_writable(folder, folder=True)
    outputs = [path for path in files if path]
    read_folders = [Path(os.path.realpath(p)) for p in filter(None, reads) if os.path.isdir(p)]
    check_distinct_outputs([(None, path) for path in outputs], reads)
    for path in outputs:
        check_writable(path)
    # A plot written into the data folder would be one of its images at the next run.
    for path in [*(p for p in outputs if p.suffix.lower() in IMAGE_SUFFIXES), *([folder] if folder else [])]:
        inside = [d for d in read_folders if Path(os.path.realpath(path)).is_relative_to(d)]
        if inside:
            raise OutputError(f"{path}: lies in {inside[0]}, which this command reads images from")
    if plots:
        from .plots import pyplot

        pyplot()


def given_only_with(needed: str, missing: bool, **options) -> None:
    if problem := only_with(needed, missing, **options):
        fail(problem)


INPUT_SIZE = "N|HxW"  # the metavar of every --input-size


# Every file or folder argument: str values in typer's path type (shown as PATH), as typed. A Path annotation folded
# a URL's "//", and the command's refusal named it wrongly ("http:/host/m.onnx"); runtime.uri.uri_refusal reads it.
PATH = TyperPath(path_type=str, readable=False)  # an output replaced whole need not be readable


def warn_left_out(failures, whose: str, rest_in: str | None = None) -> None:
    """The images a command left out, each by name, or the first few when ``rest_in`` says where every one is
    listed."""
    if not failures:
        return
    console.print(f"[yellow]warning:[/] {plural(len(failures), 'image')} could not be used, left out {whose}:",
                  highlight=False)
    shown_here = failures if rest_in is None else failures[:5]
    for failure in shown_here:
        console.print(f"  {shown(failure.reason)}", highlight=False, soft_wrap=True)
    if len(failures) > len(shown_here):
        console.print(f"  … and {len(failures) - len(shown_here)} more ({rest_in})", highlight=False)


def warn_also_calibrated(overlapping: int, evaluated: int) -> None:
    console.print(f"[yellow]warning:[/] {overlapping} of the {evaluated} evaluation images are also calibration images "
                  f"(the same model input): INT8's ranges were fitted to them, so the accuracy gate reads optimistic; "
                  f"evaluate on images kept out of --calib", highlight=False, soft_wrap=True)


def parse_input_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        fail(f"--input-size must be N or HxW with positive integers, got {text!r}")
    return parts[0], parts[1]


@command()
def export(
    checkpoint: Annotated[str, typer.Argument(click_type=PATH, help="Official MedMamba checkpoint (.pth state_dict).")],
    output: Annotated[str, typer.Option("-o", "--output", click_type=PATH, help="Where to write the ONNX model.")],
    input_size: Annotated[Optional[str], typer.Option(metavar=INPUT_SIZE, help=f"Input size, the size it was trained at: "
                                                                                f"N or HxW (default {DEFAULT_INPUT_SIZE}).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Fixed batch size (default 1).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or later).")] = 18,
    classes: Annotated[Optional[str], typer.Option(help="Class names: comma-separated, or a class_indices.json. "
                                                        "Default: class_indices.json beside the checkpoint.")] = None,
    scan: Annotated[str, typer.Option(help="plugin: one SS2DScan node per SS2D block (TensorRT plugin, "
                                           "native ONNX Runtime op); portable: standard ONNX ops only.")] = "plugin",
    verify: Annotated[bool, typer.Option(help="Compare ONNX Runtime with PyTorch on real images.")] = True,
    atol: Annotated[Optional[float], typer.Option(
        help="Verification: |ONNX Runtime − PyTorch| ≤ atol + rtol·|PyTorch| on every logit (compare's fp32 rule). "
             "Default: 1e-4.")] = None,
    rtol: Annotated[Optional[float], typer.Option(
        help="Verification's relative logit tolerance. Default: 1e-4.")] = None,
) -> None:
    """Export an official checkpoint to ONNX, verified against PyTorch."""
    size = parse_input_size(input_size) if input_size is not None else DEFAULT_INPUT_SIZE
    if dynamic_batch and batch is not None:
        fail("--batch and --dynamic-batch exclude each other: a model has a fixed batch or a dynamic one")
    given_only_with("verification, which --no-verify turns off", not verify, atol=atol, rtol=rtol)
    fixed_batch = None if dynamic_batch else 1 if batch is None else batch
    from medmamba_edge.exporters.onnx_export import export_onnx

    with spinner("exporting") as update:
        tolerances = {name: value for name, value in (("atol", atol), ("rtol", rtol)) if value is not None}
        result = export_onnx(checkpoint, output, input_size=size, batch=fixed_batch, opset=opset, classes=classes,
                             scan=scan, verify=verify, status=update, **tolerances)
    meta = result.metadata
    out.print(f"wrote {result.path} ({meta.variant}, {meta.scan_form} scan, input {meta.input_size[0]}×{meta.input_size[1]}, "
              f"batch {meta.batch or 'dynamic'}, classes {', '.join(meta.class_names)}) in {result.seconds:.1f} s")
    if result.max_abs_diff is not None:
        out.print(f"verified on {result.verified_images} real images ({result.verified_form}): "
                  f"max |ONNX Runtime − PyTorch| = {result.max_abs_diff:.2e}")
    if input_size is None:  # said last, once the export is done, where an error would be the one line
        say_default_size(checkpoint, "exported")


@command()
def quantize(
    model: Annotated[str, typer.Argument(click_type=PATH, help="fp32 ONNX model from `medmamba-edge export` (plugin or portable form).")],
    calib: Annotated[str, typer.Option(click_type=PATH, help="Calibration images: ImageFolder, plain folder, MedMNIST .npz or CSV.")],
    output: Annotated[str, typer.Option("-o", "--output", click_type=PATH, help="Where to write the INT8 ONNX model.")],
    split: Annotated[Optional[str], typer.Option(help="Split of a .npz calibration set. Default: train.")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration images, chosen at random (--seed).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample choice.")] = 0,
    method: Annotated[str, typer.Option(help="Activation ranges: minmax, entropy or percentile.")] = "percentile",
    percentile: Annotated[Optional[float], typer.Option(help="Percentile of |activation| kept by --method percentile. "
                                                             "Default: 99.99.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Keep matching nodes float: a glob, or re:REGEX, on "
                                                              "node names or op types. Repeatable.")] = None,
    quant_format: Annotated[str, typer.Option("--format", help="qdq: Q/DQ nodes (TensorRT and ONNX Runtime); qoperator: "
                                                        "QLinear* ops (ONNX Runtime CPU only).")] = "qdq",
    eval_data: Annotated[Optional[str], typer.Option("--eval", click_type=PATH, help="Labelled data to compare fp32 and INT8 top-1 on.")] = None,
    eval_split: Annotated[Optional[str], typer.Option(help="Split of a .npz evaluation set. Default: val.")] = None,
    max_drop: Annotated[Optional[float], typer.Option(help="Largest allowed top-1 drop in points with --eval; more "
                                                           "refuses (no output). Default: 1.")] = None,
    auto_fallback: Annotated[bool, typer.Option("--auto-fallback", help="Keep the most sensitive layers float, one "
                                                                        "at a time, until within --max-drop.")] = False,
    min_speedup: Annotated[Optional[float], typer.Option(help="Time fp32 and INT8 side by side on this machine; a "
                                                              "smaller fp32/INT8 ratio refuses (no output).")] = None,
    speed_batch: Annotated[Optional[int], typer.Option(help="Batch size --min-speedup times. Default: the model's "
                                                             "fixed batch, or 1.")] = None,
) -> None:
    """Quantize an exported model to INT8 (explicit Q/DQ), calibrated on real images, with accuracy and speed gates."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    given_only_with("--min-speedup", min_speedup is None, speed_batch=speed_batch)

    output = local_output(output, "quantize")
    check_outputs(output, reads=[model, calib, eval_data])
    from medmamba_edge.exporters.quantize import quantize_onnx

    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        tasks: dict[str, int] = {}

        def progress(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total)
            bar.update(tasks[task], completed=done, total=total)

        timer = None
        if min_speedup is not None:
            from medmamba_edge.benchmarking import speed_check

            timer = speed_check(speed_batch,
                                lambda done, total: progress("timing fp32 and INT8 on this machine", done, total))
        result = quantize_onnx(model, output, calib, split=split, num_samples=num_samples, seed=seed,
                               method=method, percentile=percentile, exclude=exclude or (),
                               quant_format=quant_format, eval_data=eval_data, eval_split=eval_split, max_drop=max_drop,
                               auto_fallback=auto_fallback, min_speedup=min_speedup, speed_check=timer,
                               progress=progress, left_out=lambda stage, failures: warn_left_out(failures, f"of {stage}"),
                               also_calibrated=warn_also_calibrated)
    out.print(f"wrote {result.path} ({result.metadata.scan_form} scan, {quant_format}, "
              f"{plural(len(result.quantized_nodes), 'layer')} INT8, calibrated on "
              f"{plural(result.calibration_images, 'image')}) in {result.seconds:.1f} s")
    if result.calibration_short:
        out.print(f"the calibration set ran out of usable images: {result.calibration_images + result.past_last_batch} "
                  f"of the {num_samples} --num-samples asked for", highlight=False)
    if result.past_last_batch:
        out.print(f"left out {plural(result.past_last_batch, 'usable calibration image')} past the model's last whole "
                  f"batch of {result.metadata.batch}, rather than count any twice by padding", highlight=False)
    if result.kept_float:
        out.print(f"kept float: {', '.join(result.kept_float)}")
    if result.fallback_nodes:
        out.print(f"--auto-fallback kept {plural(len(result.fallback_nodes), 'sensitive layer')} float: "
                  f"{', '.join(result.fallback_nodes)}")
    from medmamba_edge.runtime.metrics import compared_text, points_lost

    if result.int8_top1 is not None:
        # a drop within the budget never printed over it (2 of 120 images, 1.6667 points: "1.67, budget 1.667"),
        # nor one over_budget passes as equal to it, its rounding past it ("drop 5.153 points, budget 5.15267")
        lost = min(points_lost(result.float_top1, result.int8_top1), result.max_drop)
        drop, budget = compared_text(lost, result.max_drop, 3)
        out.print(f"top-1: fp32 {result.float_top1:.2f}%, int8 {result.int8_top1:.2f}% "
                  f"(drop {drop} points, budget {budget}) on {result.evaluated_on}")
    if result.speed is not None:
        speed = result.speed
        speedup, asked = compared_text(speed.speedup, min_speedup, 3)
        noise = (", passed on the median, the interval straddling it: within this machine's noise"
                 if result.speed_within_noise else "")
        out.print(f"speed at batch {speed.batch_label}: fp32 {speed.fp32_ms:.2f} ms, int8 {speed.int8_ms:.2f} ms median, "
                  f"{speedup}× ({speed.describe(min_speedup)}) on {speed.measured_on}, --min-speedup {asked}{noise}",
                  highlight=False)


@command("build-plugin")
def build_plugin(
    cuda_arch: Annotated[Optional[str], typer.Option(help="CUDA architectures, e.g. '87' or '75;86;89'. "
                                                          "Default: Orin, Thor and desktop/data-centre GPUs.")] = None,
    tensorrt_root: Annotated[Optional[Path], typer.Option(help="TensorRT install prefix (include/ and lib/).")] = None,
    build_dir: Annotated[Optional[str], typer.Option(click_type=PATH, help="Build directory (default: the plugin cache).")] = None,
) -> None:
    """Build the selective-scan TensorRT plugin with CMake and print where the library is."""
    from medmamba_edge.runtime.backends.tensorrt import plugin

    build_dir = local_output(build_dir, "build-plugin", folder=True)
    with spinner("building the TensorRT plugin (cmake)") as update:
        library = plugin.build_plugin(build_dir=build_dir, cuda_arch=cuda_arch, tensorrt_root=tensorrt_root,
                                     progress=lambda line: update(line[:100]))
    out.print(str(library))


@command("build-engine")
def build_engine(
    model: Annotated[str, typer.Argument(click_type=PATH, help="ONNX model from `medmamba-edge export` (or `quantize` for --int8).")],
    output: Annotated[str, typer.Option("-o", "--output", click_type=PATH, help="Where to write the engine (a .json manifest goes beside it).")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine (TensorRT 11: the graph is converted to float16 first).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 engine from an explicitly quantized (Q/DQ) model.")] = False,
    min_batch: Annotated[Optional[int], typer.Option(help="Smallest batch of a dynamic-batch model's profile (default 1).")] = None,
    opt_batch: Annotated[Optional[int], typer.Option(help="Batch the engine is tuned for (default 1).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Largest batch (default 8).")] = None,
    workspace: Annotated[Optional[int], typer.Option(help="Workspace memory limit in MiB.")] = None,
    timing_cache: Annotated[Optional[str], typer.Option(click_type=PATH, help="Timing cache file: read if present, written after the build.")] = None,
    opt_level: Annotated[Optional[int], typer.Option(help="Builder optimisation level 0..5 (TensorRT default 3).")] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Run on this DLA core with GPU fallback (-1: GPU only).")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="Runs on later TensorRT versions too.")] = False,
    hardware_compat: Annotated[bool, typer.Option("--hardware-compat", help="Runs on any Ampere or newer GPU.")] = False,
    plugin: Annotated[Optional[Path], typer.Option(help="SS2DScan plugin library (default: the one "
                                                        "`medmamba-edge build-plugin` built).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Defaults for orin-nano, orin-nx, agx-orin, thor or dgpu; "
                                                       "explicit options win.")] = None,
) -> None:
    """Build a TensorRT engine from an exported ONNX model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from medmamba_edge.runtime.backends.tensorrt import build as tensorrt_build
    from medmamba_edge.runtime.backends.tensorrt.manifest import manifest_path
    from medmamba_edge.runtime.files import check_writable

    output, timing_cache = local_output(output, "build-engine"), local_output(timing_cache, "build-engine")
    check_writable(output)  # first: a folder (-o .) has no name to put the manifest beside
    # The timing cache is read and written: it may be neither the model nor the engine.
    check_outputs(output, manifest_path(output), timing_cache, reads=[model, plugin])
    options = tensorrt_build.resolve_options(
        preset, fp16=fp16 or None, int8=int8 or None, min_batch=min_batch, opt_batch=opt_batch,
        max_batch=max_batch, workspace_mib=workspace, opt_level=opt_level, dla_core=dla_core,
        version_compatible=version_compatible or None, hardware_compat=hardware_compat or None,
        timing_cache=str(timing_cache) if timing_cache else None)

    class RichProgress(tensorrt_build.BuildProgress):
        """TensorRT's phases as progress bars; before and without them, a spinner with the current stage."""

        def __init__(self, bars: Progress):
            self.bars, self.tasks = bars, {}
            self.stage = bars.add_task("preparing", total=None)

        def status(self, message: str) -> None:
            self.bars.update(self.stage, description=shown(message[:100]))

        def phase_start(self, phase, parent, steps):
            self.tasks[phase] = self.bars.add_task(shown(phase), total=steps or None)

        def step_complete(self, phase, step):
            self.bars.update(self.tasks[phase], completed=step + 1)

        def phase_finish(self, phase):
            self.bars.remove_task(self.tasks.pop(phase))

    with progress_bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        result = tensorrt_build.build_engine(model, output, options, plugin=plugin, progress=RichProgress(bars))
    manifest = result.manifest
    shapes = next(iter(manifest.profile.values()))
    out.print(f"wrote {result.engine} ({manifest.precision}, batch {shapes['min'][0]}..{shapes['max'][0]}, "
              f"TensorRT {manifest.tensorrt_version} on {manifest.gpu_name}) in {result.seconds:.1f} s")


@command()
def demo(
    workdir: Annotated[str, typer.Option(click_type=PATH, help="Where to write the exported model.")] = "medmamba-edge-demo",
    scan: Annotated[str, typer.Option(help="Scan form to export and run (portable or plugin).")] = "portable",
) -> None:
    """Export the bundled checkpoint and classify the bundled sample images with ONNX Runtime."""
    from rich.table import Table

    from medmamba_edge.exporters.onnx_export import export_onnx
    from medmamba_edge.runtime.bundled import bundled_checkpoint, sample_image_paths
    from medmamba_edge.runtime.backends import open_backend, softmax
    from medmamba_edge.runtime.decode import read_image
    from medmamba_edge.runtime.preprocess import preprocess

    onnx_path = local_output(workdir, "demo", folder=True) / f"bundled_{scan}.onnx"
    with spinner("exporting the bundled checkpoint"):
        result = export_onnx(bundled_checkpoint(), onnx_path, input_size=32, batch=None, scan=scan)
    out.print(f"exported {result.path}; verified against PyTorch: max logit diff {result.max_abs_diff:.1e}")
    backend = open_backend(onnx_path)
    paths = sample_image_paths("pneumoniamnist")
    probabilities = softmax(backend.run(preprocess([read_image(p) for p in paths], backend.metadata)))
    names = backend.metadata.class_names
    table = Table(title=f"{onnx_path.name} on {backend.describe()}")
    for column in ("image", "true label", "prediction", "confidence"):
        table.add_column(column)
    for path, probs in zip(paths, probabilities):
        best = int(probs.argmax())
        # Bundled sample names end with their label: val_0012_normal.png.
        truth = path.stem.rsplit("_", 1)[-1]
        table.add_row(path.name, truth if truth in names else "?", names[best], f"{probs[best]:.1%}")
    out.print(table)


ModelsArgument = Annotated[list[str], typer.Argument(help="Model files: .pth (PyTorch), .onnx (ONNX Runtime), "
                                                            ".engine (TensorRT), in any mix.")]
CheckpointClassesOption = Annotated[Optional[str], typer.Option(
    help="Class names for a .pth: comma-separated or a class_indices.json (default: the json beside it).")]
CheckpointSizeOption = Annotated[Optional[str], typer.Option(
    "--input-size", metavar=INPUT_SIZE, help=f"Input size for .pth checkpoints: N or HxW (default: the first .onnx model's, else {DEFAULT_INPUT_SIZE}).")]
SplitOption = Annotated[Optional[str], typer.Option(help="Split of a MedMNIST .npz (val, test, train). Default: val.")]


@command()
def evaluate(
    models: ModelsArgument,
    data: Annotated[str, typer.Option(click_type=PATH, help="Labelled images: ImageFolder, MedMNIST .npz or path,label CSV.")],
    split: SplitOption = None,
    input_size: CheckpointSizeOption = None,
    batch: Annotated[int, typer.Option(help="Images per inference batch.")] = 32,
    max_drop: Annotated[Optional[float], typer.Option(help="Fail (exit 1) when a model's top-1 accuracy is more "
                                                           "than this many points below the first model's.")] = None,
    plots: Annotated[Optional[str], typer.Option(click_type=PATH, help="Folder for a confusion-matrix PNG per model.")] = None,
    json_file: Annotated[Optional[str], typer.Option("--json", click_type=PATH, help="Write every metric to this JSON file.")] = None,
    classes: CheckpointClassesOption = None,
) -> None:
    """Accuracy, precision, sensitivity, specificity, F1 and AUC of models side by side on the same images."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    from . import evaluation

    plots, json_file = local_output(plots, "evaluate", folder=True), local_output(json_file, "evaluate")
    size = checkpoint_input_size(input_size, models)
    plot_files = [plots / name for name in evaluation.plot_file_names(models)] if plots else []
    check_outputs(json_file, *plot_files, folder=plots, plots=bool(plots), reads=[*models, data])
    with progress_bars("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn()) as bar:
        task = bar.add_task("evaluating", total=None)
        report = evaluation.evaluate(models, data, split=split, input_size=size, batch_size=batch, max_drop=max_drop,
                                     classes=classes, progress=lambda done, total: bar.update(task, completed=done, total=total))
    shown_on = report_console(json_file)  # asked before the file is renamed into place
    # Files first: printing may fail (stdout's reader gone), and a long evaluation's report must not go with it.
    written = evaluation.write_confusion_plots(report, plots) if plots else []
    if json_file:
        write_json(json_file, report.to_dict())
        written.append(json_file)
    for table in evaluation.render_tables(report):
        shown_on.print(table)
    warn_left_out(report.failures, "for every model", f"all in {json_file}" if json_file else None)
    for path in written:
        shown_on.print(f"wrote {path}")
    from medmamba_edge.runtime.metrics import compared_text

    for m in report.gate_failures:
        drop, budget = compared_text(m.drop, max_drop, 4)
        fail(f"{m.path}: top-1 accuracy {100 * m.metrics.accuracy:.2f}% is {drop} points below "
             f"{report.models[0].path}'s {100 * report.models[0].metrics.accuracy:.2f}% (--max-drop {budget})")


@command()
def benchmark(
    models: ModelsArgument,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8",
    input_size: CheckpointSizeOption = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs per model and batch before timing.")] = 3,
    iterations: Annotated[int, typer.Option(help="Timed runs per model and batch.")] = 20,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads per model (default: each backend's).")] = None,
    json_file: Annotated[Optional[str], typer.Option("--json", click_type=PATH, help="Write every latency to this JSON file.")] = None,
    plot: Annotated[Optional[str], typer.Option(click_type=PATH, help="Write a latency bar chart (PNG) here.")] = None,
) -> None:
    """Latency (p50/p90/p99), throughput and peak memory of models side by side, each in its own process."""
    from rich.progress import BarColumn, MofNCompleteColumn

    from . import benchmarking

    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        fail(f"--batch must be comma-separated integers, got {batch!r}")
    json_file, plot = local_output(json_file, "benchmark"), local_output(plot, "benchmark")
    size = checkpoint_input_size(input_size, models)
    check_outputs(json_file, plot, plots=bool(plot), reads=models)
    if plot and plot.suffix.lower() != ".png":  # matplotlib is told PNG: another name would not say what it holds
        fail(f"{plot}: the plot is a PNG; name it *.png")
    with progress_bars("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task("loading and warming up", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, description="timing", completed=done, total=total)

        report = benchmarking.benchmark(models, batches=batches, input_size=size, warmup=warmup,
                                        iterations=iterations, threads=threads, progress=advance)
    shown_on = report_console(json_file)
    written = [report.plot(plot)] if plot else []  # files first, as evaluate's
    if json_file:
        write_json(json_file, report.to_dict())
        written.append(json_file)
    shown_on.print(report.markdown(), highlight=False, soft_wrap=True)
    for path in written:
        shown_on.print(f"wrote {path}")


@command()
def compare(
    # str, not Path: a Path would fold the double slash of triton://HOST:PORT/MODEL.
    model_a: Annotated[str, typer.Argument(help="Reference model (.pth, .onnx, .engine, triton://HOST:PORT/MODEL).")],
    model_b: Annotated[str, typer.Argument(help="Model to check against it.")],
    data: Annotated[Optional[str], typer.Option(click_type=PATH, help="Images (folder, .npz, CSV); default: the bundled samples.")] = None,
    split: SplitOption = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Compare a fixed random subset of this many images.")] = None,
    atol: Annotated[Optional[float], typer.Option(help="Logit tolerance |A−B| ≤ atol + rtol·|A| "
                                                       "(default: by precision, see docs/evaluation.md).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Relative logit tolerance.")] = None,
    input_size: CheckpointSizeOption = None,
    batch: Annotated[int, typer.Option(help="Images per inference batch.")] = 32,
    classes: CheckpointClassesOption = None,
) -> None:
    """Run the same images through two models; exit 1 when their outputs differ beyond tolerance."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    from . import comparison

    size = checkpoint_input_size(input_size, [model_a, model_b])
    with progress_bars("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn()) as bar:
        task = bar.add_task("comparing", total=None)
        report = comparison.compare(model_a, model_b, data, split=split, num_samples=num_samples, atol=atol,
                                    rtol=rtol, input_size=size, batch_size=batch, classes=classes,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    for table in comparison.render_tables(report):
        out.print(table)
    for line in comparison.summary_lines(report):
        console.print(f"  {shown(line)}", highlight=False, soft_wrap=True)
    if not report.passed:
        fail(f"{model_b} differs from {model_a}: " + "; ".join(report.problems))
    out.print(f"PASSED: {model_b} matches {model_a} within the {report.tolerance.tier} tolerance")


@command()
def run(
    # str, not Path: a Path would fold the double slash of triton://HOST:PORT/MODEL.
    model: Annotated[str, typer.Argument(help="Model: .onnx (ONNX Runtime), .engine (TensorRT), .pth (PyTorch) or "
                                              "triton://HOST:PORT/MODEL (a server, docs/serving.md).")],
    source: Annotated[str, typer.Argument(help="Camera index, /dev/videoN, csi://N, rtsp:// or http(s):// stream, video, "
                                                "image, folder, glob or DICOM (docs/runtime.md).")],
    batch: Annotated[int, typer.Option(help="Frames per inference batch.")] = 1,
    stride: Annotated[int, typer.Option(help="Use every Nth frame (every Nth file of a folder).")] = 1,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames.")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="Start a file source again at its end.")] = False,
    top_k: Annotated[int, typer.Option(help="Labels per record.")] = 3,
    threshold: Annotated[float, typer.Option(help="Abstain when the top-1 probability is below this.")] = 0.0,
    jsonl: Annotated[Optional[str], typer.Option(click_type=PATH, help="Write a JSON record per frame.")] = None,
    csv: Annotated[Optional[str], typer.Option("--csv", click_type=PATH, help="Write a CSV row per frame.")] = None,
    save_video: Annotated[Optional[str], typer.Option(click_type=PATH, help="Write an annotated video (.mp4, .m4v, .mov, .mkv or .avi).")] = None,
    show: Annotated[bool, typer.Option("--show", help="Show annotated frames in a window (needs a display).")] = False,
    console_lines: Annotated[str, typer.Option("--console", help="auto, frame, second or none "
                                                                  "(auto: per frame for files, per second for live sources).")] = "auto",
    backend: Annotated[str, typer.Option(help="auto (by file type) or tensorrt (an .onnx through the engine cache).")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help="Engine precision for --backend tensorrt (default: the model's).")] = None,
    providers: Annotated[Optional[str], typer.Option(help="ONNX Runtime providers in order, e.g. cuda,cpu "
                                                          "(default: TensorRT, CUDA, CPU as available).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for inference.")] = None,
    input_size: Annotated[Optional[str], typer.Option(metavar=INPUT_SIZE, help=f"Input size for a .pth checkpoint: N or HxW "
                                                                                f"(default {DEFAULT_INPUT_SIZE}).")] = None,
    classes: CheckpointClassesOption = None,
    reconnect: Annotated[int, typer.Option(help="Reconnect attempts in a row before a live stream counts as lost.")] = 5,
) -> None:
    """Classify frames from a camera, stream, video, images or DICOM; records, overlay video and a summary."""
    size = checkpoint_input_size(input_size, [model])
    warn = lambda message: console.print(f"[yellow]{shown(message)}[/]", highlight=False, soft_wrap=True)  # noqa: E731
    from medmamba_edge.runtime import sinks as sink_types
    from medmamba_edge.runtime.backends import is_triton_url
    from medmamba_edge.runtime.loop import RunOptions, capture_still_running, stop_on_signals
    from medmamba_edge.runtime.loop import run as run_loop
    from medmamba_edge.runtime.sources import open_source
    from medmamba_edge.runtime.uri import without_password

    from .loaders import open_model

    jsonl, csv, save_video = (local_output(path, "run") for path in (jsonl, csv, save_video))  # before any work
    options = RunOptions(batch=batch, stride=stride, max_frames=max_frames, loop=loop, top_k=top_k, threshold=threshold)
    frames = open_source(source, reconnect=reconnect, notify=warn)  # before the model: a missing camera fails at once
    with spinner("loading the model") as update:
        model_backend = open_model(model, backend=backend, precision=precision, status=update, threads=threads,
                                   providers=providers, input_size=size, classes=classes)
    # A video's frame rate divided by the stride; stills at 5 fps (--stride picks files, not a rate)
    video_fps = frames.fps / stride if frames.fps else 5.0
    # From the first output file on, a stop signal stops the run as it would mid-run (records, outputs renamed into
    # place, exit 0); before, the default handler's KeyboardInterrupt left a .partial file and exit 130.
    with stop_on_signals(warn) as stop:
        outputs = sink_types.open_outputs(console_lines, frames.live, save_video, video_fps, show,
                                          jsonl, csv, reads=[*frames.inputs, Path(model)])
        console.print(f"{shown(model_backend.path if is_triton_url(model) else Path(model).name)} on "
                      f"{shown(model_backend.describe())}; source: {shown(frames.description)}",
                      highlight=False, soft_wrap=True)
        files = [sink.output for sink in outputs if getattr(sink, "output", None)]
        # Records piped through stdout (--jsonl /dev/stdout, or `--jsonl F > F`) stay records only: the summary
        # goes to stderr. Asked now: F renamed into place at the end is no longer the file stdout is.
        report = report_console(*(f.path for f in files))
        try:
            stats = run_loop(model_backend, frames, outputs, options, notify=warn, stop=stop)
        except KeyboardInterrupt as interrupt:
            if capture_still_running(interrupt):
                _exit_now()
            raise
    if out.file.failed:  # its reader gone (`| head`): the summary still says what the files hold
        report = console
    # On stderr, as every stderr line, a file name's control characters as escapes (printable).
    say = (lambda text: report.print(text if report is out else printable(text, console.file), markup=False,
                                     highlight=False, soft_wrap=True))
    say(stats.summary())
    for output in files:
        # The file outputs' own record: one that failed (a full disk) or never got a frame was not written.
        if output.complete:
            say(f"wrote {output.path}")
    if stats.error:
        fail(stats.error)
    if stats.classified == 0 and stats.counts["skipped"] and not stats.stopped:
        # Nothing usable at all (a single broken file, a folder of them): the records say why, the exit says so.
        fail(f"{without_password(source)}: no frame could be classified ({stats.counts['skipped']} skipped; first: "
             f"{stats.first_skip_reason})")


@command("export-triton")
def export_triton(
    model: Annotated[str, typer.Argument(click_type=PATH, help="ONNX model from `medmamba-edge export`, or an engine from `build-engine`.")],
    output: Annotated[str, typer.Option("-o", "--output", click_type=PATH, help="Triton model repository (the model goes in OUTPUT/NAME).")],
    name: Annotated[str, typer.Option(help="Model name on the server.")] = DEFAULT_MODEL_NAME,
    max_batch: Annotated[Optional[int], typer.Option(help="Largest batch Triton's dynamic batcher forms "
                                                          "(dynamic-batch models; default: an engine's largest, "
                                                          f"else {DEFAULT_MAX_BATCH}).")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(help="How long a request may wait for others to batch "
                                                         "with.")] = DEFAULT_MAX_QUEUE_DELAY_US,
    instances: Annotated[int, typer.Option(help="Model instances (instance_group count).")] = DEFAULT_INSTANCES,
    kind: Annotated[str, typer.Option(help="cpu or gpu instances (an engine is always gpu).")] = DEFAULT_KIND,
    server_root: Annotated[Optional[str], typer.Option(help="Where the server sees OUTPUT (e.g. /models in a container); "
                                                            "library paths in the configs point there. Default: OUTPUT here.")] = None,
    plugin: Annotated[Optional[str], typer.Option(help="The TensorRT plugin library's path on the server or DeepStream "
                                                       "device (default: a copy in OUTPUT/NAME).")] = None,
    deepstream_batch: Annotated[Optional[int], typer.Option(help="nvinfer batch-size: the number of streams "
                                                                 "(default: the model's batch, else --max-batch).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for inference (ONNX Runtime), per instance "
                                                        "(default: the server's, one per physical core).")] = None,
) -> None:
    """Write a Triton model repository entry (onnxruntime or tensorrt backend) and a DeepStream nvinfer config."""
    from medmamba_edge.exporters.triton_repository import export_triton as write_repository

    result = write_repository(model, output, name=name, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                              instances=instances, kind=kind, server_root=server_root, plugin=plugin,
                              deepstream_batch=deepstream_batch, threads=threads)
    served = result.served
    batching = (f"max batch {served.max_batch}, dynamic batching ≤ {max_queue_delay_us} µs" if served.max_batch
                else f"fixed batch {served.metadata.batch}")
    out.print(f"wrote {result.folder} ({'onnxruntime' if served.kind == 'onnx' else 'tensorrt'} backend, {batching}, "
              f"{served.metadata.scan_form} scan)", highlight=False, soft_wrap=True)
    if result.schema_checked_with:
        out.print(f"config.pbtxt parses with Triton's model_config schema (tritonclient {result.schema_checked_with})",
                  highlight=False)
    else:
        # Not an install hint: tritonclient[grpc] pins protobuf < 7 and the serve extra numpy < 2 and an older
        # OpenCV, which would downgrade this environment; the serve venv has it.
        note = ("config.pbtxt not checked against Triton's schema: tritonclient[grpc] is not installed here (the "
                "serve extra's virtual environment has it; docs/serving.md)")
        console.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    if result.deepstream_text:
        out.print(f"wrote {result.folder}/deepstream_nvinfer.txt (Gst-nvinfer, network-type=1) and "
                  f"deepstream_model.onnx (the model, its logits through a Softmax)", highlight=False, soft_wrap=True)
    else:
        console.print(f"[yellow]no DeepStream config: {shown(result.deepstream_refusal or '')}[/]", highlight=False,
                      soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]{shown(note)}[/]", highlight=False, soft_wrap=True)
    out.print(f"start: {result.server_command}; clients: medmamba-edge run triton://HOST:{DEFAULT_PORT}/{name} SOURCE",
              highlight=False, soft_wrap=True)


@command()
def serve(
    model: Annotated[str, typer.Argument(click_type=PATH, help="ONNX model from `medmamba-edge export`, or a TensorRT engine.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="HTTP port (KServe v2); gRPC and metrics default to the next "
                                           "two.")] = DEFAULT_PORT,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port (default: --port + 1).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus metrics port (default: --port + 2).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Largest batch Triton's dynamic batcher forms (default: an "
                                                          f"engine's largest, else {DEFAULT_MAX_BATCH}).")] = None,
    max_queue_delay_us: Annotated[int, typer.Option(help="How long a request may wait for others to batch "
                                                         "with.")] = DEFAULT_MAX_QUEUE_DELAY_US,
    name: Annotated[str, typer.Option(help="Model name on the server.")] = DEFAULT_MODEL_NAME,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for inference (ONNX Runtime).")] = None,
) -> None:
    """Serve a model on a real Triton Inference Server (PyTriton): HTTP and gRPC, dynamic batching, metrics."""
    from .serving import ServeOptions
    from .serving import serve as serve_model

    options = ServeOptions(host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
                           max_queue_delay_us=max_queue_delay_us, name=name, threads=threads)
    serve_model(model, options, notify=lambda message: out.print(message, highlight=False, soft_wrap=True))


def _exit_now() -> None:
    """End the process at once, as Python's own exit on KeyboardInterrupt would (130), where that exit would abort
    (loop.capture_still_running); the outputs are closed."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed stdout (`>&-`) or a reader gone: exit all the same
            stream.flush()
    os._exit(128 + signal.SIGINT)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM and SIGHUP (systemd, docker, a closed terminal) end a command as Ctrl-C does, its temporary files
    # removed on the way out; `run` and `serve` install their own, gentler handlers while they work. A signal
    # ignored at the start (nohup) stays ignored.
    handle_stop_signals(_interrupt, [s for s in STOP_SIGNALS if s != signal.SIGINT])  # Ctrl-C: Python's own
    app()


if __name__ == "__main__":
    main()
