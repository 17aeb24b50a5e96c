"""PyTorch eager: the reference every artifact is compared with; runs a run's student.pt, exports nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine import load_student
from .base import Backend, register_backend


@register_backend
class PyTorchBackend(Backend):
    name = "pytorch"

    def __init__(self, model: nn.Module, threads: int = 0):
        self.model = model.eval()
        self.threads = threads

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> PyTorchBackend:
        return cls(load_student(path)[0], threads)

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.threads <= 0:
            return self.model(torch.from_numpy(batch)).float().numpy()
        previous = torch.get_num_threads()  # torch's thread count is process-wide: restore it for other code
        torch.set_num_threads(self.threads)
        try:
            return self.model(torch.from_numpy(batch)).float().numpy()
        finally:
            torch.set_num_threads(previous)
