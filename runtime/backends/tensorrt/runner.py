"""TensorRT backend: runs an engine from `medmamba-edge build-engine` (TensorRT 10.3+ or 11).

The manifest beside the engine supplies the model metadata and is checked against the running TensorRT,
GPU and CPU architecture first, so a stale engine fails with the command that rebuilds it instead of a
deserialisation error. The SS2DScan plugin library is loaded automatically, unless the plan carries its own. I/O goes
through ``execute_async_v3`` with ``set_input_shape``/``set_tensor_address`` on device buffers from cuda-python
(see ``runtime/backends/tensorrt/compat.py`` for why cuda-python). torch-free.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ...metadata import check_against_graph
from .. import Backend, BackendError, run_in_fixed_batches
from .compat import (
    cuda_check,
    current_gpu,
    import_cudart,
    import_tensorrt,
    load_plugin_library,
    tensorrt_logger,
)
from .manifest import check_manifest, read_manifest
from .plugin import find_plugin_library


class TensorRTBackend(Backend):
    def __init__(self, path: str | Path, plugin: str | Path | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.metadata = self.manifest.metadata
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self.gpu = current_gpu(cudart)
        self._logger = logger = tensorrt_logger(trt)
        logger.take_errors()
        self._runtime = trt.Runtime(logger.trt_logger)
        check_manifest(self.manifest, self.path, trt.__version__, self.gpu, self._runtime.num_DLA_cores,
                       platform.machine())
        if self.manifest.build.dla_core is not None:  # the core it was built for (the runtime's default is -1)
            self._runtime.DLA_core = self.manifest.build.dla_core
        if self.manifest.plugin_sha256 is not None and not self.manifest.carries_plugin:
            load_plugin_library(trt, Path(plugin) if plugin is not None else find_plugin_library())

        if self.manifest.build.version_compatible:
            # A version-compatible plan embeds TensorRT's lean runtime (host code); it was built by
            # `build-engine`, whose manifest we just read, so it is trusted.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BackendError(f"{self.path}: TensorRT cannot load this engine{logger.failure()}")
        self._context = self._engine.create_execution_context()

        self._inputs, self._outputs = [], []
        self._dtypes = {}
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            self._dtypes[name] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(name)
        if len(self._inputs) != 1 or len(self._outputs) != 1:
            raise BackendError(f"{self.path}: expected one input and one output, found {self._inputs} / {self._outputs}")
        check_against_graph(self.metadata, tuple(self._engine.get_tensor_shape(self._inputs[0])),
                            tuple(self._engine.get_tensor_shape(self._outputs[0])), str(self.path))
        profile = self.manifest.profile[self._inputs[0]]
        self.batch_range = (profile["min"][0], profile["max"][0])
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes allocated)
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate())

    def describe(self) -> str:
        return (f"TensorRT {self.manifest.tensorrt_version} ({self.gpu.name}, {self.manifest.precision}, "
                f"{self.metadata.scan_form} scan)")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.metadata.batch is not None:
            return run_in_fixed_batches(self._execute, batch, self.metadata.batch)
        low, high = self.batch_range
        outputs = []
        for start in range(0, len(batch), high):
            chunk = batch[start:start + high]
            # At most the profile's max batch; a last chunk below its min batch is padded up to it.
            outputs.append(run_in_fixed_batches(self._execute, chunk, max(low, len(chunk))))
        return np.concatenate(outputs)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, allocated = self._buffers.get(name, (0, 0))
        if allocated < nbytes:
            if pointer:
                cuda_check(self._cudart, self._cudart.cudaFree(pointer))
            pointer = cuda_check(self._cudart, self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (int(pointer), nbytes)
        return self._buffers[name][0]

    def _execute(self, chunk: np.ndarray) -> np.ndarray:
        cudart, context = self._cudart, self._context
        (input_name,), (output_name,) = self._inputs, self._outputs
        host_input = np.ascontiguousarray(chunk, dtype=self._dtypes[input_name])
        if not context.set_input_shape(input_name, host_input.shape):
            raise BackendError(f"{self.path}: input shape {host_input.shape} is outside the engine's profile "
                               f"(batch {self.batch_range[0]}..{self.batch_range[1]})")
        host_output = np.empty(tuple(context.get_tensor_shape(output_name)), dtype=self._dtypes[output_name])
        device_input = self._device_buffer(input_name, host_input.nbytes)
        device_output = self._device_buffer(output_name, host_output.nbytes)
        context.set_tensor_address(input_name, device_input)
        context.set_tensor_address(output_name, device_output)
        stream = self._stream
        cuda_check(cudart, cudart.cudaMemcpyAsync(device_input, host_input.ctypes.data, host_input.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        self._logger.take_errors()  # the process's one logger: what is there is another call's
        if not context.execute_async_v3(int(stream)):
            raise BackendError(f"{self.path}: TensorRT execution failed{self._logger.failure()}")
        cuda_check(cudart, cudart.cudaMemcpyAsync(host_output.ctypes.data, device_output, host_output.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        cuda_check(cudart, cudart.cudaStreamSynchronize(stream))
        return host_output.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free device memory and the stream (also done when the backend is garbage-collected)."""
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        if getattr(self, "_stream", None) is not None:
            self.close()
