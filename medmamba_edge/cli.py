"""The ``medmamba-edge`` command. Thin: each command parses options, calls one library function, and
turns the library's errors into one clear line and a non-zero exit. Heavy imports happen inside the
commands so ``--help`` is instant and optional parts stay optional."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medmamba_edge.errors import UserError

app = typer.Typer(
    name="medmamba-edge",
    help="MedMamba from a PyTorch checkpoint to fast, quantized inference on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


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


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Official MedMamba checkpoint (.pth state_dict).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the ONNX model.")],
    input_size: Annotated[str, typer.Option(help="Input size: N or HxW.")] = "224",
    batch: Annotated[int, typer.Option(help="Fixed batch size.")] = 1,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    classes: Annotated[Optional[str], typer.Option(help="Class names: comma-separated, or a class_indices.json. "
                                                        "Default: class_indices.json beside the checkpoint.")] = None,
    scan: Annotated[str, typer.Option(help="plugin: one SelectiveScan node per scan (TensorRT plugin, fused ONNX "
                                           "Runtime op); portable: standard ONNX ops only.")] = "plugin",
    verify: Annotated[bool, typer.Option(help="Compare ONNX Runtime with PyTorch on real images.")] = True,
    atol: Annotated[float, typer.Option(help="Largest allowed logit difference in verification.")] = 1e-4,
) -> None:
    """Export an official checkpoint to ONNX, verified against PyTorch."""
    size = parse_input_size(input_size)
    try:
        from medmamba_edge.exporters.onnx_export import export_onnx

        with console.status("exporting") as spinner:
            result = export_onnx(checkpoint, output, input_size=size, batch=None if dynamic_batch else batch,
                                 opset=opset, classes=classes, scan=scan, verify=verify, atol=atol,
                                 status=lambda message: spinner.update(message))
    except UserError as exc:
        fail(str(exc))
    meta = result.metadata
    out.print(f"wrote {result.path} ({meta.variant}, {meta.scan_form} scan, input {meta.input_size[0]}×{meta.input_size[1]}, "
              f"batch {meta.batch or 'dynamic'}, classes {', '.join(meta.class_names)}) in {result.seconds:.1f} s")
    if result.max_abs_diff is not None:
        out.print(f"verified on {result.verified_images} real images: max |ONNX Runtime − PyTorch| = {result.max_abs_diff:.2e}")


@app.command("build-plugin")
def build_plugin(
    cuda_arch: Annotated[Optional[str], typer.Option(help="CUDA architectures, e.g. '87' or '75;86;89'. "
                                                          "Default: Orin, Thor and desktop/data-centre GPUs.")] = None,
    tensorrt_root: Annotated[Optional[Path], typer.Option(help="TensorRT install prefix (include/ and lib/).")] = None,
    build_dir: Annotated[Optional[Path], typer.Option(help="Build directory (default: the plugin cache).")] = None,
) -> None:
    """Build the selective-scan TensorRT plugin with CMake and print where the library is."""
    try:
        from medmamba_edge.plugins import build

        with console.status("building the TensorRT plugin (cmake)") as spinner:
            library = build.build_plugin(build_dir=build_dir, cuda_arch=cuda_arch, tensorrt_root=tensorrt_root,
                                         progress=lambda line: spinner.update(line[:100]))
    except UserError as exc:
        fail(str(exc))
    out.print(str(library))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where to write the exported model.")] = Path("medmamba-edge-demo"),
    scan: Annotated[str, typer.Option(help="Scan form to export and run (portable or plugin).")] = "portable",
) -> None:
    """Export the bundled checkpoint and classify the bundled sample images with ONNX Runtime."""
    from rich.table import Table

    try:
        from medmamba_edge.exporters.onnx_export import export_onnx
        from medmamba_edge.runtime.bundled import bundled_checkpoint, sample_image_paths
        from medmamba_edge.runtime.backends import open_backend, softmax
        from medmamba_edge.runtime.preprocess import preprocess, read_image

        onnx_path = workdir / f"bundled_{scan}.onnx"
        with console.status("exporting the bundled checkpoint"):
            result = export_onnx(bundled_checkpoint(), onnx_path, input_size=32, batch=None, scan=scan)
        out.print(f"exported {result.path}; verified against PyTorch: max logit diff {result.max_abs_diff:.1e}")
        backend = open_backend(onnx_path)
        paths = sample_image_paths("pneumoniamnist")
        probabilities = softmax(backend.run(preprocess([read_image(p) for p in paths], backend.metadata)))
    except UserError as exc:
        fail(str(exc))
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
