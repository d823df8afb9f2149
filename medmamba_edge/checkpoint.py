"""Load MedMamba checkpoints written by the official ``train.py`` (or wrapped, DataParallel, compiled or
Lightning variants).

The architecture is read off the weights, so users never restate depths, dims or the class count.
Loading is ``torch.load(weights_only=True)``: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmamba_edge.runtime.backends import ONNX_SUFFIXES, is_checkpoint_name
from medmamba_edge.runtime.files import sha256_file
from medmamba_edge.runtime.metadata import (IN_CHANS, ModelMetadata, class_names_problem, too_few_classes,
                                             unwritable_class_names)
from medmamba_edge.runtime.shared_change import SharedChange, ignored_warnings

from . import __version__
from .errors import UserError, clipped, first_line, plural
from .model import VSSM, SS_Conv_SSM, variant_name

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net")
CLASS_INDEX_FILE = "class_indices.json"
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass
class ModelConfig:
    depths: list[int]
    dims: list[int]
    num_classes: int
    in_chans: int = 3
    patch_size: int = 4
    d_state: int = 16
    patch_norm: bool = True

    @property
    def variant(self) -> str:
        return variant_name(self.depths, self.dims) or "custom"

    def build(self) -> VSSM:
        return VSSM(patch_size=self.patch_size, in_chans=self.in_chans, num_classes=self.num_classes,
                    depths=self.depths, dims=self.dims, d_state=self.d_state, patch_norm=self.patch_norm)


@dataclass
class LoadedCheckpoint:
    model: VSSM
    config: ModelConfig
    class_names: list[str]
    path: Path
    sha256: str

    def metadata(self, input_size: tuple[int, int], scan_form: str, batch: int | None) -> ModelMetadata:
        """What an export of this checkpoint carries; preprocessing is the official train.py's. Raises
        CheckpointError for an input too small to leave every stage a token (patch embedding, then a 2× merge
        per stage after the first)."""
        config, minimum = self.config, self.model.min_input_size()
        if min(input_size) < minimum:
            raise CheckpointError(f"{self.path}: input size {tuple(input_size)} is too small; the model needs at least {minimum}")
        return ModelMetadata(
            input_size=tuple(input_size),
            class_names=tuple(self.class_names),
            in_chans=config.in_chans,
            mean=(0.5,) * config.in_chans,
            std=(0.5,) * config.in_chans,
            variant=config.variant,
            depths=tuple(config.depths),
            dims=tuple(config.dims),
            d_state=config.d_state,
            scan_form=scan_form,
            batch=batch,
            source_checkpoint_sha256=self.sha256,
            tool_version=__version__,
        )


def _data_globals() -> list:
    """What training scripts save beside the weights that only rebuilds data, allowed by name to weights_only's
    unpickler (nothing else it would construct is): timm's CheckpointSaver stores its argparse Namespace ("args"),
    other scripts a numpy metric (best_acc) with its dtype, Lightning the paths among the module's hyper-parameters.
    numpy 1 named the scalar numpy.core.multiarray.scalar."""
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2, numpy 1
    dtypes = [cls for cls in vars(getattr(np, "dtypes", object)).values()  # np.dtypes: numpy >= 1.25
              if isinstance(cls, type) and issubclass(cls, np.dtype) and isinstance(getattr(cls, "type", None), type)
              and issubclass(cls.type, (np.number, np.bool_))]
    # Lightning's save_hyperparameters keeps the paths given to the module (data_dir=Path(...)); a path rebuilds as
    # its text. A WindowsPath cannot be made elsewhere, so it loads as the pure path it names; Python 3.13 pickles
    # paths from pathlib._local.
    paths = [(cls, f"{module}.{name}") for module in ("pathlib", "pathlib._local")
             for cls, name in ((pathlib.PurePosixPath, "PurePosixPath"), (pathlib.PureWindowsPath, "PureWindowsPath"),
                               (pathlib.PosixPath if os.name == "posix" else pathlib.PurePosixPath, "PosixPath"),
                               (pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath, "WindowsPath"))]
    return [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"), *dtypes, *paths]


def _allow_data_globals(undo: contextlib.ExitStack) -> None:
    """_data_globals allowed to torch's weights_only unpickler. Only those not allowed already: torch's
    safe_globals removes on exit what it was given, and would take an allowance the application embedding us had
    made itself (add_safe_globals([PosixPath])) with ours."""
    allowed = torch.serialization.get_safe_globals()
    undo.enter_context(torch.serialization.safe_globals([g for g in _data_globals() if g not in allowed]))


# torch's allowances are the process's, not a thread's: two loads at once share one, or the first to finish would
# take it from the other mid-load (a Lightning checkpoint's paths then refused).
_data_globals_allowed = SharedChange(_allow_data_globals)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in a checkpoint file, unwrapped and without wrapper prefixes."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    if stat.S_ISDIR(info.st_mode):  # the checkpoints in it, by the names the runtime opens as checkpoints
        inside = sorted(p.name for p in path.glob("*") if is_checkpoint_name(p))[:3]
        raise CheckpointError(f"{path}: a folder, not a checkpoint file"
                              + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not stat.S_ISREG(info.st_mode):  # torch.load seeks: a pipe or process substitution (<(…)) cannot be read
        raise CheckpointError(f"{path}: not a regular file (a pipe or device); save the checkpoint to a file")
    if info.st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        with open(path, "rb") as file:
            head = file.read(32)
    except OSError as exc:  # no read permission (a file copied from another user's run): before torch's own open
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if _bare_pickle(head):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (a bare pickle, as pickle.dump writes it, not "
                              f"torch.save's format); save the weights with torch.save(net.state_dict(), path)")
    _check_crcs(path)
    try:
        # ignored: e.g. on a bare pickle, a warning that would come before our one line
        with ignored_warnings(), _data_globals_allowed():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the line naming the blocked global or bad opcode is what matters.
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(exc), re.IGNORECASE)
        if blocked:
            raise CheckpointError(
                f"{path}: refused to load: the pickle wants to call {blocked.group(1)} (loaded with "
                f"weights_only=True; medmamba-edge never runs code from a model file)"
            ) from None
        # torch's other wordings: an object (a whole nn.Module, argparse's Namespace before it was allowed) beside or
        # instead of the tensors, which loading would have to construct; or one built from an allowed global (a numpy
        # scalar of a str or datetime64 dtype, which are not allowed).
        other = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(exc))
        if other:
            raise CheckpointError(
                f"{path}: refused to load: it holds a {other.group(1) or other.group(2)} object, not only tensors (loaded with "
                f"weights_only=True); save the weights with torch.save(net.state_dict(), path)"
            ) from None
        if re.search(r"Unsupported operand 149\b", str(exc)) and _pickle_protocol(path) >= 4:  # FRAME: torch's
            # weights_only unpickler has none; a byte 149 in a protocol 2 pickle is damage, not a frame
            raise CheckpointError(
                f"{path}: not readable with weights_only=True (saved with pickle_protocol 4 or later, whose frames "
                f"torch.load reads only with weights_only=False); save the weights with torch.save's default "
                f"protocol: torch.save(net.state_dict(), path)"
            ) from None
        why = _what_else(path, "not a tensor-only pickle")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({why})") from None
    except Exception as exc:  # torch's unpickler raises whatever the garbage triggers (IndexError, EOFError, ...)
        cause = f"{type(exc).__name__}: {_first_sentence(first_line(exc))}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_what_else(path, cause)})") from None

    if isinstance(obj, dict) and not is_state_dict(obj):  # the first wrapper key holding one (a "model" key may
        obj = next((obj[key] for key in WRAPPER_KEYS if is_state_dict(obj.get(key))), obj)  # hold a config)
    if not is_state_dict(obj):
        raise CheckpointError(
            f"{path}: expected a state_dict (name → tensor), optionally under one of {list(WRAPPER_KEYS)}; "
            f"got {_held_instead(obj)}"
        )
    return _model_keys(obj, path)


def is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _held_instead(obj) -> str:
    """What a file holds where a state_dict belongs. Among tensors, the entries that are not (an epoch count saved
    into the state_dict): the first keys alone listed only weights, and did not show what kept it from being one.
    Under a wrapper key, what that holds: the keys alone ('model, epoch') did not show it."""
    if not (isinstance(obj, dict) and obj):
        return type(obj).__name__
    others = [f"{key} ({type(value).__name__})" for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if len(others) < len(obj):
        return (f"a dict of {plural(len(obj) - len(others), 'tensor')} and "
                f"{plural(len(others), 'other entry', 'other entries')}: "
                f"{', '.join(others[:8])}{' …' if len(others) > 8 else ''}")
    wrappers = [key for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)]
    # the one holding tensors before the first: a "model" key may hold a config beside the weights' "state_dict"
    wrapper = next((key for key in wrappers if any(isinstance(v, torch.Tensor) for v in obj[key].values())),
                   wrappers[0] if wrappers else None)
    if wrapper is None and (other := next((key for key, value in obj.items() if is_state_dict(value)), None)):
        # weights under a key of the trainer's own (an EMA-only save: "ema", "model_ema"), which may not be the
        # weights as trained, so the user picks them
        return (f"a dict of {', '.join(map(str, list(obj)[:8]))}; under {other!r}, a state_dict: to export it, "
                f"save it alone: torch.save(torch.load(path)[{other!r}], 'weights.pth')")
    return (f"a dict of {', '.join(map(str, list(obj)[:8]))}"
            + (f"; under {wrapper!r}, {_held_instead(obj[wrapper])}" if wrapper else ""))


def _bare_pickle(head: bytes) -> bool:
    """Whether the file is a pickle without the magic number torch.save's legacy format pickles first, which
    torch.load never reads: its refusal told such a file as 'Invalid magic number; corrupt file?', or, for tensors
    pickled by pickle.dump, as one holding 'a torch.storage._load_from_bytes object, not only tensors'. ``head``:
    the file's first 32 bytes."""
    magic = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")  # LONG1 of 10 bytes
    cut_legacy = (b"\x80\x02" + magic).startswith(head)  # a legacy file cut within its magic: torch says it is cut
    return head.startswith(b"\x80") and magic not in head and not cut_legacy  # PROTO, (4+: a FRAME), the magic


