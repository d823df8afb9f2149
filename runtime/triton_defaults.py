"""What a Triton model gets unless told: the one place for the defaults that ``serve`` (``medmamba_edge/serving.py``),
``export-triton`` (``exporters/triton_repository.py``) and the command line's options share. Constants only, no
imports, so that the command line reads them without loading numpy or onnx."""

DEFAULT_MODEL_NAME = "medmamba"  # the name a served or exported model has on the server
