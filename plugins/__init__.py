"""The native SS2DScan sources for NVIDIA GPUs: the CUDA kernel, the TensorRT IPluginV3 plugin and its CMake
build (``selective_scan/``). The Python that builds, finds and loads them lives with the rest of the TensorRT
backend, in ``runtime/backends/tensorrt/plugin.py``.
"""
