"""The manipulated copies of a val set that measure a model's biases and robustness, as pure functions of one image.

Every generator takes an RGB image as uint8 (H, W, 3) and a numpy Generator seeded for that image and that set,
and returns the manipulated uint8 image of the same size. Torch-free (numpy, Pillow, scipy, scikit-image), so the
sets can be made and read on an edge install.

Bias sets (after the cross-architecture study behind kd2deploy; bias = top-1 on the set / top-1 on the original):
- `locality`: SLIC superpixels (Achanta et al. 2012, scikit-image), each flattened to its mean colour;
- `scramble_<g>`: the image cut into g × g patches and the patches permuted (one seeded permutation per image,
  never the identity);
- `noise`: one fixed Gaussian pattern (drawn once from the seed) added at one fixed place in every image; its side
  is `noise_fraction` of the image side (the study's 32×32 region is the whole of a 32×32 CIFAR image);
- `shape` (offline construction): Canny edges of the image, dark lines on white, the shape without the texture;
- `texture` (offline construction): cue-conflict images by amplitude–phase recombination (Chen et al., ICCV 2021):
  the amplitude spectrum of the image (its texture, which names the folder) with the phase of an image of another
  class (its shape, recorded in conflicts.csv), so shape bias = shape hits / (shape hits + texture hits) in the
  manner of Geirhos et al. 2019.
- `shape` and `texture` (pretrained construction, in `pretrained.py`): the study's way, with segmentation and
  style-transfer networks, used when their weights are available locally.
Corruptions in the style of CIFAR-10-C (Hendrycks & Dietterich 2019), regenerated with CIFAR's parameters (not the
official files): Gaussian, shot and impulse noise, defocus and motion blur, brightness, contrast, pixelate, JPEG,
each at severities 1–5.
"""
from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

Generator = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def image_rng(seed: int, set_name: str, index: int) -> np.random.Generator:
    """The generator for one image of one set: independent of the order and of the other sets."""
    return np.random.default_rng([seed, zlib.crc32(set_name.encode()), index])


