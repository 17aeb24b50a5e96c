"""Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Distiller, MethodParams, StepOutput, kl_divergence
from .registry import register_method


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="softening temperature τ")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term; CE gets 1 - alpha")


@register_method
class KnowledgeDistillation(Distiller):
    """L = (1 − α)·CE(z_s, y) + α·τ²·KL(σ(z_t/τ) ‖ σ(z_s/τ)) (Hinton et al. 2015, §2).
    Several teachers are ensembled by averaging their logits."""

    name = "kd"
    Params = KDParams
    max_teachers = 8

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: KDParams = self.params
        teacher = torch.stack(self.teacher_logits(images, indices)).mean(0)
        logits = self.student(images)
        ce = self.classification_loss(logits, targets)
        kd = kl_divergence(logits, teacher, p.temperature)
        loss = (1 - p.alpha) * ce + p.alpha * kd
        return StepOutput(loss, logits, {"ce": ce.detach(), "kd": kd.detach()})
