"""The interface every deployment backend implements, and the registry that finds backends by name.

A backend has two halves: an exporter (`export`: turn the student into artifact files, returning one record per
artifact for manifest.json) and a runner (`load` an artifact, `run` NCHW float32 batches to logits). The registry
follows timm's model registry: a decorator fills a name -> class table that the manifest's `backend` field indexes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from rich.console import Console
from torch import nn

from ..checkpoint import sha256
from ..data import DataInfo
from ..errors import UserError

CHANNELS = 3  # every kd2deploy dataset yields RGB images, so every artifact takes 3-channel NCHW input


@dataclass
class ExportRequest:
    """What an exporter gets: the student in eval mode, its input description and where to write."""

    model: nn.Module
    info: DataInfo
    out_dir: Path
    precisions: tuple[str, ...] = ("fp32",)
    # NCHW float32 batches of training images with the eval transform; a fresh iterator per call (INT8 needs it)
    calibration: Callable[[], Iterator[np.ndarray]] | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))  # for notes such as exporter fallbacks


class Backend(ABC):
    """A runtime that runs artifacts and, when it overrides `export`, writes them."""

    name: ClassVar[str]  # registry key, recorded as the artifact's `backend`

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        """Write the requested precisions it supports into request.out_dir; return one `artifact_record` per file."""
        raise NotImplementedError(f"The {cls.name} backend runs models but does not export them.")

    @classmethod
    @abstractmethod
    def load(cls, path: Path, threads: int = 0) -> Backend:
        """A runner for the artifact at `path`; threads=0 leaves the runtime's default thread count."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a float32 NCHW batch, normalised like the eval transform."""


def artifact_record(path: Path, out_dir: Path, *, name: str, backend: str, file_format: str, precision: str,
                    **details: Any) -> dict[str, Any]:
    """The manifest entry for one artifact file; exporting fills in `verification` once it has checked the file."""
    return {"name": name, "backend": backend, "format": file_format, "precision": precision,
            "file": path.relative_to(out_dir).as_posix(), "sha256": sha256(path), "size_bytes": path.stat().st_size,
            **details, "verification": {}}


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
