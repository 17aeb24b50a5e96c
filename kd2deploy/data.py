"""Datasets and loaders: torchvision datasets, timm transforms and mixup, distributed samplers."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .cifar import CIFAR_MEAN, CIFAR_STD
from .errors import UserError
from .recipe import DataConfig
from .valdata import MINI_CIFAR10, spread_indices

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


CHANNELS = 3  # every kd2deploy dataset yields RGB images, so every artifact takes 3-channel NCHW input


@dataclass
class DataInfo:
    """What a deployed model needs to know about its inputs; stored in checkpoints and manifests."""

    dataset: str
    num_classes: int
    class_names: list[str]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    root: str | None = None
    val_dir: str = "val"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class SampleDataset(Dataset):
    """Applies a transform and yields (image, target, index); the index lets a method look up per-sample
    data such as cached teacher outputs."""

    def __init__(self, dataset: Dataset, transform=None):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return (self.transform(image) if self.transform else image), target, index


def eval_transform(info: DataInfo):
    return create_transform(info.img_size, is_training=False, interpolation=info.interpolation,
                            mean=info.mean, std=info.std, crop_pct=info.crop_pct)


def train_transform(cfg: DataConfig, info: DataInfo):
    aug = cfg.augment
    if not aug.enabled:
        return eval_transform(info)
    timm_stages = create_transform(info.img_size, is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                                   color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, re_prob=aug.re_prob,
                                   interpolation=info.interpolation, mean=info.mean, std=info.std,
                                   separate=aug.crop == "padded")
    if aug.crop == "random_resized":
        return timm_stages
    # timm has no padded crop: replace its geometric stage, keep its photometric and final stages
    size = info.img_size
    geometric = transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode(info.interpolation)),
        transforms.RandomCrop(size, padding=aug.padding, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(aug.hflip)])
    return transforms.Compose([geometric, *timm_stages[1:]])


def _default_stats(dataset: str) -> tuple[tuple, tuple]:
    if dataset in ("cifar10", "mini_cifar10"):
        return CIFAR_MEAN, CIFAR_STD
    if dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _image_folder(path: Path, field: str) -> datasets.ImageFolder:
    if not path.is_dir():
        raise UserError(f"Data folder {path} does not exist ({field}). Point `data.root` at a folder holding "
                        "one sub-folder per class (ImageFolder layout), e.g. train/<class>/*.jpg and "
                        "val/<class>/*.jpg.")
    try:
        return datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"Data folder {path} ({field}) holds no images in ImageFolder layout ({exc}). "
                        "It needs one sub-folder per class with .jpg/.png files inside.") from None


def _cifar(cfg: DataConfig, train: bool) -> Dataset:
    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
    try:
        return cls(str(cfg.root), train=train, download=cfg.download)
    except RuntimeError as exc:
        raise UserError(f"{cfg.dataset} was not found under {cfg.root} (data.root): {exc}. Point `data.root` at the "
                        f"folder holding torchvision's `{folder}`, or set `data.download: true` on a machine with "
                        "internet access.") from None


def _raw_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """Untransformed train and val datasets of (PIL image, class index), and the class names."""
    if cfg.dataset == "mini_cifar10":
        train = _image_folder(MINI_CIFAR10 / "train", "bundled mini_cifar10")
        return train, _image_folder(MINI_CIFAR10 / "val", "bundled mini_cifar10"), train.classes
    if cfg.root is None:
        raise UserError(f"Dataset `{cfg.dataset}` needs `data.root`: the folder that holds it.")
    if cfg.dataset in ("cifar10", "cifar100"):
        train = _cifar(cfg, True)
        return train, _cifar(cfg, False), train.classes
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"Data root {root} (data.root) does not exist. Point it at the folder that holds "
                        f"`{cfg.train_dir}/` and `{cfg.val_dir}/` in ImageFolder layout.")
    train = _image_folder(root / cfg.train_dir, "data.train_dir")
    if (root / cfg.val_dir).is_dir():
        return train, _image_folder(root / cfg.val_dir, "data.val_dir"), train.classes
    if cfg.val_fraction is None:
        raise UserError(f"{root} has no `{cfg.val_dir}/` folder (data.val_dir). Add one, name the right folder in "
                        "`data.val_dir`, or set `data.val_fraction` (e.g. 0.1) to hold out part of the training set.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(order) * cfg.val_fraction))
    return Subset(train, order[n_val:]), Subset(train, order[:n_val]), train.classes


def _info(cfg: DataConfig, class_names: list[str]) -> DataInfo:
    default_mean, default_std = _default_stats(cfg.dataset)
    root = str(MINI_CIFAR10) if cfg.dataset == "mini_cifar10" else (str(cfg.root) if cfg.root else None)
    return DataInfo(dataset=cfg.dataset, num_classes=len(class_names), class_names=list(class_names),
                    img_size=cfg.img_size, mean=tuple(cfg.mean or default_mean), std=tuple(cfg.std or default_std),
                    interpolation=cfg.interpolation, crop_pct=cfg.crop_pct, root=root, val_dir=cfg.val_dir)


def build_datasets(cfg: DataConfig, seed: int = 0, augment: bool = True
                   ) -> tuple[SampleDataset, SampleDataset, DataInfo]:
    """Transformed train and val datasets yielding (image, target, index), plus the DataInfo.
    augment=False gives the training images the eval transform (calibration, teacher caches)."""
    train, val, names = _raw_splits(cfg, seed)
    info = _info(cfg, names)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"Dataset `{cfg.dataset}` at {info.root} has an empty {'train' if len(train) == 0 else 'val'} "
                        "split. Check `data.root`, `data.train_dir` and `data.val_dir`.")
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        train = Subset(train, sorted(order[: cfg.train_subset]))
    train_tf = train_transform(cfg, info) if augment else eval_transform(info)
    return SampleDataset(train, train_tf), SampleDataset(val, eval_transform(info)), info


def val_dataset(cfg: DataConfig, seed: int = 0) -> SampleDataset:
    """The val split alone, with the eval transform."""
    return build_datasets(cfg, seed, augment=False)[1]


def spread_subset(dataset: Dataset, n: int | None) -> Dataset:
    """n images at valdata.spread_indices (all of them when n is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, spread_indices(len(dataset), n).tolist())


