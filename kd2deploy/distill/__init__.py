"""Registry of distillation methods; each method is one module defining one Distiller subclass."""
from __future__ import annotations

from .base import Distiller, MethodParams, StepOutput, kl_divergence

_METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    _METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Distiller]:
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


from . import capkd, cit, cskd, deit, kd, libkd, plain  # noqa: E402,F401  (imported last: they register in the table above)

__all__ = [
    "Distiller",
    "MethodParams",
    "StepOutput",
    "get_method_class",
    "kl_divergence",
    "method_names",
    "register_method",
]
