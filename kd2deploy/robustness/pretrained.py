"""The study's own shape and texture sets, made with pretrained networks (construction "pretrained"), used by
`make-sets` when their torchvision weights are already in torch's hub cache (nothing is downloaded).

- `shape`: silhouettes from FCN-ResNet-101 (torchvision, COCO with the 20 VOC classes). The image is upsampled to
  `size` pixels; every pixel whose most likely class is not background is the object, drawn black on white at the
  image's size. A small CIFAR image is often all "background" to a network trained on large photos; then the object
  is the pixels whose background probability is below the image's mean (its most object-like part). The paper is
  silent on this; the choice is recorded in sets.json.
- `texture`: style transfer after Gatys et al. (CVPR 2016) with VGG-19 (torchvision, ImageNet): the content (the
  shape) of an image of another class and the style (the texture) of this image, optimised from the content image
  with Adam at `size` pixels: style = Gram matrices of relu1_1 … relu5_1, content = relu4_2 (their Eq. 1–5). The
  folder is the texture's class and conflicts.csv names the shape's, as for the offline construction.

Needs torch and torchvision (kd2deploy[train]); runs on the GPU when there is one (style transfer optimises every
image, so on a CPU it takes hours for 10,000 images).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE_WEIGHTS = ("torchvision.models.segmentation", "FCN_ResNet101_Weights", "COCO_WITH_VOC_LABELS_V1")
TEXTURE_WEIGHTS = ("torchvision.models", "VGG19_Weights", "IMAGENET1K_V1")
STYLE_LAYERS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in vgg19().features
CONTENT_LAYER = 22  # relu4_2


def _weights(spec: tuple[str, str, str]) -> Any:
    import importlib

    module, enum, member = spec
    return getattr(getattr(importlib.import_module(module), enum), member)


def weight_file(spec: tuple[str, str, str]) -> Path:
    """Where torchvision keeps these weights once downloaded (torch.hub's checkpoints folder)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(_weights(spec).url).path).name


def missing() -> list[str]:
    """Why the pretrained construction cannot run here (empty when it can)."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return ['torch and torchvision are not installed (pip install "kd2deploy[train]")']
    files = [weight_file(spec) for spec in (SHAPE_WEIGHTS, TEXTURE_WEIGHTS)]
    return [f"{path} is missing" for path in files if not path.is_file()]


def _load_state(spec: tuple[str, str, str]) -> dict[str, Any]:
    import torch

    return torch.load(weight_file(spec), map_location="cpu", weights_only=True)


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_tensor(images: np.ndarray, size: int, device: Any = "cpu") -> Any:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _normalise(x: Any) -> Any:
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (x - mean) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)


class Silhouettes:
    """Black-on-white object masks of a batch of images from a segmentation network (`model(x)["out"]`, channel 0
    = background)."""

    def __init__(self, size: int = 224, model: Any = None):

        if model is None:
            from torchvision.models.segmentation import fcn_resnet101

            model = fcn_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
            model.load_state_dict(_load_state(SHAPE_WEIGHTS))
        self.device = _device()
        self.model, self.size = model.eval().to(self.device), size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = images.shape[1:3]
        with torch.no_grad():
            scores = self.model(_normalise(_to_tensor(images, self.size, self.device)))["out"].float()
            scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
            background = scores.softmax(1)[:, 0]
            mask = scores.argmax(1) != 0
            for i in range(len(mask)):
                if not mask[i].any():  # nothing found: the most object-like part of the image
                    mask[i] = background[i] < background[i].mean()
        out = np.where(mask.cpu().numpy(), 0, 255).astype(np.uint8)
        return np.repeat(out[..., None], 3, axis=3)


def gram(features: Any) -> Any:
    """Gram matrices of (N, C, H, W) features, normalised by C·H·W (Gatys et al. Eq. 3)."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


class StyleTransfer:
    """Gatys et al. style transfer of a batch: each output has the content of `shapes[i]` and the style of
    `textures[i]`."""

    def __init__(self, size: int = 128, steps: int = 300, style_weight: float = 1e6, lr: float = 0.03,
                 features: Any = None):
        if features is None:
            from torchvision.models import vgg19

            model = vgg19(weights=None)
            model.load_state_dict(_load_state(TEXTURE_WEIGHTS))
            features = model.features
        self.device = _device()
        self.features = features[:max(*STYLE_LAYERS, CONTENT_LAYER) + 1].eval().requires_grad_(False).to(self.device)
        for layer in self.features:
            if hasattr(layer, "inplace"):
                layer.inplace = False  # the outputs at STYLE_LAYERS are kept
        self.size, self.steps, self.style_weight, self.lr = size, steps, style_weight, lr

    def _activations(self, x: Any) -> tuple[list[Any], Any]:
        styles, content = [], None
        x = _normalise(x)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in STYLE_LAYERS:
                styles.append(gram(x))
            if i == CONTENT_LAYER:
                content = x
        return styles, content

    def loss(self, image: Any, style_targets: list[Any], content_target: Any) -> Any:
        """Eq. 7: content loss (Eq. 1) + style_weight × the mean over layers of the Gram losses (Eq. 4–5)."""
        styles, content = self._activations(image)
        style = sum(((s - t) ** 2).sum(dim=(1, 2)) for s, t in zip(styles, style_targets, strict=True))
        return (((content - content_target) ** 2).mean(dim=(1, 2, 3)) + self.style_weight * style / len(styles)).sum()

    def __call__(self, textures: np.ndarray, shapes: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = textures.shape[1:3]
        with torch.no_grad():
            style_targets, _ = self._activations(_to_tensor(textures, self.size, self.device))
            _, content_target = self._activations(_to_tensor(shapes, self.size, self.device))
        image = _to_tensor(shapes, self.size, self.device).requires_grad_(True)
        optimizer = torch.optim.Adam([image], lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad()
            self.loss(image, style_targets, content_target).backward()
            optimizer.step()
            with torch.no_grad():
                image.clamp_(0, 1)
        out = F.interpolate(image.detach(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return (out.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
