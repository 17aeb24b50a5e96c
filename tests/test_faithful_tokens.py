"""CSKD and CiT as their papers and authors' code define them, against values computed by hand on tiny batches."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ROOT, quiet

from kd2deploy.data.sources import DataInfo
from kd2deploy.deploy.onnx import export_onnx
from kd2deploy.distill import get_method_class
from kd2deploy.distill.cit import network_kind
from kd2deploy.distill.cskd import ckf_logits, dense_distillation_loss, pool_to_cells
from kd2deploy.errors import UserError
from kd2deploy.models import count_params  # noqa: F401  (registers kd2deploy's CIFAR models with timm)
from kd2deploy.recipe import load_recipe

TINY_REDNET = {"channels": [8, 8, 16, 16], "stem_width": 8, "involution_kernel": 3, "group_channels": 8}
CIFAR_INFO = DataInfo("mini_cifar10", 10, [str(i) for i in range(10)], 32, (0.5,) * 3, (0.5,) * 3)


def _cskd(student_kwargs=None, **params):
    torch.manual_seed(0)
    cls = get_method_class("cskd")
    student = timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1, **(student_kwargs or {}))
    teacher = timm.create_model("resnet10_cifar", num_classes=10, channels=[8, 8, 16, 16])  # a 4x4 last map
    return cls(student, [teacher], cls.Params(**params), 10).train()


class _FixedOutputs:
    """Stands in for the teacher-output cache: hands out given teacher outputs."""

    def __init__(self, logits: torch.Tensor, dense: torch.Tensor):
        self.outputs = [{"logits": logits, "dense": dense}]

    def lookup(self, indices, device):
        return self.outputs


# ------------------------------------------------------------------------------------------- CSKD: CKF
def test_ckf_fuses_logits_by_hand():
    z_global = torch.tensor([[0.0, 1.0, 0.0]])  # one image, 3 classes
    z_dense = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # two cells
    fused = ckf_logits(z_global, z_dense, r=0.9)
    # 0.9·[0, 1, 0] + 0.1·[10, 0, 0] and 0.9·[0, 1, 0] + 0.1·[0, 0, 3]
    assert torch.allclose(fused, torch.tensor([[[1.0, 0.9, 0.0], [0.0, 0.9, 0.3]]]))
    assert fused.argmax(-1).tolist() == [[0, 1]]
    # mixing probabilities instead moves the first cell to the global class: 0.9·0.212 + 0.1·1.0 < 0.9·0.576
    mixed = 0.9 * z_global.softmax(-1)[:, None] + 0.1 * z_dense.softmax(-1)
    assert mixed.argmax(-1).tolist() == [[1, 1]]
    # log-probabilities shift each row by a constant, which moves neither the argmax nor the softmax of the fusion
    from_log_probs = ckf_logits(z_global.log_softmax(-1), z_dense.log_softmax(-1), r=0.9)
    assert torch.allclose(from_log_probs.softmax(-1), fused.softmax(-1), atol=1e-6)
    assert ckf_logits(z_global, z_dense, 0.0).argmax(-1).tolist() == [[0, 2]]  # r = 0: the dense targets
    assert ckf_logits(z_global, z_dense, 1.0).argmax(-1).tolist() == [[1, 1]]  # r = 1: the global target


# ------------------------------------------------------------------------------------------- CSKD: grids
def test_student_dense_logits_are_pooled_to_the_teacher_cells_by_hand():
    dense = torch.arange(32.0).reshape(1, 16, 2) / 8  # a 4x4 grid, 2 classes; patch p has logits (p/4, p/4 + 1/8)
    cells = pool_to_cells(dense, (4, 4), (2, 2))
    # cell (0, 0) averages patches 0, 1, 4, 5: class 0 logits (0 + 2 + 8 + 10) / 8 / 4 = 0.625
    expected = torch.tensor([[[0.625, 0.75], [1.125, 1.25], [2.625, 2.75], [3.125, 3.25]]])
    assert torch.allclose(cells, expected)
    assert pool_to_cells(dense, (4, 4), (4, 4)) is dense

    dense.requires_grad_(True)
    targets = torch.tensor([[1, 0, 1, 0]])
    loss = dense_distillation_loss(pool_to_cells(dense, (4, 4), (2, 2)), F.one_hot(targets, 2) * 9.0, "hard", 1.0)
    by_hand = sum(-math.log(math.exp(c[t]) / (math.exp(c[0]) + math.exp(c[1])))
                  for c, t in zip(expected[0].tolist(), targets[0].tolist(), strict=True)) / 4
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-6)
    loss.backward()
    # a patch gets a quarter of its cell's gradient: (softmax − one-hot) / 4 cells / 4 patches per cell
    cell0 = expected[0, 0].softmax(-1) - torch.tensor([0.0, 1.0])
    assert torch.allclose(dense.grad[0, 0], cell0 / 16, atol=1e-7)
    assert torch.allclose(dense.grad[0, 5], cell0 / 16, atol=1e-7)


def test_cskd_compares_on_the_teacher_grid_and_the_loss_by_hand():
    d = _cskd(alpha=0.4, cskd_weight=2.0)
    assert d.grid == (8, 8) and d.cells == (4, 4)  # the student's 8x8 patches pooled to the teacher's 4x4 map
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    teacher = d.teachers[0]
    with torch.no_grad():
        out_t = d.teacher_output(0, x)
        per_position = torch.einsum("bchw,kc->bkhw", teacher.forward_features(x), teacher.fc.weight)
        per_position = per_position + teacher.fc.bias[:, None, None]
        assert torch.allclose(out_t["logits"], teacher(x), atol=1e-5)  # pooling and the classifier commute
        assert torch.allclose(out_t["dense"], per_position.flatten(2).transpose(1, 2), atol=1e-5)  # logits, 4x4

    d.progress = 0.25
    out = d(x, y)
    z_cls, z_dist = d.student(x)
    patches = d.student.token_heads[0](d.student_hooks.features["tokens"][:, 2:])  # (3, 64, 10)
    student_cells = patches.reshape(3, 4, 2, 4, 2, 10).mean(dim=(2, 4)).reshape(3, 16, 10)  # 2x2 patches a cell
    target = (0.25 * out_t["logits"][:, None] + 0.75 * out_t["dense"]).argmax(-1)
    expected = (0.6 * F.cross_entropy(z_cls, y) + 0.4 * F.cross_entropy(z_dist, out_t["logits"].argmax(-1))
                + 2.0 * F.cross_entropy(student_cells.reshape(-1, 10), target.reshape(-1)))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_a_teacher_grid_finer_than_the_students_is_pooled_to_the_students():
    d = _cskd({"patch_size": 16})  # 2x2 patches, the teacher's map is 4x4
    assert d.grid == (2, 2) and d.cells == (2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = d.teacher_dense_logits(0, x)  # (2, 10, 4, 4)
        by_hand = full.reshape(2, 10, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
        assert torch.allclose(d.teacher_output(0, x)["dense"], by_hand, atol=1e-6)
    assert d.teacher_output_signature() == {"outputs": ["logits", "dense"], "dense": "logits", "cells": [2, 2]}


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cskd_term_on_fixed_teacher_outputs_by_hand(kind):
    """Teacher outputs set by hand (through the cache's interface) and a distillation head that predicts the same
    logits b on every patch: the CSKD term is then a hand computation over the 16 cells."""
    d = _cskd(alpha=0.0, cskd_weight=1.0, cskd_type=kind, tau=2.0)
    b = torch.linspace(-1.0, 1.0, 10)
    with torch.no_grad():
        d.student.token_heads[0].weight.zero_()
        d.student.token_heads[0].bias.copy_(b)
    z_global = torch.zeros(2, 10)
    z_global[:, 3] = 1.0
    z_dense = torch.zeros(2, 16, 10)
    z_dense[:, :, 7] = 20.0  # every cell: class 7 by 20
    z_dense[1, 5, 7], z_dense[1, 5, 2] = 0.0, 0.5  # one cell of the second image: class 2 by 0.5
    d.teacher_cache = _FixedOutputs(z_global, z_dense)
    d.progress = 0.9  # r = 0.9: fused = 0.9·z_global + 0.1·z_dense
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    cskd = d(x, y, torch.arange(2)).terms["cskd"].item()

    log_p = [bk - math.log(sum(math.exp(v) for v in b.tolist())) for bk in b.tolist()]  # log softmax(b)
    if kind == "hard":
        # fused argmax: class 7 (0.1·20 > 0.9·1) in 31 cells, class 3 (0.9·1 > 0.1·0.5) in the other one; mixing
        # probabilities would pick class 3 everywhere (0.9·0.232 > 0.1·1.0 + 0.9·0.085)
        assert math.isclose(cskd, -(31 * log_p[7] + log_p[3]) / 32, rel_tol=1e-5)
    else:
        tau = 2.0
        student = [v / tau - math.log(sum(math.exp(w / tau) for w in b.tolist())) for v in b.tolist()]

        def kl(fused: list[float]) -> float:
            z = math.log(sum(math.exp(v / tau) for v in fused))
            return sum(math.exp(v / tau - z) * (v / tau - z - s) for v, s in zip(fused, student, strict=True))

        common = [0.9 * (1.0 if k == 3 else 0.0) + 0.1 * (20.0 if k == 7 else 0.0) for k in range(10)]
        odd = [0.9 * (1.0 if k == 3 else 0.0) + 0.1 * (0.5 if k == 2 else 0.0) for k in range(10)]
        # τ² · (sum over the 2·16 cells) / 2 images
        assert math.isclose(cskd, tau**2 * (31 * kl(common) + kl(odd)) / 2, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------- CSKD: inference
def test_cls_dist_dense_fusion_by_hand_and_in_onnx(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1, head_fusion="cls_dist_dense").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        dense = model.token_heads[0](tokens[:, 2:])  # every patch through the distillation head (the authors' way)
        expected = (model.head(tokens[:, 0]) + model.token_heads[0](tokens[:, 1]) + dense.mean(dim=1)) / 3
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert not torch.allclose(model(x), (model.head(tokens[:, 0]) + model.token_heads[0](tokens[:, 1])) / 2)

    path = tmp_path / "model.onnx"
    export_onnx(model, CIFAR_INFO, path, quiet())
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.no_grad():
        assert np.abs(got - model(torch.from_numpy(batch)).numpy()).max() < 1e-4


def test_cskd_training_accuracy_uses_the_same_fusion():
    d = _cskd({"head_fusion": "cls_dist_dense"})
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    out = d(x, y)
    z_cls, z_dist = d.student(x)
    patches = d.student.token_heads[0](d.student_hooks.features["tokens"][:, 2:])
    assert torch.allclose(out.logits, (z_cls + z_dist + patches.mean(dim=1)) / 3, atol=1e-5)


def test_cls_dist_dense_is_refused_where_it_cannot_work():
    with pytest.raises(UserError, match="head_fusion"):
        timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1, head_fusion="cls_dist_dense")
    deit = get_method_class("deit")
    student = timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1, head_fusion="cls_dist_dense")
    d = deit(student, [timm.create_model("test_resnet", num_classes=10)], deit.Params(), 10).train()
    with pytest.raises(UserError, match=r"student\.kwargs\.head_fusion.*cskd"):
        d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_the_cskd_recipe_names_its_inference_fusion():
    recipe = load_recipe(ROOT / "recipes" / "cskd_cifar10.yaml")
    assert recipe.student.kwargs["head_fusion"] == "cls_dist_dense"
    assert recipe.teacher_cache.dense_topk >= 10  # every class stored: the cached CKF targets are exact


# ------------------------------------------------------------------------------------------- CiT
@pytest.mark.parametrize("name", ["cit_nano_patch4_32", "cit_tiny_patch4_32"])
def test_cit_students_predict_with_the_class_token_by_default(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, depth=1).eval()
    assert model.head_fusion == "cls"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        heads = [model.head(tokens[:, 0]), *(h(tokens[:, 1 + i]) for i, h in enumerate(model.token_heads))]
        assert torch.allclose(model(x), heads[0], atol=1e-6)
        assert not torch.allclose(model(x), torch.stack(heads).mean(0), atol=1e-3)
    mean = timm.create_model(name, num_classes=10, depth=1, head_fusion="mean")
    assert mean.head_fusion == "mean"  # the authors' mean of the three heads stays an option
    assert timm.create_model("libkd_nano_patch4_32", num_classes=10, depth=1).head_fusion == "mean"
    assert load_recipe(ROOT / "recipes" / "cit_cifar10.yaml").student.kwargs["head_fusion"] == "cls"


def test_cit_checks_which_teacher_is_which():
    cls = get_method_class("cit")
    cnn = timm.create_model("test_resnet", num_classes=10)
    inn = timm.create_model("rednet26_cifar", num_classes=10, **TINY_REDNET)
    vit = timm.create_model("vit_nano_patch4_32", num_classes=10, depth=1)
    assert [network_kind(m) for m in (cnn, inn, vit)] == ["convolutional", "involution", "transformer"]

    def student():
        return timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1)

    cls(student(), [cnn, inn], cls.Params(), 10)  # the right order
    with pytest.raises(UserError, match=r"`teachers`.*swapped.*Swap the two entries of `teachers`") as swapped:
        cls(student(), [inn, cnn], cls.Params(), 10)
    assert "teachers.0 is an involution network" in str(swapped.value)
    with pytest.raises(UserError, match=r"`teachers`.*teachers\.0 is a transformer"):
        cls(student(), [vit, inn], cls.Params(), 10)
    with pytest.raises(UserError, match=r"teachers\.1 is a convolutional network"):
        cls(student(), [cnn, cnn], cls.Params(), 10)


def test_token_heads_are_initialised_like_timms_head():
    torch.manual_seed(0)
    model = timm.create_model("cit_tiny_patch16_224", num_classes=100, depth=1)  # 192 x 100 weights a head
    for head in [model.head, *model.token_heads]:
        assert abs(head.weight.std().item() - 0.02) < 1e-3  # trunc_normal(std .02); PyTorch's default is ~0.042
        assert abs(head.weight.mean().item()) < 1e-3
        assert torch.count_nonzero(head.bias) == 0
    jax = timm.create_model("cit_nano_patch4_32", num_classes=10, depth=1, weight_init="jax_nlhb")
    for head in [jax.head, *jax.token_heads]:  # timm's jax init: zero weights, bias −log(classes)
        assert torch.count_nonzero(head.weight) == 0
        assert torch.allclose(head.bias, torch.full((10,), -math.log(10)))
