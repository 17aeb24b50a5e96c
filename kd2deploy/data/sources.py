"""The dataset registry, torch-free: each kind of dataset is one `DatasetSource` that knows its statistics, where
its files are, how its val split is chosen, how training opens it (torchvision, imported lazily) and how the
torch-free reader opens its val split (numpy and Pillow). Training, the teacher-output cache, `kd2deploy eval` and
`kd2deploy bench` all go through it, so adding a dataset is one class here.

The val_fraction split (an ImageFolder without a val folder) is drawn with numpy's PCG64 from the run's seed, so a
device without torch rebuilds it exactly. Runs recorded before kd2deploy 0.2 drew it with torch's generator; their
recorded data sections carry `split_rng: torch` (recipe.migrate_data_section), and rebuilding those needs torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    from .valset import EvalTransform, ValSet

CHANNELS = 3  # every kd2deploy dataset yields RGB images, so every artifact takes 3-channel NCHW input
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*
MINI_CIFAR10 = Path(__file__).resolve().parent.parent / "assets" / "mini_cifar10"


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


def held_out_order(length: int, seed: int, rng: str = "numpy") -> list[int]:
    """The seeded permutation whose first val_fraction is the held-out val split: numpy's PCG64, or torch's
    generator for runs recorded before kd2deploy 0.2 (`split_rng: torch`)."""
    if rng == "numpy":
        return np.random.default_rng(seed).permutation(length).tolist()
    try:
        import torch
    except ImportError:
        raise UserError("This run held out data.val_fraction of its training folder with torch's generator (it was "
                        "trained by kd2deploy < 0.2), which only the training stack rebuilds. Give --val DIR (a "
                        "folder with one sub-folder per class), or install kd2deploy[train].") from None
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed)).tolist()


def held_out_split(length: int, fraction: float, seed: int, rng: str = "numpy") -> tuple[list[int], list[int]]:
    """(train indices, val indices) of a folder of `length` images with `fraction` held out."""
    order = held_out_order(length, seed, rng)
    n_val = max(1, int(length * fraction))
    return order[n_val:], order[:n_val]


class DatasetSource(ABC):
    """One kind of dataset. `data` is a recipe's data section (a DataConfig, or its recorded dict)."""

    name: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    needs_root: ClassVar[bool] = True
    downloadable: ClassVar[bool] = False  # `data.download: true` fetches it into data.root

    @classmethod
    def root(cls, data: Any) -> Path | None:
        root = _get(data, "root")
        return None if root is None else Path(root)

    @classmethod
    def folders(cls, data: Any) -> dict[str, Path]:
        """The class-folder trees it reads, by split (what `kd2deploy data check` decodes); none for array files."""
        return {}

    @classmethod
    @abstractmethod
    def training_splits(cls, data: Any, seed: int) -> tuple[Any, Any, list[str]]:
        """Untransformed torch train and val datasets of (PIL image, class index), and the class names."""

    @classmethod
    @abstractmethod
    def val_images(cls, data: dict[str, Any], seed: int, class_names: Sequence[str], transform: EvalTransform,
                   where: str) -> ValSet:
        """The run's val split read without torch (what `kd2deploy eval` and `bench` score)."""


def _get(data: Any, key: str, default: Any = None) -> Any:
    return data.get(key, default) if isinstance(data, dict) else getattr(data, key, default)


_sources: dict[str, type[DatasetSource]] = {}


def register_dataset(cls: type[DatasetSource]) -> type[DatasetSource]:
    """Class decorator: make a dataset kind available as `data.dataset: <cls.name>`."""
    if cls.name in _sources:
        raise ValueError(f"Dataset name {cls.name!r} is registered twice ({_sources[cls.name].__name__}, "
                         f"{cls.__name__}).")
    _sources[cls.name] = cls
    return cls


def dataset_names() -> list[str]:
    return list(_sources)


def get_dataset(name: str) -> type[DatasetSource]:
    try:
        return _sources[name]
    except KeyError:
        raise UserError(f"Unknown dataset `{name}` (data.dataset). Known datasets: {', '.join(_sources)}.") from None


def recipe_folders(data: Any, recipe: Path) -> list[tuple[str, Path]]:
    """The (split name, tree) pairs of a recipe's `data` section that `kd2deploy data check` decodes."""
    source = get_dataset(data.dataset)
    if data.root is None and source.needs_root:
        raise UserError(f"{recipe} sets no data.root, so there is no folder to check. Set it, or give the folder.")
    folders = source.folders(data)
    if not folders:
        raise UserError(f"{recipe} reads `{data.dataset}`, which is stored as arrays, not image files; "
                        "`kd2deploy data check` checks image folders.")
    return list(folders.items())


def _torch_image_folder(path: Path, field: str, data: Any) -> Any:
    from .folders import image_folder

    return image_folder(path, field, _get(data, "max_bad_fraction", 0.001))


@register_dataset
class MiniCifar10(DatasetSource):
    """The 7,000 CIFAR-10 images bundled with kd2deploy (6,000 train, 1,000 val: the quickstart's data)."""

    name = "mini_cifar10"
    mean, std = CIFAR_MEAN, CIFAR_STD
    needs_root = False

    @classmethod
    def root(cls, data: Any) -> Path:
        return MINI_CIFAR10

    @classmethod
    def folders(cls, data: Any) -> dict[str, Path]:
        return {"train": MINI_CIFAR10 / "train", "val": MINI_CIFAR10 / "val"}

    @classmethod
    def training_splits(cls, data: Any, seed: int) -> tuple[Any, Any, list[str]]:
        train = _torch_image_folder(MINI_CIFAR10 / "train", "bundled mini_cifar10", data)
        return train, _torch_image_folder(MINI_CIFAR10 / "val", "bundled mini_cifar10", data), train.classes

    @classmethod
    def val_images(cls, data, seed, class_names, transform, where):
        from .valset import image_folder

        return readable(image_folder(MINI_CIFAR10 / "val", class_names, transform, "bundled mini_cifar10"))


