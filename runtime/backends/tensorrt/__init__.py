"""Everything TensorRT, in one folder (as mmdeploy keeps a backend's conversion, wrapper and plugin loading
together): ``compat`` (versions, GPUs, the lazy import), ``float16`` (the FP16 graph strongly typed networks
need), ``build`` (engines and their cache), ``manifest`` (what an engine was built from), ``plugin`` (building
and finding the SS2DScan plugin library) and ``runner`` (the backend). Importing this package imports nothing:
TensorRT itself is imported only when an engine is built or opened.
"""
