"""Deployment backends, one module each, found by name through the registry in `base`.

Importing this package registers every backend; a backend whose runtime is optional imports it lazily.
"""
from . import ort, pytorch  # noqa: F401  (registers the backends)
from .base import Backend, ExportRequest, artifact_record, get_backend, list_backends, register_backend

__all__ = ["Backend", "ExportRequest", "artifact_record", "get_backend", "list_backends", "register_backend"]
