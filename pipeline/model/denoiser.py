"""The torch U-Net behind the one denoiser interface (pipeline.core.denoiser): NumPy in, NumPy out.

One adapter for every torch use: training previews (the in-memory EMA model), `export.sample` on a
checkpoint directory (the reference backend), and the benchmarks' torch rows. Options:
    device         where the network runs
    half           fp16 weights and inputs (the output comes back as float32)
    channels_last  NHWC memory format for the convolutions
    cuda_graphs    one CUDA graph per batch size, captured on first use (CUDA only): no launch overhead
`to_device` and `forward` let a benchmark time the network on device tensors, without the host copies.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import Checkpoint, read_checkpoint
from pipeline.core.sidecar import Sidecar


class TorchDenoiser:
    def __init__(
        self,
        model: torch.nn.Module,
        info: Sidecar,
        *,
        device: str | torch.device = "cpu",
        half: bool = False,
        channels_last: bool = False,
        cuda_graphs: bool = False,
    ):
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
        self.dtype = torch.float16 if half else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # A no-op for the training previews' fp32 model on its own device: the model is not copied.
        self.model = model.to(self.device, self.dtype, memory_format=self.memory_format)
        self.info = dataclasses.replace(info, format="torch", dtype="float16" if half else "float32")
        self.cuda_graphs, self._graphs = cuda_graphs, {}
        options = [name for name, on in (("fp16", half), ("channels_last", channels_last)) if on]
        self.name = " ".join(
            [f"torch {torch.__version__}", "CUDA graphs" if cuda_graphs else "eager", str(device), *options]
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path | Checkpoint, *, weights: str = "ema", threads: int | None = None, **options
    ) -> TorchDenoiser:
        """The chosen weights of a checkpoint (or a run directory's newest) in eval mode."""
        if threads:
            torch.set_num_threads(threads)
        checkpoint = read_checkpoint(ckpt)
        info = Sidecar(
            format="torch",
            dtype="float32",
            model=checkpoint.model,
            diffusion=checkpoint.diffusion,
            source_checkpoint=str(checkpoint.dir),
            step=checkpoint.step,
            weights=weights,
        )
        return cls(checkpoint.load_unet("cpu", weights), info, **options)

    def to_device(self, x: np.ndarray, t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t) as device tensors in the model's dtype and memory format."""
        xs = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)
        ts = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self.device)
        return xs.contiguous(memory_format=self.memory_format), ts

    @torch.inference_mode()
    def forward(self, xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """The network's output on the device (with cuda_graphs: the graph's own buffer, reused by the next call)."""
        if not self.cuda_graphs:
            return self.model(xs, ts)
        graph, x_in, t_in, out = self._graphs.get(len(xs)) or self._capture(len(xs))
        x_in.copy_(xs)
        t_in.copy_(ts)
        graph.replay()
        return out

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.forward(*self.to_device(x, t)).float().cpu().numpy()

    def _capture(self, batch: int):
        """Record the network for one batch size into a CUDA graph with static input and output buffers."""
        x, t = self.to_device(
            np.zeros((batch, self.info.channels, self.info.image_size, self.info.image_size), np.float32),
            np.zeros(batch, np.float32),
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuDNN picks its algorithms here
                self.model(x, t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(x, t)
        self._graphs[batch] = (graph, x, t, out)
        return self._graphs[batch]
