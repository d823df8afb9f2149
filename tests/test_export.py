"""`medmamba-edge export` on the official checkpoint: graph structure, parity, metadata, bad input."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from medmamba_edge.checkpoint import CheckpointError, load_checkpoint
from medmamba_edge.cli import app
from medmamba_edge.exporters.onnx_export import ExportError, export_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.model import VSSM
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.bundled import sample_image_paths
from medmamba_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata
from tests.shared_data import OFFICIAL_T32, require_shared
from tests.test_model import pneumoniamnist_val

STANDARD_DOMAINS = {"", "ai.onnx"}


@pytest.fixture(scope="module")
def official():
    return load_checkpoint(require_shared(*OFFICIAL_T32))


@pytest.fixture(scope="module")
def plugin32(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "t32_plugin.onnx"
    result = export_onnx(official, path, input_size=32, batch=None, scan="plugin")
    return result, onnx.load(str(path))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_plugin_form_has_one_scan_node_per_block_with_plugin_attributes(plugin32):
    result, model = plugin32
    scans = [n for n in model.graph.node if scan_node.is_scan_node(n)]
    assert len(scans) == sum(result.metadata.depths) == 10
    for node in scans:
        assert node.domain == scan_node.DOMAIN
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"delta_softplus": 1, "plugin_version": scan_node.PLUGIN_VERSION.encode(),
                              "plugin_namespace": scan_node.PLUGIN_NAMESPACE.encode()}
        assert len(node.input) == len(scan_node.INPUT_NAMES)
    assert not model.functions, "a model-local function would hide the TensorRT plugin"
    assert (scan_node.DOMAIN, scan_node.DOMAIN_VERSION) in {(o.domain, o.version) for o in model.opset_import}


def test_plugin_form_shapes_by_onnx_shape_inference(plugin32):
    _, model = plugin32
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    shapes.update({i.name: list(i.dims) for i in inferred.graph.initializer})
    scans = [n for n in inferred.graph.node if scan_node.is_scan_node(n)]
    # MedMamba-T at 32×32: 8×8, 4×4, 2×2, 1×1 tokens; D = 96·2^i channels, dt_rank D/32, d_state 16.
    expected = [(96, 8, 3)] * 2 + [(192, 4, 6)] * 2 + [(384, 2, 12)] * 4 + [(768, 1, 24)] * 2
    for node, (channels, side, rank) in zip(scans, expected):
        x, x_dbl, dt_w, dt_b, a, ds = (shapes[name] for name in node.input)
        assert x[1:] == [channels, side, side] and isinstance(x[0], str)  # dynamic batch
        assert x_dbl[1:] == [4 * (rank + 32), side * side] and x_dbl[0] == x[0]
        assert dt_w == [4, channels, rank] and dt_b == [4, channels]
        assert a == [4 * channels, 16] and ds == [4 * channels]
        assert shapes[node.output[0]] == [x[0], side, side, channels]


def test_nothing_but_the_projection_between_the_conv_and_out_norm(plugin32):
    """SS2D's core is the scan node alone: x straight from the conv's SiLU, x_dbl from one 1×1 Conv (a GEMM with
    a constant weight) on that same x, y straight into out_norm. No Transpose, flip, Concat or Slice around it."""
    _, model = plugin32
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    constants = {i.name for i in model.graph.initializer}

    def through_reshapes(name):
        while name in producer and producer[name].op_type in ("Reshape", "Identity"):
            name = producer[name].input[0]
        return name

    scans = [n for n in model.graph.node if scan_node.is_scan_node(n)]
    assert scans
    for node in scans:
        x, x_dbl = node.input[:2]
        assert producer[x].op_type in ("Mul", "Sigmoid", "Silu"), producer[x].op_type  # SiLU = x·sigmoid(x)
        projection = producer[through_reshapes(x_dbl)]
        assert projection.op_type == "Conv" and len(projection.input) == 2  # no bias
        features, weight = projection.input
        assert weight in constants and features == x
        assert [d for d in next(i for i in model.graph.initializer if i.name == weight).dims[2:]] == [1, 1]
        assert all(w in constants for w in node.input[2:])
        assert [c.op_type for c in consumers[node.output[0]]] == ["LayerNormalization"]
    glue = {"Transpose", "Concat", "Slice", "Split", "Gather", "ReverseSequence"}
    between = {producer[name].op_type for node in scans for name in node.input[:2]}
    assert not between & glue


def test_metadata_round_trip(plugin32, official):
    result, model = plugin32
    meta = read_onnx_metadata(model)
    assert meta == result.metadata
    assert meta.input_size == (32, 32) and meta.class_names == ("normal", "pneumonia")
    assert meta.mean == meta.std == (0.5, 0.5, 0.5) and meta.channel_order == "RGB"
    assert meta.scan_form == "plugin" and meta.batch is None and meta.variant == "medmamba_t"
    assert meta.source_checkpoint_sha256 == official.sha256


def test_exported_model_matches_pytorch_on_real_images_with_dynamic_batch(plugin32, official):
    result, model = plugin32
    assert result.max_abs_diff <= 1e-4 and result.verified_images > 0
    x, labels = pneumoniamnist_val()
    portable = session(lower_ss2d_scan(model))
    for batch in (x[:1], x[1:40]):
        (logits,) = portable.run(None, {"input": batch.numpy()})
        with torch.no_grad():
            expected = official.model(batch).numpy()
        assert np.abs(logits - expected).max() <= 1e-4


def test_verification_runs_the_model_as_written(official, plugin32, tmp_path, monkeypatch):
    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    assert plugin32[0].verified_form == "plugin form, native SS2DScan op"  # the file, SS2DScan nodes and all
    ran = []
    monkeypatch.setattr(custom_ops, "make_fused_session", lambda model, **_: ran.append(model) or session(model))
    # Plain ONNX Runtime has no SS2DScan kernel: its refusal shows the plugin form itself was handed over
    with pytest.raises(Exception, match="SS2DScan"):
        export_onnx(official, tmp_path / "a.onnx", input_size=32, batch=1)
    assert scan_node.has_scan_nodes(ran[0]) and not (tmp_path / "a.onnx").exists()

    def unavailable(model, **_):
        raise custom_ops.FusedScanUnavailable("not built")

    monkeypatch.setattr(custom_ops, "make_fused_session", unavailable)
    result = export_onnx(official, tmp_path / "b.onnx", input_size=32, batch=1)
    assert result.verified_form == "its portable lowering: the native op library is not built"
    assert result.max_abs_diff <= 1e-4 and scan_node.has_scan_nodes(onnx.load(str(tmp_path / "b.onnx")))
    assert export_onnx(official, tmp_path / "c.onnx", input_size=32, batch=1, scan="portable").verified_form == "portable form"


def test_portable_export_at_224_runs_in_plain_onnxruntime(official, tmp_path):
    path = tmp_path / "t224.onnx"
    result = export_onnx(official, path, input_size=224, batch=2, scan="portable")
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS
    assert result.max_abs_diff <= 1e-4
    images = torch.randn(2, 3, 224, 224)
    (logits,) = session(model).run(None, {"input": images.numpy()})
    with torch.no_grad():
        assert np.abs(logits - official.model(images).numpy()).max() <= 1e-4


def test_odd_input_size_exports_and_matches(tmp_path):
    """Through the command line: --input-size HxW is height then width, from the option to the model's input."""
    result = runner.invoke(app, ["export", str(require_shared(*OFFICIAL_T32)), "-o", str(tmp_path / "odd.onnx"),
                                 "--input-size", "36x44", "--scan", "portable"])
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |ONNX Runtime − PyTorch| = ")[1].split()[0]) <= 1e-4
    assert read_onnx_metadata(tmp_path / "odd.onnx").input_size == (36, 44)
    assert [d.dim_value for d in onnx.load(str(tmp_path / "odd.onnx")).graph.input[0].type.tensor_type.shape.dim] == [
        1, 3, 36, 44]
    # Every other test model is square, so height and width swapped between the metadata and the graph, in the check
    # or in preprocessing, went unnoticed: the model runs on real X-rays, and its metadata turned 44×36 is refused.
    xrays = sample_image_paths("pneumoniamnist")
    result = runner.invoke(app, ["run", str(tmp_path / "odd.onnx"), str(xrays[0].parent)])
    assert result.exit_code == 0 and f"{len(xrays)} frames (0 abstained), 0 skipped" in result.output, result.output
    model = onnx.load(str(tmp_path / "odd.onnx"))
    write_onnx_metadata(model, read_onnx_metadata(model).replace(input_size=(44, 36)))
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    result = runner.invoke(app, ["run", str(tmp_path / "swapped.onnx"), str(xrays[0].parent)])
    assert result.exit_code == 1 and result.output == (
        f"error: {tmp_path / 'swapped.onnx'}: the metadata does not fit the model graph: input_size is 44×36 but the "
        f"graph takes 36×44\n"), result.output


