"""Model creation: every model is built by timm.create_model; weights come from timm or a local file.

Importing this package registers kd2deploy's own models with timm's registry (`cifar`, `involution`,
`token_vit`), so recipes name them like any other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..errors import UserError
from . import cifar, involution, token_vit  # noqa: F401  (register their models with timm)


def create_model(name: str, num_classes: int, pretrained: bool = False, checkpoint: Path | None = None,
                 kwargs: dict[str, Any] | None = None, field: str = "model") -> nn.Module:
    """timm.create_model, then local weights if given. Problems become UserErrors naming `field`."""
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, num_classes=num_classes,
                                  **(kwargs or {}))
    except RuntimeError as exc:
        if pretrained:
            raise UserError(
                f"Could not fetch timm's pretrained weights for `{name}` ({field}): {exc}. Without internet access, "
                f"download the weights elsewhere and set `{field.rsplit('.', 1)[0]}.checkpoint` to the local file."
            ) from None
        raise UserError(f"timm could not build `{name}` ({field}): {exc}.") from None
    except TypeError as exc:
        raise UserError(f"timm could not build `{name}` ({field}) with kwargs {kwargs}: {exc}. "
                        f"Remove or rename the offending key under `{field.rsplit('.', 1)[0]}.kwargs`.") from None
    if checkpoint is not None:
        load_weights(model, checkpoint, field=field.rsplit(".", 1)[0] + ".checkpoint")
    return model


def load_weights(model: nn.Module, path: Path, field: str = "checkpoint") -> None:
    """Load a kd2deploy checkpoint, a {'state_dict'|'model': ...} dict or a plain state_dict into `model`."""
    ckpt = load_checkpoint(path)
    state = ckpt
    for key in ("state_dict", "model_state", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} ({field}) holds no model weights: expected a kd2deploy checkpoint or a state_dict "
                        "of tensors. Point the field at a student.pt/last.pt from a run, or at a saved state_dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape mismatch {', '.join(mismatched[:2])}" if mismatched else "",
        ]))
        raise UserError(f"The weights in {path} ({field}) do not fit the model `{type(model).__name__}`: {details}. "
                        "Check that the model name, its kwargs and the number of classes match those the "
                        "checkpoint was trained with.")
    model.load_state_dict(state)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_complexity(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameters and GFLOPs for one image. torch's FlopCounterMode counts convolutions and matrix multiplies
    (attention included) at 2 FLOPs per multiply-add, so ResNet-18 at 224 is 3.6 (the "1.8 GFLOPs" papers quote
    are multiply-adds); elementwise work, such as involution's multiply-and-sum, is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return {"params": count_params(model), "gflops": counter.get_total_flops() / 1e9}
