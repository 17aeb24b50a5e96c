"""The Distiller interface: everything a method needs, so the training engine never special-cases one."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ..errors import UserError
from .hooks import FeatureHooks


class MethodParams(BaseModel):
    """A method's recipe parameters (the keys under `distill:` beside `method`)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StepOutput:
    loss: Tensor  # what the engine back-propagates
    logits: Tensor  # the student's prediction, for training accuracy
    terms: dict[str, Tensor] = field(default_factory=dict)  # loss terms, logged per epoch


@dataclass
class TrainingData:
    """What a method may need to know about the training set before its first step (`Distiller.prepare`)."""

    targets: Tensor  # (N,) the class of every training image, at the dataset index the batches carry
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor, Tensor]]]  # epoch -> this process's augmented
    # (images, targets, indices) batches, as training sees them
    fingerprint: Callable[[], dict[str, Any]]  # what identifies the images, their augmentation and the seed
    cache_dir: Path  # where a method keeps what it computes once per teacher and data (SSKD's teacher head)
    console: Any = None  # a rich Console for progress and notes (on the main process only), or None


class Distiller(nn.Module):
    """One distillation method: the student, the frozen teachers and any training-only modules.

    The engine calls `prepare` once, builds one optimizer over `trainable_parameters()`, calls `forward` once per
    batch, steps, then calls `on_step_end` (where a method may update e.g. a discriminator with its own optimizer).
    Only `self.student` is ever saved as the run's artifact.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int] = 1
    # whether the teacher-output cache can stand in for the teachers: only if the method reads nothing but
    # `teacher_output` (CAP-KD reads teacher features every step, so it cannot)
    cacheable: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teachers: list[nn.Module], params: MethodParams, num_classes: int,
                 label_smoothing: float = 0.0, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD, img_size: int | None = None):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.teachers.requires_grad_(False)
        self.teachers.eval()  # frozen from the start: e.g. the teacher-output cache runs them before training
        self.params = params
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.input_mean, self.input_std = tuple(mean), tuple(std)  # how the batches are normalised
        self.img_size = img_size  # the batches' side (data.img_size); None: unknown (a unit test)
        self.teacher_cache: Any = None  # a TeacherCache once the engine attaches one
        self.progress = 0.0  # fraction of training done, set by the engine before each step (for schedules)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teachers.eval()  # teachers stay frozen in eval mode (BN statistics, dropout)
        return self

    # ------------------------------------------------------------------------------------ training
    def prepare(self, data: TrainingData) -> None:
        """Called once before the optimizer is built and before a resumed run restores `training_state`: a method
        may size state to the training set (CRD's memory bank) or run a preparatory stage (SSKD's teacher head)."""

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        raise NotImplementedError

    def teacher_output(self, index: int, images: Tensor) -> dict[str, Tensor]:
        """What teacher `index` tells the student about a batch: "logits" (B, C), plus, for methods that override
        this, "dense" per-position logits (B, P, C). The teacher-output cache stores exactly this."""
        return {"logits": self.teachers[index](images)}

    def teacher_output_signature(self) -> dict[str, Any]:
        """Everything besides the teacher, data and views that shapes `teacher_output` (part of the cache key)."""
        return {"outputs": ["logits"]}

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor, indices: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Every teacher's outputs for the batch: read from the teacher-output cache when one is attached (the
        batch's `indices` then name stored views), otherwise computed by the teachers."""
        if self.teacher_cache is not None and indices is not None:
            return self.teacher_cache.lookup(indices, images.device)
        return [self.teacher_output(i, images) for i in range(len(self.teachers))]

    def teacher_logits(self, images: Tensor, indices: Tensor | None = None) -> list[Tensor]:
        """Each teacher's logits for the batch."""
        return [output["logits"] for output in self.teacher_outputs(images, indices)]

    def classification_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy with hard labels, or with the soft targets mixup/cutmix produce."""
        if targets.dim() == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def hook_features(self, model: nn.Module, layers: dict[str, str]) -> FeatureHooks:
        """Forward hooks on `model`'s named sub-modules; read them after a forward from `.features`."""
        return FeatureHooks(model, layers)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs for the engine's optimizer: the student's and any projector's, not the
        teachers' nor those of modules with their own optimizer."""
        return [(name, p) for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith(self.ddp_ignored_prefixes())]

    def ddp_ignored_prefixes(self) -> tuple[str, ...]:
        """Parameter/buffer name prefixes DDP must not synchronise (frozen teachers; modules with their own
        optimizer, which then reduce their own gradients)."""
        return ("teachers.",)

    def on_step_end(self, step: int, output: StepOutput) -> dict[str, float]:
        """Called after each optimizer step; returns extra scalars to log."""
        return {}

    # ------------------------------------------------------------------------------------ checkpoints
    def training_state(self) -> dict[str, Any]:
        """Everything a resumed run needs from the method, without teacher weights."""
        return {"modules": {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")},
                "extra": self.extra_state()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["modules"], strict=False)
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        """State outside nn.Modules, e.g. a discriminator's own optimizer."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def model_input_size(model: nn.Module) -> int:
    """The input side a timm model was built for: its patch embedding's, else its pretrained config's."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[-1])
    return int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])


def require_distill_tokens(student: nn.Module, count: int, method: str, example: str) -> None:
    """A UserError unless `student` has exactly `count` distillation tokens (heads beside the class head)."""
    from ..models.token_vit import num_distill_tokens

    have = num_distill_tokens(student)
    if have != count:
        raise UserError(
            f"distill.method `{method}` needs a student with {count} distillation token(s), but "
            f"`{type(student).__name__}` has {have} (student.name). Use e.g. {example}, or set "
            f"`student.kwargs.num_distill_tokens: {count}` on one of kd2deploy's token ViTs.")


def fused_logits(student: nn.Module, head_logits: tuple[Tensor, ...], dense_logits: Tensor | None = None) -> Tensor:
    """The prediction a token student makes at inference (its `head_fusion`, see kd2deploy/token_vit.py) from its
    heads' logits (class head first) and, for "cls_dist_dense", the distillation head's logits on every patch
    token (B, P, K), which only a method that trains them (CSKD) computes."""
    fusion = getattr(student, "head_fusion", "mean")
    if fusion == "cls":
        return head_logits[0].detach()
    heads = list(head_logits)
    if fusion == "cls_dist_dense":
        if dense_logits is None:
            raise UserError(
                "`head_fusion: cls_dist_dense` (student.kwargs.head_fusion) predicts with the distillation head on "
                "every patch token, which only distill.method `cskd` trains. Use `head_fusion: mean` or `cls` with "
                "this method.")
        heads.append(dense_logits.mean(dim=1))
    return torch.stack([z.detach() for z in heads]).mean(dim=0)


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """τ²·KL(σ(z_t/τ) ‖ σ(z_s/τ)), batch mean (Hinton et al. 2015, Eq. 2 with the τ² gradient scale)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
