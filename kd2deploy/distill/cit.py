"""CiT, co-advised training (Ren et al., "Co-advise: Cross Inductive Bias Distillation", CVPR 2022)."""
from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, MethodParams, StepOutput, fused_logits, kl_divergence, require_distill_tokens
from .registry import register_method


class CiTParams(MethodParams):
    lambda_cls: float = Field(1.0, ge=0, description="λ0, weight of the class token's cross-entropy")
    lambda_conv: float = Field(1.0, ge=0, description="λ1, weight of the conv token's KD from teachers[0] (CNN)")
    lambda_inv: float = Field(1.0, ge=0, description="λ2, weight of the inv token's KD from teachers[1] (INN)")
    tau_conv: float = Field(1.0, gt=0, description="τ1, temperature of the conv token's KD")
    tau_inv: float = Field(1.0, gt=0, description="τ2, temperature of the inv token's KD")


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
