"""What a Triton model gets unless told: the one place for the defaults that ``serve`` (``medmamba_edge/serving.py``),
``export-triton`` (``exporters/triton_repository.py``), the ``triton://`` client and the command line's options
share, and the ranges of the config fields they fill. No imports, so that the command line reads them without loading
numpy or onnx."""

DEFAULT_MODEL_NAME = "medmamba"  # the name a served or exported model has on the server
DEFAULT_HOST = "127.0.0.1"  # where serve listens: this machine only
DEFAULT_PORT = 8000  # Triton's HTTP port: serve's, and a triton:// URL's without one
DEFAULT_MAX_BATCH = 8  # the largest batch Triton's dynamic batcher forms for a model that sets none
DEFAULT_MAX_QUEUE_DELAY_US = 2000  # how long a request may wait for others to batch with
DEFAULT_INSTANCES, DEFAULT_KIND = 1, "cpu"  # export-triton's instance_group

# What each option may be: at least one batch, instance, stream or thread (no delay at all is fine), and at most what
# its config field holds (model_config.proto: max_batch_size and instance_group's count are int32,
# max_queue_delay_microseconds uint64; nvinfer's batch-size an int): past it Triton refuses the whole config
# ("failed to read text proto"). --threads is the onnxruntime backend's intra_op_thread_count, which it reads into an
# int and starts that many threads of per instance: it is held to the most CPUs a Linux server can have (NR_CPUS,
# 8192 on x86-64), the server's own CPUs being unknown here.
OPTION_RANGES = {"--max-batch": (1, 2**31 - 1), "--instances": (1, 2**31 - 1), "--deepstream-batch": (1, 2**31 - 1),
                 "--max-queue-delay-us": (0, 2**64 - 1), "--threads": (1, 8192)}
FIELD_RANGE = "the range of Triton's config field"
UPPER_BOUNDS = {"--threads": "the most CPUs a Linux server can have"}  # the others': FIELD_RANGE


def max_batch_or_default(max_batch: int | None, largest: int | None) -> int:
    """--max-batch as given, else ``largest``, an engine's profile's largest batch (what it was built for: an engine
    built for 32 and served at 8 would never run the batches it was tuned for), else DEFAULT_MAX_BATCH."""
    if max_batch is not None:
        return max_batch
    return largest if largest is not None else DEFAULT_MAX_BATCH


def range_problem(option: str, value: int | None) -> str | None:
    """Why ``value`` cannot be given for ``option`` (one of OPTION_RANGES), if it cannot; None is left to the
    default."""
    least, most = OPTION_RANGES[option]
    if value is None:
        return None
    if value < least:
        return f"{option} must be ≥ {least}, got {value}"
    if value > most:
        return f"{option} must be ≤ {most} ({UPPER_BOUNDS.get(option, FIELD_RANGE)}), got {value}"
    return None
