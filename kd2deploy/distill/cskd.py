"""CSKD (Zhao et al., "Cumulative Spatial Knowledge Distillation for Vision Transformers", ICCV 2023).

Follows the paper's Fig. 1(b) and the authors' code (github.com/Zzzzz1/CSKD: cskd/cskd.py `CSKDLoss`,
cskd/models/vision_transformer.py `forward`, cskd/models/regnet.py `forward`):

- Teacher: the CNN's linear classifier at every position of its last feature map gives dense logits z_dense; their
  mean is its global logits z_global (pooling and a linear layer commute), as regnet.py `forward` and
  `CSKDLoss.forward` (`tea_dense_logits.mean(dim=(2,3))`).
- Student: the distillation head on every patch token gives dense logits (vision_transformer.py `forward`).
- Grids: the two are compared per *cell* of the coarser grid. The authors average-pool the student's dense logits
  down to the teacher's grid (`align_stu_logits`, 14x14 -> 7x7). Where the teacher's grid is finer than the
  student's (the paper has no such case, our choice) the teacher's dense logits are average-pooled down to the
  student's grid instead; equal grids are compared as they are. Pooling is adaptive average pooling, which is the
  authors' 2x2 average pool for their grids.
- CKF (`get_loss_cskd`): per cell the fused *logits* r·z_global + (1 − r)·z_dense, r = ckf_ratio(progress) rising
  from 0 to 1 (the authors' decay ratio is 1 − r: "linear", "x2", "cos" = our linear, quadratic, cosine).
- hard: CE(pooled student logits, argmax of the fused logits), mean over images and cells (`cskd_loss_type` hard).
  soft: τ²·Σ_cells KL(σ(fused/τ) ‖ σ(student/τ)) / B, summed over cells and averaged over images, τ = the DeiT
  term's temperature `tau`, exactly the authors' normalisation (so it grows with the number of cells).
- L = (1 − α)·CE(z_cls, y) + α·L_deit(z_dist, z_global) + β·L_cskd; defaults from configs/cskd_tiny.py: α = 0.5,
  hard DeiT term, β = 1, hard CKF, linear r.

Differences from the authors' code: r follows the training progress per step (theirs per epoch); the soft DeiT term
is kd2deploy's τ²·KL batch mean (DeiT Eq. 2) where their code divides the summed KL by B·K.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import UserError
from ..models.token_vit import distill_token_heads
from .base import Distiller, MethodParams, StepOutput, fused_logits, require_distill_tokens
from .deit import token_distillation_loss
from .registry import register_method

Schedule = Literal["linear", "quadratic", "cosine"]


class CSKDParams(MethodParams):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the DeiT global term; CE gets 1 - alpha")
    distillation_type: Literal["hard", "soft"] = Field("hard", description="the global (DeiT) term's kind")
    tau: float = Field(1.0, gt=0, description="temperature of the soft DeiT term and of the soft CSKD term")
    cskd_weight: float = Field(1.0, ge=0, description="weight of the dense (patch-token) term")
    cskd_type: Literal["hard", "soft"] = Field(
        "hard", description="hard: CE to the argmax of the CKF logits; soft: KL to their softmax at `tau`")
    schedule: Schedule = Field("linear", description="how the CKF ratio r rises from 0 to 1 over training")


def ckf_ratio(progress: float, schedule: Schedule) -> float:
    """r(t) for training progress t ∈ [0, 1]: 0 at the start (local, dense targets), 1 at the end (global).
    The authors' `get_decay_ratio` is 1 − r."""
    t = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return t
    if schedule == "quadratic":
        return 1 - (1 - t) ** 2
    return 1 - math.cos(math.pi / 2 * t)


def ckf_logits(global_logits: Tensor, dense_logits: Tensor, r: float) -> Tensor:
    """Cumulative Knowledge Fusion of logits (`get_loss_cskd`): r·z_global + (1 − r)·z_dense per cell (B, P, K)."""
    return r * global_logits.unsqueeze(1) + (1 - r) * dense_logits


def pool_to_cells(dense_logits: Tensor, grid: tuple[int, int], cells: tuple[int, int]) -> Tensor:
    """Dense logits (B, P, K) on `grid` average-pooled to the cell grid (B, P_cells, K) (`align_stu_logits`)."""
    if tuple(grid) == tuple(cells):
        return dense_logits
    maps = dense_logits.transpose(1, 2).unflatten(2, tuple(grid))  # (B, K, h, w)
    return F.adaptive_avg_pool2d(maps, cells).flatten(2).transpose(1, 2)


