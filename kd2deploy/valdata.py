"""Val images without torch: ImageFolder and CIFAR readers, timm's eval transform in numpy and Pillow, and top-1
of any runner. This is what `kd2deploy eval` and `kd2deploy bench` read images with, so they run on a device that
has only an export folder and a runtime (kd2deploy[edge]); tests check the pixels equal timm's transform."""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import UserError

MINI_CIFAR10 = Path(__file__).resolve().parent / "assets" / "mini_cifar10"
# torchvision.datasets.folder.IMG_EXTENSIONS: the same files count as images, so splits have the same order
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def spread_indices(length: int, n: int) -> np.ndarray:
    """n indices spread evenly over 0..length-1: ImageFolder splits are sorted by class, so the first n images
    would cover only a few classes."""
    return np.linspace(0, length - 1, n).round().astype(int)


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform (create_transform(is_training=False), center crop mode) for PIL images: resize the
    short side to floor(img_size / crop_pct) like torchvision's Resize, center-crop img_size like CenterCrop, then
    ToTensor and Normalize, as float32 CHW."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_input(cls, spec: dict[str, Any]) -> EvalTransform:
        """From a manifest's `input` section (or a DataInfo dict)."""
        return cls(int(spec["img_size"]), tuple(spec["mean"]), tuple(spec["std"]), spec.get("interpolation",
                   "bilinear"), float(spec.get("crop_pct", 1.0)))

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        scale = math.floor(self.img_size / self.crop_pct)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != scale:  # torchvision's _compute_resized_output_size for a scalar size
            new_short, new_long = scale, int(scale * long / short)
            size = (new_short, new_long) if width <= height else (new_long, new_short)
            image = image.resize(size, PIL_FILTERS[self.interpolation])
            width, height = size
        if width < self.img_size or height < self.img_size:
            raise UserError(f"crop_pct {self.crop_pct} makes the resized image ({width}x{height}) smaller than the "
                            f"{self.img_size} crop; the manifest's input section is wrong, re-export the run.")
        top, left = round((height - self.img_size) / 2.0), round((width - self.img_size) / 2.0)  # CenterCrop's rounding
        image = image.crop((left, top, left + self.img_size, top + self.img_size))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (self.mean, self.std))
        return (pixels - mean) / std


class LabelledImages(Protocol):
    """Anything top-1 is measured on: a length and batches of (float32 NCHW images, int64 labels)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class ValSet:
    """Labelled images read and transformed on demand, in a fixed order."""

    items: Sequence[Any]  # what `open` takes: a file path, or a decoded array
    labels: np.ndarray
    open: Callable[[Any], Image.Image]
    transform: EvalTransform
    source: str  # for messages and the bench context

    def __len__(self) -> int:
        return len(self.labels)

    def spread(self, n: int | None) -> ValSet:
        """n images at spread_indices (all when n is None or larger), as kd2deploy.data.spread_subset picks."""
        if n is None or n >= len(self):
            return self
        picked = spread_indices(len(self), n)
        return ValSet([self.items[i] for i in picked], self.labels[picked], self.open, self.transform, self.source)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            images = np.stack([self.transform(self.open(self.items[i])) for i in range(start, stop)])
            yield images, self.labels[start:stop]


def _open_file(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as exc:
        raise UserError(f"Val image {path} cannot be read ({exc}). Remove or replace it.") from None


def image_folder(root: Path, class_names: Sequence[str], transform: EvalTransform, field: str) -> ValSet:
    """An ImageFolder tree (one sub-folder per class), in torchvision's order; labels follow the model's class
    names, so a folder with fewer classes (a subset) or another class order still scores correctly."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Val folder {root} ({field}) does not exist. Give a folder with one sub-folder per class "
                        "(ImageFolder layout), e.g. val/<class>/*.jpg.")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise UserError(f"Val folder {root} ({field}) has class folders the model does not know: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Its sub-folders must be named "
                        f"like the model's classes ({', '.join(list(class_names)[:5])} ...).")
    paths, labels = [], []
    for name in classes:
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    paths.append(Path(folder) / file)
                    labels.append(index[name])
    if not paths:
        raise UserError(f"Val folder {root} ({field}) holds no images ({', '.join(IMG_EXTENSIONS)}) in class "
                        "sub-folders.")
    return ValSet(paths, np.asarray(labels, dtype=np.int64), _open_file, transform, str(root))


def cifar_test_split(root: Path, dataset: str, transform: EvalTransform) -> ValSet:
    """torchvision's CIFAR-10/100 test split, read from its python pickle without torchvision."""
    folder, file, key = {"cifar10": ("cifar-10-batches-py", "test_batch", "labels"),
                         "cifar100": ("cifar-100-python", "test", "fine_labels")}[dataset]
    path = Path(root) / folder / file
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise UserError(f"{dataset} test split {path} cannot be read ({exc}). Point data.root at the folder holding "
                        f"torchvision's `{folder}`, or give --val DIR with images in class folders.") from None
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ValSet(images, np.asarray(entry[key], dtype=np.int64), Image.fromarray, transform, str(path))


def is_held_out_split(data: dict[str, Any]) -> bool:
    """Whether a recorded data section's val split is a held-out part of its training folder (data.val_fraction):
    that split comes from torch's generator, so only kd2deploy.data rebuilds it."""
    val_dir = Path(data["root"]) / data["val_dir"] if data.get("root") is not None else None
    return (data["dataset"] == "imagefolder" and val_dir is not None and not val_dir.is_dir()
            and data.get("val_fraction") is not None)


def recorded_val_set(data: dict[str, Any], seed: int, class_names: Sequence[str], transform: EvalTransform,
                     samples: int | None = None, where: str = "the manifest") -> LabelledImages:
    """The val split of the run a model comes from, rebuilt from its recorded data section."""
    dataset = data["dataset"]
    if dataset == "mini_cifar10":
        return image_folder(MINI_CIFAR10 / "val", class_names, transform, "bundled mini_cifar10").spread(samples)
    if data.get("root") is None:
        raise UserError(f"The data section in {where} has no root, so its val split cannot be found here. "
                        "Give --val DIR: a folder with one sub-folder per class.")
    if dataset in ("cifar10", "cifar100"):
        return cifar_test_split(Path(data["root"]), dataset, transform).spread(samples)
    if is_held_out_split(data):
        raise ValueError("a held-out split: kd2deploy.data.HeldOutValSplit rebuilds it")
    return image_folder(Path(data["root"]) / data["val_dir"], class_names, transform,
                        f"data.val_dir in {where}").spread(samples)


def evaluate_runner(run: Callable[[np.ndarray], np.ndarray], images: LabelledImages, batch_size: int = 64
                    ) -> dict[str, float]:
    """{loss, top1, top5, count} of run(batch) -> logits over labelled images: the same figures as
    kd2deploy.evaluate for PyTorch models, in numpy."""
    loss = correct1 = correct5 = count = 0.0
    for batch, labels in images.batches(batch_size):
        logits = np.asarray(run(batch), dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss -= float(log_probs[np.arange(len(labels)), labels].sum())
        k = min(5, logits.shape[1])
        topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hits = topk == labels[:, None]
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(axis=1).sum())
        count += len(labels)
    n = max(count, 1.0)
    return {"loss": loss / n, "top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "count": int(count)}
