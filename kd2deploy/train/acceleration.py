"""How a training run uses the hardware at hand: precision, memory layout, compilation, threads and the allocator.

Each choice comes from the recipe (`optim.amp`, `optim.channels_last`, `optim.compile`, `optim.threads`) and what
the machine is, and `Acceleration.notes` says in the run log what was chosen and why:

- **Precision.** On CUDA, autocast in `optim.amp_dtype`. On a CPU, autocast in bfloat16, and only where the CPU
  multiplies bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo); elsewhere bf16 is emulated and slower than
  FP32, so `amp: auto` stays FP32 there and `amp: true` says why it does too. Teachers run inside the same autocast
  region, under no_grad and in eval mode. Validation runs in FP32 on a CPU (what an exported FP32 artifact scores).
  Attention uses PyTorch's math kernel under CPU bf16 (the fused kernel's bf16 backward is slow there).
- **Memory layout.** Channels-last (NHWC) for convolutional models (more than two 2-D convolutions, so not a ViT's
  single patch embedding): oneDNN's and cuDNN's convolutions run faster in it.
- **Compilation.** `torch.compile` of the student in place (`nn.Module.compile`, so its state_dict keys do not
  change); the first step pays the compile time, which the engine reports on its own.
- **Threads.** With `optim.threads: auto` the engine uses the cores other processes leave free (read from
  /proc/stat at the start of each epoch), at least one: on a 2-core machine a second process running two threads of
  matrix work made all-core training about 4x slower, one thread about 2x.
- **Allocator.** glibc returns big blocks (activations of a batch) to the kernel on free and page-faults them back
  on the next step; on the VMs this project measures on that costs more than the arithmetic of small models. The
  engine raises glibc's mmap and trim thresholds, so freed blocks are reused.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..machine import BF16_FLAGS, busy_cores_elsewhere, cpu_flags, cpu_model, usable_cores

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> str:
    """Make glibc keep and reuse freed blocks up to 1 GiB instead of unmapping them; returns what was done."""
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return "allocator: left as it is (not glibc)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "allocator: left as it is (MALLOC_MMAP_THRESHOLD_ or a preloaded allocator is set)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
        ok = mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1 and mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1
    except (OSError, AttributeError):
        ok = False
    return ("allocator: glibc keeps freed blocks up to 1 GiB for reuse (no page faults per step)" if ok
            else "allocator: glibc's mallopt refused the thresholds; left as it is")


def cpu_bf16_reason() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and the flag (or its absence) that says so."""
    found = [flag for flag in cpu_flags() if flag in BF16_FLAGS]
    if found:
        return True, f"the CPU has {found[0]}"
    return False, f"the CPU has none of {', '.join(BF16_FLAGS)}, so bf16 would be emulated (slower than FP32)"


def resolve_amp(setting: bool | str, amp_dtype: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for `optim.amp` (None: FP32) and why."""
    if setting is False:
        return None, "FP32 (optim.amp: false)"
    if device.type == "cuda":
        dtype = torch.float16 if amp_dtype == "float16" else torch.bfloat16
        return dtype, f"{amp_dtype} autocast on CUDA (optim.amp: {str(setting).lower()})"
    native, why = cpu_bf16_reason()
    if native:
        note = "" if amp_dtype == "bfloat16" or setting == "auto" else " (amp_dtype float16 applies to CUDA only)"
        return torch.bfloat16, f"bfloat16 autocast on the CPU: {why}{note}"
    return None, f"FP32: optim.amp is {setting}, but {why}"


def is_convolutional(model: nn.Module) -> bool:
    """More than two 2-D convolutions: a CNN (or a conv-stem hybrid), not a ViT with one patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def free_threads(setting: int | str, window_s: float) -> tuple[int, float]:
    """(intra-op threads, cores busy elsewhere): for `auto`, the usable cores others leave free, shared by this
    machine's torchrun processes (which read the machine at the same moment, so they do not see each other), at
    least 1."""
    if setting != "auto":
        return int(setting), 0.0
    busy = busy_cores_elsewhere(window_s)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, round((usable_cores() - busy) / local_processes)), busy


