"""TensorRT engines at sampling time: the CUDA checks and `TrtDenoiser` (one of export.backends' denoisers).

Imports neither torch nor onnx: a machine that serves a denoiser.plan needs numpy, tensorrt and
cuda-python. tensorrt and cuda.bindings are imported when first asked for, so this module loads
(and says what is missing) on a machine without them.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.sidecar import read_sidecar


def require_cuda_runtime(user: str = "the CUDA runtime"):
    """cuda.bindings.runtime with at least one device, or BackendUnavailable saying what is missing.

    `cuda.bindings.runtime` exists from cuda-python 12.6.1 (before: `cuda.cudart`). Without a driver
    some versions return an error code and others raise while loading libcudart / libcuda: both
    are "no CUDA device here", never a traceback.
    """
    try:
        from cuda.bindings import runtime as cudart  # optional: cuda-python, on CUDA machines only
    except ImportError as e:
        raise BackendUnavailable(
            f"the CUDA Python bindings are missing or older than 12.6.1 ({e}); run `pip install 'cuda-python>=12.6.1'`"
        ) from None
    try:
        err, count = cudart.cudaGetDeviceCount()
    except (RuntimeError, OSError) as e:
        raise BackendUnavailable(
            f"{user} is installed but there is no CUDA device ({str(e).splitlines()[0]}); "
            f"run on a machine with an NVIDIA GPU"
        ) from None
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        reason = cudart.cudaGetErrorString(err)[1].decode() if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendUnavailable(
            f"{user} is installed but there is no CUDA device ({reason}); run on a machine with an NVIDIA GPU"
        )
    return cudart


def require_tensorrt():
    """(tensorrt, cuda.bindings.runtime), or BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt  # optional: TensorRT, on CUDA machines only
    except ImportError as e:
        raise BackendUnavailable(
            f"TensorRT is not installed ({e}); on a machine with an NVIDIA GPU run `pip "
            f"install tensorrt 'cuda-python>=12.6.1'` (or `pip install -e .[tensorrt]`)"
        ) from None
    return trt, require_cuda_runtime(f"TensorRT {trt.__version__}")