def dense_logits(cnn: nn.Module, features: Tensor) -> Tensor:
    """A CNN's linear classifier applied at every position of its last map (B, C, h, w): (B, K, h, w) logits;
    their mean over positions is its prediction (pooling and a linear layer commute)."""
    classifier = cnn.get_classifier()
    if features.dim() != 4 or not isinstance(classifier, nn.Linear):
        raise ValueError("not a CNN with a linear classifier")
    return classifier(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def check_dense_teacher(teacher: nn.Module, img_size: tuple[int, int], method: str) -> tuple[int, int]:
    """Dense predictions need a classifier that is linear after global average pooling: check on a probe at the
    student's input size (the teacher in eval mode); returns the teacher's grid there, or raises a UserError."""
    teacher.eval()  # a probe in train mode would move the BN running statistics
    probe = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        try:
            dense = dense_logits(teacher, teacher.forward_features(probe))
            global_logits = teacher(probe)
        except (AttributeError, RuntimeError, ValueError) as exc:
            dense, global_logits = None, exc
    if dense is None or not torch.allclose(dense.mean(dim=(2, 3)), global_logits, atol=1e-3, rtol=1e-3):
        raise UserError(
            f"{method} needs a CNN teacher whose classifier is a linear layer after global average pooling, so it can "
            f"be applied at every position, but `{type(teacher).__name__}` (teachers.0.name) is not such a model. "
            "Use e.g. a ResNet, RegNet, MobileNetV2 or EfficientNet teacher.")
    return tuple(dense.shape[-2:])


def dense_distillation_loss(student_cells: Tensor, fused: Tensor, kind: str, tau: float) -> Tensor:
    """The CSKD term on (B, P, K) cells: hard CE to the fused argmax (mean over cells), or soft
    τ²·Σ_cells KL(σ(fused/τ) ‖ σ(student/τ)) / B (the authors' sum over cells, mean over images)."""
    if kind == "hard":
        return F.cross_entropy(student_cells.flatten(0, 1), fused.argmax(dim=-1).flatten())
    return F.kl_div(F.log_softmax(student_cells / tau, dim=-1), F.log_softmax(fused / tau, dim=-1),
                    reduction="sum", log_target=True) * tau**2 / student_cells.shape[0]


@register_method
class CumulativeSpatialKD(Distiller):
    """Every patch token of the student predicts the class through the distillation head, supervised per cell by
    the CNN teacher's prediction at the same place; Cumulative Knowledge Fusion moves that target from local to
    global over training (see the module docstring for the equations and their sources)."""

    name = "cskd"
    Params = CSKDParams

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: CSKDParams, num_classes: int,
                 **kwargs: Any):
        require_distill_tokens(student, 1, "cskd", "libkd_nano_patch4_32 or deit_tiny_distilled_patch16_224")
        super().__init__(student, teachers, params, num_classes, **kwargs)
        student.set_distilled_training(True)
        self.grid = tuple(student.patch_embed.grid_size)
        self.student_hooks = self.hook_features(student, {"tokens": "norm"})  # final tokens, before the heads
        teacher_grid = check_dense_teacher(teachers[0], tuple(student.patch_embed.img_size), "CSKD")
        self.cells = (min(self.grid[0], teacher_grid[0]), min(self.grid[1], teacher_grid[1]))  # the coarser grid

    def teacher_output_signature(self) -> dict[str, Any]:
        return {"outputs": ["logits", "dense"], "dense": "logits", "cells": list(self.cells)}

    def teacher_dense_logits(self, index: int, images: Tensor) -> Tensor:
        """The teacher's classifier at every position of its last feature map: (B, K, h, w) logits."""
        teacher = self.teachers[index]
        return dense_logits(teacher, teacher.forward_features(images))

    def teacher_output(self, index: int, images: Tensor) -> dict[str, Tensor]:
        dense = self.teacher_dense_logits(index, images)
        logits = dense.mean(dim=(2, 3))  # = the teacher's own prediction
        cells = F.adaptive_avg_pool2d(dense, self.cells)  # the identity unless the teacher's grid is finer
        return {"logits": logits, "dense": cells.flatten(2).transpose(1, 2)}  # dense: (B, P_cells, K) logits

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CSKDParams = self.params
        teacher = self.teacher_outputs(images, indices)[0]
        cls_logits, dist_logits = self.student(images)
        patch_tokens = self.student_hooks.features["tokens"][:, self.student.num_prefix_tokens:]
        dense_logits = distill_token_heads(self.student)[0](patch_tokens)  # (B, P, K), the distillation head
        fused = ckf_logits(teacher["logits"], teacher["dense"], ckf_ratio(self.progress, p.schedule))
        student_cells = pool_to_cells(dense_logits, self.grid, self.cells)
        ce = self.classification_loss(cls_logits, targets)
        deit = token_distillation_loss(dist_logits, teacher["logits"], p.distillation_type, p.tau)
        cskd = dense_distillation_loss(student_cells, fused, p.cskd_type, p.tau)
        loss = (1 - p.alpha) * ce + p.alpha * deit + p.cskd_weight * cskd
        return StepOutput(loss, fused_logits(self.student, (cls_logits, dist_logits), dense_logits),
                          {"ce": ce.detach(), "deit": deit.detach(), "cskd": cskd.detach()})
