"""CIFAR-size defaults shared by kd2deploy's timm models (a leaf module: models, involution and token_vit use it)."""
from __future__ import annotations

from timm.models.resnet import ResNet
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_CFG = {"input_size": (3, 32, 32), "num_classes": 10, "mean": CIFAR_MEAN, "std": CIFAR_STD, "url": ""}


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
