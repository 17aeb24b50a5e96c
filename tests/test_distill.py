"""Distiller losses against hand-computed values, hooks, and teacher freezing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd2deploy.distill import get_method_class
from kd2deploy.distill.deit import DeiTParams
from kd2deploy.distill.hooks import FeatureHooks
from kd2deploy.distill.kd import KDParams
from kd2deploy.errors import UserError
from kd2deploy.models import create_model


class FixedLogits(nn.Module):
    """A 'model' that returns given logits (and has one parameter so it can be trained/frozen)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.logits * self.scale


def softmax(values, t=1.0):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    student_logits = torch.tensor([[2.0, 0.0, -1.0]])
    teacher_logits = torch.tensor([[0.5, 1.5, 0.0]])
    target = torch.tensor([0])
    t, alpha = 2.0, 0.7
    kd = get_method_class("kd")(FixedLogits(student_logits), [FixedLogits(teacher_logits)],
                                KDParams(temperature=t, alpha=alpha), num_classes=3)
    out = kd(torch.zeros(1, 3, 4, 4), target)

    ce = -math.log(softmax([2.0, 0.0, -1.0])[0])
    p_t, p_s = softmax([0.5, 1.5, 0.0], t), softmax([2.0, 0.0, -1.0], t)
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True)) * t * t
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out.terms["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-5)


class TwoHeads(nn.Module):
    """Stands in for a distilled DeiT: returns (cls, dist) logits in distilled training."""

    def __init__(self, cls_logits, dist_logits):
        super().__init__()
        self.cls_logits, self.dist_logits = cls_logits, dist_logits
        self.distilled = False

    def set_distilled_training(self, enable=True):
        self.distilled = enable

    def forward(self, x):
        return self.cls_logits, self.dist_logits


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deit_losses_match_hand_computation(kind):
    cls_l, dist_l = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    teacher_l = torch.tensor([[0.0, 0.0, 3.0]])
    params = DeiTParams(distillation_type=kind, alpha=0.5, tau=2.0)
    student = TwoHeads(cls_l, dist_l)
    deit = get_method_class("deit")(student, [FixedLogits(teacher_l)], params, num_classes=3)
    assert student.distilled
    out = deit(torch.zeros(1, 3, 4, 4), torch.tensor([0]))
    ce_cls = -math.log(softmax([1.0, 0.0, 0.0])[0])
    if kind == "hard":  # teacher's argmax is class 2
        distill = -math.log(softmax([0.0, 2.0, 0.0])[2])
    else:
        p_t, p_s = softmax([0.0, 0.0, 3.0], 2.0), softmax([0.0, 2.0, 0.0], 2.0)
        distill = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True)) * 4.0
    assert out.loss.item() == pytest.approx(0.5 * ce_cls + 0.5 * distill, rel=1e-5)
    assert torch.allclose(out.logits, (cls_l + dist_l) / 2)


def test_deit_needs_a_distillation_token():
    with pytest.raises(UserError, match="distillation token"):
        get_method_class("deit")(create_model("test_resnet", 10), [create_model("test_resnet", 10)],
                                 DeiTParams(), num_classes=10)


def test_distilled_vit_student_trains_with_deit():
    student = create_model("deit_nano_distilled_patch4_32", 10, kwargs={"depth": 1})
    deit = get_method_class("deit")(student, [create_model("test_resnet", 10)], DeiTParams(), 10)
    out = deit.train()(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    out.loss.backward()
    assert student.dist_token.grad is not None and student.cls_token.grad is not None
    assert student.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # inference averages the two heads


def test_soft_targets_from_mixup_use_soft_cross_entropy():
    plain = get_method_class("none")(FixedLogits(torch.tensor([[1.0, 2.0]])), [], None, num_classes=2)
    soft = plain(torch.zeros(1), torch.tensor([[0.25, 0.75]]))
    p = softmax([1.0, 2.0])
    assert soft.loss.item() == pytest.approx(-(0.25 * math.log(p[0]) + 0.75 * math.log(p[1])), rel=1e-5)


def test_teachers_are_frozen_and_excluded_from_the_optimizer():
    student, teacher = create_model("test_resnet", 10), create_model("test_resnet", 10)
    kd = get_method_class("kd")(student, [teacher], KDParams(), num_classes=10).train()
    assert not teacher.training
    names = [name for name, _ in kd.trainable_parameters()]
    assert names and all(name.startswith("student.") for name in names)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD([p for _, p in kd.trainable_parameters()], lr=0.1)
    kd(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])).loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert "teachers.0.conv1.weight" not in kd.training_state()["modules"]


def test_feature_hooks_read_intermediate_outputs_without_editing_the_model():
    model = create_model("test_resnet", 10).eval()
    hooks = FeatureHooks(model, {"stage": "layer2"})
    model(torch.randn(2, 3, 32, 32))
    assert hooks.features["stage"].shape[0] == 2 and hooks.features["stage"].dim() == 4
    hooks.remove()
    hooks.features.clear()
    model(torch.randn(2, 3, 32, 32))
    assert hooks.features == {}
    with pytest.raises(KeyError, match="no sub-module"):
        FeatureHooks(model, {"x": "layer99"})
