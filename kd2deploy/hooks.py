"""Read intermediate features with forward hooks, so no model is edited (the torchdistill way)."""
from __future__ import annotations

from torch import Tensor, nn


class FeatureHooks:
    """Record the outputs of named sub-modules on every forward.

    hooks = FeatureHooks(model, {"last_stage": "layer4"}); model(x); hooks.features["last_stage"]
    """

    def __init__(self, model: nn.Module, layers: dict[str, str]):
        modules = dict(model.named_modules())
        missing = [path for path in layers.values() if path not in modules]
        if missing:
            raise KeyError(f"{type(model).__name__} has no sub-module {', '.join(missing)}; "
                           f"some it has: {', '.join(list(modules)[1:8])}...")
        self.features: dict[str, Tensor] = {}
        self._handles = [modules[path].register_forward_hook(self._recorder(alias)) for alias, path in layers.items()]

    def _recorder(self, alias: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.features[alias] = output
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
