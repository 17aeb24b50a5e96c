"""Model creation: every model is built by timm.create_model; weights come from timm or a local file.

kd2deploy registers a few CIFAR-size models with timm's registry, so recipes name them like any other.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .checkpoint import load_checkpoint
from .cifar import CIFAR_CFG, CIFAR_MEAN, CIFAR_STD, cifar_stem  # noqa: F401  (CIFAR_MEAN/STD: re-exported)
from .errors import UserError


def _cifar_vit(cls: type[VisionTransformer], variant: str, pretrained: bool, defaults: dict[str, Any],
               kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's ViT/DeiT with CIFAR-size defaults; recipe kwargs (e.g. depth) override them."""
    args = {"img_size": 32, "patch_size": 4, **defaults, **kwargs}
    args["pretrained_cfg"] = args.get("pretrained_cfg") or dict(CIFAR_CFG)  # create_model passes None
    return build_model_with_cfg(cls, variant, pretrained, **args)


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A ViT for 32x32 inputs on a CPU budget (64 patch tokens + class token, 96 wide, 6 blocks)."""
    return _cifar_vit(VisionTransformer, "vit_nano_patch4_32", pretrained,
                      {"embed_dim": 96, "depth": 6, "num_heads": 3}, kwargs)


@register_model
def deit_nano_distilled_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT with a distillation token sized for 32x32 inputs on a CPU budget (64 tokens, 96 wide, 6 blocks)."""
    return _cifar_vit(VisionTransformerDistilled, "deit_nano_distilled_patch4_32", pretrained,
                      {"embed_dim": 96, "depth": 6, "num_heads": 3}, kwargs)


@register_model
def deit_tiny_distilled_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT-Tiny (192 wide, 12 blocks) with a distillation token, for 32x32 inputs."""
    return _cifar_vit(VisionTransformerDistilled, "deit_tiny_distilled_patch4_32", pretrained,
                      {"embed_dim": 192, "depth": 12, "num_heads": 3}, kwargs)


def _cifar_resnet(variant: str, pretrained: bool, layers: tuple[int, ...], kwargs: dict[str, Any]) -> ResNet:
    args = dict(kwargs)
    args["pretrained_cfg"] = args.get("pretrained_cfg") or dict(CIFAR_CFG)  # create_model passes None
    return cifar_stem(build_model_with_cfg(ResNet, variant, pretrained, block=BasicBlock, layers=layers, **args))


@register_model
def resnet10_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-10 (one basic block per stage) with the CIFAR stem; `channels`/`stem_width` kwargs narrow it."""
    return _cifar_resnet("resnet10_cifar", pretrained, (1, 1, 1, 1), kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with the CIFAR stem (the usual CIFAR ResNet-18, 11M parameters)."""
    return _cifar_resnet("resnet18_cifar", pretrained, (2, 2, 2, 2), kwargs)


class ResNet9(nn.Module):
    """The fast-training CIFAR network of Page's DAWNBench entry (myrtle.ai, "How to train your ResNet", 2018): a
    3x3 stem, three stages of conv-BN-ReLU + 2x2 max-pool, a residual pair of convs after the first and last.
    Wide and shallow, so it reaches 94% on CIFAR-10 in 24 epochs at full width.
    Differences from Page's: global average pooling instead of max (so the classifier can also be applied at every
    position, as CSKD's dense teacher predictions need) and no 0.125 logit scale (label smoothing tames the logits).
    `width` is the stem's channel count (Page: 64); the stages have 2x, 4x and 8x it."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 64, drop_rate: float = 0.0,
                 global_pool: str = "avg", **_: Any):
        super().__init__()
        c = [width, 2 * width, 4 * width, 8 * width]
        self.num_classes, self.num_features, self.drop_rate = num_classes, c[3], drop_rate
        self.stem = ConvNormAct(in_chans, c[0], 3)
        self.layer1 = nn.Sequential(ConvNormAct(c[0], c[1], 3), nn.MaxPool2d(2), _Residual(c[1]))
        self.layer2 = nn.Sequential(ConvNormAct(c[1], c[2], 3), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(ConvNormAct(c[2], c[3], 3), nn.MaxPool2d(2), _Residual(c[3]))
        self.feature_info = [{"num_chs": n, "reduction": r, "module": m}
                             for n, r, m in zip(c, (1, 2, 4, 8), ("stem", "layer1", "layer2", "layer3"), strict=True)]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(c[3], num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.dropout(self.global_pool(x), p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class _Residual(nn.Module):
    """x + two conv-BN-ReLU layers (ResNet-9's residual pair)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.conv2 = ConvNormAct(channels, channels, 3), ConvNormAct(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


@register_model
def resnet9_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet9:
    """Page's ResNet-9 for 32x32 inputs (6.6M parameters at `width: 64`; 1.6M at `width: 32`)."""
    args = dict(kwargs)
    args["pretrained_cfg"] = args.get("pretrained_cfg") or {**CIFAR_CFG, "first_conv": "stem.conv", "classifier": "fc"}
    return build_model_with_cfg(ResNet9, "resnet9_cifar", pretrained, feature_cfg={"out_indices": (0, 1, 2, 3)}, **args)


class ConvStemEmbed(nn.Module):
    """A convolutional stem in place of a ViT's patchify layer (Xiao et al., "Early Convolutions Help Transformers
    See Better", NeurIPS 2021): a 3x3 conv-BN-ReLU, then log2(patch_size) stages of 3x3 conv-BN-ReLU + 2x2
    max-pool doubling the width, and a 1x1 projection to the embedding. Returns (B, N, D) tokens like timm's
    PatchEmbed, on the same grid a patch_size patchify would give."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 128,
                 width: int = 32, **_: Any):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size:
            raise ValueError(f"the convolutional stem needs a power-of-two patch_size, not {patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, channels = [ConvNormAct(in_chans, width, 3)], width
        for _stage in range(stages):
            layers += [ConvNormAct(channels, 2 * channels, 3), nn.MaxPool2d(2)]
            channels *= 2
        self.proj = nn.Sequential(*layers, nn.Conv2d(channels, embed_dim, 1))

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@register_model
def vit_convstem_cifar(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A small ViT for 32x32 inputs with a convolutional stem (64 tokens, 128 wide, 6 blocks of 4 heads, MLP ratio
    2, no class token: average-pooled tokens; 0.9M parameters). `stem_width` sets the stem's first width (32)."""
    stem = partial(ConvStemEmbed, width=kwargs.pop("stem_width", 32))
    return _cifar_vit(VisionTransformer, "vit_convstem_cifar", pretrained,
                      {"embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0, "class_token": False,
                       "global_pool": "avg", "embed_layer": stem}, kwargs)


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


from . import involution, token_vit  # noqa: E402,F401  (register their models with timm)
