"""kd2deploy's CIFAR-size models, registered with timm: ViT/DeiT with 4x4 patches, ResNets with the CIFAR stem,
Page's ResNet-9 and a small ViT with a convolutional stem. Recipes name them like any timm model."""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch.nn.functional as F
from timm.layers import ConvNormAct, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..data.sources import CIFAR_MEAN, CIFAR_STD


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg (timm's `default_cfgs` entry) for a 32x32 CIFAR-10 model without published weights."""
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "interpolation": "bilinear", "crop_pct": 1.0, **kwargs}


_VIT = {"first_conv": "patch_embed.proj", "classifier": "head"}
default_cfgs = generate_default_cfgs({
    "vit_nano_patch4_32": cifar_cfg(**_VIT),
    "deit_nano_distilled_patch4_32": cifar_cfg(**{**_VIT, "classifier": ("head", "head_dist")}),
    "deit_tiny_distilled_patch4_32": cifar_cfg(**{**_VIT, "classifier": ("head", "head_dist")}),
    "resnet10_cifar": cifar_cfg(first_conv="conv1", classifier="fc"),
    "resnet18_cifar": cifar_cfg(first_conv="conv1", classifier="fc"),
    "resnet9_cifar": cifar_cfg(first_conv="stem.conv", classifier="fc"),
    "vit_convstem_cifar": cifar_cfg(first_conv="patch_embed.proj.0.conv", classifier="head"),
})


def cifar_stem(model: ResNet) -> ResNet:
    """Give a timm ResNet the usual CIFAR stem: stride 1 and no max-pool, so a 32x32 input ends in a 4x4 map
    (8x downsampling) instead of timm's 1x1 (32x). A single-conv stem becomes one 3x3 convolution; a deep stem
    keeps its layers with its first convolution at stride 1."""
    stem = model.conv1
    if isinstance(stem, nn.Sequential):
        stem[0].stride = (1, 1)
    else:
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // 4)  # the stem (2x) and max-pool (2x) are gone
    return model


def _cifar_vit(cls: type[VisionTransformer], variant: str, pretrained: bool, defaults: dict[str, Any],
               kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's ViT/DeiT with CIFAR-size defaults; recipe kwargs (e.g. depth) override them."""
    return build_model_with_cfg(cls, variant, pretrained, **{"img_size": 32, "patch_size": 4, **defaults, **kwargs})


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
    return cifar_stem(build_model_with_cfg(ResNet, variant, pretrained, block=BasicBlock, layers=layers, **kwargs))


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
    return build_model_with_cfg(ResNet9, "resnet9_cifar", pretrained, feature_cfg={"out_indices": (0, 1, 2, 3)},
                                **kwargs)


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
