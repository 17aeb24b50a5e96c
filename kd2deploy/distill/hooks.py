"""Read intermediate features with forward hooks, so no model is edited (the torchdistill way)."""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import UserError


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


class PooledFeatures:
    """The pooled representation a model classifies (its pre-logits): the input of its class head, read by a
    forward pre-hook. For a CNN that is the global-average-pooled map, for a ViT its class token or its mean patch
    token (whichever its `global_pool` uses), after any final norm; `.features` is (B, D) after a forward."""

    def __init__(self, model: nn.Module):
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, (nn.ModuleList, list, tuple)):  # a distilled ViT: (class head, distillation heads...)
            head = head[0]
        if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
            raise ValueError(f"{type(model).__name__} has no classifier head (timm's get_classifier()) whose input "
                             "is its pooled feature")
        self.dim = _in_features(head, model)
        self.features: Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._record)

    def _record(self, _module: nn.Module, inputs: tuple) -> None:
        self.features = inputs[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def pooled_features(model: nn.Module, method: str, field: str) -> PooledFeatures:
    """PooledFeatures(model), or a UserError naming the recipe field."""
    try:
        return PooledFeatures(model)
    except ValueError as exc:
        raise UserError(f"distill.method `{method}` reads pooled features, but {exc} ({field}). Use a timm "
                        "classification model.") from None


def _in_features(head: nn.Module, model: nn.Module) -> int:
    if isinstance(head, nn.Linear):
        return head.in_features
    if isinstance(head, nn.Conv2d):
        return head.in_channels
    return int(model.num_features)


class TransformerTap:
    """Hooks on a timm vision transformer's last attention block (ViT, DeiT, Swin, ...), without editing it.

    After a forward, `read()` gives the block's output tokens h_T (B, N, D) on the patch grid (class and
    distillation tokens dropped) and that block's per-head Q, K, V (B, heads, N, head_dim), computed from the
    block's own `norm1` output and `attn.qkv` weights. For a ViT these are exactly the tensors its attention
    uses; for a windowed transformer (Swin) they are the same per-token Q, K, V, laid out on the full grid.
    """

    def __init__(self, model: nn.Module):
        blocks = [(name, module) for name, module in model.named_modules()
                  if isinstance(getattr(getattr(module, "attn", None), "qkv", None), nn.Linear)
                  and hasattr(module.attn, "num_heads") and isinstance(getattr(module, "norm1", None), nn.Module)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no transformer block with `norm1` and `attn.qkv`")
        self.block_name, block = blocks[-1]
        self.attn = block.attn
        self.num_heads = self.attn.num_heads
        self.head_dim = self.attn.qkv.out_features // (3 * self.num_heads)
        self.embed_dim = self.attn.qkv.in_features
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.grid_size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        self.hooks = FeatureHooks(model, {"tokens": self.block_name, "normed": f"{self.block_name}.norm1"})

    def _grid_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.dim() == 4:  # (B, H, W, C), as Swin's blocks carry it
            return x.flatten(1, 2), (x.shape[1], x.shape[2])
        x = x[:, self.num_prefix_tokens:]
        n = x.shape[1]
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == n:
            return x, tuple(self.grid_size)
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"cannot lay {n} tokens on a square grid")
        return x, (side, side)

    def read(self) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], tuple[int, int]]:
        """(h_T, (Q, K, V), grid) from the latest forward."""
        tokens, grid = self._grid_tokens(self.hooks.features["tokens"])
        normed, _ = self._grid_tokens(self.hooks.features["normed"])
        b, n, _ = normed.shape
        q, k, v = self.attn.qkv(normed).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.attn.q_norm(q) if hasattr(self.attn, "q_norm") else q
        k = self.attn.k_norm(k) if hasattr(self.attn, "k_norm") else k
        return tokens, (q, k, v), grid

    def remove(self) -> None:
        self.hooks.remove()
