"""DeiT token distillation (Touvron et al., "Training data-efficient image transformers", ICML 2021)."""
from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, MethodParams, StepOutput, fused_logits, kl_divergence, require_distill_tokens
from .registry import register_method


class DeiTParams(MethodParams):
    distillation_type: Literal["hard", "soft"] = Field("hard", description="hard: teacher argmax; soft: KL")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation-token loss")
    tau: float = Field(1.0, gt=0, description="temperature of the soft variant")


@register_method
class DeiTDistillation(Distiller):
    """The class token learns from labels, the distillation token from the teacher.

    soft (DeiT Eq. 2): (1 − λ)·CE(ψ(Z_cls), y) + λ·τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ))
    hard (DeiT Eq. 3, λ = ½ by default): (1 − λ)·CE(ψ(Z_cls), y) + λ·CE(ψ(Z_dist), argmax Z_t)
    At inference the two heads' logits are averaged (timm's VisionTransformerDistilled does this in eval; kd2deploy's
    token ViTs follow their `head_fusion`).
    """

    name = "deit"
    Params = DeiTParams

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: DeiTParams, num_classes: int,
                 **kwargs: Any):
        require_distill_tokens(student, 1, "deit", "deit_tiny_distilled_patch16_224, or kd2deploy's CIFAR-size "
                               "deit_nano_distilled_patch4_32 / libkd_nano_patch4_32")
        super().__init__(student, teachers, params, num_classes, **kwargs)
        student.set_distilled_training(True)  # timm API: training forward returns (cls, dist) logits

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: DeiTParams = self.params
        teacher = self.teacher_logits(images, indices)[0]
        cls_logits, dist_logits = self.student(images)
        ce = self.classification_loss(cls_logits, targets)
        distill = token_distillation_loss(dist_logits, teacher, p.distillation_type, p.tau)
        loss = (1 - p.alpha) * ce + p.alpha * distill
        logits = fused_logits(self.student, (cls_logits, dist_logits))
        return StepOutput(loss, logits, {"ce": ce.detach(), "distill": distill.detach()})


def token_distillation_loss(dist_logits: Tensor, teacher_logits: Tensor, kind: str, tau: float) -> Tensor:
    """DeiT's distillation-token loss: soft τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ)) (Eq. 2) or hard CE(Z_dist, argmax Z_t)
    (Eq. 3)."""
    if kind == "soft":
        return kl_divergence(dist_logits, teacher_logits, tau)
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
