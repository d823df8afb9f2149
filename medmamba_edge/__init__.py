"""medmamba-edge: MedMamba from a PyTorch checkpoint to fast, quantized inference on edge devices.

Importing this package (or ``medmamba_edge.runtime``) must stay cheap and torch-free; the modules that
need torch (``model``, ``scan``, ``checkpoint``, ``exporters``) import it themselves.
"""

__version__ = "0.2.0"