class _Cifar(DatasetSource):
    """torchvision's CIFAR python pickles under data.root."""

    downloadable = True
    folder: ClassVar[str]
    test_file: ClassVar[str]
    label_key: ClassVar[str]

    @classmethod
    def _torchvision(cls, data: Any, train: bool) -> Any:
        from torchvision import datasets

        dataset = datasets.CIFAR10 if cls.name == "cifar10" else datasets.CIFAR100
        try:
            return dataset(str(_get(data, "root")), train=train, download=bool(_get(data, "download", False)))
        except RuntimeError as exc:
            raise UserError(f"{cls.name} was not found under {_get(data, 'root')} (data.root): {exc}. Point "
                            f"`data.root` at the folder holding torchvision's `{cls.folder}`, or set "
                            "`data.download: true` on a machine with internet access.") from None

    @classmethod
    def training_splits(cls, data: Any, seed: int) -> tuple[Any, Any, list[str]]:
        train = cls._torchvision(data, True)
        return train, cls._torchvision(data, False), train.classes

    @classmethod
    def val_images(cls, data, seed, class_names, transform, where):
        from .valset import cifar_pickle

        return cifar_pickle(cls.root(data) / cls.folder / cls.test_file, cls.label_key, cls.name, cls.folder,
                            transform)


@register_dataset
class Cifar10(_Cifar):
    name, folder, test_file, label_key = "cifar10", "cifar-10-batches-py", "test_batch", "labels"
    mean, std = CIFAR_MEAN, CIFAR_STD


@register_dataset
class Cifar100(_Cifar):
    name, folder, test_file, label_key = "cifar100", "cifar-100-python", "test", "fine_labels"
    mean, std = CIFAR100_MEAN, CIFAR100_STD


@register_dataset
class ImageFolderSource(DatasetSource):
    """root/train_dir and root/val_dir with one sub-folder per class; without val_dir, a seeded val_fraction of
    train_dir is held out."""

    name = "imagefolder"

    @classmethod
    def holds_out(cls, data: Any) -> bool:
        root = cls.root(data)
        return (root is not None and not (root / _get(data, "val_dir", "val")).is_dir()
                and _get(data, "val_fraction") is not None)

    @classmethod
    def folders(cls, data: Any) -> dict[str, Path]:
        root, val = cls.root(data), _get(data, "val_dir", "val")
        found = {"train": root / _get(data, "train_dir", "train")}
        return {**found, "val": root / val} if (root / val).is_dir() else found

    @classmethod
    def training_splits(cls, data: Any, seed: int) -> tuple[Any, Any, list[str]]:
        from torch.utils.data import Subset

        root, train_dir, val_dir = cls.root(data), _get(data, "train_dir", "train"), _get(data, "val_dir", "val")
        if not root.is_dir():
            raise UserError(f"Data root {root} (data.root) does not exist. Point it at the folder that holds "
                            f"`{train_dir}/` and `{val_dir}/` in ImageFolder layout.")
        train = _torch_image_folder(root / train_dir, "data.train_dir", data)
        if (root / val_dir).is_dir():
            return train, _torch_image_folder(root / val_dir, "data.val_dir", data), train.classes
        if _get(data, "val_fraction") is None:
            raise UserError(f"{root} has no `{val_dir}/` folder (data.val_dir). Add one, name the right folder in "
                            "`data.val_dir`, or set `data.val_fraction` (e.g. 0.1) to hold out part of the training "
                            "set.")
        kept, held_out = held_out_split(len(train), _get(data, "val_fraction"), seed, _get(data, "split_rng", "numpy"))
        return Subset(train, kept), Subset(train, held_out), train.classes

    @classmethod
    def val_images(cls, data, seed, class_names, transform, where):
        from .valset import image_folder

        root, train_dir, val_dir = cls.root(data), data.get("train_dir", "train"), data.get("val_dir", "val")
        if not cls.holds_out(data):
            return readable(image_folder(root / val_dir, class_names, transform, f"data.val_dir in {where}"))
        folder = readable(image_folder(root / train_dir, class_names, transform, f"data.train_dir in {where}"))
        held_out = held_out_split(len(folder), data["val_fraction"], seed, data.get("split_rng", "numpy"))[1]
        return folder.subset(held_out, f"{root} (val_fraction {data['val_fraction']} of {train_dir}/, seed {seed})")


def readable(folder: ValSet) -> ValSet:
    """The images of a folder that training reads too: without the files whose header cannot be read, which
    folders.TolerantImageFolder leaves out (so splits and spread subsets pick the same images)."""
    from .checks import header_problem

    keep = [i for i, path in enumerate(folder.items) if header_problem(str(path)) is None]
    return folder if len(keep) == len(folder) else folder.subset(keep, folder.source)


def recorded_val_set(data: dict[str, Any], seed: int, class_names: Sequence[str], transform: EvalTransform,
                     samples: int | None = None, where: str = "the manifest") -> ValSet:
    """The val split of the run a model comes from, rebuilt from its recorded data section."""
    source = get_dataset(data["dataset"])
    if source.needs_root and data.get("root") is None:
        raise UserError(f"The data section in {where} has no root, so its val split cannot be found here. "
                        "Give --val DIR: a folder with one sub-folder per class.")
    return source.val_images(data, seed, class_names, transform, where).spread(samples)


def default_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    source = get_dataset(dataset)
    return source.mean, source.std
