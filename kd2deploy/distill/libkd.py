"""LIB-KD: lightweight inductive-bias teachers distilling a ViT through one distillation token (arXiv 2310.00369)."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, fused_logits, require_distill_tokens
from .deit import token_distillation_loss
from .registry import register_method


class LIBKDParams(MethodParams):
    teacher_weights: list[float] | None = Field(
        None, description="one weight per teacher for the ensemble target (normalised to sum 1); default equal")
    distillation_type: Literal["hard", "soft"] = Field("soft", description="soft: KL to the ensemble; hard: its argmax")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation-token loss; CE gets 1 - alpha")
    tau: float = Field(1.0, gt=0, description="temperature of the soft variant")


@register_method
class LIBKD(Distiller):
    """Lightweight teachers with different inductive biases (a CNN and an involution network) jointly teach one
    distillation token. Their logits are ensembled, z_ens = Σ_i w_i·z_i with Σ w_i = 1, and
    L = (1 − α)·CE(z_cls, y) + α·L_dist(z_dist, z_ens), L_dist as in DeiT (soft Eq. 2 / hard Eq. 3).
    The teachers are cheap and fixed, so their logits are typically precomputed (`teacher_cache.enabled: true`)."""

    name = "libkd"
    Params = LIBKDParams
    max_teachers = 8

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: LIBKDParams, num_classes: int,
                 **kwargs: Any):
        require_distill_tokens(student, 1, "libkd", "libkd_nano_patch4_32 or deit_tiny_distilled_patch16_224")
        super().__init__(student, teachers, params, num_classes, **kwargs)
        weights = params.teacher_weights or [1.0] * len(teachers)
        if len(weights) != len(teachers) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"distill.teacher_weights {weights} must hold one non-negative weight per teacher "
                            f"({len(teachers)}), not all zero. Fix the list or remove it for equal weights.")
        self.register_buffer("weights", torch.tensor(weights) / sum(weights), persistent=False)
        student.set_distilled_training(True)

    def ensemble_logits(self, teacher_logits: list[Tensor]) -> Tensor:
        return torch.einsum("t,tbc->bc", self.weights, torch.stack(teacher_logits))

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: LIBKDParams = self.params
        target = self.ensemble_logits(self.teacher_logits(images, indices))
        cls_logits, dist_logits = self.student(images)
        ce = self.classification_loss(cls_logits, targets)
        distill = token_distillation_loss(dist_logits, target, p.distillation_type, p.tau)
        loss = (1 - p.alpha) * ce + p.alpha * distill
        return StepOutput(loss, fused_logits(self.student, (cls_logits, dist_logits)),
                          {"ce": ce.detach(), "distill": distill.detach()})