def native_handle(obj) -> int:
    """The address behind a cuda.bindings handle such as a cudaStream_t. cuda-bindings 12.9.1
    deprecated int(handle) for cuda.bindings.utils.get_cuda_native_handle; older ones only have int()."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # optional: cuda-python
    except ImportError:
        return int(obj)
    return get_cuda_native_handle(obj)


def check_batch(info, batch: int, path) -> None:
    """A batch outside the engine's optimization profile is the user's error, named with the range."""
    if not info.accepts_batch(batch):
        raise ModelError(
            f"{path}: batch {batch} is outside the engine's batch range {info.batch_range()} "
            f"(rebuild it with `python -m export.trt --batch MIN,OPT,MAX`, or sample with a batch "
            f"in that range)"
        )


def _cuda(result):
    """Unpack a cuda.bindings call `(err, *values)`, raising on error."""
    from cuda.bindings import runtime as cudart  # optional: cuda-python, on CUDA machines only

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else (values or None)


class TrtDenoiser:
    """denoiser.plan on TensorRT: device and pinned host buffers allocated once at the profile's
    maximum batch, one stream, host copies only at the ends of each call."""

    def __init__(self, path: str | Path, device: int = 0):
        self.path = Path(path)
        self._cudart: Any = None  # cuda.bindings.runtime, once require_tensorrt found it
        self._stream: Any = None
        self._device: dict[str, Any] = {}  # per tensor: device buffer,
        self._host: dict[str, tuple[int, np.ndarray]] = {}  # pinned host buffer (address, array view),
        self._row_bytes: dict[str, int] = {}  # and bytes per batch row
        self._batch: int | None = None  # the batch the context's input shapes are set for
        self.info = read_sidecar(self.path)
        if self.info.format != "tensorrt":
            raise ModelError(f"{self.path}: sidecar format is {self.info.format!r}, not a TensorRT engine")
        trt, cudart = require_tensorrt()
        self._cudart = cudart
        _cuda(cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(
                f"{self.path}: TensorRT {trt.__version__} cannot deserialize this engine (built with "
                f"TensorRT {self.info.producer.get('tensorrt', '?')} or for another GPU; rebuild it)"
            )
        self.context = self.engine.create_execution_context()
        gpu = _cuda(cudart.cudaGetDeviceProperties(device)).name
        gpu = (gpu.decode() if isinstance(gpu, bytes) else str(gpu)).rstrip("\x00")
        self.name = f"tensorrt {trt.__version__} on {gpu}"
        self._stream = _cuda(cudart.cudaStreamCreate())
        self._allocate(trt)

    def _allocate(self, trt) -> None:
        info, engine = self.info, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(info.input_names + info.output_names):
            raise ModelError(f"{self.path}: engine tensors {names} != sidecar {info.input_names + info.output_names}")
        lo, _, hi = (tuple(d) for d in engine.get_tensor_profile_shape(info.input_names[0], 0))
        expected = (info.channels, info.image_size, info.image_size)
        if hi[1:] != expected or (lo[0], hi[0]) != (info.batch_min, info.batch_max):
            raise ModelError(
                f"{self.path}: engine profile {lo}..{hi} disagrees with its sidecar "
                f"(batch {info.batch_range()}, image {expected})"
            )
        for name in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            row = (1,) + (expected if name != info.input_names[1] else ())
            self._row_bytes[name] = int(np.prod(row)) * dtype.itemsize
            nbytes = self._row_bytes[name] * int(hi[0])  # hi[0] == info.batch_max, checked above
            self._device[name] = _cuda(self._cudart.cudaMalloc(nbytes))
            host_ptr = _cuda(self._cudart.cudaMallocHost(nbytes))  # pinned: async copies really overlap
            raw = (ctypes.c_byte * nbytes).from_address(host_ptr)
            rows = np.frombuffer(raw, dtype)  # type: ignore[call-overload]  # a ctypes array is a buffer
            self._host[name] = (host_ptr, rows.reshape((-1,) + row[1:]))  # batch_max rows
            if not self.context.set_tensor_address(name, int(self._device[name])):
                raise RuntimeError(f"{self.path}: TensorRT refused the device buffer of tensor {name!r}")

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        cudart, info = self._cudart, self.info
        (sample, timestep), output = info.input_names, info.output_names[0]
        b = len(x)
        if b != self._batch:
            check_batch(info, b, self.path)
            self._batch = None  # until both shapes are accepted
            if not (
                self.context.set_input_shape(sample, (b, info.channels, info.image_size, info.image_size))
                and self.context.set_input_shape(timestep, (b,))
            ):
                raise ModelError(
                    f"{self.path}: TensorRT refused input shapes for batch {b} "
                    f"(engine batch range {info.batch_range()})"
                )
            self._batch = b
        np.copyto(self._host[sample][1][:b], x, casting="same_kind")
        np.copyto(self._host[timestep][1][:b], t, casting="same_kind")
        for name in (sample, timestep):
            self._copy(name, b, to_device=True)
        if not self.context.execute_async_v3(native_handle(self._stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (batch {b})")
        self._copy(output, b, to_device=False)
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return self._host[output][1][:b].astype(np.float32)  # a copy: the pinned buffer is reused

    def _copy(self, name: str, batch: int, to_device: bool) -> None:
        """Queue the copy of `batch` rows of tensor `name` between its pinned host and device buffers."""
        kinds = self._cudart.cudaMemcpyKind
        device, host, nbytes = self._device[name], self._host[name][0], batch * self._row_bytes[name]
        if to_device:
            _cuda(self._cudart.cudaMemcpyAsync(device, host, nbytes, kinds.cudaMemcpyHostToDevice, self._stream))
        else:
            _cuda(self._cudart.cudaMemcpyAsync(host, device, nbytes, kinds.cudaMemcpyDeviceToHost, self._stream))

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice, or after a failed __init__."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        device, host, stream = self._device, self._host, self._stream
        self._device, self._host, self._stream, self._batch = {}, {}, None, None
        for ptr in device.values():
            cudart.cudaFree(ptr)
        for ptr, _ in host.values():
            cudart.cudaFreeHost(ptr)
        if stream is not None:
            cudart.cudaStreamDestroy(stream)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA context is going away anyway
            pass