def test_failed_verification_writes_nothing(official, tmp_path):
    target = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(official, target, input_size=32, scan="portable", atol=0.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def three_digits_below(largest: float) -> float:
    """The largest 3-digit figure below ``largest``: 6.91e-06 for 6.914e-06, where the 3-digit message showed the
    difference as that atol, and for 6.917e-06 too (another CPU's difference), which it showed as over it."""
    shown = float(f"{largest:.3g}")
    return shown if shown < largest else float(f"{shown - 10.0 ** (math.floor(math.log10(largest)) - 2):.3g}")


@pytest.mark.parametrize("below", [three_digits_below,  # as the message showed it
                                   lambda largest: float(np.nextafter(largest, 0))],  # float32 rounds it back up
                         ids=["3 digits", "float32 rounding"])
def test_a_failed_verification_never_reads_as_within_its_atol(official, tmp_path, below):
    """A logit outside the tolerance is over atol, yet at 40×40 the official T-32, whose largest difference is
    6.914e-06, was refused with --atol 6.91e-06 as 'by up to 6.91e-06, 1 of 18 beyond 6.91e-06 + 0·|PyTorch|'; and
    with --atol 6.9141387939453e-06, just below 6.9141387939453125e-06, it passed (numpy judged it in float32)."""
    largest = export_onnx(official, tmp_path / "t40.onnx", input_size=40, atol=1.0, rtol=0.0).max_abs_diff
    atol = below(largest)
    assert atol < largest, "the case needs an atol below the largest difference"
    with pytest.raises(ExportError) as refused:
        export_onnx(official, tmp_path / "strict.onnx", input_size=40, atol=atol, rtol=0.0)
    shown = float(str(refused.value).split("by up to ")[1].split(",")[0])
    assert shown > atol, refused.value


def test_verification_allows_what_compare_allows_relative_to_large_logits(tmp_path):
    """Logits in the thousands differ by a few 1e-3 in float32 arithmetic: verification once held them to 1e-4
    absolute and refused an export that `compare` passes (its fp32 rule: atol + rtol·|A|)."""
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    state = load_checkpoint(bundled_checkpoint()).model.state_dict()
    state["head.weight"] *= 3000
    loud = tmp_path / "loud.pth"
    torch.save(state, loud)
    result = export_onnx(loud, tmp_path / "loud.onnx", input_size=32)
    assert result.max_abs_diff > 1e-4, "the case needs logits whose float32 error passes 1e-4"
    with pytest.raises(ExportError, match=r"beyond 0\.0001 \+ 0·\|PyTorch\|"):
        export_onnx(loud, tmp_path / "strict.onnx", input_size=32, rtol=0.0)


def test_a_model_answering_infinite_logits_is_refused_not_verified(official, tmp_path):
    """The official T-32 with its head scaled so that the first logit overflows to inf on every sample image (all
    weights finite): inf beside inf passed the logit check, and the model was written 'verified ... max |ONNX
    Runtime − PyTorch| = nan'."""
    from medmamba_edge.runtime.bundled import sample_image_paths
    from medmamba_edge.runtime.decode import read_image
    from medmamba_edge.runtime.preprocess import preprocess

    features = []
    hook = official.model.head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    try:
        with torch.no_grad():
            official.model(torch.from_numpy(preprocess([read_image(p) for p in sample_image_paths()],
                                                       official.metadata((32, 32), "plugin", None))))
    finally:
        hook.remove()
    smallest = features[0].min(dim=0).values  # a feature above 1 on every image: 3.4e38 times it overflows
    state = {name: tensor.clone() for name, tensor in official.model.state_dict().items()}  # the fixture's stay
    state["head.weight"][0] = 0.0
    state["head.weight"][0, int(smallest.argmax())] = 3.4e38
    assert smallest.max() > 1, "the case needs a feature that stays above 1"
    huge = tmp_path / "huge.pth"
    torch.save(state, huge)
    with pytest.raises(ExportError, match=r"PyTorch gives non-finite logits \(NaN or infinite\) for 9 of 9 sample"):
        export_onnx(huge, tmp_path / "huge.onnx", input_size=32)
    assert not (tmp_path / "huge.onnx").exists()


def test_an_export_leaves_the_logger_levels_and_warning_filters_as_it_found_them(tmp_path):
    """The exporter's loggers were left at ERROR and CRITICAL for good: an application's own torch.onnx level, set to
    see its records, was gone after an export."""
    import logging
    import warnings

    from medmamba_edge.runtime.bundled import bundled_checkpoint

    loggers = {"torch.onnx": logging.INFO, "onnxscript.version_converter": logging.WARNING}
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    filters = list(warnings.filters)
    try:
        # Batch 3: a trace of its own, not the session's copy (conftest's trace_each_checkpoint_once).
        export_onnx(bundled_checkpoint(), tmp_path / "m.onnx", input_size=32, batch=3, verify=False)
        assert {name: logging.getLogger(name).level for name in loggers} == loggers
        assert warnings.filters == filters
    finally:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_two_exports_at_once_leave_the_logger_levels_as_they_found_them(official, tmp_path, monkeypatch):
    """Each export set the exporter's loggers and put back the levels it found: of two at once (an application's
    threads), the second found the first's ERROR and, out last, left torch.onnx at ERROR for good."""
    import logging
    import threading

    real_export, first_in, second_in, first_out = torch.onnx.export, *(threading.Event() for _ in range(3))

    def in_turn(*args, **kwargs):
        # Both exports inside their quieting before the first leaves it; the traces themselves one after the other.
        if threading.current_thread() is first:
            first_in.set()
            second_in.wait(120)
        else:
            second_in.set()
            first_out.wait(600)
        return real_export(*args, **kwargs)

    def export(batch, failed):
        try:
            export_onnx(official, tmp_path / f"b{batch}.onnx", input_size=32, batch=batch, verify=False)
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            first_in.set()
            first_out.set()

    monkeypatch.setattr(torch.onnx, "export", in_turn)
    loggers = {"torch.onnx": logging.INFO, "onnxscript.version_converter": logging.WARNING}
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    failed = []
    # Batches of their own: traced, not copies of the session's trace (conftest's trace_each_checkpoint_once).
    first = threading.Thread(target=export, args=(5, failed))
    try:
        first.start()
        first_in.wait(120)
        export(6, failed)
        first.join()
        assert not failed
        assert {name: logging.getLogger(name).level for name in loggers} == loggers
    finally:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.NOTSET)


