"""CiT, co-advised training (Ren et al., "Co-advise: Cross Inductive Bias Distillation", CVPR 2022).

Follows the paper's Eq. 3 and the authors' code (github.com/OliverRensu/co-advise: main.py `train_one_epoch`,
models.py `DistilledVisionTransformer`). The extra token heads are initialised like timm's `head` (models.py
applies timm's `_init_weights` to `head_conv`/`head_inv`: trunc_normal std .02, zero bias), see
kd2deploy/token_vit.py. At inference the cit_* students use the class token (`head_fusion: cls`), as the paper's
text; `head_fusion: mean` averages the three heads as the authors' code (models.py `forward` in eval).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from ..errors import UserError
from ..models.involution import Involution2d
from .base import Distiller, MethodParams, StepOutput, fused_logits, kl_divergence, require_distill_tokens
from .registry import register_method


class CiTParams(MethodParams):
    lambda_cls: float = Field(1.0, ge=0, description="λ0, weight of the class token's cross-entropy")
    lambda_conv: float = Field(1.0, ge=0, description="λ1, weight of the conv token's KD from teachers[0] (CNN)")
    lambda_inv: float = Field(1.0, ge=0, description="λ2, weight of the inv token's KD from teachers[1] (INN)")
    tau_conv: float = Field(1.0, gt=0, description="τ1, temperature of the conv token's KD")
    tau_inv: float = Field(1.0, gt=0, description="τ2, temperature of the inv token's KD")


def network_kind(model: nn.Module) -> str:
    """"involution" (has an Involution2d), "transformer" (has attention), "convolutional" (has nn.Conv2d and
    neither) or "other"."""
    modules = list(model.modules())
    if any(isinstance(m, Involution2d) for m in modules):
        return "involution"
    if any(isinstance(m, nn.MultiheadAttention) or isinstance(getattr(m, "qkv", None), nn.Linear)
           or type(m).__name__.endswith("Attention") for m in modules):
        return "transformer"
    if any(isinstance(m, nn.Conv2d) for m in modules):
        return "convolutional"
    return "other"


def check_teacher_order(teachers: list[nn.Module]) -> None:
    """A UserError unless teachers.0 is a CNN and teachers.1 an involution network (CiT's token order)."""
    kinds = [network_kind(t) for t in teachers]
    if kinds == ["convolutional", "involution"]:
        return
    if kinds == ["involution", "convolutional"]:
        raise UserError(
            "distill.method `cit` takes the recipe's `teachers` in a fixed order: teachers.0 a convolutional "
            "network (it teaches the conv token), teachers.1 an involution network (the inv token). This recipe has "
            "them swapped: teachers.0 is an involution network (it has Involution2d layers) and teachers.1 a "
            "convolutional one. Swap the two entries of `teachers`.")
    what = {"convolutional": "a convolutional network", "involution": "an involution network",
            "transformer": "a transformer", "other": "neither a convolutional nor an involution network"}
    raise UserError(
        f"distill.method `cit` needs the recipe's `teachers` to be a convolutional network (teachers.0, for the "
        f"conv token) and an involution network (teachers.1, for the inv token), but teachers.0 is "
        f"{what[kinds[0]]} and teachers.1 is {what[kinds[1]]}. List a CNN then an involution network "
        "under `teachers`, e.g. resnet10_cifar then rednet26_cifar.")


@register_method
class CoAdvisedDistillation(Distiller):
    """One token per teacher: the conv token learns from the CNN teacher (`teachers[0]`), the inv token from the
    involution teacher (`teachers[1]`), the class token from the labels (CiT Eq. 3, paper defaults λ = τ = 1):
    L = λ0·CE(z_cls, y) + λ1·τ1²·KL(σ(z_t1/τ1) ‖ σ(z_conv/τ1)) + λ2·τ2²·KL(σ(z_t2/τ2) ‖ σ(z_inv/τ2))."""

    name = "cit"
    Params = CiTParams
    min_teachers = 2
    max_teachers = 2

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: CiTParams, num_classes: int,
                 **kwargs: Any):
        require_distill_tokens(student, 2, "cit", "cit_nano_patch4_32 or cit_tiny_patch16_224")
        check_teacher_order(teachers)
        super().__init__(student, teachers, params, num_classes, **kwargs)
        student.set_distilled_training(True)

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CiTParams = self.params
        cnn_logits, inn_logits = self.teacher_logits(images, indices)
        cls_logits, conv_logits, inv_logits = self.student(images)
        ce = self.classification_loss(cls_logits, targets)
        kd_conv = kl_divergence(conv_logits, cnn_logits, p.tau_conv)
        kd_inv = kl_divergence(inv_logits, inn_logits, p.tau_inv)
        loss = p.lambda_cls * ce + p.lambda_conv * kd_conv + p.lambda_inv * kd_inv
        return StepOutput(loss, fused_logits(self.student, (cls_logits, conv_logits, inv_logits)),
                          {"ce": ce.detach(), "kd_conv": kd_conv.detach(), "kd_inv": kd_inv.detach()})
