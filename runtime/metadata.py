"""The one metadata schema every artifact carries (ONNX ``metadata_props``, engine manifests).

The exporter writes it, and everything downstream (runtime, quantizer, engine builder) reads
preprocessing and class names from it; nothing else hard-codes them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medmamba_edge.errors import UserError, plural

SCHEMA_VERSION = 1
METADATA_KEY = "medmamba_edge"
SCAN_FORMS = ("plugin", "portable")
# The input size `export` uses unless told, and that a bare .pth checkpoint runs at when nothing says otherwise.
DEFAULT_INPUT_SIZE = 224
PRECISIONS = ("fp32", "fp16", "int8")
# The names `medmamba-edge export` gives the graph's input and output; an engine built from it keeps them.
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class MetadataError(UserError, ValueError):
    """A model file without usable medmamba-edge metadata."""


def height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    """An input size as (height, width) of Python ints: an integer N (``--input-size N``, numpy's too) is N×N."""
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    return tuple(int(side) if isinstance(side, numbers.Integral) else side for side in pair)  # others stay, refused later


def int_at_least(value, least: int) -> bool:
    """An integer (numpy's too) of at least ``least``, not a bool: what a size, a count or a number of tries takes
    (1.5 or True would pass a comparison and mean something else)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def positive_int(value) -> bool:
    """An integer of at least 1 (``int_at_least``)."""
    return int_at_least(value, 1)


# ';' separates labels in DeepStream's label file and in the CSV's top_k; a line break (or any control
# character) would split a line of Triton's labels.txt; a lone surrogate, Python's spelling of an undecodable
# byte, cannot be written as UTF-8 at all.
_UNWRITABLE_CATEGORIES = {"Cc", "Zl", "Zp", "Cs"}


def class_names_problem(names) -> str | None:
    """Why ``names`` cannot label a model's outputs, or None: what every model's metadata must satisfy."""
    if not (isinstance(names, (tuple, list)) and names and all(isinstance(n, str) and n for n in names)):
        return f"class names must be a non-empty list of non-empty strings, got {names!r}"
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"class names must differ; {', '.join(map(repr, repeated))} is given more than once"
    return None


def too_few_classes(count: int) -> str | None:
    """Why a model of ``count`` outputs cannot be classified, or None. The runtime takes a softmax over the
    outputs: over a single one (a one-logit sigmoid model, trained with BCE instead of train.py's cross-entropy)
    it is 1, so every image would read 100 % that class."""
    if count < 2:
        return (f"the model has {plural(count, 'output')}; medmamba-edge classifies by a softmax over 2 or more "
                f"classes (as train.py trains them, with CrossEntropyLoss), and over one output every image would "
                f"read 100 %")
    return None


def unwritable_class_names(names) -> str | None:
    """Why ``names`` cannot go into every file a model's labels go to, or None. Checked where names are given
    (a checkpoint's, --classes) and where such files are written (export-triton); a model exported before this
    rule still runs."""
    unwritable = [n for n in names if ";" in n or any(unicodedata.category(c) in _UNWRITABLE_CATEGORIES for c in n)]
    if unwritable:
        return (f"class names must not contain ';', line breaks, other control characters or undecodable bytes, "
                f"got {', '.join(map(repr, unwritable))}")
    return None


# The channels preprocessing makes of an image (runtime/preprocess.py): grayscale or RGB.
IN_CHANS = (1, 3)


@dataclass(frozen=True)
class ModelMetadata:
    input_size: tuple[int, int]  # (height, width) the model was exported for
    class_names: tuple[str, ...]
    in_chans: int = 3
    channel_order: str = "RGB"
    # The official train.py: Resize((H, W)) on PIL images, ToTensor, Normalize(0.5, 0.5).
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resize: str = "bilinear"
    variant: str = "custom"
    depths: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()
    d_state: int = 16
    scan_form: str = "portable"
    batch: int | None = 1  # None: dynamic
    precision: str = "fp32"  # fp16: converted graph; int8: explicit Q/DQ from `quantize`
    source_checkpoint_sha256: str = ""
    tool_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        # Types and ranges first: a model whose metadata says "size 0" or "batch -1" must fail here, in one
        # line, not as an IndexError or ZeroDivisionError somewhere in preprocessing.
        if not (isinstance(self.input_size, (tuple, list)) and len(self.input_size) == 2
                and all(positive_int(v) for v in self.input_size)):
            raise MetadataError(f"input_size must be two positive integers (height, width), got {self.input_size!r}")
        problem = class_names_problem(self.class_names) or too_few_classes(len(self.class_names))
        if problem:
            raise MetadataError(problem)
        if not positive_int(self.in_chans) or self.in_chans not in IN_CHANS:
            raise MetadataError(f"in_chans must be 1 or 3, got {self.in_chans!r}")
        if self.channel_order != "RGB":  # the order preprocessing feeds (and the official train.py's PIL images)
            raise MetadataError(f"channel_order must be RGB, got {self.channel_order!r}")
        if self.resize != "bilinear":  # the one preprocessing does (PIL's, as train.py's Resize)
            raise MetadataError(f"resize must be bilinear, got {self.resize!r}")
        if self.batch is not None and not positive_int(self.batch):
            raise MetadataError(f"batch must be a positive integer, or null for a dynamic batch; got {self.batch!r}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (*self.mean, *self.std)):
            raise MetadataError(f"mean and std must be finite numbers, got {self.mean!r} / {self.std!r}")
        if self.scan_form not in SCAN_FORMS:
            raise MetadataError(f"scan_form must be one of {SCAN_FORMS}, got {self.scan_form!r}")
        if self.precision not in PRECISIONS:
            raise MetadataError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise MetadataError(f"mean/std need {plural(self.in_chans, 'value')}, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise MetadataError(f"std must be positive, got {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> ModelMetadata:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of over 4,300 digits, arrays too deep
            raise MetadataError(f"{source}: metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MetadataError(f"{source}: metadata must be a JSON object")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):  # "1" or null: a TypeError at the comparison
            raise MetadataError(f"{source}: metadata schema_version must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise MetadataError(
                f"{source}: metadata schema {data['schema_version']} is newer than this medmamba-edge "
                f"understands ({SCHEMA_VERSION}); upgrade medmamba-edge"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetadataError(f"{source}: unknown metadata fields {unknown}")
        tuples = {"input_size", "class_names", "mean", "std", "depths", "dims"}
        try:
            # Only lists become tuples: anything else where a list belongs is refused, by __post_init__ or as the
            # TypeError its checks raise on it (a number where mean's list belongs).
            return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()})
        except TypeError as exc:
            raise MetadataError(f"{source}: incomplete or mistyped metadata ({exc})") from None
        except MetadataError as exc:
            raise MetadataError(f"{source}: {exc}") from None

    def replace(self, **changes) -> ModelMetadata:
        return type(self)(**{**asdict(self), **changes})


def check_against_graph(metadata: ModelMetadata, input_shape, output_shape, source: str) -> None:
    """Refuse metadata that parses but does not fit the graph's input (N, C, H, W) and output (N, classes)
    shapes; a dimension the graph leaves open (a name, None, -1) fits anything."""
    def fixed(dim) -> bool:
        return isinstance(dim, int) and dim > 0

    problems = []
    if len(input_shape) != 4:
        problems.append(f"the graph's input has rank {len(input_shape)}, expected 4 (N, C, H, W)")
    else:
        batch, channels, height, width = input_shape
        if fixed(channels) and channels != metadata.in_chans:
            problems.append(f"in_chans is {metadata.in_chans} but the graph takes {plural(channels, 'channel')}")
        if (fixed(height) and height != metadata.input_size[0]) or (fixed(width) and width != metadata.input_size[1]):
            problems.append(f"input_size is {metadata.input_size[0]}×{metadata.input_size[1]} but the graph takes "
                            f"{height}×{width}")
        if fixed(batch) and metadata.batch != batch:
            problems.append(f"batch is {metadata.batch or 'dynamic'} but the graph's batch is {batch}")
    if len(output_shape) != 2:
        problems.append(f"the graph's output has rank {len(output_shape)}, expected 2 (N, classes)")
    elif fixed(output_shape[1]) and output_shape[1] != metadata.num_classes:
        problems.append(f"{plural(metadata.num_classes, 'class name')} but the graph outputs "
                        f"{plural(output_shape[1], 'class', 'classes')}")
    if problems:
        raise MetadataError(f"{source}: the metadata does not fit the model graph: {'; '.join(problems)}")


def load_onnx(path: str | Path, external_data: bool = True):
    """The ``onnx.ModelProto`` at ``path``, or a MetadataError saying why it cannot be read. Read once by whoever
    needs both the graph and the metadata: a model replaced between two reads (an export renames a new file over
    it) would pair one file's metadata with the other's graph."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on how the file is broken
        # An OSError's strerror alone: its str() names the path again (read_onnx_metadata says it so too).
        raise MetadataError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                            f"{getattr(exc, 'strerror', None) or exc})") from None


def graph_inputs(model) -> list:
    """An ``onnx.ModelProto``'s graph inputs that are not weights (an initializer may be listed as an input too)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


# Standard ONNX ops of a QOperator model (`quantize --format qoperator`) that TensorRT's ONNX parser does not take
# (its operator table lists them as unsupported; it takes INT8 as Q/DQ pairs).
ONNX_RUNTIME_ONLY_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"})


def onnx_runtime_only_ops(model) -> list[str]:
    """The op types of an ``onnx.ModelProto``'s graph that only ONNX Runtime runs (com.microsoft's contrib ops and
    ONNX_RUNTIME_ONLY_OPS), sorted: what keeps it from TensorRT."""
    return sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft" or n.op_type in ONNX_RUNTIME_ONLY_OPS})


def graph_shapes(model) -> tuple[list[int], list[int]]:
    """The input and output shapes of an ``onnx.ModelProto``'s graph (its first ``graph_inputs``, its first
    output), -1 where a dimension is open: what check_against_graph takes."""
    graph_input = graph_inputs(model)[0]
    return tuple([d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                 for value in (graph_input, model.graph.output[0]))


def _varint(file) -> int | None:
    """A protobuf varint from ``file``; None at the end of the file, before its first byte."""
    value = shift = 0
    while byte := file.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
    if shift:
        raise ValueError("the file ends inside a varint")
    return None


def _string_pair(entry: bytes) -> tuple[str, str]:
    """A StringStringEntryProto's key (field 1) and value (field 2)."""
    import io

    found, stream = {1: "", 2: ""}, io.BytesIO(entry)
    while (tag := _varint(stream)) is not None:
        if tag & 7 != 2:
            raise ValueError(f"a metadata entry's field {tag >> 3} of wire type {tag & 7}")
        found[tag >> 3] = _proto_text(stream.read(_varint(stream) or 0))
    return found[1], found[2]


