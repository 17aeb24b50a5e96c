"""The timing harness of `kd2deploy bench`: timed runs of one deployable, their statistics, what the harness itself
costs per call, peak memory, and the machine context every report records. Torch-free."""
from __future__ import annotations

import os
import resource
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import backend_packages, get_backend
from ..backends.base import host_timings
from ..checkpoint import library_versions
from ..data.valset import evaluate_runner
from ..machine import cpu_flags, cpu_model, gpu_info


def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Percentiles (numpy's linear interpolation), mean and throughput of timed runs of one batch."""
    times = np.asarray(seconds, dtype=np.float64)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return {"p50_ms": 1e3 * float(p50), "p90_ms": 1e3 * float(p90), "p99_ms": 1e3 * float(p99),
            "mean_ms": 1e3 * mean, "images_per_s": batch / mean, "runs": len(times)}


def time_runner(runner: Any, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None
                ) -> list[float]:
    """Host wall-clock seconds per runner.run(batch), warm-up excluded (see backends.base.host_timings)."""
    return host_timings(runner.run, batch, iters, warmup, duration)


class _NullRunner:
    """Returns its input: timing it measures what the harness itself adds to every timed call."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch


def harness_overhead_us(runs: int = 2000) -> float:
    """Median microseconds the timing loop adds per call (timer reads, list append, the call itself)."""
    return 1e6 * float(np.median(time_runner(_NullRunner(), np.zeros(1, np.float32), runs, 10)))


def machine_context(threads: int, iters: int, warmup: int, val_images: int | None, busy_before: float,
                    duration: float | None = None, timing: Sequence[str] = ()) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "gpu": gpu_info(),
            "threads": threads, "iters": iters, "warmup": warmup, "duration_s": duration, "val_images": val_images,
            "busy_cores_before": busy_before, "harness_overhead_us": harness_overhead_us(),
            "isolation": "each artifact in a fresh process", "timing": sorted(set(timing)),
            "versions": library_versions(backend_packages()), "command": invocation(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def invocation() -> str:
    """The command line as typed: `kd2deploy ...` whether it ran as the console script or `python -m kd2deploy`."""
    if Path(sys.argv[0]).name in ("kd2deploy", "__main__.py"):
        return shlex.join(["kd2deploy", *sys.argv[1:]])
    return shlex.join(sys.argv)


def training_machine() -> dict[str, Any]:
    """Where a training benchmark ran: CPU, cores, GPU (if any) and library versions."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "versions": library_versions()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this program's own memory map;
    getrusage's ru_maxrss would also count the parent's RSS, which Linux carries across fork and exec."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Time one deployable at each batch size, smallest first, recording the process's peak RSS after each, then
    score top-1 on the val images at the largest batch (padded, so runtimes that compile per shape reuse it)."""
    rss_before = _peak_rss_mb()
    runner = get_backend(job["backend"]).load(Path(job["path"]), job["threads"])
    rng = np.random.default_rng(0)  # latency does not depend on pixel values; a fixed input keeps runs comparable
    rows = []
    for batch in sorted(job["batches"]):
        images = rng.standard_normal((batch, *job["input_shape"]), dtype=np.float32)
        times = runner.time_batch(images, job["iters"], job["warmup"], job["duration"])
        gpu, runtime = runner.device_memory_bytes(), runner.runtime_timings
        rows.append({"batch": batch, **latency_stats(times, batch),
                     "runtime_p50_ms": 1e3 * float(np.median(runtime)) if runtime else None,
                     "peak_rss_mb": _peak_rss_mb(),
                     "gpu_mem_mb": None if gpu is None else gpu / 2**20, "timing": runner.timing_method})
    top1 = None
    if job["val"]:
        data = np.load(job["val"]["images"], mmap_mode="r")
        labels = np.load(job["val"]["labels"])
        size = max(job["batches"])

        def padded(batch: np.ndarray) -> np.ndarray:
            count = len(batch)
            if count < size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], size - count, axis=0)])
            return runner.run(np.ascontiguousarray(batch))[:count]

        top1 = evaluate_runner(padded, _ArrayImages(data, labels), size)["top1"]
    return {"rows": rows, "top1": top1, "rss_before_load_mb": rss_before}


class _ArrayImages:
    """Pre-processed val images in a .npy file, shared by every artifact's process."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            stop = start + batch_size  # np.array copies: runners may write into their input
            yield np.array(self.images[start:stop]), self.labels[start:stop]
