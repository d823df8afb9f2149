"""The contract of the ``SelectiveScan`` ONNX node, shared by the exporter, the runtime and the plugin.

Inputs, in order: u (batch, K·D, L); delta (batch, K·D, L); A (K·D, N) float32; B, C (batch, G, N, L);
D (K·D,) float32; delta_bias (K·D,) float32. Output: y (batch, K·D, L), dtype of u. G divides K·D.
Attributes: ``delta_softplus`` (int 0/1) plus ``plugin_version`` and ``plugin_namespace``, which
TensorRT's ONNX parser uses to find our IPluginV3 creator (``plugins/selective_scan``) by name, version
and namespace; the namespace's presence also makes TensorRT >= 10.15 prefer the plugin.
"""

DOMAIN = "medmamba_edge"
DOMAIN_VERSION = 1
OP_TYPE = "SelectiveScan"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "medmamba_edge"
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
OUTPUT_NAMES = ("y",)
# Attributes that become plugin fields (PluginFieldCollection); TensorRT's parser consumes the other two.
FIELD_ATTRIBUTES = ("delta_softplus",)
# mamba_ssm's kernel and torch.nn.functional.softplus both return x unchanged above this.
SOFTPLUS_THRESHOLD = 20.0


def node_attributes(delta_softplus: bool) -> dict[str, int | str]:
    """Every attribute of a SelectiveScan node, as the exporter writes it."""
    return {
        "delta_softplus": int(delta_softplus),
        "plugin_version": PLUGIN_VERSION,
        "plugin_namespace": PLUGIN_NAMESPACE,
    }
