"""Knowledge Distillation Meets Self-Supervision (SSKD; Xu, Liu, Li & Loy, ECCV 2020, arXiv 2006.07114).

Every batch gains three rotated copies (90°, 180°, 270°; the paper's transformations). Both networks carry a
2-layer MLP self-supervision head on their pooled features; the cosine similarity between each rotated image's
and each original image's head output forms a (3B × B) matrix A, whose "label" is the column of the image's own
original. The student minimises

    L = λ_ce·CE(originals) + λ_kd·KD(originals, τ_kd) + λ_ss·L_ss + λ_tf·L_T                          (Eq. 9)
    L_ss = τ_ss²·KL(softmax(A_T/τ_ss) ‖ softmax(A_S/τ_ss)), over the kept rows                        (Eq. 7)
    L_T  = τ_tf²·KL(softmax(z_T/τ_tf) ‖ softmax(z_S/τ_tf)) on the rotated images, over the kept rows   (Eq. 8)

where "kept" (error-level ranking, §3.3) is every row the teacher gets right (its label ranked first) plus the
`keep_wrong_*` fraction of the wrong rows whose label the teacher ranks highest.

Preparatory stage: before the student trains, the teacher's head is trained on the frozen teacher with the
contrastive objective CE(A_T, own original) (§3.2), for `head_epochs` passes over the augmented training set
(SGD, momentum 0.9, weight decay 5e-4, learning rate ×0.1 at `head_milestones`). It runs automatically and is
cached as `sskd-head-<key>.pt` in `teacher_cache.dir` (default ~/.cache/kd2deploy/teacher_outputs), keyed by the
teacher's weights, the training images and augmentation, the head settings and the seed, so the seeds of a study
and resumed runs reuse it.

Defaults are the authors' (xuguodong03/SSKD student.py): λ = 0.1, 0.9, 10 (ss), 2.7 (tf); τ = 4, 0.5 (ss), 4 (tf);
keep 75% of the wrong rows of L_ss and all of L_T's; the head: 60 epochs at 0.05, decayed at 50% and 75%. Where
they are silent: the KL form (as in their code; the cross-entropy form of Eq. 7 differs only by the teacher's
entropy, so the gradients are the same); the rotated copies also pass through the student's normalisation layers
in training mode, as in their code. Both heads are training-only modules: not part of student.pt.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from rich.progress import Progress
from torch import Tensor, nn

from ..checkpoint import atomic_save
from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, TrainingData, kl_divergence
from .hooks import pooled_features
from .registry import register_method
from .teacher_cache import tensor_digest

ROTATIONS = 4  # 0, 90, 180, 270 degrees


class SSKDParams(MethodParams):
    ce_weight: float = Field(0.1, ge=0, description="λ on the cross-entropy of the original images")
    kd_weight: float = Field(0.9, ge=0, description="λ on KD of the original images")
    ss_weight: float = Field(10.0, ge=0, description="λ on the self-supervision similarity term L_ss")
    tf_weight: float = Field(2.7, ge=0, description="λ on KD of the rotated images L_T")
    kd_temperature: float = Field(4.0, gt=0)
    ss_temperature: float = Field(0.5, gt=0)
    tf_temperature: float = Field(4.0, gt=0)
    keep_wrong_ss: float = Field(0.75, ge=0, le=1, description="fraction of the teacher's wrong rows kept in L_ss")
    keep_wrong_tf: float = Field(1.0, ge=0, le=1, description="fraction of the teacher's wrong rows kept in L_T")
    head_epochs: int = Field(60, ge=0, description="epochs of the teacher-head stage (0: leave it untrained)")
    head_lr: float = Field(0.05, gt=0)
    head_milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75],
                                         description="fractions of head_epochs where the head's lr drops ×0.1")


def ss_head(dim: int) -> nn.Sequential:
    """The self-supervision head: Linear(d, d), ReLU, Linear(d, d) on the pooled feature."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def with_rotations(images: Tensor) -> Tensor:
    """(4B, C, H, W): the batch, then its rotations by 90°, 180° and 270°; rotated row j shows original j mod B."""
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"distill.method `sskd` rotates the training images by 90°, which needs square images, but "
                        f"the batch is {images.shape[-2]}x{images.shape[-1]}. Set a square data.img_size.")
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])


def rotation_similarity(embeddings: Tensor, batch: int) -> Tensor:
    """A (3B, B): cosine similarity of every rotated image's embedding with every original's."""
    originals, rotated = embeddings[:batch], embeddings[batch:]
    return F.cosine_similarity(rotated[:, None, :], originals[None, :, :], dim=2)


def rotation_labels(batch: int, device: torch.device) -> Tensor:
    return torch.arange(batch, device=device).repeat(ROTATIONS - 1)


def kept_rows(scores: Tensor, labels: Tensor, keep_wrong: float) -> Tensor:
    """Error-level ranking (§3.3): the rows whose label ranks first in `scores`, plus the `keep_wrong` fraction of
    the others whose label ranks highest; sorted row indices."""
    rank = (scores > scores.gather(1, labels[:, None])).sum(dim=1)  # 0: the teacher is right
    order = torch.argsort(rank, stable=True)
    wrong = int((rank > 0).sum())
    keep = len(rank) - wrong + int(wrong * keep_wrong)
    return torch.sort(order[:keep]).values


