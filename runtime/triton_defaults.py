"""What a Triton model gets unless told: the one place for the defaults that ``serve`` (``medmamba_edge/serving.py``),
``export-triton`` (``exporters/triton_repository.py``), the ``triton://`` client and the command line's options
share. Constants only, no imports, so that the command line reads them without loading numpy or onnx."""

DEFAULT_MODEL_NAME = "medmamba"  # the name a served or exported model has on the server
DEFAULT_HOST = "127.0.0.1"  # where serve listens: this machine only
DEFAULT_PORT = 8000  # Triton's HTTP port: serve's, and a triton:// URL's without one
DEFAULT_MAX_BATCH = 8  # the largest batch Triton's dynamic batcher forms
DEFAULT_MAX_QUEUE_DELAY_US = 2000  # how long a request may wait for others to batch with
DEFAULT_INSTANCES, DEFAULT_KIND = 1, "cpu"  # export-triton's instance_group