def export_over_2_gb(checkpoint, output, scan="plugin") -> str:
    """Export with a 2 GiB initializer beside the real graph, standing in for the weights of a custom checkpoint
    over protobuf's 2 GB (depths [1, 1, 1, 5], dims [512 .. 4096]: traced in a minute and 6 GB); the refusal."""
    from unittest import mock

    from medmamba_edge.exporters import onnx_export

    trace = onnx_export.trace_to_onnx

    def oversized(*args):
        model = trace(*args)
        model.graph.initializer.add(name="padding", data_type=onnx.TensorProto.UINT8, dims=[1 << 31],
                                    raw_data=bytes(1 << 31))
        return model

    with mock.patch.object(onnx_export, "trace_to_onnx", oversized), pytest.raises(ExportError) as refusal:
        export_onnx(checkpoint, output, input_size=32, scan=scan, verify=False)
    return str(refusal.value)


@pytest.mark.parametrize("protobuf, scan", [("upb", "plugin"), ("upb", "portable"), ("python", "plugin")])
def test_a_model_over_2_gb_is_refused_in_one_line(official, tmp_path, protobuf, scan):
    """It ended its export in google.protobuf's EncodeError traceback from the checker; with protobuf's pure-Python
    backend (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, its fallback where no wheel has the C one), which
    serializes it, in the checker's 'ValueError: This protobuf of onnx model is too large (>2GiB)'; in the portable
    form, in the EncodeError of the shape inference its lowering runs, before the checker."""
    output = tmp_path / "big.onnx"
    if protobuf == "upb":
        refusal = export_over_2_gb(official, output, scan)
    else:  # a backend is chosen once per process, at protobuf's import
        script = ("import sys; from tests.test_export import export_over_2_gb; "
                  "print(export_over_2_gb(sys.argv[1], sys.argv[2]))")
        done = subprocess.run([sys.executable, "-c", script, str(official.path), str(output)], capture_output=True,
                              text=True, env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": protobuf},
                              cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        refusal = done.stdout.strip()
    assert re.fullmatch(r".*t32\.pth: the exported model is over 2 GB, more than one ONNX file holds .*nothing was "
                        r"written to .*big\.onnx", refusal), refusal
    assert list(tmp_path.iterdir()) == []


def test_weights_over_2_gb_are_refused_before_the_trace(tmp_path):
    """MedMamba-B at 4× its widths (dims [512 .. 4096], 614 M weights, 2.3 GiB as fp32) was refused only once the
    traced graph failed to serialize: 37 s and 10.9 GB of memory here, over 4 times the weights'. On the meta device
    here: the refusal needs the weights' shapes, never their values nor a trace."""
    from pathlib import PurePath
    from unittest import mock

    from medmamba_edge.checkpoint import LoadedCheckpoint, ModelConfig
    from medmamba_edge.exporters import onnx_export

    config = ModelConfig(depths=[2, 2, 12, 2], dims=[512, 1024, 2048, 4096], num_classes=2)
    with torch.device("meta"):
        model = config.build()
    checkpoint = LoadedCheckpoint(model, config, ["a", "b"], PurePath("b4.pth"), "0" * 64)
    output = tmp_path / "big.onnx"
    with mock.patch.object(onnx_export, "trace_to_onnx", side_effect=AssertionError("traced")), \
            pytest.raises(ExportError) as refusal:
        export_onnx(checkpoint, output, input_size=224, verify=False)
    assert str(refusal.value) == (f"b4.pth: the exported model is over 2 GB (its 614 M weights alone are 2.29 GiB as "
                                  f"fp32), more than one ONNX file holds (protobuf's limit; medmamba-edge does not "
                                  f"write external weights); nothing was written to {output}")
    assert list(tmp_path.iterdir()) == []


def test_classes_label_a_loaded_checkpoint_too(official, tmp_path):
    """export_onnx(load_checkpoint(path), out, classes=[...]) wrote the checkpoint's own names (normal, pneumonia),
    the names given left unused without a word."""
    export_onnx(official, tmp_path / "named.onnx", input_size=32, classes=["healthy", "sick"], verify=False)
    assert read_onnx_metadata(tmp_path / "named.onnx").class_names == ("healthy", "sick")
    assert official.class_names == ["normal", "pneumonia"]  # the caller's checkpoint is left as it was
    with pytest.raises(CheckpointError, match=r"3 class names given but the model has 2 outputs"):
        export_onnx(official, tmp_path / "three.onnx", input_size=32, classes="a,b,c", verify=False)


def test_too_small_input_is_refused(official, tmp_path):
    with pytest.raises(CheckpointError, match="needs at least 32"):
        export_onnx(official, tmp_path / "small.onnx", input_size=28)


runner = CliRunner()


def test_cli_export_reports_parity(tmp_path):
    out = tmp_path / "cli.onnx"
    result = runner.invoke(app, ["export", str(require_shared(*OFFICIAL_T32)), "-o", str(out),
                                 "--input-size", "32", "--scan", "portable"])
    assert result.exit_code == 0, result.output
    assert "max |ONNX Runtime − PyTorch|" in result.output and out.is_file()


def test_cli_export_at_the_default_size_says_so(tmp_path):
    """A checkpoint does not record the size it was trained at, and run, evaluate and compare say so when they run
    one at 224; export wrote the model at 224 without a word, a size every later command then took from its
    metadata (the official T-32 at 224: top-1 74 %, not 93 %)."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "small.pth"
    torch.save(VSSM(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=3).state_dict(), checkpoint)
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (f"{checkpoint}: a checkpoint does not record its training size: "
                                              f"exported at 224×224 (--input-size gives another)")
    assert read_onnx_metadata(onnx.load(str(tmp_path / "m.onnx"))).input_size == (224, 224)
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--input-size", "224"])
    assert result.exit_code == 0 and "training size" not in result.output, result.output


def test_cli_export_refuses_an_empty_input_size(tmp_path):
    """An empty --input-size (a script's unset variable, --input-size "$SIZE") was refused as any other bad size,
    until --input-size defaulted to nothing: it then exported at 224 without the default's warning either."""
    checkpoint = tmp_path / "small.pth"
    torch.save(VSSM(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=3).state_dict(), checkpoint)
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--input-size", ""])
    assert result.exit_code == 1, result.output
    assert result.output == "error: --input-size must be N or HxW with positive integers, got ''\n"
    assert not (tmp_path / "m.onnx").exists()


def test_export_never_overwrites_what_it_reads_and_checks_atol_first(tmp_path):
    checkpoint = tmp_path / "t.pth"
    checkpoint.write_bytes(require_shared(*OFFICIAL_T32).read_bytes())
    (tmp_path / "class_indices.json").write_text('{"0": "normal", "1": "pneumonia"}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for output, extra, message in [
        (checkpoint, [], "t.pth: the output would overwrite a file this export reads"),  # once: weights gone, exit 0
        (tmp_path / "class_indices.json", [], "the output would overwrite a file this export reads"),
        (tmp_path / "m.onnx", ["--atol", "-1"], "--atol must be a finite number ≥ 0, got -1"),
        (tmp_path / "m.onnx", ["--atol", "nan"], "--atol must be a finite number ≥ 0, got nan"),
        # compare's rule: inf would pass any difference (--no-verify says that plainly).
        (tmp_path / "m.onnx", ["--atol", "inf"], "--atol must be a finite number ≥ 0, got inf"),
        (tmp_path / "m.onnx", ["--rtol", "-1e-4"], "--rtol must be a finite number ≥ 0, got -0.0001"),
        (tmp_path / "m.onnx", ["--no-verify", "--atol", "0"], "--atol applies only with verification, which --no-verify"),
        # run and the other commands open a model by its suffix: this ONNX would be taken for a checkpoint.
        (tmp_path / "m.pth", [], "m.pth: an export is ONNX; name it *.onnx"),
        (tmp_path / "m.onnx", ["--input-size", "99999999"], "cannot trace at 99999999×99999999"),
    ]:
        result = runner.invoke(app, ["export", str(checkpoint), "-o", str(output), "--input-size", "32", *extra])
        assert result.exit_code == 1 and message in result.output and len(result.output.splitlines()) == 1, result.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("args, message", [
    (["missing.pth"], "missing.pth: no such checkpoint file"),
    ([__file__], "test_export.py: not a readable PyTorch checkpoint"),
    ([__file__, "--input-size", "0"], "--input-size must be N or HxW"),
    (["OFFICIAL", "--scan", "loop"], "--scan must be 'plugin' or 'portable'"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    out = tmp_path / "never.onnx"
    if args[0] == "OFFICIAL":
        args = [str(require_shared(*OFFICIAL_T32)), *args[1:]]
    result = runner.invoke(app, ["export", *args, "-o", str(out)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1
    assert not out.exists()