def random_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    return Subset(dataset, sorted(np.random.default_rng(seed).choice(len(dataset), n, replace=False).tolist()))


def numpy_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images float32 NCHW, targets) batches in dataset order: what every deployment runner takes."""
    for images, targets, _ in eval_loader(dataset, batch_size, num_workers=0):
        yield images.numpy(), targets.numpy()


def build_mixup(cfg: DataConfig, num_classes: int) -> Mixup | None:
    aug = cfg.augment
    if not aug.enabled or (aug.mixup <= 0 and aug.cutmix <= 0):
        return None
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                 label_smoothing=aug.label_smoothing, num_classes=num_classes)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                 pin_memory: bool = False) -> DataLoader:
    """Per-process loader over a DistributedSampler (also for one process): the global batch order depends
    only on (seed, epoch), so single-process and torchrun runs see the same global batches."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=pin_memory, persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Strided shard per process, no padding, so reduced metrics count every image exactly once."""
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


class HeldOutValSplit:
    """A recorded held-out part of a training folder (data.val_fraction) as labelled numpy batches, rebuilt with
    the same torch generator as in training (valdata.LabelledImages)."""

    def __init__(self, data: dict[str, Any], seed: int, samples: int | None):
        self.dataset = spread_subset(val_dataset(DataConfig.model_validate(data), seed), samples)
        self.source = f"{data['root']} (val_fraction {data['val_fraction']} of {data['train_dir']}/, seed {seed})"

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from numpy_batches(self.dataset, batch_size)
