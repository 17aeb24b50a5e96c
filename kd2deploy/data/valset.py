"""Val images without torch: ImageFolder and CIFAR readers, timm's eval transform in numpy and Pillow, and top-1
of any runner. This is what `kd2deploy eval` and `kd2deploy bench` read images with, so they run on a device that
has only an export folder and a runtime (kd2deploy[edge]); tests check the pixels equal timm's transform.

CIFAR's python batches are pickles, and a pickle can name any importable callable (that is how a hostile one runs
code), so they are read by an unpickler that accepts only containers, strings, bytes and numpy arrays."""
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

from ..errors import UserError

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
        """n images at spread_indices (all when n is None or larger), as data.loaders.spread_subset picks."""
        if n is None or n >= len(self):
            return self
        return self.subset(spread_indices(len(self), n), self.source)

    def subset(self, indices: Sequence[int], source: str) -> ValSet:
        picked = np.asarray(indices, dtype=np.int64)
        return ValSet([self.items[i] for i in picked], self.labels[picked], self.open, self.transform, source)

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


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR's python batches: dicts, lists, strings, bytes and numpy arrays, nothing else."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names `{module}.{name}`, which a CIFAR batch never holds (a pickle "
                                         "that names callables can run code)")
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return _ArraysOnly(f, encoding="latin1").load()


def cifar_pickle(path: Path, label_key: str, dataset: str, folder: str, transform: EvalTransform) -> ValSet:
    """torchvision's CIFAR-10/100 test split, read from its python pickle without torchvision."""
    try:
        entry = load_cifar_pickle(path)
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{dataset} test split {path} cannot be read ({exc}). Point data.root at the folder holding "
                        f"torchvision's `{folder}`, or give --val DIR with images in class folders.") from None
    return ValSet(images, labels, Image.fromarray, transform, str(path))


def evaluate_runner(run: Callable[[np.ndarray], np.ndarray], images: LabelledImages, batch_size: int = 64
                    ) -> dict[str, float]:
    """{loss, top1, top5, count} of run(batch) -> logits over labelled images: the same figures as
    kd2deploy.train.evaluate for PyTorch models, in numpy."""
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