def _pickle_protocol(path: Path) -> int:
    """The protocol the checkpoint's pickle declares (its PROTO opcode; 0 where there is none): in a zip, data.pkl's,
    in a legacy file its first pickle's, which torch.save writes with the same protocol."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            head = archive.open(name).read(2) if name else b""
    except zipfile.BadZipFile:
        with open(path, "rb") as file:
            head = file.read(2)
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else 0


def _check_crcs(path: Path) -> None:
    """torch.load reads a zip checkpoint's records without their CRC-32: bytes damaged in place (a bad copy, bit
    rot) loaded as other weights, and export verified the damaged model against itself. 0.1 s for 58 MB."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # a legacy (non-zip) checkpoint, one cut short, an encrypted record: torch.load says which
        return
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt: its record {damaged} fails its CRC check (copy or download the "
                              f"checkpoint again)")


def _first_sentence(text: str, limit: int = 200) -> str:
    end = text.find(". ")
    return clipped(text[:end + 1] if 0 <= end < limit else text, limit)


def _what_else(path: Path, cause: str) -> str:
    """What a file torch cannot read is instead, where its first bytes say: a clone without git-lfs has pointers
    where the weights should be, a download link saved as a page has HTML; a cut copy says why torch stopped."""
    with open(path, "rb") as file:
        raw = file.read(64)
    head = raw.lstrip()
    if _is_safetensors(raw, path):  # what Accelerate's save_model and Hugging Face write by default
        return ("a safetensors file, not torch.save's format: convert it with torch.save(safetensors.torch."
                "load_file(path), 'model.pth')")
    if Path(path).suffix.lower() in ONNX_SUFFIXES and raw[:1] == b"\x08":  # ModelProto's ir_version, field 1
        return ("an ONNX model, an export's output perhaps: export reads the .pth file train.py saves; give this "
                "one to run, quantize or build-engine")
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights: run `git lfs pull` where it was cloned"
    if head[:1] == b"<":
        return "an HTML or XML page, not the weights (a download that saved the web page?)"
    if b"PK\x03\x04".startswith(raw[:4]) and not zipfile.is_zipfile(path):
        # torch.save's zip ends in its central directory, which a copy cut short lacks; torch's reason then depends
        # on where the cut is ('not a ZIP archive', 'Invalid argument' below 64 KB)
        return "truncated or corrupt: a zip without its end (its central directory), as a copy cut short leaves it"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a pickle (legacy torch files)
        return f"not a PyTorch checkpoint: it starts with {head[:16]!r}"
    if other_zip := _zip_of_other_files(path):
        return other_zip
    if re.search(r"EOF|unexpected end|unpack requires a buffer", cause, re.IGNORECASE):  # a legacy file cut short
        return f"truncated or corrupt: {cause.rstrip(': ')}"
    return cause


