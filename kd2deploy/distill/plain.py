"""No teacher: plain supervised training. This is how teachers themselves are trained."""
from __future__ import annotations

from torch import Tensor

from .base import Distiller, StepOutput
from .registry import register_method


@register_method
class PlainTraining(Distiller):
    name = "none"
    min_teachers = max_teachers = 0

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        logits = self.student(images)
        loss = self.classification_loss(logits, targets)
        return StepOutput(loss, logits, {"ce": loss.detach()})
