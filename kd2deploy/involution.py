"""Involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021)
and RedNet, registered in timm's model registry as timm ResNets whose 3x3 convolutions are involutions.

Involution is spatial-specific and channel-agnostic, the mirror image of convolution: kd2deploy uses RedNets as
the "INN" teachers of the LIB-KD family.
"""
from __future__ import annotations

from typing import Any

from timm.layers import ConvNormAct
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

from .models import CIFAR_CFG, cifar_stem


class Involution2d(nn.Module):
    """Y[i,j,c] = Σ_(u,v)∈Δ_K H[i,j,u,v,g(c)] · X[i+u,j+v,c] (Eq. 4), with the kernel generated from the pixel
    itself, H[i,j] = W1 σ(W0 X[i,j]) (Eq. 6): a channel reduction by `reduction` (1x1 conv, BN, ReLU) and a span
    to K·K weights per group of `group_channels` channels. Strided involutions average-pool before generating
    kernels, as the paper does. Applied with unfold, so it exports to ONNX."""

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction: int = 4):
        super().__init__()
        group_channels = min(group_channels, channels)
        if channels % group_channels:
            raise ValueError(f"involution channels ({channels}) must be a multiple of group_channels "
                             f"({group_channels})")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = channels // group_channels
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.reduce = ConvNormAct(channels, max(1, channels // reduction), 1)
        self.span = nn.Conv2d(max(1, channels // reduction), kernel_size * kernel_size * self.groups, 1)
        self.unfold = nn.Unfold(kernel_size, padding=(kernel_size - 1) // 2, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.span(self.reduce(self.pool(x)))  # (B, K²·G, H', W')
        b, _, h, w = kernel.shape
        k2 = self.kernel_size * self.kernel_size
        kernel = kernel.view(b, self.groups, 1, k2, h, w)  # shared by the channels of a group
        patches = self.unfold(x).view(b, self.groups, self.channels // self.groups, k2, h, w)
        return (kernel * patches).sum(dim=3).view(b, self.channels, h, w)


class InvolutionBottleneck(Bottleneck):
    """timm's ResNet bottleneck with the 3x3 convolution replaced by a KxK involution (RedNet, §4.1)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *args: Any, involution_kernel: int = 7,
                 group_channels: int = 16, **kwargs: Any):
        super().__init__(inplanes, planes, stride, *args, **kwargs)
        width = self.conv2.out_channels
        self.conv2 = Involution2d(width, involution_kernel, stride, group_channels)


_REDNET_LAYERS = {"rednet26": (1, 2, 4, 1), "rednet38": (2, 3, 5, 2), "rednet50": (3, 4, 6, 3)}
_IMAGENET_CFG = {"input_size": (3, 224, 224), "num_classes": 1000, "interpolation": "bicubic", "url": "",
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "conv1.0",
                 "classifier": "fc"}


def _rednet(variant: str, pretrained: bool, cifar: bool, kwargs: dict[str, Any]) -> ResNet:
    """A RedNet: deep stem (3x3 conv, 3x3 involution, 3x3 conv) and involution bottlenecks.
    `involution_kernel` (7) and `group_channels` (16) are kwargs; the CIFAR variants use a stride-1 stem."""
    block_args = {"involution_kernel": kwargs.pop("involution_kernel", 7),
                  "group_channels": kwargs.pop("group_channels", 16), **kwargs.pop("block_args", {})}
    args = {"stem_type": "deep", "stem_width": 32, **kwargs}
    default_cfg = {**CIFAR_CFG, "first_conv": "conv1.0", "classifier": "fc"} if cifar else _IMAGENET_CFG
    args["pretrained_cfg"] = args.get("pretrained_cfg") or dict(default_cfg)  # create_model passes None
    model = build_model_with_cfg(ResNet, variant, pretrained, block=InvolutionBottleneck,
                                 layers=_REDNET_LAYERS[variant.removesuffix("_cifar")], block_args=block_args,
                                 **args)
    stem = model.conv1
    stem[3] = Involution2d(stem[3].in_channels, 3, 1, block_args["group_channels"])  # the RedNet stem
    if cifar:
        cifar_stem(model)
    return model


@register_model
def rednet26(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-26 (9.2M parameters at ImageNet size)."""
    return _rednet("rednet26", pretrained, False, kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-38."""
    return _rednet("rednet38", pretrained, False, kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-50."""
    return _rednet("rednet50", pretrained, False, kwargs)


@register_model
def rednet26_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-26 for 32x32 inputs: stride-1 stem, no max-pool (8x downsampling, a 4x4 last map)."""
    return _rednet("rednet26_cifar", pretrained, True, kwargs)


@register_model
def rednet38_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-38 for 32x32 inputs."""
    return _rednet("rednet38_cifar", pretrained, True, kwargs)


@register_model
def rednet50_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-50 for 32x32 inputs."""
    return _rednet("rednet50_cifar", pretrained, True, kwargs)