# ------------------------------------------------------------------------------------------------ bias sets
def locality(image: np.ndarray, n_segments: int = 64, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels, each replaced by its mean colour."""
    from skimage.segmentation import slic

    labels = slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    flat, pixels = labels.reshape(-1), image.reshape(-1, 3).astype(np.float64)
    counts = np.bincount(flat)
    means = np.stack([np.bincount(flat, weights=pixels[:, c]) for c in range(3)], axis=1) / counts[:, None]
    return to_uint8(means[flat].reshape(image.shape))


def patch_permutation(grid: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of grid² patches that is not the identity (when there is more than one patch)."""
    while True:
        order = rng.permutation(grid * grid)
        if grid == 1 or (order != np.arange(grid * grid)).any():
            return order


def scramble(image: np.ndarray, rng: np.random.Generator, grid: int) -> np.ndarray:
    """The image's grid × grid patches, permuted; sides that do not divide keep their last rows/columns."""
    h, w = (image.shape[0] // grid) * grid, (image.shape[1] // grid) * grid
    ph, pw = h // grid, w // grid
    patches = image[:h, :w].reshape(grid, ph, grid, pw, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, ph, pw, 3)
    shuffled = patches[patch_permutation(grid, rng)]
    out = image.copy()
    out[:h, :w] = shuffled.reshape(grid, grid, ph, pw, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)
    return out


@dataclass(frozen=True)
class FixedNoise:
    """One Gaussian pattern (std `sigma` in [0, 1] units) at one place, the same in every image."""

    seed: int
    fraction: float = 1.0
    sigma: float = 0.1

    def region(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) of the noisy square, drawn once from the seed."""
        side = max(1, round(self.fraction * min(height, width)))
        rng = np.random.default_rng([self.seed, 1])
        return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side

    def pattern(self, side: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2]).normal(0.0, self.sigma * 255, size=(side, side, 3))

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        top, left, side = self.region(*image.shape[:2])
        out = image.astype(np.float64)
        out[top:top + side, left:left + side] += self.pattern(side)
        return to_uint8(out)


def edges(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of the grey image as dark lines on white, in three channels."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    lines = canny(rgb2gray(image), sigma=sigma)
    return np.repeat(np.where(lines, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def amplitude_phase(texture: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """The amplitude spectrum of `texture` with the phase of `shape`, per channel (APR, Chen et al. 2021)."""
    a, b = np.fft.fft2(texture.astype(np.float64), axes=(0, 1)), np.fft.fft2(shape.astype(np.float64), axes=(0, 1))
    mixed = np.abs(a) * np.exp(1j * np.angle(b))
    return to_uint8(np.real(np.fft.ifft2(mixed, axes=(0, 1))))


# ------------------------------------------------------------------------------------------------ corruptions
def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """An anti-aliased disk kernel (CIFAR-10-C's defocus: a 17×17 support, a 3×3 Gaussian of `alias_blur`)."""
    from scipy.ndimage import gaussian_filter

    span = np.arange(-8, 9) if radius <= 8 else np.arange(-math.ceil(radius), math.ceil(radius) + 1)
    x, y = np.meshgrid(span, span)
    disk = ((x**2 + y**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    return gaussian_filter(disk, alias_blur, truncate=1.0 / alias_blur)  # a 3×3 Gaussian, like cv2 ksize 3


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.ndimage import correlate

    return np.stack([correlate(x[..., c], kernel, mode="mirror") for c in range(x.shape[2])], axis=2)


def _motion_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """A one-sided Gaussian-weighted line of `radius` pixels at `angle` degrees (ImageMagick's motion blur)."""
    size = 2 * radius + 1
    kernel = np.zeros((size, size))
    theta = math.radians(angle)
    for i in range(radius + 1):
        row, col = radius - round(i * math.sin(theta)), radius + round(i * math.cos(theta))
        kernel[row, col] += math.exp(-(i**2) / (2 * sigma**2))
    return kernel / kernel.sum()


CIFAR_C = {  # severity 1..5 parameters of CIFAR-10-C (hendrycks/robustness, make_cifar_c.py)
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}


def corrupt(image: np.ndarray, rng: np.random.Generator, name: str, severity: int) -> np.ndarray:
    """One CIFAR-10-C corruption at severity 1–5."""
    c = CIFAR_C[name][severity - 1]
    x = image.astype(np.float64) / 255
    if name == "gaussian_noise":
        x = x + rng.normal(0.0, c, x.shape)
    elif name == "shot_noise":
        x = rng.poisson(x * c) / c
    elif name == "impulse_noise":  # salt and pepper on `c` of the values, half each (skimage's s&p)
        hit = rng.random(x.shape) < c
        x = np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float64), x)
    elif name == "defocus_blur":
        x = _filter(x, _disk(*c))
    elif name == "motion_blur":
        x = _filter(x, _motion_kernel(c[0], c[1], rng.uniform(-45, 45)))
    elif name == "brightness":
        from skimage.color import hsv2rgb, rgb2hsv

        hsv = rgb2hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        x = hsv2rgb(hsv)
    elif name == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        x = (x - means) * c + means
    elif name == "pixelate":
        h, w = image.shape[:2]
        small = Image.fromarray(image).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
        return np.asarray(small.resize((w, h), Image.Resampling.BOX))
    elif name == "jpeg_compression":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=c)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return to_uint8(np.clip(x, 0, 1) * 255)


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class SetSpec:
    """One manipulated set: how it is made (stated in sets.json and in every table)."""

    name: str
    kind: str  # "bias" or "corruption"
    construction: str  # "offline" (no weights) or "pretrained"
    description: str
    params: dict[str, Any] = field(default_factory=dict)


PRETRAINED_SHAPE = SetSpec("shape", "bias", "pretrained", "FCN-ResNet-101 silhouettes, the object black on white "
                           "(shape without texture)", {"weights": "FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
                                                       "size": 224, "empty_mask": "below-mean background"})
PRETRAINED_TEXTURE = SetSpec("texture", "bias", "pretrained", "VGG-19 style transfer (Gatys et al. 2016): the style "
                             "of the image, the content of an image of another class (cue conflict; the folder is "
                             "the texture's class, conflicts.csv the shape's)",
                             {"weights": "VGG19_Weights.IMAGENET1K_V1", "size": 128, "steps": 300,
                              "style_weight": 1e6, "lr": 0.03})


def bias_sets(noise_fraction: float = 1.0, noise_sigma: float = 0.1, segments: int = 64,
              pretrained: bool = False) -> list[SetSpec]:
    """The bias sets; `pretrained` makes shape and texture with the study's networks instead of offline."""
    offline = _offline_bias_sets(noise_fraction, noise_sigma, segments)
    if not pretrained:
        return offline
    return [{"shape": PRETRAINED_SHAPE, "texture": PRETRAINED_TEXTURE}.get(s.name, s) for s in offline]


def _offline_bias_sets(noise_fraction: float, noise_sigma: float, segments: int) -> list[SetSpec]:
    return [
        SetSpec("locality", "bias", "offline", "SLIC superpixels flattened to their mean colour",
                {"n_segments": segments, "compactness": 10.0}),
        *[SetSpec(f"scramble_{g}", "bias", "offline", f"{g}x{g} patches permuted (seeded, never the identity)",
                  {"grid": g}) for g in (2, 4, 8)],
        SetSpec("noise", "bias", "offline", "one fixed Gaussian pattern at one fixed place in every image",
                {"fraction": noise_fraction, "sigma": noise_sigma}),
        SetSpec("shape", "bias", "offline", "Canny edges, dark on white (shape without texture)", {"sigma": 1.0}),
        SetSpec("texture", "bias", "offline", "amplitude of the image + phase of an image of another class "
                "(cue conflict; the folder is the texture's class, conflicts.csv the shape's)", {}),
    ]


def corruption_sets() -> list[SetSpec]:
    return [SetSpec(f"{name}_{s}", "corruption", "offline", f"{name.replace('_', ' ')}, severity {s} "
                    "(CIFAR-10-C parameters, regenerated)", {"corruption": name, "severity": s,
                                                             "parameter": CIFAR_C[name][s - 1]})
            for name in CIFAR_C for s in range(1, 6)]