def _is_safetensors(head: bytes, path: Path) -> bool:
    """A safetensors file: the length of its JSON header (8 bytes, little-endian), then the header, within the file."""
    size = int.from_bytes(head[:8], "little")
    return head[8:10] in (b'{"', b"{}") and size <= os.path.getsize(path) - 8


def _zip_of_other_files(path: Path) -> str | None:
    """What a whole zip archive holds where torch.save's (its records under one folder, with data.pkl) would be: a
    checkpoint zipped for sending, a data set's archive, a TorchScript model (torch.jit.save's zip, with its code).
    torch says only "[enforce fail at inline_container.cc:180]" or 'Expected hasRecord("version")'."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # cut short or damaged: torch's own cause says more
        return None
    if any(re.fullmatch(r"[^/]+/constants\.pkl", name) for name in names):  # torch.jit.save's, beside its data.pkl
        return ("a TorchScript archive (torch.jit.save), not a state_dict, and torch.load reads none with "
                "weights_only=True: save the weights with torch.save(net.state_dict(), path)")
    if any(re.fullmatch(r"[^/]+/data\.pkl", name) for name in names):
        return None
    held = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") if names else "nothing"
    return f"a zip archive of other files, not one torch.save wrote: it holds {held}"


def _model_keys(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The model's own tensors, named as VSSM names them. DataParallel (``module.``), torch.compile
    (``_orig_mod.``), a Lightning module's attribute (``model.``, ``net.``) or a nesting of them put the same
    prefix before every model key, so the prefix is read off the patch embedding's weight rather than listed.
    Under a prefix, keys outside it belong to the wrapper (a loss's class weights, a metric's state)."""
    anchor = "patch_embed.proj.weight"
    prefixes = sorted(k[:-len(anchor)] for k in state_dict
                      if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == "."))
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{path}: holds {len(prefixes)} models' weights (under "
            f"{', '.join(repr(p) if p else '(no prefix)' for p in prefixes)}); "
            f"save the one to export with torch.save(net.state_dict(), path)"
        )
    if not prefixes or not prefixes[0]:
        return state_dict  # infer_config names what is missing, or the keys are already the model's
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _shape(state_dict: dict[str, torch.Tensor], key: str, rank: int, path: Path) -> tuple[int, ...]:
    shape = tuple(state_dict[key].shape)
    if len(shape) != rank or 0 in shape:
        raise CheckpointError(f"{path}: {key} has shape {shape}; expected {plural(rank, 'dimension')}, none of them 0")
    return shape


