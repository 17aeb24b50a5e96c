"""The LIB-KD family: involution and RedNet, token students, the libkd/cit/cskd losses and CKF's schedule."""
from __future__ import annotations

import itertools
import math

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import quiet

from kd2deploy.data.sources import DataInfo
from kd2deploy.deploy.onnx import export_onnx
from kd2deploy.distill import get_method_class
from kd2deploy.distill.cskd import ckf_ratio
from kd2deploy.errors import UserError
from kd2deploy.models.involution import Involution2d
from kd2deploy.models.token_vit import num_distill_tokens

TINY_REDNET = {"channels": [8, 8, 16, 16], "stem_width": 8, "involution_kernel": 3, "group_channels": 8}
CIFAR_INFO = DataInfo("mini_cifar10", 10, [str(i) for i in range(10)], 32, (0.5,) * 3, (0.5,) * 3)


def onnx_matches(model: torch.nn.Module, tmp_path, batch: int = 3) -> float:
    """Export at batch 2, run at another batch size in ONNX Runtime; the max |Δ| against PyTorch."""
    path = tmp_path / "model.onnx"
    export_onnx(model.eval(), CIFAR_INFO, path, quiet())
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        return float(np.abs(got - model(torch.from_numpy(x)).numpy()).max())


# ------------------------------------------------------------------------------------------- involution, RedNet
def test_involution_shape_gradient_and_definition():
    torch.manual_seed(0)
    inv = Involution2d(16, kernel_size=3, stride=1, group_channels=8)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = inv(x)
    assert y.shape == (2, 16, 6, 6)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inv.parameters() if p.requires_grad)

    # Eq. 4 by hand at one output position: channels of a group share the pixel's own K x K kernel
    kernel = inv.span(inv.reduce(x)).detach()  # (B, K²·G, H, W)
    b, i, j, c = 1, 2, 3, 11
    g = c // 8
    padded = F.pad(x.detach(), (1, 1, 1, 1))
    expected = sum(kernel[b, g * 9 + u * 3 + v, i, j] * padded[b, c, i + u, j + v] for u in range(3) for v in range(3))
    assert torch.allclose(y[b, c, i, j], expected, atol=1e-5)

    strided = Involution2d(16, kernel_size=7, stride=2)
    assert strided(torch.randn(2, 16, 8, 8)).shape == (2, 16, 4, 4)


