"""The study's teacher architectures (resnet9_cifar, vit_convstem_cifar) and loading an fp16 teacher checkpoint."""
from __future__ import annotations

import pytest
import timm
import torch

from kd2deploy.checkpoint import STUDENT_FORMAT, atomic_save
from kd2deploy.distill import get_method_class
from kd2deploy.distill.capkd import CAPKDParams
from kd2deploy.distill.cskd import CSKDParams
from kd2deploy.distill.hooks import TransformerTap
from kd2deploy.models import create_model


def test_resnet9_stages_have_the_widths_and_strides_feature_info_states():
    model = timm.create_model("resnet9_cifar", num_classes=10, width=8)
    features = timm.create_model("resnet9_cifar", num_classes=10, width=8, features_only=True)
    maps = features(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert [i["reduction"] for i in model.feature_info] == [32 // m.shape[-1] for m in maps]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_resnet9_can_teach_cskd_its_classifier_commutes_with_pooling():
    """CSKD applies the classifier at every position: the mean of the dense logits is the model's prediction."""
    torch.manual_seed(0)
    teacher = timm.create_model("resnet9_cifar", num_classes=10, width=8).eval()
    student = timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1)
    distiller = get_method_class("cskd")(student, [teacher], CSKDParams(), 10)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = distiller.teacher_output(0, images)
        torch.testing.assert_close(out["logits"], teacher(images), rtol=1e-4, atol=1e-5)
    assert out["dense"].shape == (3, 16, 10)  # the teacher's 4x4 cells


def test_convstem_vit_tokens_lie_on_the_patch4_grid_and_capkd_can_tap_them():
    teacher = timm.create_model("vit_convstem_cifar", num_classes=10, depth=2).eval()
    assert teacher.num_prefix_tokens == 0 and teacher.feature_info[-1]["reduction"] == 4
    tap = TransformerTap(teacher)
    teacher(torch.randn(2, 3, 32, 32))
    tokens, (q, k, v), grid = tap.read()
    assert grid == (8, 8) and tokens.shape == (2, 64, 128) and q.shape == k.shape == v.shape == (2, 4, 64, 32)
    student = timm.create_model("resnet10t", num_classes=10, channels=[8, 8, 16, 16])
    distiller = get_method_class("capkd")(student, [teacher], CAPKDParams(), 10).train()
    assert student.feature_info[[i["module"] for i in student.feature_info].index(distiller.student_layer)][
        "reduction"] == 4  # the stage whose 8x8 map matches the teacher's tokens
    output = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    output.loss.backward()
    assert torch.isfinite(output.loss) and student.conv1[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet9_cifar", "vit_convstem_cifar"])
def test_an_fp16_teacher_checkpoint_loads_through_the_ordinary_checkpoint_path(tmp_path, name):
    """The study commits teachers as fp16 copies of a run's student.pt; loading one is create_model(checkpoint=)."""
    torch.manual_seed(0)
    kwargs = {"width": 8} if name == "resnet9_cifar" else {"depth": 2}
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "teacher.pt"
    atomic_save({"format": STUDENT_FORMAT, "model": {"name": name, "num_classes": 10, "kwargs": kwargs},
                 "state_dict": half}, path)
    loaded = create_model(name, 10, checkpoint=path, kwargs=kwargs).eval()
    assert next(loaded.parameters()).dtype == torch.float32
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, half[key].to(value.dtype)), key  # exactly the fp16 values, widened
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=2e-2, atol=2e-2)
