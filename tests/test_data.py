"""Datasets: the bundled mini CIFAR-10, ImageFolder trees with or without a val folder, clear errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from kd2deploy.data import MINI_CIFAR10, build_datasets, build_mixup
from kd2deploy.errors import UserError
from kd2deploy.recipe import DataConfig


def test_bundled_mini_cifar10_is_a_stratified_real_subset():
    train, val, info = build_datasets(DataConfig(dataset="mini_cifar10"))
    assert (len(train), len(val)) == (6000, 1000)
    assert info.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]
    per_class = torch.bincount(torch.tensor(train.dataset.targets), minlength=10)
    assert per_class.tolist() == [600] * 10
    image, target, index = val[5]
    assert image.shape == (3, 32, 32) and 0 <= target < 10 and index == 5
    size_mb = sum(f.stat().st_size for f in MINI_CIFAR10.rglob("*.jpg")) / 2**20
    assert size_mb < 8


def _image_tree(root, classes=("cat", "dog"), per_class=5):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), color=(i * 40, 10, 200)).save(root / name / f"{i}.png")


def test_imagefolder_with_a_val_folder(tmp_path):
    _image_tree(tmp_path / "train")
    _image_tree(tmp_path / "val", per_class=2)
    train, val, info = build_datasets(DataConfig(dataset="imagefolder", root=tmp_path, img_size=24))
    assert (len(train), len(val), info.num_classes) == (10, 4, 2)
    assert train[0][0].shape == (3, 24, 24) and val[0][0].shape == (3, 24, 24)
    assert info.mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet statistics for ImageFolder data


def test_imagefolder_val_fraction_is_a_seeded_disjoint_split(tmp_path):
    _image_tree(tmp_path / "train", per_class=10)
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_fraction=0.25, img_size=16)
    train, val, _ = build_datasets(cfg, seed=3)
    assert (len(train), len(val)) == (15, 5)
    assert not set(train.dataset.indices) & set(val.dataset.indices)
    assert build_datasets(cfg, seed=3)[1].dataset.indices == val.dataset.indices


def test_train_subset_and_eval_transform_for_training_images():
    train, _, _ = build_datasets(DataConfig(train_subset=100), augment=False)
    assert len(train) == 100
    a, b = train[0][0], train[0][0]
    assert torch.equal(a, b)  # no augmentation: the same image twice gives the same tensor


@pytest.mark.parametrize("cfg, message", [
    (dict(dataset="imagefolder"), "needs `data.root`"),
    (dict(dataset="cifar10", root="/nonexistent/cifar"), "cifar-10-batches-py"),
    (dict(dataset="imagefolder", root="/nonexistent/imagenet"), "does not exist"),
])
def test_missing_data_gives_a_clear_error(cfg, message):
    with pytest.raises(UserError, match=message):
        build_datasets(DataConfig(**cfg))


def test_imagefolder_without_val_folder_explains_the_options(tmp_path):
    _image_tree(tmp_path / "train")
    with pytest.raises(UserError, match="val_fraction"):
        build_datasets(DataConfig(dataset="imagefolder", root=tmp_path))


def test_mixup_gives_soft_targets_only_when_asked():
    assert build_mixup(DataConfig(), 10) is None
    mixup = build_mixup(DataConfig(augment={"mixup": 0.2, "cutmix": 1.0}), 10)
    _, targets = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(-1), torch.ones(4))
