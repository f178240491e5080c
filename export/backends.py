"""Denoiser backends behind one interface: `denoiser(x (B,C,H,W) f32, t (B,) f32) -> (B,C,H,W) f32`.

    OrtDenoiser    denoiser.onnx + sidecar, ONNX Runtime (CUDA provider when it really runs, else CPU)
    TrtDenoiser    denoiser.plan + sidecar, TensorRT with cuda.bindings buffers on one stream
    TorchDenoiser  a checkpoint directory, PyTorch eager (the reference)

Each exposes `info` (an `export.sidecar.Sidecar`) and `name` (what actually ran). Heavy modules
are imported inside the class that needs them, so the ORT and TensorRT paths never import torch.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from export.sidecar import SUFFIX_FORMATS, SidecarError, read_sidecar, sidecar_from_config


class ModelError(ValueError):
    """The model the user pointed at cannot be used as asked; the message names the file."""


class BackendUnavailable(RuntimeError):
    """A runtime the backend needs (TensorRT, a CUDA device, torch) is missing on this machine."""


MODEL_SUFFIXES = SUFFIX_FORMATS  # .onnx -> ORT, .plan / .engine -> TensorRT


def load_denoiser(path: str | Path, *, provider: str = "auto", threads: int | None = None, device: str = "cpu"):
    """The backend for `path`: .onnx -> ORT, .plan/.engine -> TensorRT, a directory -> torch."""
    path = Path(path)
    if path.is_dir():
        return TorchDenoiser(path, device=device, threads=threads)
    kind = MODEL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise ModelError(
            f"{path}: unknown model type {path.suffix!r}; expected .onnx, .plan, .engine or a checkpoint directory"
        )
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if kind == "onnx":
        return OrtDenoiser(path, provider=provider, threads=threads)
    return TrtDenoiser(path)


def default_threads() -> int:
    """Cores this process may use (respects taskset / Slurm cpu binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- ONNX Runtime ------------------------------------------------------------------------


def _cuda_driver_present() -> bool:
    """libcuda loads: asking ORT for CUDA is worth trying (and will not spray load errors)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _session_options(ort, threads: int | None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    # Which provider runs each node (read back by nodes_by_provider); older versions ignore the key.
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def nodes_by_provider(session) -> dict[str, int] | None:
    """Graph nodes per execution provider after partitioning, or None where this onnxruntime does
    not record it. Nodes left on the CPU inside a CUDA session cost host-device copies around them
    (ORT also puts small shape computations there on purpose: the count says how many)."""
    get = getattr(session, "get_provider_graph_assignment_info", None)
    try:
        subgraphs = get() if get else None
    except Exception:
        return None
    if subgraphs is None:
        return None
    counts: dict[str, int] = {}
    for subgraph in subgraphs:
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return counts


def preload_cuda_libraries(ort) -> str:
    """onnxruntime.preload_dlls() (1.21+): load the pip-installed CUDA and cuDNN libraries, which a
    CUDA session otherwise finds only when torch was imported first. Returns a note ('' if fine)."""
    if not hasattr(ort, "preload_dlls"):
        return ""
    try:
        ort.preload_dlls()
        return ""
    except Exception as e:  # missing libraries show up again, precisely, when the session starts
        return f"preload_dlls failed ({str(e).splitlines()[0]})"


class OrtDenoiser:
    """denoiser.onnx on ONNX Runtime. provider: auto | cuda | cpu; `provider` says what runs,
    `note` what was given up on the way (CUDA provider failed, nodes placed on the CPU), and
    `nodes` the node count per provider (None where onnxruntime does not record it).

    No I/O binding: the NumPy sampling loop needs x on the host at every step, so binding would
    save ORT's output allocation, not a host-device copy.
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.info = read_sidecar(self.path)
        if provider not in ("auto", "cuda", "cpu"):
            raise ModelError(f"provider {provider!r}: expected auto, cuda or cpu")
        driver = _cuda_driver_present()
        if provider == "cuda" and not driver:
            raise BackendUnavailable(
                "--provider cuda: no NVIDIA driver on this machine (libcuda.so.1 not found); use --provider cpu"
            )
        want_cuda = provider == "cuda" or (
            provider == "auto" and driver and "CUDAExecutionProvider" in ort.get_available_providers()
        )
        self.session, self.note = self._open(ort, threads, want_cuda, provider)
        # ORT drops a provider it cannot create with only a log line; check what we really got.
        self.provider = self.session.get_providers()[0]
        self.nodes = nodes_by_provider(self.session)
        on_cpu = (self.nodes or {}).get("CPUExecutionProvider", 0)
        if self.provider == "CUDAExecutionProvider" and on_cpu:
            placed = f"{on_cpu} of {sum((self.nodes or {}).values())} nodes on the CPU"
            self.note = f"{self.note}; {placed}" if self.note else placed
        if want_cuda and self.provider != "CUDAExecutionProvider" and not self.note:
            self.note = "CUDA provider did not start; running on the CPU"  # auto: said, not silent
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise BackendUnavailable(
                f"--provider cuda: onnxruntime could not start CUDAExecutionProvider here "
                f"(available: {ort.get_available_providers()}; needs an NVIDIA GPU with "
                f"CUDA and cuDNN); use --provider cpu"
            )
        self.name = f"onnxruntime {ort.__version__} {self.provider}" + (f" ({self.note})" if self.note else "")
        self._check_io()
        self._dtype = np.float16 if self.info.dtype == "float16" else np.float32
        self._in_sample, self._in_t = self.info.input_names
        self._out = self.info.output_names[0]

    def _open(self, ort, threads, want_cuda: bool, provider: str):
        """(session, note). When CUDA was wanted and only the CPU loads the model, the provider
        failed, not the model: said so, not "cannot load it"."""
        cpu = ["CPUExecutionProvider"]
        if not want_cuda:
            return self._load(ort, _session_options(ort, threads), cpu), ""
        note = preload_cuda_libraries(ort)
        try:
            cuda = ["CUDAExecutionProvider"] + cpu
            return ort.InferenceSession(str(self.path), _session_options(ort, threads), providers=cuda), note
        except Exception as e:
            cuda_error = str(e).splitlines()[0]
        session = self._load(ort, _session_options(ort, threads), cpu)  # ModelError if the model is at fault
        if provider == "cuda":
            raise BackendUnavailable(
                f"--provider cuda: onnxruntime's CUDA provider failed on {self.path.name} "
                f"({cuda_error}); use --provider cpu"
            )
        return session, f"CUDA provider failed ({cuda_error}); running on the CPU"

    def _load(self, ort, options, providers):
        try:
            return ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad files
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None

    def _check_io(self) -> None:
        """The graph's inputs must be what the sidecar says: names, dtype, image size."""
        info, where = self.info, self.path
        inputs = {i.name: i for i in self.session.get_inputs()}
        if sorted(inputs) != sorted(info.input_names):
            raise ModelError(f"{where}: inputs {sorted(inputs)} != sidecar input_names {info.input_names}")
        sample = inputs[info.input_names[0]]
        want_type = "tensor(float16)" if info.dtype == "float16" else "tensor(float)"
        if sample.type != want_type:
            raise ModelError(f"{where}: input {sample.name} is {sample.type}, sidecar says {info.dtype}")
        expected = [info.channels, info.image_size, info.image_size]
        if list(sample.shape[1:]) != expected:
            raise ModelError(
                f"{where}: input {sample.name} has shape {sample.shape}, sidecar says "
                f"(batch, {', '.join(map(str, expected))}): wrong image size or channels"
            )

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        feeds = {self._in_sample: x.astype(self._dtype, copy=False), self._in_t: t.astype(np.float32, copy=False)}
        out = self.session.run([self._out], feeds)[0]
        return out.astype(np.float32, copy=False)


# --- TensorRT ----------------------------------------------------------------------------


def require_cuda_runtime(user: str = "the CUDA runtime"):
    """cuda.bindings.runtime with at least one device, or BackendUnavailable saying what is missing.

    `cuda.bindings.runtime` exists from cuda-python 12.6.1 (before: `cuda.cudart`). Without a driver
    some versions return an error code and others raise while loading libcudart / libcuda: both
    are "no CUDA device here", never a traceback.
    """
    try:
        from cuda.bindings import runtime as cudart
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
        import tensorrt as trt
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
        from cuda.bindings.utils import get_cuda_native_handle
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
    from cuda.bindings import runtime as cudart

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
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in (sample, timestep):
            _cuda(
                cudart.cudaMemcpyAsync(
                    self._device[name], self._host[name][0], b * self._row_bytes[name], h2d, self._stream
                )
            )
        if not self.context.execute_async_v3(native_handle(self._stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (batch {b})")
        _cuda(
            cudart.cudaMemcpyAsync(
                self._host[output][0], self._device[output], b * self._row_bytes[output], d2h, self._stream
            )
        )
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return self._host[output][1][:b].astype(np.float32)  # a copy: the pinned buffer is reused

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


# --- PyTorch (reference) -----------------------------------------------------------------


class TorchDenoiser:
    """The EMA U-Net of a checkpoint (or run) directory, in PyTorch eager mode."""

    def __init__(self, ckpt: str | Path, device: str = "cpu", threads: int | None = None, half: bool = False):
        import torch
        from pipeline.checkpoint import CheckpointError, read_checkpoint
        from pipeline.schedule import schedule_from_config

        if threads:
            torch.set_num_threads(threads)
        try:
            checkpoint = read_checkpoint(ckpt)
            self.model = checkpoint.load_unet(device=device)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
        self.checkpoint = checkpoint.dir
        if half:
            self.model.half()
        self._torch, self._device = torch, torch.device(device)
        self._dtype = torch.float16 if half else torch.float32
        self.info = sidecar_from_config(
            checkpoint.model,
            checkpoint.diffusion,
            schedule_from_config(checkpoint.diffusion).betas,
            fmt="torch",
            dtype="float16" if half else "float32",
            source=str(checkpoint.dir),
            step=checkpoint.step,
        )
        self.name = f"torch {torch.__version__} eager {device}{' fp16' if half else ''}"

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            xs = torch.from_numpy(np.ascontiguousarray(x)).to(self._device, self._dtype)
            ts = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self._device)
            return self.model(xs, ts).float().cpu().numpy()


__all__ = [
    "BackendUnavailable",
    "ModelError",
    "OrtDenoiser",
    "SidecarError",
    "TorchDenoiser",
    "TrtDenoiser",
    "check_batch",
    "load_denoiser",
    "native_handle",
    "require_cuda_runtime",
    "require_tensorrt",
]
