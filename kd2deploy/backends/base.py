"""The interface every deployment backend implements, and the registry that finds backends by name.

A backend has two halves: an exporter (`export`: build artifacts from the FP32 ONNX graph, returning one record per
artifact for manifest.json) and a runner (`load` an artifact, `run` NCHW float32 batches to logits). The registry
follows timm's model registry: a decorator fills a name -> class table that the manifest's `backend` field indexes.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Console

from ..checkpoint import sha256
from ..deploy.profiles import DeviceProfile, host_profile
from ..errors import UserError

if TYPE_CHECKING:  # the data module needs torch; runners must import without it (kd2deploy[edge])
    from ..data.sources import DataInfo

INPUT_NAME, OUTPUT_NAME = "input", "logits"  # the I/O tensor names of every exported graph

Batches = Callable[[], Iterator[np.ndarray]]  # a fresh iterator of NCHW float32 batches per call
LabelledBatches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class ExportRequest:
    """What an exporter gets: the FP32 ONNX graph it builds from, the input description, the target and data."""

    onnx_path: Path  # the verified-to-be FP32 graph, written by kd2deploy.deploy.onnx
    info: DataInfo
    out_dir: Path  # the staging export folder: each artifact goes into its own sub-folder
    precisions: tuple[str, ...] = ("fp32",)
    profile: DeviceProfile = field(default_factory=host_profile)
    calibration: Batches | None = None  # training images with the eval transform (INT8 needs them)
    calib_method: str = "minmax"
    validation: LabelledBatches | None = None  # val images and labels, for accuracy-controlled quantization
    max_drop: float | None = None  # top-1 points an INT8 model may lose (accuracy-controlled quantization)
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def calibration_batches(self) -> Iterator[np.ndarray]:
        if self.calibration is None:
            raise ValueError("INT8 export needs calibration batches (ExportRequest.calibration).")
        return self.calibration()


class BackendUnavailable(UserError):
    """A backend's runtime or hardware is missing here; what could be built without it was built."""

    def __init__(self, message: str, records: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.records = records or []


def timed_runs(timed_call: Callable[[], float], iters: int, duration: float | None = None) -> list[float]:
    """Seconds of each `timed_call()` (which times one inference itself: host clock or CUDA events): `iters`
    calls, or with `duration`, as many as fit in that many seconds (at least `iters`)."""
    times: list[float] = []
    deadline = time.perf_counter() + (duration or 0.0)
    while len(times) < iters or time.perf_counter() < deadline:
        times.append(timed_call())
    return times


def host_timings(run: Callable[[np.ndarray], Any], batch: np.ndarray, iters: int, warmup: int,
                 duration: float | None = None) -> list[float]:
    """Wall-clock seconds per `run(batch)` after `warmup` untimed runs (allocations, kernel selection, caches)."""
    for _ in range(warmup):
        run(batch)

    def wall_clock() -> float:
        start = time.perf_counter()
        run(batch)
        return time.perf_counter() - start

    return timed_runs(wall_clock, iters, duration)


class Backend(ABC):
    """A runtime that runs artifacts and, when it overrides `export`, builds them."""

    name: ClassVar[str]  # registry key, recorded as the artifact's `backend`
    format: ClassVar[str | None] = None  # the `--format` it builds (None: a reference runtime that builds nothing)
    suffix: ClassVar[str | None] = None  # the file suffix of its artifacts (what `eval` and `bench` accept)
    precisions: ClassVar[tuple[str, ...]] = ()  # what `export` can build
    extra: ClassVar[str] = "train"  # the kd2deploy extra that installs its runtime (`pip install "kd2deploy[extra]"`)
    packages: ClassVar[tuple[str, ...]] = ()  # its runtime's distributions: their versions go into manifests
    marker: ClassVar[str] = "o"  # its matplotlib marker in bench plots
    export_needs_runtime: ClassVar[bool] = True  # False: `export` builds what it can without it and says the rest

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run here (a missing package or device), or None when it can."""
        return None

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        """Build the requested precisions it supports under request.out_dir; return one `artifact_record` each."""
        raise NotImplementedError(f"The {cls.name} backend runs models but does not export them.")

    @classmethod
    @abstractmethod
    def load(cls, path: Path, threads: int = 0) -> Backend:
        """A runner for the artifact at `path`; threads=0 leaves the runtime's default thread count."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a float32 NCHW batch, normalised like the eval transform."""

    # what `kd2deploy bench` reads; GPU runners override both
    timing_method: ClassVar[str] = "host wall clock per run() call, input and output on the host"

    def time_batch(self, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None) -> list[float]:
        """Seconds per inference of `batch`, warm-up excluded. On the CPU, host wall-clock time of run(); a GPU
        runner times its own enqueue with CUDA events on a resident input (what trtexec calls GPU compute time)."""
        return host_timings(self.run, batch, iters, warmup, duration)

    # set by time_batch where the runtime measures each call itself (OpenVINO's request latency): seconds per
    # timed call, so the table can show how much of the host time the runtime's own work is
    runtime_timings: list[float] | None = None

    def device_memory_bytes(self) -> int | None:
        """Peak accelerator memory this runner has used (None on the CPU, where the process's peak RSS counts)."""
        return None


def artifact_record(path: Path, out_dir: Path, *, name: str, backend: str, file_format: str, precision: str,
                    companions: tuple[Path, ...] = (), **details: Any) -> dict[str, Any]:
    """The manifest entry for one artifact: its main file plus any companion files (OpenVINO's .bin), each with its
    sha256. Exporting fills in `verification` once it has checked the artifact."""
    files = [path, *companions]
    return {"name": name, "backend": backend, "format": file_format, "precision": precision,
            "file": path.relative_to(out_dir).as_posix(), "sha256": sha256(path),
            "companions": {p.relative_to(out_dir).as_posix(): sha256(p) for p in companions},
            "size_bytes": sum(p.stat().st_size for p in files), **details, "verification": {}}


_backends: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available under `cls.name`."""
    if cls.name in _backends:
        raise ValueError(f"Backend name {cls.name!r} is registered twice ({_backends[cls.name].__name__}, "
                         f"{cls.__name__}).")
    _backends[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    return sorted(_backends)


def get_backend(name: str) -> type[Backend]:
    try:
        return _backends[name]
    except KeyError:
        raise UserError(f"Unknown backend `{name}`. Known backends: {', '.join(list_backends())}. A manifest naming "
                        "another one was written by a newer kd2deploy or by hand: re-export with "
                        "`kd2deploy export RUN_DIR`.") from None


def artifact_suffixes() -> tuple[str, ...]:
    return tuple(sorted({b.suffix for b in _backends.values() if b.format and b.suffix}))


def backend_packages() -> dict[str, str]:
    """Every backend runtime's distribution -> the kd2deploy extra that installs it."""
    return {package: b.extra for b in _backends.values() for package in b.packages}


def backend_for_format(file_format: str) -> type[Backend]:
    for backend in _backends.values():
        if backend.format == file_format:
            return backend
    known = sorted(b.format for b in _backends.values() if b.format)
    raise UserError(f"Unknown export format `{file_format}`: --format takes a comma-separated list of "
                    f"{', '.join(known)}.")
