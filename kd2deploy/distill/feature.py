"""Feature distillation between named layers, FitNet style (Romero et al., "FitNets: Hints for Thin Deep Nets",
ICLR 2015).

For every `(student, teacher, weight)` pair of module names, a projector r maps the student layer's output onto
the teacher layer's layout and the loss pulls it to the teacher's output:

    L = ce_weight·CE + kd_weight·KD + Σ_pairs weight·d(r(u_S), v_T)     (Eq. 3 with d = ½‖·‖², per pair)

with d the mean squared error (`loss: mse`) or 1 − cosine similarity per position (`loss: cosine`).

The projector follows from the shapes seen in one probe forward at the data's image size:
- map → map, (B, C, H, W) → (B, C', H', W'): a 1×1 convolution;
- tokens → tokens, (B, N, D) → (B, N', D'): a linear layer;
- between maps and token grids: the tokens (after dropping the class/distillation tokens, `num_prefix_tokens`)
  are laid on their square grid, or the map is read as tokens, then the 1×1 convolution or linear layer above.
Where the spatial grids differ, the student's is resized to the teacher's first (area averaging down, bilinear
up). 4-D outputs are read as (B, C, H, W) maps, 3-D outputs as (B, N, D) tokens.

Where FitNet differs: the paper trains the hint in a separate first stage, then the whole student with KD. Here
both are one stage (as torchdistill and RepDistiller run FitNet), which is what a recipe with many pairs needs;
set `kd_weight` for the paper's KD term. The projectors are training-only modules: not part of student.pt.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, kl_divergence, model_input_size
from .hooks import FeatureHooks
from .registry import register_method


class LayerPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="a module name of the student (from named_modules())")
    teacher: str = Field(description="a module name of the teacher")
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        """Also accept [student, teacher] or [student, teacher, weight]."""
        if isinstance(value, (list, tuple)) and len(value) in (2, 3):
            return dict(zip(("student", "teacher", "weight"), value, strict=False))
        return value


class FeatureParams(MethodParams):
    pairs: list[LayerPair] = Field(min_length=1, description="(student layer, teacher layer, weight) pairs")
    loss: Literal["mse", "cosine"] = Field("mse", description="mse, or 1 − cosine similarity per position")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="weight of a logit-KD term (0: off)")
    temperature: float = Field(4.0, gt=0)


def _grid(tokens: int, where: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"{where} gives {tokens} tokens (after its class/distillation tokens), which do not lie on a "
                        "square grid. Pick a layer with a square token grid or a (B, C, H, W) map.")
    return side, side


class Projector(nn.Module):
    """Maps the student layer's output onto the teacher layer's layout (see the module docstring)."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, student_prefix: int,
                 teacher_prefix: int, where: str):
        super().__init__()
        for shape, side in ((student_shape, "student"), (teacher_shape, "teacher")):
            if len(shape) not in (3, 4):
                raise UserError(f"The {side} layer of {where} gives a {len(shape)}-D output; feature distillation "
                                "needs a (B, C, H, W) map or (B, N, D) tokens. Pick another layer.")
        self.student_map, self.teacher_map = len(student_shape) == 4, len(teacher_shape) == 4
        self.student_prefix = 0 if self.student_map else student_prefix
        self.teacher_prefix = 0 if self.teacher_map else teacher_prefix
        channels_in = student_shape[1] if self.student_map else student_shape[2]
        channels_out = teacher_shape[1] if self.teacher_map else teacher_shape[2]
        self.student_grid = (tuple(student_shape[2:]) if self.student_map
                             else _grid(student_shape[1] - student_prefix, f"the student layer of {where}"))
        self.teacher_grid = (tuple(teacher_shape[2:]) if self.teacher_map
                             else _grid(teacher_shape[1] - teacher_prefix, f"the teacher layer of {where}"))
        self.proj = nn.Conv2d(channels_in, channels_out, 1) if self.teacher_map else nn.Linear(channels_in,
                                                                                             channels_out)
        kind = {(True, True): "conv1x1", (False, False): "linear", (True, False): "map->tokens: reshape + linear",
                (False, True): "tokens->map: reshape + conv1x1"}[(self.student_map, self.teacher_map)]
        self.kind = kind + (" + resize" if self.student_grid != self.teacher_grid else "")

    def forward(self, student: Tensor) -> Tensor:
        x = student if self.student_map else _tokens_to_map(student[:, self.student_prefix:], self.student_grid)
        if tuple(x.shape[2:]) != self.teacher_grid:
            smaller = x.shape[2] > self.teacher_grid[0]
            x = (F.adaptive_avg_pool2d(x, self.teacher_grid) if smaller
                 else F.interpolate(x, size=self.teacher_grid, mode="bilinear", align_corners=False))
        return self.proj(x) if self.teacher_map else self.proj(x.flatten(2).transpose(1, 2))

    def target(self, teacher: Tensor) -> Tensor:
        """The teacher output the projection is compared with: its patch tokens, or its map."""
        return teacher if self.teacher_map else teacher[:, self.teacher_prefix:]


