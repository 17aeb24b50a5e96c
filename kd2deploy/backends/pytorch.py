"""PyTorch eager, the reference every artifact is compared with, and PyTorch compiled (torch.compile, Inductor);
both run a run's student.pt and export nothing. torch is imported when a runner is made, so the registry (and
kd2deploy[edge], which has no torch) imports this module without it."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import Backend, register_backend, timed_runs

INSTALL_HINT = ('install the training stack (`pip install "kd2deploy[train]"`); export folders run without it on '
                "ONNX Runtime, OpenVINO or TensorRT")


@register_backend
class PyTorchBackend(Backend):
    name = "pytorch"
    suffix, packages, marker = ".pt", ("torch",), "o"

    def __init__(self, model: Any, threads: int = 0, device: str = "cpu"):
        self.model, self.threads, self.device = model.eval().to(device), threads, device
        self.module = self.model  # what run() calls; the compiled backend wraps it
        if device == "cuda":
            self.timing_method = "CUDA events around one forward of a resident input, no host copies"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if importlib.util.find_spec("torch") else f"torch is not installed: {INSTALL_HINT}"

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> PyTorchBackend:
        reason = cls.unavailable()
        if reason:
            raise UserError(f"{path} is a PyTorch checkpoint, but {reason}.")
        import torch

        from ..student import load_student

        return cls(load_student(path)[0], threads, "cuda" if torch.cuda.is_available() else "cpu")

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's thread count is process-wide: set it for the call, restore it for other code."""
        import torch

        if self.threads <= 0:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _forward(self, images: Any) -> Any:
        import torch

        with torch.inference_mode(), self._threads():
            return self.module(images)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self._forward(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def time_batch(self, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None) -> list[float]:
        if self.device != "cuda":
            return super().time_batch(batch, iters, warmup, duration)
        import torch

        images = torch.from_numpy(batch).to(self.device)
        for _ in range(max(1, warmup)):
            self._forward(images)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_events() -> float:
            start.record()
            self._forward(images)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms

        return timed_runs(cuda_events, iters, duration)

    def device_memory_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())


def _cxx_compiler() -> str | None:
    return os.environ.get("CXX") or next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)


@register_backend
class CompiledPyTorchBackend(PyTorchBackend):
    """torch.compile with Inductor. Each new batch shape compiles once, during that row's warm-up; on a GPU,
    mode="reduce-overhead" replays CUDA graphs."""

    name = "pytorch-compiled"
    marker = "D"

    def __init__(self, model: Any, threads: int = 0, device: str = "cpu"):
        import torch

        super().__init__(model, threads, device)
        self.module = torch.compile(self.model, mode="reduce-overhead" if device == "cuda" else None)

    @classmethod
    def unavailable(cls) -> str | None:
        reason = super().unavailable()
        if reason is None and _cxx_compiler() is None:
            import torch

            if not torch.cuda.is_available():  # Inductor's CPU code is C++, built on first run
                return "torch.compile on the CPU needs a C++ compiler (g++ or clang++; or set CXX)"
        return reason