@dataclass
class Acceleration:
    """The run's choices; `notes` are the log lines that say what was chosen and why."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: dict[str, bool]  # per model: "student", "teacher 0", ...
    compile: bool
    threads_setting: int | str
    notes: list[str] = field(default_factory=list)
    threads: int = 0

    @classmethod
    def from_recipe(cls, optim: Any, device: torch.device, models: dict[str, nn.Module]) -> Acceleration:
        """The choices for `optim` on `device`; `models` (by name: "student", "teacher 0", ...) are converted to
        the chosen memory layout in place."""
        dtype, amp_note = resolve_amp(optim.amp, optim.amp_dtype, device)
        layout = {name: (is_convolutional(m) if optim.channels_last == "auto" else bool(optim.channels_last))
                  for name, m in models.items()}
        for name, model in models.items():
            if layout[name]:
                model.to(memory_format=torch.channels_last)
        acc = cls(device, dtype, layout, bool(optim.compile), optim.threads)
        acc.notes.append(f"precision: {amp_note}")
        chosen = [name for name, on in layout.items() if on]
        acc.notes.append(f"memory layout: channels-last for {', '.join(chosen)}" if chosen else
                         "memory layout: NCHW (no convolutional model)" if optim.channels_last == "auto" else
                         "memory layout: NCHW (optim.channels_last: false)")
        if acc.compile:
            acc.notes.append("compile: torch.compile of the student; the first step includes the compile time")
        if device.type == "cpu":
            acc.notes.append(keep_freed_memory())
            policy = os.environ.get("OMP_WAIT_POLICY")
            acc.notes.append(f"OpenMP wait policy: {policy.lower() if policy else 'default (spin, then sleep)'}")
        return acc

    def record(self) -> dict[str, Any]:
        """What student.pt records of how it was trained: the same recipe trains in bf16 on one CPU and in FP32 on
        another, so a comparison of runs can tell."""
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"device": str(self.device), "cpu": cpu_model(), "gpu": gpu,
                "precision": "fp32" if self.amp_dtype is None else f"{str(self.amp_dtype).removeprefix('torch.')} "
                                                                   "autocast",
                "channels_last": self.channels_last, "compile": self.compile}

    def autocast(self) -> torch.autocast | None:
        if self.amp_dtype is None:
            return None
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_context(self) -> contextlib.ExitStack:
        """The training forward's context: autocast, and on a CPU in bf16 PyTorch's math attention kernel (the fused
        CPU kernel's bf16 backward measured 2.4x slower than the rest of a ViT-nano step; the math kernel's matmuls
        run bf16 natively)."""
        stack = contextlib.ExitStack()
        autocast = self.autocast()
        if autocast is not None:
            stack.enter_context(autocast)
            if self.device.type == "cpu":
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def eval_autocast(self) -> torch.autocast | None:
        """Validation: FP32 on a CPU (what the exported FP32 artifact scores), the training autocast on CUDA."""
        return self.autocast() if self.device.type == "cuda" else None

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """A batch in the layout of the student's first layer."""
        if self.channels_last.get("student") and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def set_threads(self, window_s: float = 0.05) -> str | None:
        """Pick the intra-op thread count for the coming epoch (CPU only); returns a log line when it changes."""
        if self.device.type != "cpu":
            return None
        threads, busy = free_threads(self.threads_setting, window_s)
        if threads == self.threads:
            return None
        first = self.threads == 0
        self.threads = threads
        torch.set_num_threads(threads)
        why = (f"optim.threads: {threads}" if self.threads_setting != "auto" else
               f"{usable_cores()} usable cores, {busy:.1f} busy elsewhere")
        return f"threads: {threads} ({why})" if first else f"threads: now {threads} ({why})"