def batch_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), batch mean; 0 for an empty selection."""
    if len(student) == 0:
        return student.sum() * 0
    return kl_divergence(student, teacher, temperature)


@register_method
class SSKD(Distiller):
    """λ_ce·CE + λ_kd·KD + λ_ss·L_ss + λ_tf·L_T on the batch and its rotations (Eq. 9)."""

    name = "sskd"
    Params = SSKDParams
    cacheable = False  # it reads the teacher's pooled features of rotated images every step

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.student_pool, self.teacher_pool = (pooled_features(m, self.name, f) for m, f in (
            (self.student, "student.name"), (self.teachers[0], "teachers.0.name")))
        self.student_head = ss_head(self.student_pool.dim)
        self.teacher_head = ss_head(self.teacher_pool.dim).requires_grad_(False)  # trained in prepare()

    def ddp_ignored_prefixes(self) -> tuple[str, ...]:
        return ("teachers.", "teacher_head.")

    # ------------------------------------------------------------------------------------ preparatory stage
    def prepare(self, data: TrainingData) -> None:
        p: SSKDParams = self.params
        key, fields = self._head_key(data)
        path = data.cache_dir / f"sskd-head-{key[:32]}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == key:
                    self.teacher_head.load_state_dict(saved["state_dict"])
                    _say(data, f"SSKD teacher head: cached, {path}")
                    return
            except Exception as exc:  # a truncated or foreign cache file is a cache miss: train and replace it
                _say(data, f"SSKD teacher head: the cached {path} cannot be read ({type(exc).__name__}); "
                           "training it again")
        accuracy = self._train_teacher_head(data)
        if not dist.is_initialized() or dist.get_rank() == 0:
            data.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_save({"key": key, "fields": fields, "state_dict": self.teacher_head.state_dict(),
                         "ss_accuracy": accuracy}, path)
        _say(data, f"SSKD teacher head: trained {p.head_epochs} epochs, rotation-retrieval accuracy "
                   f"{100 * accuracy:.1f}% in the last epoch; cached in {path}")

    def _head_key(self, data: TrainingData) -> tuple[str, dict[str, Any]]:
        p: SSKDParams = self.params
        fields = {"teacher": tensor_digest(self.teachers[0]), "data": data.fingerprint(),
                  "head": {k: getattr(p, k) for k in ("head_epochs", "head_lr", "head_milestones")}}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest(), fields

    def _train_teacher_head(self, data: TrainingData) -> float:
        """§3.2: CE(A_T, own original) on the frozen teacher's pooled features; returns the last epoch's accuracy."""
        p: SSKDParams = self.params
        head, device = self.teacher_head, next(self.teacher_head.parameters()).device
        head.requires_grad_(True)
        optimizer = torch.optim.SGD(head.parameters(), lr=p.head_lr, momentum=0.9, weight_decay=5e-4)
        milestones = sorted({round(f * p.head_epochs) for f in p.head_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        accuracy = 0.0
        with Progress(console=data.console, transient=True, disable=data.console is None) as progress:
            task = progress.add_task("SSKD teacher head", total=p.head_epochs)
            for epoch in range(p.head_epochs):
                hits = seen = 0
                for images, _, _ in data.epoch_batches(epoch):
                    images = images.to(device, non_blocking=True)
                    batch = len(images)
                    with torch.no_grad():
                        self.teachers[0](with_rotations(images))
                        pooled = self.teacher_pool.features.float()
                    similarity = rotation_similarity(head(pooled), batch)
                    labels = rotation_labels(batch, device)
                    loss = F.cross_entropy(similarity, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    _average_gradients(head)
                    optimizer.step()
                    hits += int((similarity.argmax(dim=1) == labels).sum())
                    seen += len(labels)
                scheduler.step()
                accuracy = hits / max(seen, 1)
                progress.update(task, advance=1, description=f"SSKD teacher head (acc {100 * accuracy:.1f}%)")
        head.requires_grad_(False)
        return accuracy

    # ------------------------------------------------------------------------------------ training
    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: SSKDParams = self.params
        batch = len(images)
        views = with_rotations(images)
        hard = targets.argmax(dim=-1) if targets.dim() == 2 else targets
        with torch.no_grad():
            teacher_logits = self.teachers[0](views)
            teacher_sim = rotation_similarity(self.teacher_head(self.teacher_pool.features.float()), batch)
        logits = self.student(views)
        student_sim = rotation_similarity(self.student_head(self.student_pool.features.float()), batch)

        ce = self.classification_loss(logits[:batch], targets)
        kd = kl_divergence(logits[:batch], teacher_logits[:batch], p.kd_temperature)
        rotated_labels = hard.repeat(ROTATIONS - 1)
        keep_tf = kept_rows(teacher_logits[batch:], rotated_labels, p.keep_wrong_tf)
        tf = batch_kl(logits[batch:][keep_tf], teacher_logits[batch:][keep_tf], p.tf_temperature)
        keep_ss = kept_rows(teacher_sim, rotation_labels(batch, images.device), p.keep_wrong_ss)
        ss = batch_kl(student_sim[keep_ss], teacher_sim[keep_ss], p.ss_temperature)
        loss = p.ce_weight * ce + p.kd_weight * kd + p.ss_weight * ss + p.tf_weight * tf
        return StepOutput(loss, logits[:batch], {"ce": ce.detach(), "kd": kd.detach(), "ss": ss.detach(),
                                                 "tf": tf.detach()})


def _average_gradients(module: nn.Module) -> None:
    """Under torchrun, every process's head steps with the gradient of all their batches."""
    if dist.is_available() and dist.is_initialized():
        for param in module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()


def _say(data: TrainingData, message: str) -> None:
    if data.console is not None:  # the engine gives a console to the main process only
        data.console.print(message)

