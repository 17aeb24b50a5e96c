"""CAP-KD: cross-architecture distillation from a Transformer teacher to a CNN student.

Liu et al., "Cross-Architecture Knowledge Distillation", ACCV 2022 (arXiv 2207.05273). No official code exists;
each piece below cites the equation it follows (Eq. 1-10, Alg. 1). Projectors and the discriminator are
training-only: the saved student is the plain timm CNN.

Stated choices where the paper is silent:
- h_S: the paper's h_S ∈ ℝ^{256×196} at 224 is a stride-16 map on the ViT/16 token grid (ResNet `layer3`). By
  default h_S is the timm `feature_info` stage whose map on the student's input lies closest to the teacher's
  token grid: reduction ≈ student_img_size / grid side, nearest in log scale, ties to the deeper stage. With
  equal input sizes that is the stage whose reduction equals the teacher's patch size;
- spatial alignment: any remaining mismatch is resized to the teacher's token grid with bilinear interpolation
  (antialiased when it shrinks), so any student/teacher resolution pair works;
- ‖·‖² is a mean over elements for every term. The attention term compares the attention outputs
  softmax(QKᵀ/√d)·V, (B, heads, N, d), which live on the values' scale (rows are no longer distributions whose
  element mean would vanish as 1/N), so the same normalisation as the value-relation and token terms fits;
- Q_T, K_T, V_T are the teacher block's own per-token projections; Attn_T = softmax(Q_T K_Tᵀ/√d)·V_T over the
  patch tokens (for Swin, over the whole grid rather than per window);
- the value-relation term of Eq. 4 uses the student's own V_S (the equation writes V_S, not g(V_S)): the swap
  of Eq. 3 only enters PAttn_S;
- multi-view generator (Eq. 7): its geometric transforms (random crop, rotation) move pixels, so the same crop
  and rotation, drawn once per image, are applied to the teacher's input as well, and the position-wise
  projection losses compare aligned tokens. Colour jitter, Gaussian pixel noise and patch masking move no pixels
  and stay student-only: they are the perturbations the student must be robust to. The noise std is ours;
- which losses see the views: the paper does not say whether the CE does. By default (`views_feed: all`) the
  views replace their images for every student loss. `views_feed: mvg` keeps the CE and the projection losses
  (and the teacher) on the clean batch, and a second student forward of the views feeds only L_MVG (Eq. 9) and
  the discriminator, leaving the BatchNorm running statistics (what eval mode normalises with) to the clean
  batches; the README's study shows what the views cost a short-budget student;
- generator loss (Eq. 9): the paper's minimax form log(1 − D(h′_S)) by default; `generator_loss:
  non_saturating` uses −log D(h′_S) (Goodfellow et al. 2014), whose gradient does not vanish while the
  discriminator confidently rejects h′_S;
- the discriminator judges each token's feature vector (real: h_T, fake: h′_S) and trains with Adam.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..distributed import all_reduce_mean_grads
from ..errors import UserError
from .base import Distiller, MethodParams, StepOutput, kl_divergence, model_input_size
from .hooks import FeatureHooks, TransformerTap
from .registry import register_method


class CAPKDParams(MethodParams):
    cross_prob: float = Field(0.5, ge=0, le=1, description="p: chance each Q/K/V element of the student is "
                              "replaced by the teacher's in PAttn_S, in training (Eq. 3)")
    proj1_weight: float = Field(1.0, ge=0, description="weight of L_proj1, the PCA projector loss (Eq. 4)")
    proj2_weight: float = Field(1.0, ge=0, description="weight of L_proj2, the GL projector loss (Eq. 6)")
    mvg_weight: float = Field(1.0, ge=0, description="λ, weight of the student's adversarial loss L_MVG (Eq. 9-10)")
    generator_loss: Literal["minimax", "non_saturating"] = Field(
        "minimax", description="L_MVG: minimax is the paper's log(1 − D(h′_S)) (Eq. 9); non_saturating is "
                               "−log D(h′_S), whose gradient does not vanish while D rejects h′_S")
    kd_weight: float = Field(0.0, ge=0, description="optional logit-KD term (Hinton) added to the total")
    kd_temperature: float = Field(4.0, gt=0)
    gl_group: int = Field(4, ge=1, description="side of the pixel neighbourhood sharing one GL-projector FC (Eq. 5)")
    gl_dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the GL projector's FCs")
    mvg_prob: float = Field(0.5, ge=0, le=1, description="chance the multi-view generator transforms a student "
                            "input (Eq. 7)")
    views_feed: Literal["all", "mvg"] = Field(
        "all", description="which losses see the multi-view generator's views: all (the CE and the "
                           "projection losses too) or mvg (only L_MVG; the CE and projection losses see the clean "
                           "batch, at the cost of a second student forward)")
    color_jitter: float = Field(0.4, ge=0, lt=1, description="brightness/contrast/saturation factors in 1 ± this")
    noise_std: float = Field(0.05, ge=0, description="std of the Gaussian noise added to a view's pixels "
                             "(in [0, 1] pixel units, before normalisation)")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="area fraction kept by the random crop")
    rotation: float = Field(15.0, ge=0, le=180, description="maximum rotation, degrees")
    mask_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of patches masked")
    mask_grid: int = Field(8, ge=1, description="the input is cut into mask_grid x mask_grid patches for masking")
    disc_every: int = Field(5, ge=1, description="update the discriminator every this many iterations (Alg. 1)")
    disc_lr: float = Field(2e-4, gt=0)
    disc_hidden: int = Field(256, ge=1, description="width of the discriminator's two hidden FC layers")
    teacher_img_size: int | None = Field(None, ge=8, description="teacher input side; default: the teacher's "
                                         "own input size, the batch is resized to it")
    student_img_size: int | None = Field(None, ge=8, description="the student's input side, which picks h_S; "
                                         "default: data.img_size")
    student_layer: str | None = Field(None, description="student module whose output is h_S; default: the "
                                      "feature_info stage whose map on student_img_size matches the teacher's "
                                      "token grid")


# ------------------------------------------------------------------------------------------ modules


def align_to_grid(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a map (B, C, h, w) to `grid` (the teacher's token grid or input size): bilinear, antialiased when
    shrinking."""
    if tuple(feature_map.shape[-2:]) == tuple(grid):
        return feature_map
    shrinking = feature_map.shape[-2] > grid[0] or feature_map.shape[-1] > grid[1]
    return F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False, antialias=shrinking)


