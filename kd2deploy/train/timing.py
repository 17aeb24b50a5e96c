"""Where a training epoch's time goes: waiting for data, the teachers' forward passes, the student's forward and
backward, and the optimizer step. The engine writes the four sums to metrics.csv at the end of every epoch.

The teachers are timed by forward hooks on them and on their direct children (torchdistill's way: no model is
edited), so a method that calls `teacher.forward_features` is timed as well as one that calls the teacher. On a CPU
every step is timed and the phases add up to the epoch. On CUDA, kernels run asynchronously, so only every
`CUDA_SAMPLE`-th step synchronises at the phase boundaries, and the epoch's time is split in those steps' proportions.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

PHASES = ("data", "teacher", "student", "optimizer")
CUDA_SAMPLE = 10


class PhaseClock:
    def __init__(self, device: torch.device, teachers: nn.ModuleList):
        self.sync: Callable[[], None] | None = torch.cuda.synchronize if device.type == "cuda" else None
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.timed = True
        self._depth, self._teacher_start, self._teacher_s = 0, 0.0, 0.0
        self._mark = time.perf_counter()
        for teacher in teachers:
            for module in (teacher, *teacher.children()):
                module.register_forward_pre_hook(self._enter_teacher)
                module.register_forward_hook(self._leave_teacher)

    def _now(self) -> float:
        if self.timed and self.sync is not None:
            self.sync()
        return time.perf_counter()

    def _enter_teacher(self, *_: object) -> None:
        self._depth += 1
        if self._depth == 1:
            self._teacher_start = self._now()

    def _leave_teacher(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._teacher_s += self._now() - self._teacher_start

    def start_epoch(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._mark = time.perf_counter()

    def start_step(self, step: int) -> None:
        """Called once the loader has handed over batch `step` (1-based)."""
        self.timed = self.sync is None or step % CUDA_SAMPLE == 1
        self._teacher_s = 0.0
        self.lap("data")

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`; the teachers' share of a "student" lap goes to "teacher"."""
        now = self._now()
        if self.timed:
            elapsed = now - self._mark
            if phase == "student":
                self.totals["teacher"] += self._teacher_s
                elapsed -= self._teacher_s
            self.totals[phase] += elapsed
        self._mark = now

    def epoch_split(self, epoch_s: float) -> dict[str, float]:
        """Seconds per phase, as metrics.csv columns: measured on a CPU, CUDA's sampled proportions of `epoch_s`."""
        if self.sync is None:
            return {f"time_{phase}_s": seconds for phase, seconds in self.totals.items()}
        sampled = sum(self.totals.values()) or 1.0
        return {f"time_{phase}_s": epoch_s * seconds / sampled for phase, seconds in self.totals.items()}