def _proto_text(value: bytes | str) -> str:
    """A protobuf string field as onnx and ONNX Runtime take it: proto2 strings may hold any bytes (another tool's
    entry in Latin-1), kept as surrogate escapes rather than refused; protobuf hands such a field over as bytes."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def onnx_metadata_props(path: str | Path) -> tuple[dict[str, str], bool]:
    """A model file's metadata_props (ModelProto field 14) and whether it holds a graph (field 7), from its top-level
    fields alone: the graph and its weights are passed over, not parsed. The metadata of a 58 MB model without
    importing onnx (a second, most of it ml_dtypes) or holding the model beside ONNX Runtime's own copy of it."""
    props, has_graph = {}, False
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        while (tag := _varint(file)) is not None:
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                if _varint(file) is None:
                    raise ValueError("the file ends inside a field")
                continue
            length = {1: 8, 5: 4}.get(wire) if wire != 2 else _varint(file)
            if length is None or field == 0:
                raise ValueError(f"field {field} of wire type {wire}: not a protobuf message")
            if file.tell() + length > size:
                raise ValueError(f"field {field} runs past the end of the file (truncated?)")
            has_graph |= field == 7 and wire == 2
            if field == 14 and wire == 2:
                key, value = _string_pair(file.read(length))
                props[key] = value
            else:
                file.seek(length, os.SEEK_CUR)
    return props, has_graph