def heads_from_map(x: Tensor, num_heads: int) -> Tensor:
    """(B, heads·d, H, W) -> (B, heads, N, d), the layout of a transformer's per-head Q/K/V."""
    b, c, h, w = x.shape
    return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2)


def attention_output(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eq. 2: softmax(Q Kᵀ/√d)·V per head, (B, heads, N, d)."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def value_relation(v: Tensor) -> Tensor:
    """Eq. 4's second term: V Vᵀ/√d per head, (B, heads, N, N)."""
    return v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5


class PartialCrossAttentionProjector(nn.Module):
    """Eq. 1-4: three 3x3 convolutions give Q_S, K_S, V_S shaped like the teacher's heads (Eq. 1). In training
    each element is swapped for the teacher's with probability p (g of Eq. 3), then
    PAttn_S = softmax(g(Q_S) g(K_S)ᵀ/√d)·g(V_S)."""

    def __init__(self, in_channels: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = (nn.Conv2d(in_channels, num_heads * head_dim, 3, padding=1) for _ in range(3))

    def forward(self, feature_map: Tensor, teacher_qkv: tuple[Tensor, Tensor, Tensor], p: float
                ) -> tuple[Tensor, Tensor]:
        """Returns (PAttn_S (B, heads, N, d), V_S V_Sᵀ/√d (B, heads, N, N)), the latter from the un-swapped V_S."""
        student_qkv = [heads_from_map(conv(feature_map), self.num_heads) for conv in (self.q, self.k, self.v)]
        swapped = student_qkv
        if p > 0:  # Eq. 3: g swaps each element for the teacher's with probability p
            swapped = [torch.where(torch.rand_like(s) < p, t.to(s.dtype), s)
                       for s, t in zip(student_qkv, teacher_qkv, strict=True)]
        # Eq. 4 writes V_S, not g(V_S): the value relation keeps all of the student's gradient
        return attention_output(*swapped), value_relation(student_qkv[2])


class GroupwiseLinearProjector(nn.Module):
    """Eq. 5: each pixel of the (aligned) student map goes through an FC into the teacher's token space; the
    pixels of each group x group neighbourhood share one FC (16 FCs for a 14x14 map with groups of 4)."""

    def __init__(self, in_channels: int, out_channels: int, grid: tuple[int, int], group: int, dropout: float):
        super().__init__()
        self.group = group
        self.groups_hw = (math.ceil(grid[0] / group), math.ceil(grid[1] / group))
        num_groups = self.groups_hw[0] * self.groups_hw[1]
        self.weight = nn.Parameter(torch.empty(num_groups, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(num_groups, out_channels))
        bound = in_channels**-0.5  # nn.Linear's default initialisation, per group
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_groups(self) -> int:
        return self.weight.shape[0]

    def forward(self, feature_map: Tensor) -> Tensor:
        """(B, C, H, W) on the teacher grid -> h′_S (B, N, D)."""
        b, c, h, w = feature_map.shape
        g, (gh, gw) = self.group, self.groups_hw
        x = F.pad(self.dropout(feature_map), (0, gw * g - w, 0, gh * g - h))
        x = x.reshape(b, c, gh, g, gw, g).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, g * g, c)
        y = torch.einsum("bgpc,gcd->bgpd", x, self.weight) + self.bias[:, None]
        y = y.reshape(b, gh, gw, g, g, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * g, gw * g, -1)
        return y[:, :h, :w].flatten(1, 2)


class MultiViewGenerator(nn.Module):
    """Eq. 7: with probability `prob` per image, a random crop and rotation, colour jitter, Gaussian pixel noise
    and patch masking, as batched tensor operations on the device. Works on normalised images; jitter and noise
    happen in pixel space. The crop and rotation move pixels, so the same ones are applied to the teacher's input
    (any resolution: the warp is in normalised coordinates) and position-wise losses compare aligned tokens; the
    other transforms move no pixels and perturb the student's view only."""

    def __init__(self, p: CAPKDParams, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.p = p
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, teacher_images: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(the student's views, the teacher's input under the same crop and rotation)."""
        p, b = self.p, images.shape[0]
        if p.mvg_prob == 0:
            return images, teacher_images
        chosen = (torch.rand(b, device=images.device) < p.mvg_prob).view(b, 1, 1, 1)
        theta = self._crop_and_rotation(b, images.device)
        if theta is not None:
            images = torch.where(chosen, _warp(images, theta), images)
            if teacher_images is not None:
                teacher_images = torch.where(chosen, _warp(teacher_images, theta.to(teacher_images.dtype)),
                                             teacher_images)
        views = self._mask_patches(self._pixel_transforms(images))
        return torch.where(chosen, views, images), teacher_images

    def _factors(self, b: int, device: torch.device) -> Tensor:
        s = self.p.color_jitter
        return torch.empty(b, 1, 1, 1, device=device).uniform_(1 - s, 1 + s)

    def _pixel_transforms(self, images: Tensor) -> Tensor:
        """Colour jitter, then Gaussian noise of std noise_std, in [0, 1] pixel space."""
        if self.p.color_jitter == 0 and self.p.noise_std == 0:
            return images
        b, dev = images.shape[0], images.device
        x = images * self.std + self.mean
        if self.p.color_jitter > 0:
            x = x * self._factors(b, dev)  # brightness: blend with black
            grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
            x = torch.lerp(grey.mean(dim=(2, 3), keepdim=True), x, self._factors(b, dev))  # contrast
            x = torch.lerp(grey, x, self._factors(b, dev))  # saturation
        if self.p.noise_std > 0:
            x = x + torch.randn_like(x) * self.p.noise_std
        return (x.clamp(0, 1) - self.mean) / self.std

    def _crop_and_rotation(self, b: int, device: torch.device) -> Tensor | None:
        """Per-image affine matrices (B, 2, 3) in normalised coordinates; None when neither can move a pixel."""
        lo, hi = self.p.crop_scale
        if lo == hi == 1 and self.p.rotation == 0:
            return None
        side = torch.empty(b, device=device).uniform_(lo, hi).sqrt()  # crop side as a fraction of the image
        angle = torch.empty(b, device=device).uniform_(-1, 1) * math.radians(self.p.rotation)
        shift = (torch.rand(b, 2, device=device) * 2 - 1) * (1 - side)[:, None]  # the crop stays inside
        cos, sin = angle.cos() * side, angle.sin() * side
        return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)

    def _mask_patches(self, images: Tensor) -> Tensor:
        if self.p.mask_ratio == 0:
            return images
        b, _, h, w = images.shape
        n = self.p.mask_grid
        keep = (torch.rand(b, 1, n, n, device=images.device) >= self.p.mask_ratio).to(images.dtype)
        return images * F.interpolate(keep, size=(h, w), mode="nearest")  # 0 is the dataset's mean colour


def _warp(images: Tensor, theta: Tensor) -> Tensor:
    """Resample `images` through the affine maps `theta`; outside the image is 0, the dataset's mean colour."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Discriminator(nn.Module):
    """Eq. 8: three FC layers telling teacher tokens h_T (real) from projected student tokens h′_S (fake)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens).squeeze(-1)


def generator_loss(fake_scores: Tensor, kind: str) -> Tensor:
    """L_MVG from the discriminator's logits s on h′_S, D = σ(s). minimax: Eq. 9, mean log(1 − D) = −softplus(s);
    its gradient σ(s) vanishes while D rejects h′_S (s ≪ 0). non_saturating: mean −log D = softplus(−s)."""
    if kind == "minimax":
        return -F.softplus(fake_scores).mean()
    return F.softplus(-fake_scores).mean()


@contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers still normalise with the batch's statistics but leave their running statistics
    (and batch count) as they were: momentum 0 keeps running = (1 − 0)·running."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def pick_student_layer(feature_info: list[dict[str, Any]], target_reduction: float) -> str:
    """The feature_info module whose reduction is nearest `target_reduction` in log scale; ties go to the deeper
    stage (more semantic, and the projectors then see the smaller map)."""
    distance = [abs(math.log2(info["reduction"] / target_reduction)) for info in feature_info]
    best = min(range(len(feature_info)), key=lambda i: (round(distance[i], 9), -i))
    return feature_info[best]["module"]


# ------------------------------------------------------------------------------------------ method


@register_method
class CrossArchitectureKD(Distiller):
    """The paper's objective: L = CE(student, y) + w1·L_proj1 + w2·L_proj2 + λ·L_MVG, plus an optional logit-KD term."""

    name = "capkd"
    Params = CAPKDParams
    cacheable = False  # it reads the teacher's attention and tokens every step

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        params: CAPKDParams = self.params
        teacher = self.teachers[0]
        try:
            self.tap = TransformerTap(teacher)
        except ValueError as exc:
            raise UserError(f"CAP-KD needs a vision-transformer teacher (timm ViT, DeiT, Swin...), but {exc} "
                            "(teachers.0.name). Name a transformer teacher, or use `distill.method: kd`.") from None
        self.teacher_size = params.teacher_img_size or model_input_size(teacher)
        # the batch reaches the teacher resized to teacher_size; the student sees data.img_size (without it, a unit
        # test, assume the teacher's size: h_S is then the stage whose reduction equals the teacher's patch size)
        self.student_size = params.student_img_size or self.img_size or self.teacher_size
        self.grid = self._probe_teacher_grid()
        self.student_layer = params.student_layer or self._default_student_layer(self.student_size)
        self.student_hooks = self._hook_student(self.student_layer)
        student_channels = self._probe_student_channels()
        self.pca = PartialCrossAttentionProjector(student_channels, self.tap.num_heads, self.tap.head_dim)
        self.gl = GroupwiseLinearProjector(student_channels, self.tap.embed_dim, self.grid, params.gl_group,
                                           params.gl_dropout)
        self.views = MultiViewGenerator(params, self.input_mean, self.input_std)
        self.discriminator = Discriminator(self.tap.embed_dim, params.disc_hidden)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=params.disc_lr, betas=(0.5, 0.999))
        self.disc_steps = 0
        self._pair: tuple[Tensor, Tensor] | None = None
        self._input_checked = params.student_layer is not None

    def _default_student_layer(self, student_size: int) -> str:
        """The paper's h_S (256×196 at 224: ResNet layer3, stride 16, on the ViT/16 token grid): the feature_info
        stage whose map on the student's input is nearest the teacher's token grid."""
        info = getattr(self.student, "feature_info", None)
        if not info:
            raise UserError(f"The student `{type(self.student).__name__}` has no timm feature_info to pick h_S "
                            "from. Name the module giving h_S in `distill.student_layer`.")
        return pick_student_layer(list(info), student_size / self.grid[1])

    def _hook_student(self, layer: str) -> FeatureHooks:
        try:
            return self.hook_features(self.student, {"h_s": layer})
        except KeyError as exc:
            raise UserError(f"{exc.args[0]} (distill.student_layer). Name a module of the student.") from None

    @torch.no_grad()
    def _probe_teacher_grid(self) -> tuple[int, int]:
        """The teacher's token grid in its last block, from one forward of a blank image."""
        self.teachers[0](torch.zeros(1, 3, self.teacher_size, self.teacher_size))
        return self.tap.read()[2]

    @torch.no_grad()
    def _probe_student_channels(self) -> int:
        """h_S's channels, from one forward of a blank image at the student's input size."""
        was_training = self.student.training
        self.student.eval()
        self.student(torch.zeros(1, 3, self.student_size, self.student_size))
        self.student.train(was_training)
        h_s = self.student_hooks.features["h_s"]
        if h_s.dim() != 4:
            raise UserError(f"CAP-KD needs a CNN student whose h_S is a (B, C, H, W) map, but the student layer gives "
                            f"a {h_s.dim()}-D output (student.name / distill.student_layer). Use a CNN student or "
                            "name a convolutional stage in `distill.student_layer`.")
        return h_s.shape[1]

    def _check_student_input(self, side: int) -> None:
        """Once: warn when the batch's size would pick another h_S than the one the projectors were built for."""
        self._input_checked = True
        better = self._default_student_layer(side)
        if better != self.student_layer:
            warnings.warn(f"CAP-KD took h_S from `{self.student_layer}` for a {self.student_size}px student input, but "
                          f"the batch is {side}px, where `{better}` matches the teacher's {self.grid[0]}x{self.grid[1]}"
                          f" tokens. Set `distill.student_img_size: {side}` (or `distill.student_layer`).",
                          stacklevel=2)

    def ddp_ignored_prefixes(self) -> tuple[str, ...]:
        return (*super().ddp_ignored_prefixes(), "discriminator.")

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CAPKDParams = self.params
        if not self._input_checked:
            self._check_student_input(images.shape[-1])
        teacher_images = align_to_grid(images, (self.teacher_size, self.teacher_size))  # same resize rule
        view_images = None
        if self.training and p.views_feed == "mvg" and p.mvg_prob > 0 and p.mvg_weight > 0:
            view_images = self.views(images)[0]  # for L_MVG only; everything else sees the clean batch
        elif self.training:  # Eq. 7; the teacher's input gets the same crop and rotation, so tokens stay aligned
            images, teacher_images = self.views(images, teacher_images)
        with torch.no_grad():
            teacher_logits = self.teacher_output(0, teacher_images)["logits"]  # online: the taps need this forward
            h_t, (q_t, k_t, v_t), _ = self.tap.read()
            attn_t = attention_output(q_t, k_t, v_t)  # Eq. 2 for the teacher: softmax(Q_T K_Tᵀ/√d)·V_T
            v_rel_t = value_relation(v_t)

        logits = self.student(images)
        h_s = align_to_grid(self.student_hooks.features["h_s"], self.grid)

        # Eq. 4: L_proj1 = ‖Attn_T − PAttn_S‖² + ‖V_T V_Tᵀ/√d − V_S V_Sᵀ/√d‖², each a mean over elements
        p_attn_s, v_rel_s = self.pca(h_s, (q_t, k_t, v_t), p.cross_prob if self.training else 0.0)
        proj1 = F.mse_loss(p_attn_s, attn_t.to(p_attn_s.dtype)) + F.mse_loss(v_rel_s, v_rel_t.to(v_rel_s.dtype))
        # Eq. 6: L_proj2 = ‖h_T − h′_S‖²
        h_s_proj = self.gl(h_s)
        proj2 = F.mse_loss(h_s_proj, h_t)
        fake = h_s_proj
        if view_images is not None:
            with running_statistics_frozen(self.student):  # eval mode normalises with the clean batches' statistics
                self.student(view_images)
            fake = self.gl(align_to_grid(self.student_hooks.features["h_s"], self.grid))
        # Eq. 9: the student makes the discriminator take h′_S (of its views) for a teacher feature
        mvg = generator_loss(self.discriminator(fake), p.generator_loss)
        ce = self.classification_loss(logits, targets)

        loss = ce + p.proj1_weight * proj1 + p.proj2_weight * proj2 + p.mvg_weight * mvg
        terms = {"ce": ce.detach(), "proj1": proj1.detach(), "proj2": proj2.detach(), "mvg": mvg.detach()}
        if p.kd_weight > 0:
            kd = kl_divergence(logits, teacher_logits, p.kd_temperature)
            loss = loss + p.kd_weight * kd
            terms["kd"] = kd.detach()
        self._pair = (h_t.detach().float(), fake.detach().float())
        return StepOutput(loss, logits, terms)

    def on_step_end(self, step: int, output: StepOutput) -> dict[str, float]:
        """Alg. 1: the discriminator takes its own step every `disc_every` iterations (Eq. 8)."""
        if step % self.params.disc_every or self._pair is None:
            return {}
        real, fake = self._pair
        real_scores, fake_scores = self.discriminator(real), self.discriminator(fake)
        loss = (F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores))
                + F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores)))
        self.disc_optimizer.zero_grad(set_to_none=True)  # also drops what L_MVG left on these weights
        loss.backward()
        all_reduce_mean_grads(self.discriminator.parameters())
        self.disc_optimizer.step()
        self.disc_steps += 1
        return {"disc": loss.detach()}

    def extra_state(self) -> dict[str, Any]:
        return {"disc_optimizer": self.disc_optimizer.state_dict(), "disc_steps": self.disc_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.disc_steps = state["disc_steps"]

