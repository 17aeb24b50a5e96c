"""VLFKD: visual-linguistic feature distillation with pixel-decoupled distillation, CNN teacher → ViT student.

After C2VKD (Zheng, Luo, Zhou & Wang, "Distilling Efficient Vision Transformers from CNNs for Semantic
Segmentation", arXiv 2310.07265: its VLFD and PDD modules), carried to classification as the cross-architecture
study that motivates kd2deploy describes it:

    L = CE + λg·L_global + λp·L_patch + λl·L_linguistic + λd·L_pixel
    L_global     = KL(softmax(Proj_T(GAP(F_T))) ‖ softmax(GAP(F_S)))            (the visual feature, pooled)
    L_patch      = MSE(Proj_T(F_T), F_S resized to the teacher's grid)          (the visual feature, per position)
    L_linguistic = KL(softmax(SA(Proj_T(F_T))) ‖ softmax(Proj_S(F_S))), per token (the "linguistic-compatible"
                   feature: the teacher's map read as a token sequence and passed through a self-attention layer)
    L_pixel      = MSE(b_S, b_T) + MSE(q_S, q_T), per cell                       (PDD: decoupled target/non-target)

F_T is the CNN teacher's last feature map (B, C, h, w); F_S the student's final patch tokens (after its last norm,
class/distillation tokens dropped), laid on their grid. Proj_T is one linear map C → D (a 1×1 convolution per
position; pooling commutes with it, so L_global and L_patch share it), Proj_S a linear map D → D, SA a pre-norm
self-attention layer with a residual (timm's Attention). For PDD, the teacher's classifier applied at every
position gives dense logits (as CSKD's teacher), the student's class head applied to every patch token gives its
dense logits; the student's are average-pooled to the teacher's grid (CSKD's alignment), and per cell
b = [p_y, 1 − p_y] (the target class's probability) and q = softmax over the non-target logits (DKD's
decoupling, Zhao et al. 2022), with y the image's label.

Choices where the sources are silent (the paper's body was not reachable from this machine; the study gives only the
equations above): every comparison happens on the teacher's grid; the KL terms are over the feature channels at
temperature 1, batch means (per token for L_linguistic); all weights default to 1; Proj_T, Proj_S and SA are
trained with the student (the teacher's side has no other way to learn) and are training-only modules, not part of
student.pt. Student: a ViT (timm's or kd2deploy's token ViTs); teacher: a CNN with a linear classifier after global
average pooling.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, model_input_size
from .cskd import check_dense_teacher, dense_logits, pool_to_cells
from .registry import register_method


class VLFKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0)
    global_weight: float = Field(1.0, ge=0, description="λg: KL of the pooled features")
    patch_weight: float = Field(1.0, ge=0, description="λp: MSE of the features per position")
    linguistic_weight: float = Field(1.0, ge=0, description="λl: KL of the self-attended teacher tokens")
    pixel_weight: float = Field(1.0, ge=0, description="λd: pixel-decoupled (target / non-target) MSE")
    num_heads: int = Field(4, ge=1, description="heads of the self-attention layer (must divide the student width)")


def feature_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) over the last dimension, mean over the other rows."""
    return F.kl_div(F.log_softmax(student.flatten(0, -2), dim=-1), F.log_softmax(teacher.flatten(0, -2), dim=-1),
                    reduction="batchmean", log_target=True)