def _is_step_counter(key: str) -> bool:
    """BatchNorm's count of training steps: unused by a model in eval mode, so a checkpoint may lack it."""
    return key.endswith("num_batches_tracked")


def _check_block_count(blocks: dict[int, set[int]], state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every block up to the highest index has its weights. Depths come from that index, so without this a
    few-KB file naming ``layers.0.blocks.3000`` builds a 3001-block model before its keys are compared."""
    with torch.device("meta"):
        names = SS_Conv_SSM(hidden_dim=2).state_dict().keys()
    absent = [f"layers.{stage}.blocks.{index}.{name}" for stage, numbered in sorted(blocks.items())
              for index in range(max(numbered) + 1) for name in names
              if f"layers.{stage}.blocks.{index}.{name}" not in state_dict and not _is_step_counter(name)]
    if absent:
        raise CheckpointError(_describe_key_mismatch(path, absent, []))


def infer_config(state_dict: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    required = ("patch_embed.proj.weight", "head.weight")
    missing = [k for k in required if k not in state_dict]
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    # MedMamba's blocks by their convolution branch: a Swin backbone (timm's, its classifier under head.fc) has
    # patch_embed.proj and layers.*.blocks.* too
    if missing == ["head.weight"] and any(".conv33conv33conv11." in key for key in state_dict):
        raise CheckpointError(f"{path}: a MedMamba backbone without its classifier (no head.weight, as VSSM built with "
                              f"num_classes=0 saves it): export and run need the weights of a trained head")
    if missing or not blocks:
        sample = ", ".join(sorted(state_dict)[:6])
        raise CheckpointError(
            f"{path}: not a MedMamba (VSSM) checkpoint: missing "
            f"{', '.join(missing) if missing else 'layers.*.blocks.*'}; found keys such as {sample}"
        )
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"{path}: stages {stages} are not numbered 0..{len(stages) - 1}")
    _check_block_count(blocks, state_dict, path)
    depths = [max(blocks[i]) + 1 for i in stages]
    dims = []
    for i in stages:
        key = f"layers.{i}.blocks.0.ln_1.weight"
        if key not in state_dict:
            raise CheckpointError(f"{path}: not a MedMamba (VSSM) checkpoint: missing {key}")
        dims.append(2 * _shape(state_dict, key, 1, path)[0])
    proj = _shape(state_dict, "patch_embed.proj.weight", 4, path)
    if proj[1] not in IN_CHANS:
        raise CheckpointError(f"{path}: the model takes {proj[1]}-channel input (patch_embed.proj.weight); images are "
                              f"fed as 1 (grayscale) or 3 (RGB) channels")
    num_classes = _shape(state_dict, "head.weight", 2, path)[0]
    if problem := too_few_classes(num_classes):
        raise CheckpointError(f"{path}: head.weight: {problem}")
    a_logs = "layers.0.blocks.0.self_attention.A_logs"
    return ModelConfig(
        depths=depths,
        dims=dims,
        num_classes=num_classes,
        in_chans=proj[1],
        patch_size=proj[2],
        d_state=_shape(state_dict, a_logs, 2, path)[1] if a_logs in state_dict else 16,
        patch_norm="patch_embed.norm.weight" in state_dict,
    )


def _describe_key_mismatch(path: Path, missing: list[str], unexpected: list[str]) -> str:
    def head(keys: list[str]) -> str:
        shown = ", ".join(keys[:5])
        return f"{shown} (+{len(keys) - 5} more)" if len(keys) > 5 else shown

    parts = []
    if missing:
        parts.append(f"missing keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected)}")
    return f"{path}: weights do not match the MedMamba architecture: " + "; ".join(parts)


def read_class_names(path: Path, num_classes: int) -> list[str] | None:
    """Class names from an official ``class_indices.json`` ({"0": "name", ...}) or a JSON list."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is fine
    except UnicodeDecodeError as exc:  # Notepad's "ANSI" (cp1252), GBK: save it as UTF-8
        raise CheckpointError(f"{path}: cannot read class names (not UTF-8 text: byte 0x{exc.object[exc.start]:02x}"
                              f"; save it as UTF-8)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read class names ({exc})") from None
    if isinstance(data, dict):
        try:
            names = [data[str(i)] for i in range(len(data))]
        except KeyError:
            raise CheckpointError(f"{path}: keys must be \"0\"..\"{len(data) - 1}\", got {sorted(data)}") from None
    elif isinstance(data, list):
        names = data
    else:
        raise CheckpointError(f"{path}: expected a JSON object {{\"0\": name, ...}} or a list of names")
    return _checked_names(names, num_classes, path, "")


def _checked_names(names: list, num_classes: int, where, given: str) -> list[str]:
    """``names`` if they can label the model's outputs: one per output, by the metadata's rule (no two alike: a
    data set's folder or label would map to two outputs)."""
    problem = class_names_problem(names) or unwritable_class_names(names)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    if len(names) != num_classes:
        raise CheckpointError(f"{where}: {plural(len(names), 'class name')} {given}but the model has "
                              f"{plural(num_classes, 'output')}")
    return list(names)


def _names_file(classes: str | list[str] | None) -> Path | None:
    """--classes when it names a JSON file (NAMES.JSON too), else None."""
    return Path(classes) if isinstance(classes, str) and Path(classes).suffix.lower() == ".json" else None


def class_names_files(checkpoint: Path, classes: str | list[str] | None) -> list[Path]:
    """The JSON files the class names of ``checkpoint`` may be read from: --classes', and the one beside it."""
    return [p for p in (_names_file(classes), Path(checkpoint).with_name(CLASS_INDEX_FILE)) if p is not None]


def resolve_class_names(checkpoint: Path, num_classes: int, classes: str | list[str] | None) -> list[str]:
    """User's names (a list, a comma-separated string or a JSON file) > class_indices.json beside the
    checkpoint > ``class_0..``."""
    if _names_file(classes):
        return read_class_names(_names_file(classes), num_classes)
    if isinstance(classes, str):
        if "," not in classes and Path(classes).is_file():  # labels.txt, say: its path would be one class's name
            raise CheckpointError(f"--classes {classes}: class names are read from a JSON file (*.json: train.py's "
                                  "class_indices.json, or a list); otherwise give them as NAME,NAME,...")
        classes = [c.strip() for c in classes.split(",")]
    if classes is not None:
        return _checked_names(list(classes), num_classes, checkpoint, "given ")
    beside = Path(checkpoint).with_name(CLASS_INDEX_FILE)
    if beside.is_file():
        try:
            return read_class_names(beside, num_classes)
        except CheckpointError as exc:  # a file nobody named: a folder shared by runs with other classes
            raise CheckpointError(f"{exc} (read as the checkpoint's class names, being beside it; --classes gives "
                                  f"others)") from None
    return [f"class_{i}" for i in range(num_classes)]


def load_checkpoint(path: str | Path, classes: str | list[str] | None = None) -> LoadedCheckpoint:
    """Build the model the checkpoint describes, load it strictly, and put it in eval mode."""
    path = Path(path)
    state_dict = read_state_dict(path)
    config = infer_config(state_dict, path)
    try:
        # Shapes are compared on the meta device first: widths read off one tensor of a small file could
        # otherwise allocate gigabytes before the other tensors show that they do not fit.
        with torch.device("meta"):
            expected = config.build().state_dict()
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    # The step counters: left out by float-only conversions, infinite in fp16 past 65504 steps (100 epochs of 700).
    # PyTorch loads such files; so do we, with the model's own counters.
    counters = {key for key in expected if _is_step_counter(key)}
    state_dict = {key: value for key, value in state_dict.items() if key not in counters}
    missing = sorted(set(expected) - set(state_dict) - counters)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(_describe_key_mismatch(path, missing, unexpected))
    for key, tensor in expected.items():
        if key in state_dict and state_dict[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)} "
                f"for depths {config.depths} dims {config.dims}"
            )
    if any(t.is_meta for t in state_dict.values()):
        raise CheckpointError(f"{path}: its tensors have no data (saved from the meta device)")
    broken = next((k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken:  # else every output is NaN, and an export's verification would blame ONNX Runtime
        raise CheckpointError(f"{path}: {broken} holds NaN or infinite values (did the training diverge?)")
    model = config.build()
    own = model.state_dict()  # once: each call builds an entry for every tensor
    model.load_state_dict({**{key: own[key] for key in counters}, **state_dict}, strict=True)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        config=config,
        class_names=resolve_class_names(path, config.num_classes, classes),
        path=path,
        sha256=sha256_file(path),
    )
