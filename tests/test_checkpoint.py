"""Checkpoint formats users actually have, and every way a checkpoint can be wrong."""

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

from medmamba_edge.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from medmamba_edge.model import VSSM
from medmamba_edge.runtime.metadata import MetadataError, ModelMetadata
from tests.shared_data import OFFICIAL_T32, require_shared


@pytest.fixture(scope="module")
def tiny_state_dict():
    torch.manual_seed(0)
    return VSSM(depths=[1, 2, 1, 1], dims=[16, 32, 64, 128], num_classes=3, in_chans=1).state_dict()


def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"state_dict": sd, "optimizer_lr": 1e-4},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # nn.DataParallel
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},  # torch.compile inside DataParallel
    # a LightningModule holding the net as self.model, with a weighted loss whose buffer is saved beside it
    lambda sd: {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(3)},
                "epoch": 7, "global_step": 700},
], ids=["bare", "model-key", "state_dict-key", "data-parallel", "compiled-data-parallel", "lightning"])
def test_architecture_is_inferred_from_any_usual_wrapping(tmp_path, tiny_state_dict, wrap):
    loaded = load_checkpoint(save(wrap(tiny_state_dict), tmp_path / "w.pth"))
    config = loaded.config
    assert (config.depths, config.dims, config.num_classes, config.in_chans) == ([1, 2, 1, 1], [16, 32, 64, 128], 3, 1)
    assert config.variant == "custom"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in tiny_state_dict.items())
    assert not loaded.model.training