def decoupled(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(b, q) per row of (..., K) logits: b = [p_y, 1 − p_y], q = softmax of the K − 1 non-target logits."""
    probs = F.softmax(logits, dim=-1)
    target = F.one_hot(labels, logits.shape[-1]).bool().expand_as(logits)
    p_y = probs.masked_select(target).view(*logits.shape[:-1], 1)
    non_target = logits.masked_select(~target).view(*logits.shape[:-1], logits.shape[-1] - 1)
    return torch.cat([p_y, 1 - p_y], dim=-1), F.softmax(non_target, dim=-1)


def pixel_decoupled_loss(student_cells: Tensor, teacher_cells: Tensor, labels: Tensor) -> Tensor:
    """PDD on (B, P, K) cell logits: MSE of the target parts + MSE of the non-target parts."""
    cell_labels = labels[:, None].expand(-1, student_cells.shape[1])
    b_s, q_s = decoupled(student_cells, cell_labels)
    b_t, q_t = decoupled(teacher_cells, cell_labels)
    return F.mse_loss(b_s, b_t) + F.mse_loss(q_s, q_t)


class SelfAttention(nn.Module):
    """x + Attention(LayerNorm(x)): the layer that makes the teacher's tokens "linguistic-compatible"."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


@register_method
class VLFKD(Distiller):
    """CE + λg·L_global + λp·L_patch + λl·L_linguistic + λd·L_pixel (see the module docstring)."""

    name = "vlfkd"
    Params = VLFKDParams
    cacheable = False  # it reads the teacher's feature map every step

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        p: VLFKDParams = self.params
        student, teacher = self.student, self.teachers[0]
        grid = getattr(getattr(student, "patch_embed", None), "grid_size", None)
        if grid is None or not hasattr(student, "norm"):
            raise UserError(f"distill.method `vlfkd` distils a CNN into a vision transformer, but "
                            f"`{type(student).__name__}` (student.name) has no patch grid and final norm. Use a "
                            "timm ViT or one of kd2deploy's token ViTs (e.g. libkd_nano_patch4_32).")
        self.grid = tuple(grid)
        side = self.img_size or model_input_size(student)
        self.teacher_grid = check_dense_teacher(teacher, (side, side), "VLFKD")
        self.student_hooks = self.hook_features(student, {"tokens": "norm"})
        with torch.no_grad():
            teacher_width = teacher.forward_features(torch.zeros(1, 3, side, side)).shape[1]
        width = student.embed_dim
        if width % p.num_heads:
            raise UserError(f"distill.num_heads ({p.num_heads}) must divide the student's width ({width}).")
        self.project_teacher = nn.Linear(teacher_width, width)
        self.project_student = nn.Linear(width, width)
        self.self_attention = SelfAttention(width, p.num_heads)

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: VLFKDParams = self.params
        teacher = self.teachers[0]
        with torch.no_grad():
            teacher_map = teacher.forward_features(images)  # F_T (B, C, h, w)
            teacher_cells = dense_logits(teacher, teacher_map).flatten(2).transpose(1, 2)  # (B, hw, K)
        logits = self.student(images)
        patches = self.student_hooks.features["tokens"][:, self.student.num_prefix_tokens:]  # F_S (B, N, D)
        student_tokens = pool_to_cells(patches, self.grid, self.teacher_grid)  # on the teacher's grid (B, hw, D)
        teacher_tokens = self.project_teacher(teacher_map.float().flatten(2).transpose(1, 2))  # Proj_T (B, hw, D)

        global_term = feature_kl(student_tokens.mean(dim=1), teacher_tokens.mean(dim=1))
        patch_term = F.mse_loss(student_tokens, teacher_tokens)
        linguistic = feature_kl(self.project_student(student_tokens), self.self_attention(teacher_tokens))
        head = self.student.get_classifier()
        head = head[0] if isinstance(head, nn.ModuleList) else head
        student_cells = pool_to_cells(head(patches), self.grid, self.teacher_grid)  # (B, hw, K)
        labels = targets.argmax(dim=-1) if targets.dim() == 2 else targets
        pixel = pixel_decoupled_loss(student_cells, teacher_cells.float(), labels)

        ce = self.classification_loss(logits, targets)
        loss = (p.ce_weight * ce + p.global_weight * global_term + p.patch_weight * patch_term
                + p.linguistic_weight * linguistic + p.pixel_weight * pixel)
        return StepOutput(loss, logits, {"ce": ce.detach(), "global": global_term.detach(),
                                         "patch": patch_term.detach(), "linguistic": linguistic.detach(),
                                         "pixel": pixel.detach()})
