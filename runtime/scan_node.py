"""The contract of the ``SS2DScan`` ONNX node: SS2D's four-direction selective scan as one node, shared by the
exporter, the portable lowering, the CPU kernel (ONNX Runtime custom op), the CUDA kernel and the TensorRT plugin.

SS2D (MedMamba's 2-D selective scan) reads its feature map in four orders: k=0 row-major, k=1 column-major,
k=2 and k=3 the same reversed. Its projections act per position, so they commute with the orders: the exporter
computes ``x_dbl`` once, on the map as it is, with one constant-weight GEMM for all four directions (a 1×1 Conv:
medmamba_edge/model.py says why), and the node walks each direction's positions by index and sums the four
outputs into one ``y``.

Inputs, in order (H·W = L; D channels; N = d_state; R = dt_rank; K = 4 directions):
  x                (batch, D, H, W)        the depthwise conv's SiLU output, channel-first, as the conv writes it
  x_dbl            (batch, K·(R+2N), L)     per direction k the rows [k·(R+2N), (k+1)·(R+2N)): dt_low (R), B (N),
                                            C (N), each at position p = h·W + w (row-major), not in scan order
  dt_projs_weight  (K, D, R)   float32
  dt_projs_bias    (K, D)      float32
  A                (K·D, N)    float32      -exp(A_logs)
  Ds               (K·D,)      float32
Output: y (batch, H, W, D), channel-last as ``out_norm`` reads it, dtype of x.

Direction k visits positions in the order seq_k(t), t = 0..L-1:
  seq_0(t) = t;  seq_1(t) = (t mod H)·W + t div H;  seq_2(t) = seq_0(L-1-t);  seq_3(t) = seq_1(L-1-t).
For each k, channel d (c = k·D + d), with p = seq_k(t) and h_{-1} = 0:
  delta = dt_projs_bias[k,d] + sum_r dt_projs_weight[k,d,r]·dt_low_k[r,p];  softplus(delta) if delta_softplus
          (x itself above SOFTPLUS_THRESHOLD, as PyTorch and mamba_ssm)
  h_t[n] = exp(delta·A[c,n])·h_{t-1}[n] + delta·B_k[n,p]·x[d,p]
  y_k[d,p] = sum_n C_k[n,p]·h_t[n] + Ds[c]·x[d,p]
  y[p,d] = y_0[d,p] + y_1[d,p] + y_2[d,p] + y_3[d,p]
State and accumulation are float32 whatever the input dtype (float16 in TensorRT's FP16 engines).

Attributes: ``delta_softplus`` (int 0/1) plus ``plugin_version`` and ``plugin_namespace``, which TensorRT's ONNX
parser uses to find our IPluginV3 creator (``plugins/selective_scan``) by name, version and namespace; the
namespace's presence also makes TensorRT >= 10.15 prefer the plugin. Version 2 replaced version 1's
``SelectiveScan`` (one direction-stacked scan between Transpose/flip/Concat/Slice glue): models exported before
must be exported again.
"""

DOMAIN = "medmamba_edge"
DOMAIN_VERSION = 1
OP_TYPE = "SS2DScan"
PLUGIN_VERSION = "2"
PLUGIN_NAMESPACE = "medmamba_edge"
NUM_DIRECTIONS = 4
INPUT_NAMES = ("x", "x_dbl", "dt_projs_weight", "dt_projs_bias", "A", "Ds")
# Weights of the node: float32 in every precision (float16.py keeps them so; TensorRT's plugin reads them so).
FLOAT32_INPUTS = ("dt_projs_weight", "dt_projs_bias", "A", "Ds")
# Attributes that become plugin fields (PluginFieldCollection); TensorRT's parser consumes the other two.
FIELD_ATTRIBUTES = ("delta_softplus",)
# mamba_ssm's kernel and torch.nn.functional.softplus both return x unchanged above this.
SOFTPLUS_THRESHOLD = 20.0
# The native ONNX Runtime library implementing the node on the CPU (runtime/csrc/ort_custom_ops.c), without its
# platform suffix: runtime/backends/onnxruntime/custom_ops.py loads it, exporters/triton_repository.py ships it
# to Triton.
ORT_OPS_LIBRARY = "libmedmamba_ort_ops"


def node_attributes(delta_softplus: bool) -> dict[str, int | str]:
    """Every attribute of an SS2DScan node, as the exporter writes it: the plugin's fields, then the two TensorRT's
    parser consumes."""
    fields = dict(zip(FIELD_ATTRIBUTES, (int(delta_softplus),), strict=True))  # a field added must be given here
    return {**fields, "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


def delta_softplus(node) -> bool:
    """An SS2DScan node's ``delta_softplus``: absent means 1; anything but an int 0 or 1 is refused (ValueError), as
    the ONNX Runtime op and the TensorRT plugin refuse it, where reading a float's int field would give 0."""
    attribute = next((a for a in node.attribute if a.name == "delta_softplus"), None)
    if attribute is None:
        return True
    if attribute.type != 2 or attribute.i not in (0, 1):  # 2: onnx.AttributeProto.INT (no onnx import here)
        raise ValueError(f"{OP_TYPE} node {node.name!r}: delta_softplus must be an int (0 or 1)")
    return bool(attribute.i)


def is_scan_node(node) -> bool:
    """Whether an ``onnx.NodeProto`` is an SS2DScan node of ours."""
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def has_scan_nodes(model) -> bool:
    """Whether an ``onnx.ModelProto``'s graph holds SS2DScan nodes (the plugin form) or none (the portable form)."""
    return any(is_scan_node(n) for n in model.graph.node)


def retired_scan_node(model) -> str | None:
    """Why the graph cannot run here, if it carries a node of ours from another contract (version 1's
    ``SelectiveScan``, or an SS2DScan of another plugin_version); None when it can."""
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        # bytes that are not UTF-8 (another tool's edit) ended the refusal in a UnicodeDecodeError's traceback
        version = next((a.s.decode(errors="backslashreplace") for a in node.attribute if a.name == "plugin_version"),
                       None)
        if node.op_type != OP_TYPE or version not in (None, PLUGIN_VERSION):
            # Version 1 (SelectiveScan) is the one contract before this; any other is a later medmamba-edge's or an
            # edit, which "no longer runs" would misdate.
            retired = node.op_type != OP_TYPE or version == "1"
            return (f"it holds a {node.op_type} node of plugin version {version or '?'}, which this medmamba-edge "
                    f"(plugin version {PLUGIN_VERSION}, {OP_TYPE}) {'no longer runs' if retired else 'does not run'}; "
                    f"export it again from its checkpoint{'' if retired else ' with this medmamba-edge'}")
    return None


def scan_order(height: int, width: int):
    """seq_k for k = 0..3 as four int64 NumPy arrays of length H·W: the positions each direction visits, in order.
    The one statement of the orders every implementation (and its tests) indexes by."""
    import numpy as np

    length = height * width
    t = np.arange(length, dtype=np.int64)
    row_major, column_major = t, (t % height) * width + t // height
    return row_major, column_major, row_major[::-1].copy(), column_major[::-1].copy()