def test_torch_compile_prefix_is_read_off_a_real_compiled_module(tmp_path, tiny_state_dict):
    model = VSSM(depths=[1, 2, 1, 1], dims=[16, 32, 64, 128], num_classes=3, in_chans=1)
    model.load_state_dict(tiny_state_dict)
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled until it is called
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    loaded = load_checkpoint(save(compiled.state_dict(), tmp_path / "c.pth"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in tiny_state_dict.items())


@pytest.mark.parametrize("prefixes, named", [(("model.", "model_ema."), "'model.', 'model_ema.'"),
                                              (("", "module."), "(no prefix), 'module.'")])
def test_two_models_side_by_side_are_refused_by_name(tmp_path, tiny_state_dict, prefixes, named):
    both = {f"{prefix}{k}": v for prefix in prefixes for k, v in tiny_state_dict.items()}
    with pytest.raises(CheckpointError, match=re.escape(f"b.pth: holds 2 models' weights (under {named})")):
        load_checkpoint(save(both, tmp_path / "b.pth"))


def test_an_ema_beside_the_trained_weights_is_not_what_is_read(tmp_path, tiny_state_dict):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state_dict.items()}
    loaded = load_checkpoint(save({"state_dict": tiny_state_dict, "state_dict_ema": ema}, tmp_path / "t.pth"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in tiny_state_dict.items())
    # As timm's CheckpointSaver writes it: with its argparse Namespace, and a numpy metric as other scripts keep
    # (both refused as "holds a argparse.Namespace object"); data only, so weights_only loads them, and nothing else.
    import argparse

    import numpy as np

    timm = {"epoch": 3, "arch": "medmamba_t", "state_dict": tiny_state_dict, "state_dict_ema": ema,
            "args": argparse.Namespace(lr=1e-3, model="medmamba_t"), "metric": np.float64(0.93), "best": np.int64(7)}
    loaded = load_checkpoint(save(timm, tmp_path / "timm.pth"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in tiny_state_dict.items())
    import datetime

    with pytest.raises(CheckpointError, match=r"other\.pth: refused to load: it holds a datetime\.date object"):
        load_checkpoint(save({"state_dict": tiny_state_dict, "day": datetime.date(2026, 12, 6)}, tmp_path / "other.pth"))
    # A numpy scalar of a dtype not allowed, built from allowed globals: torch words that refusal otherwise
    with pytest.raises(CheckpointError, match=r"text\.pth: refused to load: it holds a numpy\.dtypes\.StrDType object"):
        load_checkpoint(save({"state_dict": tiny_state_dict, "name": np.str_("t")}, tmp_path / "text.pth"))


def test_a_lightning_checkpoint_keeping_paths_in_its_hyper_parameters_loads(tmp_path, tiny_state_dict):
    """save_hyperparameters() keeps the paths given to the LightningModule; such a .ckpt was refused as holding 'a
    pathlib.PosixPath object, not only tensors'. One written on Windows holds a WindowsPath, which Linux cannot make:
    it loads as the pure path."""
    import pathlib
    import zipfile

    lightning = {"state_dict": {f"model.{k}": v for k, v in tiny_state_dict.items()}, "epoch": 4, "global_step": 400,
                 "hyper_parameters": {"data_dir": pathlib.Path("/data/busi"), "out": pathlib.PureWindowsPath(r"C:\runs"),
                                      "lr": 1e-4}}
    loaded = load_checkpoint(save(lightning, tmp_path / "last.ckpt"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in tiny_state_dict.items())
    with zipfile.ZipFile(tmp_path / "last.ckpt") as source, zipfile.ZipFile(tmp_path / "windows.ckpt", "w") as copy:
        for record in source.infolist():  # torch.save's protocol 2 names a class in a GLOBAL opcode, as text
            data = source.read(record.filename)
            if record.filename.endswith("/data.pkl"):
                assert b"pathlib\nPureWindowsPath\n" in data
                data = data.replace(b"pathlib\nPureWindowsPath\n", b"pathlib\nWindowsPath\n")
            copy.writestr(record, data)
    assert load_checkpoint(tmp_path / "windows.ckpt").config.num_classes == 3


def test_loading_leaves_the_applications_own_allowances(tmp_path, tiny_state_dict):
    """The data globals are allowed only while a checkpoint loads (torch's safe_globals), which removes them on exit:
    one the application embedding medmamba-edge had allowed for its own loads (a Lightning user's PosixPath) was
    gone from the process after our first load."""
    import argparse
    import pathlib

    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([pathlib.PosixPath, argparse.Namespace])
    try:
        read_state_dict(save(tiny_state_dict, tmp_path / "w.pth"))
        assert {pathlib.PosixPath, argparse.Namespace} <= set(torch.serialization.get_safe_globals())
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_two_loads_at_once_share_the_allowance(tmp_path, tiny_state_dict, monkeypatch):
    """torch's allowances are the process's: of two loads on two threads, the first to finish took the data globals
    away while the second was still reading, and a Lightning checkpoint's paths were refused there. Driven in that
    order: A reads, B starts reading, A finishes, then B reads its paths. The warning filters are the process's too:
    B's catch_warnings kept A's "ignore" and put it back last, every warning ignored for good; each load's warnings
    are ignored (with context-aware warnings, shared, B's were not)."""
    import pathlib
    import threading

    lightning = save({"state_dict": tiny_state_dict, "hyper_parameters": {"data_dir": pathlib.Path("/data")}},
                     tmp_path / "b.ckpt")
    plain = save(tiny_state_dict, tmp_path / "a.pth")
    reading = {path: threading.Event() for path in (plain, lightning)}
    go = {path: threading.Event() for path in (plain, lightning)}
    load = torch.load

    def held_load(path, **options):
        reading[Path(path)].set()
        assert go[Path(path)].wait(30)
        warnings.warn(f"{path} read", UserWarning)
        return load(path, **options)

    monkeypatch.setattr(torch, "load", held_load)
    outcome = {}

    def read(path):
        try:
            outcome[path] = read_state_dict(path)
        except CheckpointError as exc:
            outcome[path] = exc

    threads = {path: threading.Thread(target=read, args=(path,)) for path in (plain, lightning)}
    warnings.simplefilter("error", UserWarning)  # pytest's catch_warnings puts the filters back after the test
    filters = list(warnings.filters)
    threads[plain].start()
    assert reading[plain].wait(30)
    threads[lightning].start()
    assert reading[lightning].wait(30)
    go[plain].set()
    threads[plain].join(30)
    go[lightning].set()
    threads[lightning].join(30)
    assert isinstance(outcome[plain], dict) and isinstance(outcome[lightning], dict), outcome
    assert pathlib.PosixPath not in torch.serialization.get_safe_globals()  # taken back by the last one out
    assert warnings.filters == filters


def test_class_names_from_official_class_indices_json(tmp_path, tiny_state_dict):
    path = save(tiny_state_dict, tmp_path / "m.pth")
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "benign", "1": "malignant", "2": "normal"}, indent=4))
    assert load_checkpoint(path).class_names == ["benign", "malignant", "normal"]
    assert load_checkpoint(path, classes="a,b,c").class_names == ["a", "b", "c"]
    with pytest.raises(CheckpointError, match="2 class names given but the model has 3 outputs"):
        load_checkpoint(path, classes=["a", "b"])
    with pytest.raises(CheckpointError, match=r"class names must be a non-empty list of non-empty strings, got \['a', 'b', ''\]"):
        load_checkpoint(path, classes="a,b,")  # once reported as "3 class names given but the model has 3 outputs"
    with pytest.raises(CheckpointError, match="class names must differ; 'a' is given more than once"):
        load_checkpoint(path, classes="a,b,a")
    (tmp_path / "class_indices.json").write_text(json.dumps(["x", "y", "x"]))
    with pytest.raises(CheckpointError, match=r"class_indices\.json: class names must differ; 'x'"):
        load_checkpoint(path)
    # left there by a run with other classes: the user named no such file, so the error says why it was read
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "normal", "1": "pneumonia"}))
    with pytest.raises(CheckpointError, match=r"class_indices\.json: 2 class names but the model has 3 outputs \(read "
                                              r"as the checkpoint's class names, being beside it; --classes gives "
                                              r"others\)$"):
        load_checkpoint(path)
    assert load_checkpoint(path, classes="a,b,c").class_names == ["a", "b", "c"]