@pytest.mark.parametrize("name", ["rednet26", "rednet38", "rednet50"])
def test_rednets_are_timm_models(name):
    model = timm.create_model(name, num_classes=10)
    assert isinstance(model.conv1[3], Involution2d)  # the involution stem
    assert all(isinstance(block.conv2, Involution2d) for block in model.layer1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_cifar_rednet_forward_and_onnx_export(tmp_path):
    model = timm.create_model("rednet26_cifar", num_classes=10, **TINY_REDNET)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (4, 4)  # CIFAR stem: 8x downsampling
    assert onnx_matches(model, tmp_path) < 1e-4


# ------------------------------------------------------------------------------------------- token students
@pytest.mark.parametrize(("name", "tokens", "heads"), [
    ("libkd_nano_patch4_32", 1, 2),
    ("cit_nano_patch4_32", 2, 3),
    ("deit_nano_distilled_patch4_32", 1, 2),
])
def test_token_students_have_one_head_per_token(name, tokens, heads):
    model = timm.create_model(name, num_classes=10, depth=1)
    assert num_distill_tokens(model) == tokens
    assert model.pos_embed.shape[1] == 64 + 1 + tokens  # 8x8 patches, the class token, the distillation tokens
    model.set_distilled_training(True)
    outputs = model.train()(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, tuple) and len(outputs) == heads and all(o.shape == (2, 10) for o in outputs)


def test_cit_tokens_are_pooled_stem_outputs():
    model = timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    patches, tokens = model.patch_embed(x)
    conv, inv = model.patch_embed.conv_stem(x), model.patch_embed.inv_stem(x)
    assert patches.shape == (2, 64, 96) and tokens.shape == (2, 2, 96)
    assert torch.allclose(tokens[:, 0], conv.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(tokens[:, 1], inv.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(patches, (conv + inv).flatten(2).transpose(1, 2), atol=1e-6)
    assert any(isinstance(m, Involution2d) for m in model.patch_embed.inv_stem.modules())


@pytest.mark.parametrize("fusion", ["cls", "mean"])
def test_head_fusion_decides_the_inference_prediction(fusion, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1, head_fusion=fusion)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    features = model.forward_features(x)
    cls, conv, inv = (head(features[:, i]) for i, head in enumerate([model.head, *model.token_heads]))
    expected = cls if fusion == "cls" else (cls + conv + inv) / 3
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert onnx_matches(model, tmp_path) < 1e-4


# ------------------------------------------------------------------------------------------- losses by hand
def _teachers(n: int) -> list[torch.nn.Module]:
    return [timm.create_model("test_resnet", num_classes=10) for _ in range(n)]


def _kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    p = (teacher / tau).softmax(-1)
    return (p * (p.log() - (student / tau).log_softmax(-1))).sum(-1).mean() * tau**2


def test_libkd_loss_by_hand():
    torch.manual_seed(0)
    cls = get_method_class("libkd")
    params = cls.Params(teacher_weights=[3.0, 1.0], alpha=0.3, tau=2.0, distillation_type="soft")
    d = cls(timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1), _teachers(2), params, 10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(x, y)
    with torch.no_grad():
        z1, z2 = (t(x) for t in d.teachers)
    z_cls, z_dist = d.student(x)  # no dropout: the same logits as inside the step
    ensemble = 0.75 * z1 + 0.25 * z2
    expected = 0.7 * F.cross_entropy(z_cls, y) + 0.3 * _kl(z_dist, ensemble, 2.0)
    assert torch.allclose(out.loss, expected, atol=1e-5)

    with pytest.raises(UserError, match="teacher_weights"):
        cls(timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1), _teachers(2),
            cls.Params(teacher_weights=[1.0]), 10)
    with pytest.raises(UserError, match="1 distillation token"):
        cls(timm.create_model("vit_nano_patch4_32", num_classes=10, depth=1), _teachers(2), cls.Params(), 10)


def test_cit_loss_by_hand():
    torch.manual_seed(0)
    cls = get_method_class("cit")
    params = cls.Params(lambda_cls=0.5, lambda_conv=2.0, lambda_inv=3.0, tau_conv=1.0, tau_inv=4.0)
    teachers = [timm.create_model("test_resnet", num_classes=10),  # teachers.0 a CNN, teachers.1 an INN
                timm.create_model("rednet26_cifar", num_classes=10, **TINY_REDNET)]
    d = cls(timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1), teachers, params, 10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(x, y)
    with torch.no_grad():
        t_cnn, t_inn = (t(x) for t in d.teachers)
    z_cls, z_conv, z_inv = d.student(x)
    expected = 0.5 * F.cross_entropy(z_cls, y) + 2.0 * _kl(z_conv, t_cnn, 1.0) + 3.0 * _kl(z_inv, t_inn, 4.0)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert set(out.terms) == {"ce", "kd_conv", "kd_inv"}
    with pytest.raises(UserError, match="2 distillation token"):
        cls(timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1), teachers, cls.Params(), 10)


def test_cskd_dense_teacher_and_loss_by_hand():
    torch.manual_seed(0)
    cls = get_method_class("cskd")
    teacher = timm.create_model("resnet10_cifar", num_classes=10, channels=[8, 8, 16, 16])  # 4x4 last map
    d = cls(timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1), [teacher],
            cls.Params(alpha=0.4, cskd_weight=2.0), 10).train()
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    with torch.no_grad():
        out_t = d.teacher_output(0, x)
        features = teacher.forward_features(x)  # (3, C, 4, 4)
        per_position = torch.einsum("bchw,kc->bkhw", features, teacher.fc.weight) + teacher.fc.bias[:, None, None]
        assert torch.allclose(out_t["logits"], teacher(x), atol=1e-5)  # pooling and the classifier commute
        assert torch.allclose(out_t["dense"], per_position.flatten(2).transpose(1, 2), atol=1e-5)  # 4x4 logits

    d.progress = 0.25
    out = d(x, y)
    z_cls, z_dist = d.student(x)
    tokens = d.student_hooks.features["tokens"][:, 2:]
    dense_student = d.student.token_heads[0](tokens).transpose(1, 2).reshape(3, 10, 8, 8)
    student_cells = F.avg_pool2d(dense_student, 2).flatten(2).transpose(1, 2)  # the 8x8 patches onto the 4x4 cells
    target = (0.25 * out_t["logits"][:, None] + 0.75 * out_t["dense"]).argmax(-1)  # CKF on logits, r = 0.25
    expected = (0.6 * F.cross_entropy(z_cls, y) + 0.4 * F.cross_entropy(z_dist, out_t["logits"].argmax(-1))
                + 2.0 * F.cross_entropy(student_cells.reshape(-1, 10), target.reshape(-1)))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_cskd_refuses_a_teacher_without_a_dense_classifier():
    cls = get_method_class("cskd")
    with pytest.raises(UserError, match=r"teachers\.0\.name"):
        cls(timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1),
            [timm.create_model("vit_nano_patch4_32", num_classes=10, depth=1)], cls.Params(), 10)


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "cosine"])
def test_ckf_ratio_rises_from_0_to_1(schedule):
    assert ckf_ratio(0.0, schedule) == 0.0
    assert math.isclose(ckf_ratio(1.0, schedule), 1.0, abs_tol=1e-12)
    steps = [ckf_ratio(t / 20, schedule) for t in range(21)]
    assert all(a < b for a, b in itertools.pairwise(steps))
    assert ckf_ratio(1.5, schedule) == ckf_ratio(1.0, schedule)  # clamped past the end
    assert math.isclose(ckf_ratio(0.5, "linear"), 0.5) and math.isclose(ckf_ratio(0.5, "quadratic"), 0.75)