def _tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def feature_distance(student: Tensor, teacher: Tensor, kind: str, channel_dim: int) -> Tensor:
    """MSE over all elements, or the mean over positions of 1 − cos along the channels."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=channel_dim)).mean()


@register_method
class FeatureDistillation(Distiller):
    """L = ce_weight·CE + kd_weight·KD + Σ weight·d(projector(student layer), teacher layer)."""

    name = "feature"
    Params = FeatureParams
    cacheable = False  # it reads teacher features every step

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        p: FeatureParams = self.params
        layers = {f"pair{i}": pair for i, pair in enumerate(p.pairs)}
        self.student_hooks = _hooks(self.student, {k: v.student for k, v in layers.items()}, "student")
        self.teacher_hooks = _hooks(self.teachers[0], {k: v.teacher for k, v in layers.items()}, "teacher")
        student_out, teacher_out = self._probe()
        self.projectors = nn.ModuleDict({
            key: Projector(student_out[key].shape, teacher_out[key].shape,
                           getattr(self.student, "num_prefix_tokens", 0),
                           getattr(self.teachers[0], "num_prefix_tokens", 0),
                           f"distill.pairs[{i}] ({pair.student} -> {pair.teacher})")
            for i, (key, pair) in enumerate(layers.items())})

    @torch.no_grad()
    def _probe(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every hooked layer's output for one blank image at the data's size (the student in eval mode, so its
        normalisation statistics are untouched)."""
        side = self.img_size or model_input_size(self.student)
        was_training = self.student.training
        self.student.eval()
        self.student(torch.zeros(1, 3, side, side))
        self.student.train(was_training)
        self.teachers[0](torch.zeros(1, 3, side, side))
        return dict(self.student_hooks.features), dict(self.teacher_hooks.features)

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: FeatureParams = self.params
        with torch.no_grad():
            teacher_logits = self.teachers[0](images)
        logits = self.student(images)
        ce = self.classification_loss(logits, targets)
        loss, terms = p.ce_weight * ce, {"ce": ce.detach()}
        for i, pair in enumerate(p.pairs):
            key = f"pair{i}"
            projector = self.projectors[key]
            student = projector(self.student_hooks.features[key].float())
            teacher = projector.target(self.teacher_hooks.features[key].float())
            term = feature_distance(student, teacher, p.loss, 1 if projector.teacher_map else 2)
            loss = loss + pair.weight * term
            terms[f"feat{i}"] = term.detach()
        if p.kd_weight > 0:
            kd = kl_divergence(logits, teacher_logits, p.temperature)
            loss = loss + p.kd_weight * kd
            terms["kd"] = kd.detach()
        return StepOutput(loss, logits, terms)


def _hooks(model: nn.Module, layers: dict[str, str], side: str) -> FeatureHooks:
    """Hooks on the named modules, or a UserError listing the names the model has."""
    names = [name for name, _ in model.named_modules() if name]
    wrong = [layer for layer in layers.values() if layer not in set(names)]
    if wrong:
        close = {w: difflib.get_close_matches(w, names, n=3, cutoff=0.5) for w in wrong}
        hints = "; ".join(f"`{w}`" + (f" (close: {', '.join(c)})" if c else "") for w, c in close.items())
        listed = [name for name in names if name.count(".") <= 1]
        raise UserError(f"distill.pairs names {side} layer(s) that `{type(model).__name__}` does not have: {hints}. "
                        f"Use a name from the {side}'s named_modules(); its modules up to two levels deep are: "
                        f"{', '.join(listed)}.")
    return FeatureHooks(model, layers)