def read_onnx_metadata(model_or_path, source: str | Path = "model") -> ModelMetadata:
    """The metadata of an ONNX model (a path, or a loaded ``onnx.ModelProto`` read from ``source``)."""
    if isinstance(model_or_path, (str, Path)):
        source = str(model_or_path)
        try:
            props, has_graph = onnx_metadata_props(source)
        except (OSError, ValueError) as exc:  # ValueError: bytes that are no protobuf message
            raise MetadataError(f"{source}: not a readable ONNX model ({type(exc).__name__}: "
                                f"{getattr(exc, 'strerror', None) or exc})") from None
    else:
        props, has_graph = _model_props(model_or_path), model_or_path.HasField("graph")
    if not has_graph:  # what protobuf makes of an empty file, and of some other bytes
        raise MetadataError(f"{source}: not an ONNX model (the file is empty or holds no graph)")
    if METADATA_KEY not in props:
        raise MetadataError(
            f"{source}: no medmamba-edge metadata (metadata_props[{METADATA_KEY!r}]); "
            f"export it with `medmamba-edge export`"
        )
    try:
        props[METADATA_KEY].encode("utf-8")
    except UnicodeEncodeError:  # bytes the file reader kept as escapes: not JSON text that names classes
        raise MetadataError(f"{source}: its medmamba-edge metadata is not UTF-8 text; export it again") from None
    return ModelMetadata.from_json(props[METADATA_KEY], source)


def _model_props(model) -> dict[str, str]:
    """An ``onnx.ModelProto``'s metadata_props, as the file reader (onnx_metadata_props) reads them."""
    return {_proto_text(entry.key): _proto_text(entry.value) for entry in model.metadata_props}


def remove_onnx_metadata(model) -> None:
    """Remove our metadata from an ``onnx.ModelProto`` in place."""
    # Other entries stay where they are, untouched: one in non-UTF-8 bytes cannot be assigned back.
    for index in reversed(range(len(model.metadata_props))):
        if _proto_text(model.metadata_props[index].key) == METADATA_KEY:
            del model.metadata_props[index]


def write_onnx_metadata(model, metadata: ModelMetadata) -> None:
    """Set (replace) the metadata of an ``onnx.ModelProto`` in place."""
    remove_onnx_metadata(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
