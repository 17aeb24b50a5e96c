"""Registry of distillation methods; each method is one module defining one Distiller subclass."""
from __future__ import annotations

# importing a method registers it
from . import capkd, cit, crd, cskd, deit, feature, kd, libkd, plain, sskd, vlfkd  # noqa: F401
from .base import Distiller, MethodParams, StepOutput, TrainingData, kl_divergence
from .registry import get_method_class, method_names, register_method

__all__ = [
    "Distiller",
    "MethodParams",
    "StepOutput",
    "TrainingData",
    "get_method_class",
    "kl_divergence",
    "method_names",
    "register_method",
]
