"""The table of registered distillation methods (a leaf module: each method registers itself here on import)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Distiller

_METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: make a method available as `distill.method: <cls.name>`."""
    if cls.name in _METHODS:
        raise ValueError(f"Distillation method {cls.name!r} is registered twice ({_METHODS[cls.name].__name__}, "
                         f"{cls.__name__}).")
    _METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Distiller]:
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)
