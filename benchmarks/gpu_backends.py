"""The denoisers the sampling step of `python -m benchmarks gpu` times, by backend name: torch eager,
torch with CUDA graphs (a candidate of ours), ONNX Runtime's CUDA provider and TensorRT. A backend
that cannot run here raises `Skipped` with the reason.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import artifacts
from benchmarks.gpu_steps import Skipped, need_cuda


class GraphedTorchDenoiser:
    """The U-Net in fp16, channels_last, one CUDA graph per batch size; NumPy in, NumPy out like
    every export backend. A candidate beside export.backends.TorchDenoiser, measured here."""

    def __init__(self, ckpt: Path):
        import torch
        from export.backends import TorchDenoiser

        base = TorchDenoiser(ckpt, device="cuda", half=True)
        self.torch, self.info = torch, base.info
        self.model = base.model.to(memory_format=torch.channels_last)
        self.graphs = {}
        self.name = f"torch {torch.__version__} fp16 channels_last CUDA graphs"

    def _capture(self, batch: int):
        torch, info = self.torch, self.info
        x = torch.zeros(
            batch, info.channels, info.image_size, info.image_size, device="cuda", dtype=torch.float16
        ).contiguous(memory_format=torch.channels_last)
        t = torch.zeros(batch, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (cuDNN picks its algorithms here)
                self.model(x, t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            out = self.model(x, t).float()
        return graph, x, t, out

    def __call__(self, x, t):
        batch = len(x)
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(batch)
        graph, x_in, t_in, out = self.graphs[batch]
        with self.torch.inference_mode():
            x_in.copy_(self.torch.from_numpy(x))
            t_in.copy_(self.torch.from_numpy(t))
        graph.replay()
        return out.cpu().numpy()


def denoiser_for(kind: str, ckpt: Path, cfg, p: dict):
    """(denoiser, batches it can take) for a backend name; Skipped where it cannot run here."""
    import torch
    from export.backends import BackendUnavailable, OrtDenoiser, TorchDenoiser
    from export.trt_runtime import TrtDenoiser

    if kind == "torch-eager":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchDenoiser(ckpt, device=device, half=device == "cuda"), p["batches"]
    need_cuda()
    if kind == "torch-graphs":
        return GraphedTorchDenoiser(ckpt), p["batches"]
    if kind == "onnxruntime-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise Skipped(
                f"absent: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                f"(onnxruntime-gpu is not installed)"
            )
        try:
            return OrtDenoiser(artifacts.onnx_model(cfg, fp16=True), provider="cuda"), p["batches"]
        except BackendUnavailable as e:
            raise Skipped(f"absent: {e}") from None
    if kind == "tensorrt":
        reason = artifacts.tensorrt_available()
        if reason:
            raise Skipped(f"absent: {reason}")
        profile = (min(p["batches"]), max(p["batches"]), max(p["batches"]))
        return TrtDenoiser(artifacts.tensorrt_engine(cfg, profile, fp16=True)), p["batches"]
    raise ValueError(f"unknown backend {kind!r}")