@pytest.mark.parametrize("name", ["a;b", "line\nbreak", "tab\there", "nul\x00", "next\u2028line", "byte\udcff"],
                         ids=["semicolon", "newline", "tab", "nul", "line-separator", "undecodable-byte"])
def test_class_names_every_label_file_cannot_hold_are_refused(tmp_path, tiny_state_dict, name):
    """Triton's labels.txt has one name per line; DeepStream's label file and run's CSV top_k separate names by ';'."""
    path = save(tiny_state_dict, tmp_path / "m.pth")
    (tmp_path / "classes.json").write_text(json.dumps(["a", name, "c"]))
    with pytest.raises(CheckpointError, match=r"classes\.json: class names must not contain ';', line breaks"):
        load_checkpoint(path, classes=str(tmp_path / "classes.json"))
    odd_but_writable = ["é [x] $y$", "b, c: d", 'e "f" #g']
    assert load_checkpoint(path, classes=odd_but_writable).class_names == odd_but_writable


def test_default_class_names_without_json(tmp_path, tiny_state_dict):
    assert load_checkpoint(save(tiny_state_dict, tmp_path / "m.pth")).class_names == ["class_0", "class_1", "class_2"]


def _pickled(obj, path):  # a bare pickle, not torch.save's zip: torch warns about its protocol before refusing it
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("write, refusal", [
    (save, r"refused to load: the pickle wants to call posix\.system .*weights_only=True"),
    (_pickled, r"not a readable PyTorch checkpoint \(a bare pickle, as pickle\.dump writes it, not torch\.save's format\)"),
], ids=["torch.save", "bare pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, write, refusal):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = write({"model": Exploit()}, tmp_path / "evil.pth")
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match=r"evil\.pth: " + refusal):
        warnings.simplefilter("error")  # the refusal is the one thing said
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_weights_saved_with_pickle_dump_are_named_so(tmp_path, tiny_state_dict, protocol):
    """pickle.dump(net.state_dict(), f) was refused as holding 'a torch.storage._load_from_bytes object, not only
    tensors' (protocol 2) or as 'not a tensor-only pickle', and a pickled dict of numbers as 'Invalid magic number;
    corrupt file?'. torch.save's legacy format still loads (its magic number first)."""
    bare = "a bare pickle, as pickle.dump writes it, not torch.save's format"
    for name, obj in (("weights.pth", tiny_state_dict), ("numbers.pth", {"epoch": 3})):
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(CheckpointError, match=re.escape(f"{name}: not a readable PyTorch checkpoint ({bare})")):
            load_checkpoint(tmp_path / name)
    torch.save(tiny_state_dict, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pth").config.num_classes == 3


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pickle_protocol_torch_load_cannot_read_safely_is_named(tmp_path, tiny_state_dict, zipped):
    """torch.save(sd, path, pickle_protocol=4) (or 5, zip or legacy format) was 'not a tensor-only pickle': it is
    one, framed as protocols 4 and 5 frame it, which torch's weights_only unpickler does not read. 2 and 3 load."""
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"p{protocol}.pth"
        torch.save(tiny_state_dict, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
        if protocol < 4:
            assert load_checkpoint(path).config.num_classes == 3
            continue
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not readable with weights_only=True "
                                                  rf"\(saved with pickle_protocol 4 or later, .*\); save the weights "
                                                  rf"with torch\.save's default protocol"):
            load_checkpoint(path)


def test_a_damaged_protocol_2_file_is_not_named_as_saved_with_protocol_4(tmp_path, tiny_state_dict):
    """A byte damaged to 149 (FRAME's opcode) in a legacy file saved with the default protocol 2 read 'saved with
    pickle_protocol 4 or later'; damage to any other opcode reads as what it is."""
    path = tmp_path / "damaged.pth"
    torch.save(tiny_state_dict, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    data[data.index(b"\x80\x02", 1) + 2] = 149  # the first opcode of the pickle after the magic number's
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not a readable PyTorch checkpoint \(not a "
                                              rf"tensor-only pickle\)$"):
        load_checkpoint(path)


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path, tiny_state_dict):
    resnet_like = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict()
    with pytest.raises(CheckpointError, match=r"not a MedMamba \(VSSM\) checkpoint: missing patch_embed\.proj\.weight"):
        load_checkpoint(save(resnet_like, tmp_path / "resnet.pth"))

    extra = dict(tiny_state_dict, **{"layers.0.blocks.0.extra_gate.weight": torch.zeros(2)})
    del extra["layers.1.downsample.norm.bias"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(save(extra, tmp_path / "variant.pth"))
    message = str(info.value)
    assert "missing keys: layers.1.downsample.norm.bias" in message
    assert "unexpected keys: layers.0.blocks.0.extra_gate.weight" in message
    assert "\n" not in message


def test_a_backbone_without_its_head_is_named_so(tmp_path):
    """VSSM(num_classes=0), the official code's backbone (its head an Identity), was 'not a MedMamba (VSSM)
    checkpoint: missing head.weight; found keys such as layers.0.blocks.0.conv33conv33conv11.0.bias, ...'."""
    backbone = VSSM(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64], num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match=r"backbone\.pth: a MedMamba backbone without its classifier \(no "
                                              r"head\.weight, as VSSM built with num_classes=0 saves it\)"):
        load_checkpoint(save(backbone, tmp_path / "backbone.pth"))


def test_a_swin_backbone_is_not_called_a_medmamba_one(tmp_path):
    """A timm Swin Transformer has patch_embed.proj and layers.*.blocks.* as MedMamba does, its classifier under
    head.fc: it was named 'a MedMamba backbone without its classifier', which it is not."""
    swin = {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4), "layers.0.blocks.0.norm1.weight": torch.zeros(96),
            "layers.0.blocks.0.attn.qkv.weight": torch.zeros(288, 96), "head.fc.weight": torch.zeros(1000, 768)}
    with pytest.raises(CheckpointError, match=r"swin\.pth: not a MedMamba \(VSSM\) checkpoint: missing head\.weight"):
        load_checkpoint(save(swin, tmp_path / "swin.pth"))


def test_input_channels_other_than_1_or_3_are_refused_by_name(tmp_path):
    """A 2-channel model failed its export with 'cannot turn a 3-channel image into 2 channels', naming no file."""
    two = VSSM(depths=[1, 2, 1, 1], dims=[16, 32, 64, 128], num_classes=3, in_chans=2).state_dict()
    with pytest.raises(CheckpointError, match=r"two\.pth: the model takes 2-channel input \(patch_embed\.proj\.weight\)"):
        load_checkpoint(save(two, tmp_path / "two.pth"))


def test_a_single_output_head_is_refused_by_name(tmp_path):
    """A one-logit head (a sigmoid model, trained with BCE) exported, and ran every image to '100.0 %' for its class."""
    weights = read_state_dict(require_shared(*OFFICIAL_T32))
    one = {**weights, "head.weight": weights["head.weight"][:1], "head.bias": weights["head.bias"][:1]}
    with pytest.raises(CheckpointError, match=r"one\.pth: head\.weight: the model has 1 output; .* every image would read 100 %"):
        load_checkpoint(save(one, tmp_path / "one.pth"))
    # A model of one output from elsewhere (exported before this check) is refused by its metadata.
    with pytest.raises(MetadataError, match="the model has 1 output"):
        ModelMetadata(input_size=(32, 32), class_names=("pneumonia",))


def test_wrong_shape_is_named(tmp_path, tiny_state_dict):
    bad = dict(tiny_state_dict, **{"head.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"head\.bias has shape \(4,\), expected \(3,\)"):
        load_checkpoint(save(bad, tmp_path / "shape.pth"))


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
    # What a deployment box most often has instead (it was "not a tensor-only pickle", or "(RuntimeError)"):
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:2cd5\nsize 57993837\n",
     r"a Git LFS pointer, not the weights: run `git lfs pull`"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML or XML page, not the weights"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_zip_of_other_files_says_what_it_holds(tmp_path, tiny_state_dict):
    """A checkpoint zipped for sending was 'not a readable PyTorch checkpoint (RuntimeError: [enforce fail at
    inline_container.cc:180] .)': torch's reason cut at its first '. '."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "sent.pth", "w") as archive:
        archive.write(save(tiny_state_dict, tmp_path / "best.pth"), "best.pth")
    with pytest.raises(CheckpointError, match=r"sent\.pth: not a readable PyTorch checkpoint \(a zip archive of other "
                                              r"files, not one torch\.save wrote: it holds best\.pth\)$"):
        load_checkpoint(tmp_path / "sent.pth")


def test_a_safetensors_file_and_an_onnx_model_are_named_for_what_they_are(tmp_path, tiny_state_dict):
    """Both were 'not a PyTorch checkpoint: it starts with b'pC\\x00...'' (or b'\\x08\\n\\x12\\rmedmamba-edg'), their
    first bytes, where the user needs to know what the file is and what to do with it."""
    header, blobs, offset = {}, [], 0
    for key, tensor in tiny_state_dict.items():  # safetensors' layout, written here: the package is not a dependency
        blob = tensor.numpy().tobytes()
        header[key] = {"dtype": "I64" if tensor.dtype == torch.int64 else "F32", "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable PyTorch checkpoint \(a safetensors "
                                              r"file, not torch\.save's format: convert it with torch\.save\("):
        load_checkpoint(tmp_path / "model.safetensors")
    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, producer_name="medmamba-edge"), tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match=r"model\.onnx: not a readable PyTorch checkpoint \(an ONNX model, an "
                                              r"export's output perhaps: export reads the \.pth file"):
        load_checkpoint(tmp_path / "model.onnx")


def test_a_torchscript_archive_is_named_for_what_it_is(tmp_path, tiny_state_dict):
    """A model saved with torch.jit.save was 'not a readable PyTorch checkpoint (RuntimeError: Cannot use
    ``weights_only=True`` with TorchScript archives passed to ``torch.load``.)': torch's words, not what to do."""
    head = torch.nn.Linear(128, 3)  # the scan does not trace; the archive's layout is what is read
    head.load_state_dict({"weight": tiny_state_dict["head.weight"], "bias": tiny_state_dict["head.bias"]})
    torch.jit.script(head).save(str(tmp_path / "scripted.pth"))
    with pytest.raises(CheckpointError, match=r"scripted\.pth: not a readable PyTorch checkpoint \(a TorchScript "
                                              r"archive \(torch\.jit\.save\), not a state_dict, .*"
                                              r"torch\.save\(net\.state_dict\(\), path\)\)$"):
        load_checkpoint(tmp_path / "scripted.pth")


def test_a_checkpoint_without_read_permission_is_one_line(tmp_path, tiny_state_dict, monkeypatch):
    """It ended export (and run, evaluate, compare on a .pth) in a PermissionError traceback."""
    path = save(tiny_state_dict, tmp_path / "theirs.pth")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it regardless: the file's open is refused as the kernel would refuse it
        def refused(name, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(name))

        monkeypatch.setattr("medmamba_edge.checkpoint.open", refused, raising=False)
    with pytest.raises(CheckpointError, match=r"theirs\.pth: cannot read \(Permission denied\)$"):
        load_checkpoint(path)


def test_missing_file_and_non_state_dict(tmp_path, tiny_state_dict):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_checkpoint(save([1, 2, 3], tmp_path / "list.pth"))
    # The weights under a listed key after another listed key holding a config: read (refused as "got dict").
    config = save({"model": {"arch": "medmamba_t"}, "state_dict": tiny_state_dict, "epoch": 9}, tmp_path / "c.pth")
    assert load_checkpoint(config).config.num_classes == 3
    # Weights under a key of the trainer's own, an EMA-only save: which key, and how to export them (it was only
    # 'got a dict of epoch, ema')
    with pytest.raises(CheckpointError, match=r"ema\.pth: expected a state_dict .*; got a dict of epoch, ema; under "
                                              r"'ema', a state_dict: to export it, save it alone: "
                                              r"torch\.save\(torch\.load\(path\)\['ema'\], 'weights\.pth'\)$"):
        load_checkpoint(save({"epoch": 9, "ema": tiny_state_dict}, tmp_path / "ema.pth"))
    whole = save(tiny_state_dict, tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint \(truncated or corrupt: "):
        load_checkpoint(tmp_path / "cut.pth")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_checkpoint_cut_anywhere_is_named_truncated(tmp_path, tiny_state_dict, legacy):
    """A copy cut in its first 64 KB was 'RuntimeError: PytorchStreamReader failed reading zip archive: not a ZIP
    archive.' or '(OSError: [Errno 22] Invalid argument)'; a legacy file cut within its magic number 'a bare pickle,
    as pickle.dump writes it', and further on '(error: unpack requires a buffer of 4 bytes)' or
    '(truncated or corrupt: EOFError: )'."""
    whole = tmp_path / "whole.pth"
    torch.save(tiny_state_dict, whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    for cut in (2, 10, 13, 30, 1000, 5000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as refusal:
            load_checkpoint(tmp_path / "cut.pth")
        assert re.fullmatch(r".*cut\.pth: not a readable PyTorch checkpoint \(truncated or corrupt: .*\w\.?\)",
                            str(refusal.value)), (cut, str(refusal.value))


def test_values_saved_among_the_weights_are_named(tmp_path, tiny_state_dict):
    """An epoch count put into the state_dict was 'got a dict of patch_embed.proj.weight, ...': the first keys,
    all tensors, and not the entry that kept the dict from being a state_dict."""
    flat = {**tiny_state_dict, "epoch": 30, "best_acc": 0.93}
    with pytest.raises(CheckpointError, match=rf"flat\.pth: expected a state_dict .*; got a dict of "
                                              rf"{len(tiny_state_dict)} tensors and 2 other entries: epoch \(int\), "
                                              rf"best_acc \(float\)$"):
        load_checkpoint(save(flat, tmp_path / "flat.pth"))


@pytest.mark.parametrize("config", [None, {"depths": [2, 2, 4, 2]}], ids=["alone", "beside a config under 'model'"])
def test_values_saved_among_the_weights_under_a_wrapper_key_are_named(tmp_path, tiny_state_dict, config):
    """{'model': state_dict with an epoch count in it, 'epoch': 30} was 'got a dict of model, epoch': the keys, and
    not what under 'model' kept it from being a state_dict (nor did '1 other entries' read as English). With a
    config under 'model' and the weights under 'state_dict', it was what the config held ('a dict of depths')."""
    weights_key = "model" if config is None else "state_dict"
    wrapped = {**({} if config is None else {"model": config}), weights_key: {**tiny_state_dict, "epoch": 30}, "epoch": 30}
    keys = ", ".join(wrapped)
    with pytest.raises(CheckpointError, match=rf"wrapped\.pth: expected a state_dict .*; got a dict of {keys}; "
                                              rf"under '{weights_key}', a dict of {len(tiny_state_dict)} tensors and "
                                              rf"1 other entry: epoch \(int\)$"):
        load_checkpoint(save(wrapped, tmp_path / "wrapped.pth"))


def test_a_checkpoint_damaged_in_place_a_folder_a_pipe_and_text_are_named_for_what_they_are(tmp_path, tiny_state_dict):
    """torch.load does not check a zip record's CRC: 100 zeroed bytes in the middle of the official checkpoint
    loaded as other weights, and export verified the damaged model against itself."""
    whole = bytearray(save(tiny_state_dict, tmp_path / "whole.pth").read_bytes())
    middle = len(whole) // 2
    whole[middle:middle + 100] = bytes(100)
    (tmp_path / "rot.pth").write_bytes(whole)
    with pytest.raises(CheckpointError, match=r"rot\.pth: corrupt: its record \S+ fails its CRC check"):
        load_checkpoint(tmp_path / "rot.pth")
    (tmp_path / "run1").mkdir()
    save(tiny_state_dict, tmp_path / "run1" / "best.pth")
    save(tiny_state_dict, tmp_path / "run1" / "model_best.pth.tar")  # timm's name
    with pytest.raises(CheckpointError, match=r"run1: a folder, not a checkpoint file \(it holds best\.pth, "
                                              r"model_best\.pth\.tar\)$"):
        load_checkpoint(tmp_path / "run1")
    (tmp_path / "hf").mkdir()  # a name the runtime opens as a checkpoint, hinted as one too
    save(tiny_state_dict, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"hf: a folder, not a checkpoint file \(it holds pytorch_model\.bin\)$"):
        load_checkpoint(tmp_path / "hf")
    # An encrypted record (zipfile cannot test it): torch.load's own one line, not zipfile's traceback
    raw = bytearray((tmp_path / "run1" / "best.pth").read_bytes())
    central = raw.index(b"PK\x01\x02")  # the first record's central directory entry: its flags at +8
    raw[central + 8] |= 1
    (tmp_path / "locked.pth").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"locked\.pth: "):
        load_checkpoint(tmp_path / "locked.pth")
    os.mkfifo(tmp_path / "pipe.pth")  # was "no such checkpoint file"
    with pytest.raises(CheckpointError, match=r"pipe\.pth: not a regular file"):
        load_checkpoint(tmp_path / "pipe.pth")
    (tmp_path / "notes.pth").write_text("epoch 3, best 0.93\n")  # was "(KeyError: 101)"
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable PyTorch checkpoint \(not a PyTorch "
                                              r"checkpoint: it starts with b'epoch 3, best 0\.'\)"):
        load_checkpoint(tmp_path / "notes.pth")


def test_batchnorm_step_counters_left_out_or_infinite_are_loaded_as_pytorch_loads_them(tmp_path, tiny_state_dict):
    """Unused in eval mode: a float-only conversion leaves them out, fp16 makes 70000 steps infinite."""
    counters = [k for k in tiny_state_dict if k.endswith("num_batches_tracked")]
    assert counters
    half = {k: (torch.tensor(70000) if k in counters else v).half() for k, v in tiny_state_dict.items()}
    without = {k: v for k, v in tiny_state_dict.items() if k not in counters}
    reference = load_checkpoint(save(tiny_state_dict, tmp_path / "full.pth")).model
    x = torch.randn(2, 1, 32, 32)
    for name, state_dict in (("half", half), ("without", without)):
        model = load_checkpoint(save(state_dict, tmp_path / f"{name}.pth")).model
        assert torch.allclose(model(x), reference(x), atol=1e-2 if name == "half" else 0), name


def test_blocks_declared_without_weights_are_refused_before_any_model_is_built(tmp_path, tiny_state_dict, monkeypatch):
    # A few-KB file naming block 3000 used to build a 3001-block model (15 s, 550 MB) before being refused.
    from medmamba_edge.checkpoint import ModelConfig

    def refuse(self):
        raise AssertionError(f"built a model with depths {self.depths}")

    monkeypatch.setattr(ModelConfig, "build", refuse)
    deep = {k: v for k, v in tiny_state_dict.items() if not k.startswith("layers.0.blocks.")}
    deep["layers.0.blocks.3000.ln_1.weight"] = torch.ones(8)
    path = save(deep, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=r"deep\.pth: weights do not match .* missing keys: layers\.0\.blocks\.0\."):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [
    ("layers.0.blocks.0.ln_1.weight", torch.tensor(1.0)),
    ("layers.1.blocks.0.ln_1.weight", torch.ones(2, 16)),
    ("patch_embed.proj.weight", torch.ones(16, 1)),
    ("head.weight", torch.ones(3)),
    ("layers.0.blocks.0.self_attention.A_logs", torch.ones(16)),
    ("layers.0.blocks.0.ln_1.weight", torch.ones(0)),
])
def test_wrong_rank_weights_that_fix_the_architecture_are_named(tmp_path, tiny_state_dict, key, value):
    bad = dict(tiny_state_dict, **{key: value})
    rank = "1 dimension" if key.endswith("ln_1.weight") else r"\d dimensions"  # was "1 dimensions"
    with pytest.raises(CheckpointError, match=rf"bad\.pth: {key.replace('.', r'[.]')} has shape .*; expected {rank},"):
        load_checkpoint(save(bad, tmp_path / "bad.pth"))


def test_checkpoints_as_users_files_come_out_are_loaded_or_refused_in_one_line(tmp_path, tiny_state_dict):
    meta = save({k: torch.empty_like(v, device="meta") for k, v in tiny_state_dict.items()}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match=r"meta\.pth: its tensors have no data \(saved from the meta device\)$"):
        load_checkpoint(meta)
    diverged = dict(tiny_state_dict, **{"head.weight": tiny_state_dict["head.weight"].clone()})
    diverged["head.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"nan\.pth: head\.weight holds NaN or infinite values"):
        load_checkpoint(save(diverged, tmp_path / "nan.pth"))  # it had been blamed on ONNX Runtime at export
    whole = VSSM(depths=[1, 2, 1, 1], dims=[16, 32, 64, 128], num_classes=3, in_chans=1)
    with pytest.raises(CheckpointError, match=r"it holds a medmamba_edge\.model\.VSSM object, not only tensors .*"
                                              r"torch\.save\(net\.state_dict\(\), path\)"):
        load_checkpoint(save(whole, tmp_path / "whole.pth"))
    path = save(tiny_state_dict, tmp_path / "m.ckpt")
    (tmp_path / "ansi.json").write_bytes('["l\xe9sion", "b", "c"]'.encode("cp1252"))  # Notepad's "ANSI"
    with pytest.raises(CheckpointError, match=r"ansi\.json: cannot read class names \(not UTF-8 text: byte 0xe9"):
        load_checkpoint(path, classes=str(tmp_path / "ansi.json"))
    (tmp_path / "NAMES.JSON").write_bytes(b'\xef\xbb\xbf["a", "b", "c"]')  # a byte-order mark, an upper-case suffix
    assert load_checkpoint(path, classes=str(tmp_path / "NAMES.JSON")).class_names == ["a", "b", "c"]
    from medmamba_edge.loaders import open_model

    with open_model(path, input_size=32) as backend:  # a .ckpt is a checkpoint to run, evaluate and compare as well
        assert backend.run(torch.zeros(2, 1, 32, 32).numpy()).shape == (2, 3)
