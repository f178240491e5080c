"""Denoiser backends behind the one interface (pipeline.core.denoiser), and the factory that picks one.

    onnxruntime  denoiser.onnx + sidecar, ONNX Runtime (CUDA provider when it really runs, else CPU)
    tensorrt     denoiser.plan + sidecar, TensorRT with cuda.bindings buffers (export/trt_runtime.py)
    torch        a checkpoint directory, pipeline.model.denoiser.TorchDenoiser (the reference)

The CLIs, the app and the benchmarks all build their denoiser with `load_denoiser`. onnxruntime and
torch are imported when a backend that needs them is built, so serving an engine never imports torch.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from export.trt_runtime import TrtDenoiser
from pipeline.core.denoiser import BackendUnavailable, Denoiser, ModelError
from pipeline.core.sidecar import SUFFIX_FORMATS, read_sidecar

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
SUFFIX_BACKENDS = {suffix: "onnxruntime" if kind == "onnx" else kind for suffix, kind in SUFFIX_FORMATS.items()}


def load_denoiser(
    path: str | Path,
    *,
    backend: str = "auto",
    provider: str = "auto",
    threads: int | None = None,
    device: str = "cpu",
    half: bool = False,
    channels_last: bool = False,
    cuda_graphs: bool = False,
) -> Denoiser:
    """The denoiser for `path`: .onnx -> onnxruntime, .plan / .engine -> TensorRT, a checkpoint or run
    directory -> torch (where `device`, `half`, `channels_last` and `cuda_graphs` apply)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ModelError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    found = "torch" if path.is_dir() else SUFFIX_BACKENDS.get(path.suffix)
    if found is None:
        raise ModelError(
            f"{path}: unknown model type {path.suffix!r}; expected .onnx, .plan, .engine or a checkpoint directory"
        )
    if backend not in ("auto", found):
        raise ModelError(f"{path}: a {found} model, not one for the {backend} backend")
    if found == "torch":
        return _torch_denoiser(
            path, threads, device=device, half=half, channels_last=channels_last, cuda_graphs=cuda_graphs
        )
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if found == "onnxruntime":
        return OrtDenoiser(path, provider=provider, threads=threads)
    return TrtDenoiser(path)


def _torch_denoiser(ckpt: Path, threads: int | None, **options) -> Denoiser:
    try:
        from pipeline.checkpoint import CheckpointError  # torch: only for a checkpoint directory
        from pipeline.model.denoiser import TorchDenoiser  # torch, as above
    except ImportError as e:
        raise BackendUnavailable(f"{ckpt}: a checkpoint directory needs torch ({e}); pip install .[export]") from None
    try:
        return TorchDenoiser.from_checkpoint(ckpt, threads=threads, **options)
    except CheckpointError as e:
        raise ModelError(str(e)) from None


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


def session_options(ort, threads: int | None):
    """The options of every ORT session here (served, benchmarked, profiled): threads, quiet, placement recorded."""
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
        import onnxruntime as ort  # optional runtime: only for an .onnx model

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
            return self._load(ort, session_options(ort, threads), cpu), ""
        note = preload_cuda_libraries(ort)
        try:
            cuda = ["CUDAExecutionProvider"] + cpu
            return ort.InferenceSession(str(self.path), session_options(ort, threads), providers=cuda), note
        except Exception as e:
            cuda_error = str(e).splitlines()[0]
        session = self._load(ort, session_options(ort, threads), cpu)  # ModelError if the model is at fault
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
