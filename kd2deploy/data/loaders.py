"""Training data in torch: the registry's datasets with timm transforms and mixup, seeded subsets, distributed
samplers and loaders."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..errors import UserError
from .resident import cutout_
from .sources import DataInfo, default_stats, get_dataset
from .valset import spread_indices

if TYPE_CHECKING:
    from ..recipe_schema import DataConfig


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


class Cutout:
    """resident.cutout_ on one normalised image tensor (the loader path's last transform)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return cutout_(image[None], self.size)[0]

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


def train_transform(cfg: DataConfig, info: DataInfo):
    transform = _geometric_photometric_final(cfg, info)
    aug = cfg.augment
    return transforms.Compose([transform, Cutout(aug.cutout)]) if aug.enabled and aug.cutout else transform


def _geometric_photometric_final(cfg: DataConfig, info: DataInfo):
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


def _raw_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """Untransformed train and val datasets of (PIL image, class index), and the class names."""
    source = get_dataset(cfg.dataset)
    if source.needs_root and cfg.root is None:
        raise UserError(f"Dataset `{cfg.dataset}` needs `data.root`: the folder that holds it.")
    return source.training_splits(cfg, seed)


def _info(cfg: DataConfig, class_names: list[str]) -> DataInfo:
    default_mean, default_std = default_stats(cfg.dataset)
    root = get_dataset(cfg.dataset).root(cfg)
    root = str(root) if root else None
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


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The class of every item of a (transformed, subset) dataset, in its index order, without decoding images
    where the dataset lists its targets (ImageFolder, torchvision's CIFAR)."""
    if isinstance(dataset, SampleDataset):
        return dataset_targets(dataset.dataset)
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(np.asarray(targets), dtype=torch.long)


def val_dataset(cfg: DataConfig, seed: int = 0) -> SampleDataset:
    """The val split alone, with the eval transform."""
    return build_datasets(cfg, seed, augment=False)[1]


def spread_subset(dataset: Dataset, n: int | None) -> Dataset:
    """n images at valset.spread_indices (all of them when n is None or larger)."""
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
