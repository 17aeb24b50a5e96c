"""CSKD (Zhao et al., "Cumulative Spatial Knowledge Distillation for Vision Transformers", ICCV 2023)."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import UserError
from ..token_vit import distill_token_heads
from .base import Distiller, MethodParams, StepOutput, fused_logits, require_distill_tokens
from .deit import token_distillation_loss
from .registry import register_method

Schedule = Literal["linear", "quadratic", "cosine"]


class CSKDParams(MethodParams):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the DeiT global term; CE gets 1 - alpha")
    distillation_type: Literal["hard", "soft"] = Field("hard", description="the global (DeiT) term's kind")
    tau: float = Field(1.0, gt=0, description="temperature of the soft global term")
    cskd_weight: float = Field(1.0, ge=0, description="weight of the dense (patch-token) term")
    cskd_type: Literal["hard", "soft"] = Field("hard", description="hard: CE to the CKF argmax; soft: KL to it")
    schedule: Schedule = Field("linear", description="how the CKF ratio r rises from 0 to 1 over training")


def ckf_ratio(progress: float, schedule: Schedule) -> float:
    """r(t) for training progress t ∈ [0, 1]: 0 at the start (local, dense targets), 1 at the end (global)."""
    t = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return t
    if schedule == "quadratic":
        return 1 - (1 - t) ** 2
    return 1 - math.cos(math.pi / 2 * t)


@register_method
class CumulativeSpatialKD(Distiller):
    """Every patch token of the student predicts the class through the distillation head, supervised by the CNN
    teacher's prediction at the same place; Cumulative Knowledge Fusion moves that target from local to global.

    - Teacher dense predictions: the CNN's classifier applied at every position of its last feature map (before
      global pooling), average-pooled to the student's patch grid; p_dense = softmax per position.
    - CKF target: argmax(r·p_global + (1 − r)·p_dense) per position, with r = ckf_ratio(progress) (§3.3).
    - L = (1 − α)·CE(z_cls, y) + α·L_deit(z_dist, z_t) + β·L_cskd(dense student logits, CKF target);
      defaults from the paper's code: α = 0.5, hard DeiT term, β = 1, hard CKF, linear r.
    """

    name = "cskd"
    Params = CSKDParams

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: CSKDParams, num_classes: int,
                 **kwargs: Any):
        require_distill_tokens(student, 1, "cskd", "libkd_nano_patch4_32 or deit_tiny_distilled_patch16_224")
        super().__init__(student, teachers, params, num_classes, **kwargs)
        student.set_distilled_training(True)
        self.grid = tuple(student.patch_embed.grid_size)
        self.student_hooks = self.hook_features(student, {"tokens": "norm"})  # final tokens, before the heads
        self._check_teacher_head(teachers[0])

    @torch.no_grad()
    def _check_teacher_head(self, teacher: nn.Module) -> None:
        """Dense predictions need a classifier that is linear after global average pooling: check on a probe."""
        teacher.eval()  # a probe in train mode would move the BN running statistics
        size = getattr(teacher, "pretrained_cfg", {}).get("input_size", (3, 32, 32))[-1]
        probe = torch.randn(2, 3, size, size)
        try:
            dense = self.teacher_output(0, probe)
            global_logits = teacher(probe)
        except (AttributeError, RuntimeError, ValueError) as exc:
            dense, global_logits = None, exc
        if dense is None or not torch.allclose(dense["logits"], global_logits, atol=1e-3, rtol=1e-3):
            raise UserError(
                f"CSKD needs a CNN teacher whose classifier is a linear layer after global average pooling, so it "
                f"can be applied at every position, but `{type(teacher).__name__}` (teachers.0.name) is not such a "
                "model. Use e.g. a ResNet, RegNet, MobileNetV2 or EfficientNet teacher.")

    def teacher_output_signature(self) -> dict[str, Any]:
        return {"outputs": ["logits", "dense"], "grid": list(self.grid)}

    def teacher_output(self, index: int, images: Tensor) -> dict[str, Tensor]:
        teacher = self.teachers[index]
        features = teacher.forward_features(images)  # (B, C, h, w)
        classifier = teacher.get_classifier()
        if features.dim() != 4 or not isinstance(classifier, nn.Linear):
            raise ValueError("not a CNN with a linear classifier")
        dense = classifier(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, K, h, w) logits per position
        logits = dense.mean(dim=(2, 3))  # = the teacher's own prediction: pooling and a linear layer commute
        on_grid = F.adaptive_avg_pool2d(dense, self.grid).flatten(2).transpose(1, 2)  # (B, P, K)
        return {"logits": logits, "dense": on_grid.softmax(dim=-1)}

    def ckf_target(self, global_logits: Tensor, dense_probs: Tensor) -> Tensor:
        """r·p_global + (1 − r)·p_dense, per position (B, P, K)."""
        r = ckf_ratio(self.progress, self.params.schedule)
        return r * global_logits.softmax(dim=-1).unsqueeze(1) + (1 - r) * dense_probs

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CSKDParams = self.params
        teacher = self.teacher_outputs(images, indices)[0]
        cls_logits, dist_logits = self.student(images)
        patch_tokens = self.student_hooks.features["tokens"][:, self.student.num_prefix_tokens:]
        dense_logits = distill_token_heads(self.student)[0](patch_tokens)  # (B, P, K), the distillation head
        target = self.ckf_target(teacher["logits"], teacher["dense"])
        ce = self.classification_loss(cls_logits, targets)
        deit = token_distillation_loss(dist_logits, teacher["logits"], p.distillation_type, p.tau)
        if p.cskd_type == "hard":
            cskd = F.cross_entropy(dense_logits.flatten(0, 1), target.argmax(dim=-1).flatten())
        else:
            cskd = F.kl_div(dense_logits.log_softmax(dim=-1), target, reduction="sum") / dense_logits[..., 0].numel()
        loss = (1 - p.alpha) * ce + p.alpha * deit + p.cskd_weight * cskd
        return StepOutput(loss, fused_logits(self.student, (cls_logits, dist_logits)),
                          {"ce": ce.detach(), "deit": deit.detach(), "cskd": cskd.detach()})
