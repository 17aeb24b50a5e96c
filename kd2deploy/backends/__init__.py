"""Deployment backends, one module each, found by name through the registry in `base`.

Importing this package registers every backend; a backend whose runtime is optional imports it lazily.
"""
from . import ort, ov, pytorch, trt  # noqa: F401  (registers the backends)
from .base import (
    Backend,
    BackendUnavailable,
    ExportRequest,
    artifact_record,
    artifact_suffixes,
    backend_for_format,
    backend_packages,
    get_backend,
    list_backends,
    register_backend,
)

__all__ = ["Backend", "BackendUnavailable", "ExportRequest", "artifact_record", "artifact_suffixes",
           "backend_for_format", "backend_packages", "get_backend", "list_backends", "register_backend"]
