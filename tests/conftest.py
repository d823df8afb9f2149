import os

# Two cores here: keep torch from oversubscribing them when ONNX Runtime or the scan kernel also runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")
