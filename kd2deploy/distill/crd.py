"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020, arXiv 1910.10699).

The student's and the teacher's pooled features (what each classifies: a CNN's global-average-pooled map, a ViT's
class token or mean patch token) pass through linear embedding heads to L2-normalised `feat_dim` vectors. Each
anchor is contrasted with its own image (the positive) and `nce_k` negatives, through two memory banks that hold a
momentum average of every training image's student and teacher embedding:

    h(t, s) = P / (P + K/N),  P = exp(t·s / τ) / Z                       (Eq. 10 and 19, Z estimated once)
    L_crd = −Σ_pos log h − Σ_neg log(1 − h), per anchor, batch mean         (Eq. 18, the NCE loss)

in both directions (student anchor against the teacher memory, teacher anchor against the student memory), and
L = γ·CE + α·KD + β·L_crd (Eq. 20; the paper's CIFAR runs use γ = 1, α = 0, β = 0.8).

Choices where the paper is silent, following the authors' code (HobbitLong/RepDistiller):
- The positive's score uses the memory entry of the anchor's own image, not the other network's current embedding;
  memories start uniform in ±1/√(feat_dim/3) and are updated after scoring: m ← normalise(μ·m + (1 − μ)·v).
- Negatives are images of other classes (the authors' default `exact` mode, `negatives: other_classes`); `uniform`
  draws them from the whole set as the paper's Eq. 17 does. N negatives are capped by what the training set holds
  (N − the largest class for `other_classes`).
- Z (the normalisation constant of Eq. 19) is set from the first batch: Z = mean(exp(t·s/τ))·N, and kept.
Scores are computed as (memory · anchorsᵀ) over the whole bank when that is cheaper than gathering K + 1 rows per
anchor (small data sets); both give the same numbers. Under torchrun every process updates its memories with every
process's embeddings, so the banks stay identical. The embedding heads and the memories are training-only modules:
they are not part of student.pt.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, TrainingData, kl_divergence
from .hooks import pooled_features
from .registry import register_method

EPS = 1e-7  # as in the authors' NCE loss


class CRDParams(MethodParams):
    feat_dim: int = Field(128, ge=1, description="embedding size of both heads")
    nce_k: int = Field(16384, ge=1, description="negatives per anchor (capped by the training set)")
    nce_t: float = Field(0.07, gt=0, description="temperature τ of the contrastive scores")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")
    negatives: Literal["other_classes", "uniform"] = Field(
        "other_classes", description="other_classes: the authors' code (exact mode); uniform: any image")
    gamma: float = Field(1.0, ge=0, description="weight of the cross-entropy")
    alpha: float = Field(0.0, ge=0, description="weight of a logit-KD term (0: off, the paper's CRD)")
    beta: float = Field(0.8, ge=0, description="weight of the contrastive term")
    temperature: float = Field(4.0, gt=0, description="KD temperature, when alpha > 0")


class Embed(nn.Module):
    """Linear map to feat_dim, then L2 normalisation (the paper's g_S, g_T)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=1)


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """Eq. 18: −[log h(pos) + Σ log(1 − h(neg))], batch mean; `scores` (B, 1 + K) holds P = exp(·/τ)/Z with the
    positive first, and h = P / (P + K·Pn), Pn = 1/N the uniform noise distribution."""
    k = scores.shape[1] - 1
    noise = k / num_data
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def sample_contrast_indices(anchors: Tensor, labels: Tensor | None, num_data: int, k: int) -> Tensor:
    """(B, 1 + k) dataset indices: each anchor's own index, then k uniform draws, redrawn while they hit the
    anchor's class when `labels` (the class of every training image) is given."""
    negatives = torch.randint(num_data, (len(anchors), k), device=anchors.device)
    if labels is not None:
        own = labels[anchors][:, None]
        for _ in range(1000):  # each round keeps a draw with probability 1 − (class share); a handful suffice
            clash = labels[negatives] == own
            if not clash.any():
                break
            negatives[clash] = torch.randint(num_data, (int(clash.sum()),), device=anchors.device)
    return torch.cat([anchors[:, None], negatives], dim=1)


def contrast_scores(memory: Tensor, anchors: Tensor, index: Tensor) -> Tensor:
    """memory[index[b, j]] · anchors[b] for every b, j: (B, 1 + K). Over the whole bank at once (one matmul) when
    it has fewer rows than 4 gathers would, else by gathering the rows."""
    if memory.shape[0] <= 4 * index.shape[1]:
        return torch.gather(anchors @ memory.detach().t(), 1, index)
    rows = memory.detach()[index.reshape(-1)].view(*index.shape, -1)
    return torch.bmm(rows, anchors[:, :, None]).squeeze(2)


class ContrastMemory(nn.Module):
    """Two memory banks (student and teacher embeddings of every training image) and the constants Z."""

    def __init__(self, feat_dim: int, num_data: int, temperature: float, momentum: float):
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("student", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("teacher", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z for student anchors, Z for teacher anchors

    @property
    def num_data(self) -> int:
        return self.student.shape[0]

    def forward(self, v_student: Tensor, v_teacher: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """P for student anchors against the teacher memory, and for teacher anchors against the student memory."""
        out_s = torch.exp(contrast_scores(self.teacher, v_student, index) / self.temperature)
        out_t = torch.exp(contrast_scores(self.student, v_teacher, index) / self.temperature)
        if self.z[0] < 0:  # Eq. 19's Z, once, from the first batch (averaged over processes)
            z = torch.stack([out_s.mean(), out_t.mean()]).detach() * self.num_data
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.z.copy_(z)
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def update(self, v_student: Tensor, v_teacher: Tensor, indices: Tensor) -> None:
        """m ← normalise(μ·m + (1 − μ)·v) at the batch's images (every process's batch under torchrun), after the
        step's backward (the scores' graph holds the memories)."""
        if dist.is_available() and dist.is_initialized():
            v_student, v_teacher, indices = (_all_gather(t) for t in (v_student, v_teacher, indices))
        for memory, v in ((self.student, v_student), (self.teacher, v_teacher)):
            mixed = memory[indices] * self.momentum + v.detach().to(memory.dtype) * (1 - self.momentum)
            memory.index_copy_(0, indices, F.normalize(mixed, dim=1))


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@register_method
class CRD(Distiller):
    """L = γ·CE + α·KD + β·(L_crd(student anchors) + L_crd(teacher anchors)) (Eq. 18, 20)."""

    name = "crd"
    Params = CRDParams
    cacheable = False  # it reads the teacher's pooled features every step

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        p: CRDParams = self.params
        self.student_pool, self.teacher_pool = (pooled_features(m, self.name, f) for m, f in (
            (self.student, "student.name"), (self.teachers[0], "teachers.0.name")))
        self.embed_student = Embed(self.student_pool.dim, p.feat_dim)
        self.embed_teacher = Embed(self.teacher_pool.dim, p.feat_dim)
        self.memory: ContrastMemory | None = None  # sized to the training set in prepare()
        self.labels: Tensor | None = None  # every training image's class, for `negatives: other_classes`
        self.num_negatives = 0
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # the batch's embeddings, for on_step_end

    def prepare(self, data: TrainingData) -> None:
        p: CRDParams = self.params
        device = self.embed_student.linear.weight.device
        labels = data.targets.to(device)
        n = len(labels)
        available = n - 1 if p.negatives == "uniform" else n - int(torch.bincount(labels).max())
        if available < 1:
            raise UserError("distill.method `crd` with `negatives: other_classes` needs images of at least two "
                            "classes in the training set. Use more data or `distill.negatives: uniform`.")
        self.num_negatives = min(p.nce_k, available)
        self.labels = labels if p.negatives == "other_classes" else None
        self.memory = ContrastMemory(p.feat_dim, n, p.nce_t, p.nce_m).to(device)

    def ddp_ignored_prefixes(self) -> tuple[str, ...]:
        return ("teachers.", "memory.")  # identical on every process by construction (see ContrastMemory.update)

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CRDParams = self.params
        if self.memory is None or indices is None:
            raise RuntimeError("CRD needs prepare() (its memory bank) and the batch's dataset indices")
        with torch.no_grad():
            teacher_logits = self.teachers[0](images)
            teacher_pooled = self.teacher_pool.features
        logits = self.student(images)
        indices = indices.to(images.device)
        with torch.autocast(images.device.type, enabled=False):  # exp(·/0.07) needs float32
            v_s = self.embed_student(self.student_pool.features.float())
            v_t = self.embed_teacher(teacher_pooled.float())
            index = sample_contrast_indices(indices, self.labels, self.memory.num_data, self.num_negatives)
            out_s, out_t = self.memory(v_s, v_t, index)
            crd = nce_loss(out_s, self.memory.num_data) + nce_loss(out_t, self.memory.num_data)
        self._pending = (v_s.detach(), v_t.detach(), indices)
        ce = self.classification_loss(logits, targets)
        loss = p.gamma * ce + p.beta * crd
        terms = {"ce": ce.detach(), "crd": crd.detach()}
        if p.alpha > 0:
            kd = kl_divergence(logits, teacher_logits, p.temperature)
            loss = loss + p.alpha * kd
            terms["kd"] = kd.detach()
        return StepOutput(loss, logits, terms)

    def on_step_end(self, step: int, output: StepOutput) -> dict[str, float]:
        """The memory update, after backward: the scores' graph holds the memories, so they change only now."""
        if self._pending is not None:
            self.memory.update(*self._pending)
            self._pending = None
        return {}

