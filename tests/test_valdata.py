"""Val images without torch (kd2deploy.data.valset): the numpy/Pillow eval transform equals timm's, the readers give
torchvision's order and labels, and top-1/top-5 equal kd2deploy.train.evaluate's."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from kd2deploy.data.loaders import SampleDataset, eval_loader, eval_transform, spread_subset
from kd2deploy.data.sources import MINI_CIFAR10, DataInfo, recorded_val_set
from kd2deploy.data.valset import EvalTransform, evaluate_runner, image_folder
from kd2deploy.errors import UserError
from kd2deploy.models import create_model
from kd2deploy.train.evaluate import evaluate

CLASSES = sorted(p.name for p in (MINI_CIFAR10 / "val").iterdir())


def info(img_size: int, interpolation: str, crop_pct: float) -> DataInfo:
    return DataInfo("test", 10, CLASSES, img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation,
                    crop_pct)


@pytest.mark.parametrize(("size", "image_size", "interpolation", "crop_pct"), [
    (32, (32, 32), "bilinear", 1.0),      # CIFAR as trained: no resize
    (224, (32, 32), "bilinear", 1.0),     # CIFAR upscaled for a 224 model
    (224, (500, 375), "bicubic", 0.875),  # ImageNet-style: resize the short side to 256, center crop
    (64, (90, 131), "bilinear", 0.9),     # portrait, odd sizes: the crop offsets round like torchvision's
])
def test_eval_transform_equals_timm(size, image_size, interpolation, crop_pct):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8))
    expected = eval_transform(info(size, interpolation, crop_pct))(image).numpy()
    ours = EvalTransform.from_input(info(size, interpolation, crop_pct).to_dict())(image)
    assert ours.shape == expected.shape == (3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_image_folder_matches_torchvision_order_labels_and_spread():
    transform = EvalTransform.from_input(info(32, "bilinear", 1.0).to_dict())
    ours = image_folder(MINI_CIFAR10 / "val", CLASSES, transform, "test")
    theirs = datasets.ImageFolder(str(MINI_CIFAR10 / "val"))
    assert [str(p) for p in ours.items] == [path for path, _ in theirs.samples]
    assert ours.labels.tolist() == theirs.targets
    spread = ours.spread(7)
    expected = spread_subset(SampleDataset(theirs, eval_transform(info(32, "bilinear", 1.0))), 7)
    images, labels = next(spread.batches(7))
    np.testing.assert_allclose(images, np.stack([expected[i][0].numpy() for i in range(7)]), atol=1e-6)
    assert labels.tolist() == [expected[i][1] for i in range(7)]


def test_image_folder_maps_labels_by_class_name(tmp_path):
    for name in ("truck", "cat"):  # two of the ten classes: labels follow the model's class list, not this folder's
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    transform = EvalTransform.from_input(info(8, "bilinear", 1.0).to_dict())
    assert image_folder(tmp_path, CLASSES, transform, "--val").labels.tolist() == [CLASSES.index("cat"),
                                                                                    CLASSES.index("truck")]
    (tmp_path / "unicorn").mkdir()
    with pytest.raises(UserError, match="unicorn"):
        image_folder(tmp_path, CLASSES, transform, "--val")
    with pytest.raises(UserError, match="does not exist"):
        image_folder(tmp_path / "missing", CLASSES, transform, "--val")


def test_cifar_pickle_reader(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [3, 1, 4, 1, 5, 9]}, f)
    transform = EvalTransform.from_input(info(32, "bilinear", 1.0).to_dict())
    data_section = {"dataset": "cifar10", "root": str(tmp_path)}
    images, labels = next(recorded_val_set(data_section, 0, CLASSES, transform).batches(6))
    assert labels.tolist() == [3, 1, 4, 1, 5, 9]
    # torchvision's CIFAR10 stores the rows as CHW uint8, then hands out HWC PIL images
    first = Image.fromarray(data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    np.testing.assert_allclose(images[0], transform(first), atol=0)
    with pytest.raises(UserError, match="cifar100"):
        recorded_val_set({**data_section, "dataset": "cifar100"}, 0, CLASSES, transform)


class _Hostile:
    """A pickle that runs a command when loaded (what pickle.load would do with a tampered CIFAR batch)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Hostile(marker), "labels": [0]}, f)
    transform = EvalTransform.from_input(info(32, "bilinear", 1.0).to_dict())
    with pytest.raises(UserError, match="system"):
        recorded_val_set({"dataset": "cifar10", "root": str(tmp_path)}, 0, CLASSES, transform)
    assert not marker.exists()
    pickle.load(open(folder / "test_batch", "rb"))  # the same file does run code through plain pickle.load
    assert marker.exists()


def test_evaluate_runner_equals_torch_evaluate():
    torch.manual_seed(0)
    model = create_model("test_resnet", 10).eval()
    transform = EvalTransform.from_input(info(32, "bilinear", 1.0).to_dict())
    images = image_folder(MINI_CIFAR10 / "val", CLASSES, transform, "test").spread(40)
    with torch.no_grad():
        ours = evaluate_runner(lambda batch: model(torch.from_numpy(batch)).numpy(), images, batch_size=16)
    dataset = SampleDataset(datasets.ImageFolder(str(MINI_CIFAR10 / "val")), eval_transform(info(32, "bilinear", 1.0)))
    theirs = evaluate(model, eval_loader(spread_subset(dataset, 40), 16, num_workers=0))
    assert ours["count"] == theirs["count"] == 40
    for key in ("top1", "top5"):
        assert ours[key] == pytest.approx(theirs[key])
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
