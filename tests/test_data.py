"""Datasets: the bundled mini CIFAR-10, ImageFolder trees with or without a val folder, clear errors, the
val_fraction split without torch, and unclean data (`kd2deploy data check`, training that skips bad files)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet, run_cli, tiny_recipe, write_recipe
from PIL import Image

from kd2deploy.data.checks import SKIPPED_FILE, check_tree, findings, trees_to_check
from kd2deploy.data.loaders import build_datasets, build_mixup
from kd2deploy.data.sources import MINI_CIFAR10, recorded_val_set
from kd2deploy.data.valset import EvalTransform
from kd2deploy.errors import UserError
from kd2deploy.recipe import DataConfig, load_recipe, migrate_data_section
from kd2deploy.train.engine import train


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


def test_val_fraction_split_is_rebuilt_without_torch_and_old_runs_keep_theirs(tmp_path):
    """The held-out split comes from numpy's generator, so the torch-free reader rebuilds the very images training
    held out; a data section recorded before split_rng existed is read with torch's generator, as it was made."""
    _image_tree(tmp_path / "train", per_class=10)
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, val_fraction=0.25, img_size=16)
    _, val, info = build_datasets(cfg, seed=3)
    held_out = [val.dataset.dataset.samples[i][0] for i in val.dataset.indices]
    transform = EvalTransform.from_input(info.to_dict())
    reader = recorded_val_set(cfg.model_dump(mode="json"), 3, info.class_names, transform)
    assert [str(p) for p in reader.items] == held_out
    assert reader.labels.tolist() == [val.dataset.dataset.samples[i][1] for i in val.dataset.indices]

    legacy = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "split_rng"}
    migrated = DataConfig.model_validate(migrate_data_section(legacy))
    assert migrated.split_rng == "torch"
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    assert build_datasets(migrated, seed=3)[1].dataset.indices == order[:5]


# ------------------------------------------------------------------------------------------------ unclean data
def _unclean_tree(root):
    """A train/val tree with one of each problem `data check` reports."""
    _image_tree(root / "train", classes=("cat", "dog", "fox"), per_class=4)
    _image_tree(root / "val", classes=("cat", "dog"), per_class=2)  # no fox: class sets differ
    good = root / "train" / "cat" / "0.png"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "train" / "cat" / "whole.jpg", quality=95)
    data = (root / "train" / "cat" / "whole.jpg").read_bytes()  # its header is a small part of it
    (root / "train" / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.open(good).convert("L").save(root / "train" / "fox" / "grey.png")
    (root / "train" / "owl").mkdir()  # an empty class folder
    return root


def test_data_check_reports_each_kind_of_problem(tmp_path):
    root = _unclean_tree(tmp_path)
    reports = {split: check_tree(path, workers=2) for split, path in trees_to_check(root)}
    train = reports["train"]
    assert sorted(Path(p).name for p, _ in train.unreadable) == ["empty.jpg", "truncated.jpg"]
    assert [Path(p).name for p in train.not_images] == [".DS_Store"]
    assert {mode: [Path(p).name for p in paths] for mode, paths in train.odd_modes.items()} == {"L": ["grey.png"]}
    assert train.empty_classes == ["owl"] and train.images == 4 * 3 + 3 + 1
    errors, warnings = findings(reports)
    assert len(errors) == 3 and any("empty.jpg" in e for e in errors) and any("owl" in e for e in errors)
    assert any("val lacks fox, owl" in e for e in errors) and len(warnings) == 2

    result = run_cli("data", "check", root, "--workers", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "truncated.jpg" in result.stdout and ".DS_Store" in result.stdout and "mode L" in result.stdout
    _image_tree(tmp_path / "clean" / "train")
    result = run_cli("data", "check", tmp_path / "clean")
    assert result.returncode == 0 and "No errors" in result.stdout


def test_training_leaves_unreadable_images_out_and_lists_them(tmp_path):
    root = _unclean_tree(tmp_path / "data")
    shutil.rmtree(root / "train" / "owl")
    shutil.rmtree(root / "train" / "fox")
    (root / "train" / "dog" / "empty.jpg").unlink()
    header_ok = root / "train" / "dog" / "truncated.jpg"  # opens (header intact), fails when decoded
    recipe = tiny_recipe(tmp_path / "run", data={"dataset": "imagefolder", "root": str(root), "img_size": 16,
                                                  "train_subset": None, "on_device": False, "max_bad_fraction": 0.5},
                         optim={"epochs": 1, "batch_size": 10})  # one batch: every one of the 10 images
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    metrics = train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    assert metrics["epoch"] == 1
    listed = (tmp_path / "run" / SKIPPED_FILE).read_text()
    assert "broken.png" in listed and str(header_ok) in listed  # left out at the start, and met in training

    strict = {**recipe, "data": {**recipe["data"], "max_bad_fraction": 0.01},
              "output": {**recipe["output"], "dir": str(tmp_path / "r2")}}
    result = run_cli("train", write_recipe(tmp_path / "strict.yaml", strict))
    assert result.returncode == 2 and "max_bad_fraction" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r2" / "last.pt").exists()  # stopped before the first step
