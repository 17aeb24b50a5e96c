"""CAP-KD: cross-architecture distillation from a Transformer teacher to a CNN student.

Liu et al., "Cross-Architecture Knowledge Distillation", ACCV 2022 (arXiv 2207.05273). No official code exists;
each piece below cites the equation it follows. Projectors and the discriminator are training-only: the saved
student is the plain timm CNN.

Stated choices where the paper is silent:
- spatial alignment: the student's last-stage map is resized to the teacher's token grid with bilinear
  interpolation (antialiased when it shrinks), so any student/teacher resolution pair works;
- ‖·‖² is a mean over elements, except the attention term, which sums the squared difference over the keys of
  each query (attention rows are distributions, so a plain element mean would vanish as 1/N);
- Q_T, K_T, V_T are the teacher block's own per-token projections; Attn_T = softmax(Q_T K_Tᵀ/√d) over the patch
  tokens (for Swin, over the whole grid rather than per window);
- the discriminator judges each token's feature vector (real: h_T, fake: h′_S) and trains with Adam.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..distributed import all_reduce_mean_grads
from ..errors import UserError
from ..hooks import FeatureHooks, TransformerTap
from .base import Distiller, MethodParams, StepOutput, kl_divergence
from .registry import register_method


class CAPKDParams(MethodParams):
    cross_prob: float = Field(0.5, ge=0, le=1, description="p: chance each Q/K/V element of the student is "
                              "replaced by the teacher's in training (Eq. 3-4)")
    proj1_weight: float = Field(1.0, ge=0, description="weight of L_proj1, the PCA projector loss (Eq. 4)")
    proj2_weight: float = Field(1.0, ge=0, description="weight of L_proj2, the GL projector loss (Eq. 6)")
    mvg_weight: float = Field(1.0, ge=0, description="λ, weight of the student's adversarial loss L_MVG (Eq. 9)")
    kd_weight: float = Field(0.0, ge=0, description="optional logit-KD term (Hinton) added to the total")
    kd_temperature: float = Field(4.0, gt=0)
    gl_group: int = Field(4, ge=1, description="side of the pixel neighbourhood sharing one GL-projector FC (Eq. 5)")
    gl_dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the GL projector's FCs")
    mvg_prob: float = Field(0.5, ge=0, le=1, description="chance the multi-view generator transforms a student "
                            "input (Eq. 7)")
    color_jitter: float = Field(0.4, ge=0, lt=1, description="brightness/contrast/saturation factors in 1 ± this")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="area fraction kept by the random crop")
    rotation: float = Field(15.0, ge=0, le=180, description="maximum rotation, degrees")
    mask_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of patches masked")
    mask_grid: int = Field(8, ge=1, description="the input is cut into mask_grid x mask_grid patches for masking")
    disc_every: int = Field(5, ge=1, description="update the discriminator every this many iterations (Alg. 1)")
    disc_lr: float = Field(2e-4, gt=0)
    disc_hidden: int = Field(256, ge=1, description="width of the discriminator's two hidden FC layers")
    teacher_img_size: int | None = Field(None, ge=8, description="teacher input side; default: the teacher's "
                                         "own input size, the batch is resized to it")
    student_layer: str | None = Field(None, description="student module whose output is h_S; default: the last "
                                      "stage in timm's feature_info")


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


class PartialCrossAttentionProjector(nn.Module):
    """Eq. 1-4: three 3x3 convolutions give Q_S, K_S, V_S shaped like the teacher's heads. In training each
    element is swapped for the teacher's with probability p, then PAttn_S = softmax(Q′_S K′_Sᵀ/√d)."""

    def __init__(self, in_channels: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = (nn.Conv2d(in_channels, num_heads * head_dim, 3, padding=1) for _ in range(3))

    def forward(self, feature_map: Tensor, teacher_qkv: tuple[Tensor, Tensor, Tensor], p: float
                ) -> tuple[Tensor, Tensor]:
        """Returns (PAttn_S, V′_S V′_Sᵀ/√d), both (B, heads, N, N)."""
        student_qkv = [heads_from_map(conv(feature_map), self.num_heads) for conv in (self.q, self.k, self.v)]
        if p > 0:  # Eq. 3: element-wise Bernoulli(p) swap for the teacher's values
            student_qkv = [torch.where(torch.rand_like(s) < p, t.to(s.dtype), s)
                           for s, t in zip(student_qkv, teacher_qkv, strict=True)]
        q, k, v = student_qkv
        scale = self.head_dim**-0.5
        return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1), v @ v.transpose(-2, -1) * scale


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
    """Eq. 7: with probability `prob` per image, colour jitter, a random crop, a rotation and patch masking,
    as batched tensor operations on the device. Works on normalised images; jitter happens in pixel space."""

    def __init__(self, p: CAPKDParams, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.p = p
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        p, b = self.p, images.shape[0]
        if p.mvg_prob == 0:
            return images
        chosen = torch.rand(b, device=images.device) < p.mvg_prob
        views = self._color_jitter(images)
        views = self._crop_and_rotate(views)
        views = self._mask_patches(views)
        return torch.where(chosen.view(b, 1, 1, 1), views, images)

    def _factors(self, b: int, device: torch.device) -> Tensor:
        s = self.p.color_jitter
        return torch.empty(b, 1, 1, 1, device=device).uniform_(1 - s, 1 + s)

    def _color_jitter(self, images: Tensor) -> Tensor:
        b, dev = images.shape[0], images.device
        x = images * self.std + self.mean
        x = x * self._factors(b, dev)  # brightness: blend with black
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = torch.lerp(grey.mean(dim=(2, 3), keepdim=True), x, self._factors(b, dev))  # contrast
        x = torch.lerp(grey, x, self._factors(b, dev))  # saturation
        return (x.clamp(0, 1) - self.mean) / self.std

    def _crop_and_rotate(self, images: Tensor) -> Tensor:
        b, dev = images.shape[0], images.device
        lo, hi = self.p.crop_scale
        side = torch.empty(b, device=dev).uniform_(lo, hi).sqrt()  # crop side as a fraction of the image
        angle = torch.empty(b, device=dev).uniform_(-1, 1) * math.radians(self.p.rotation)
        shift = (torch.rand(b, 2, device=dev) * 2 - 1) * (1 - side)[:, None]  # the crop stays inside
        cos, sin = angle.cos() * side, angle.sin() * side
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _mask_patches(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        n = self.p.mask_grid
        keep = (torch.rand(b, 1, n, n, device=images.device) >= self.p.mask_ratio).to(images.dtype)
        return images * F.interpolate(keep, size=(h, w), mode="nearest")  # 0 is the dataset's mean colour


class Discriminator(nn.Module):
    """Eq. 8: three FC layers telling teacher tokens h_T (real) from projected student tokens h′_S (fake)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens).squeeze(-1)


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
        self.teacher_size = params.teacher_img_size or _input_size(teacher)
        self.student_hooks = self._hook_student(params.student_layer)
        student_channels, self.grid = self._probe_shapes()
        self.pca = PartialCrossAttentionProjector(student_channels, self.tap.num_heads, self.tap.head_dim)
        self.gl = GroupwiseLinearProjector(student_channels, self.tap.embed_dim, self.grid, params.gl_group,
                                           params.gl_dropout)
        self.views = MultiViewGenerator(params, self.input_mean, self.input_std)
        self.discriminator = Discriminator(self.tap.embed_dim, params.disc_hidden)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=params.disc_lr, betas=(0.5, 0.999))
        self.disc_steps = 0
        self._pair: tuple[Tensor, Tensor] | None = None

    def _hook_student(self, layer: str | None) -> FeatureHooks:
        if layer is None:
            info = getattr(self.student, "feature_info", None)
            if not info:
                raise UserError(f"The student `{type(self.student).__name__}` has no timm feature_info to find its "
                                "last stage. Name the module giving h_S in `distill.student_layer`.")
            layer = info[-1]["module"]
        try:
            return self.hook_features(self.student, {"h_s": layer})
        except KeyError as exc:
            raise UserError(f"{exc.args[0]} (distill.student_layer). Name a module of the student.") from None

    @torch.no_grad()
    def _probe_shapes(self) -> tuple[int, tuple[int, int]]:
        """The student's h_S channels and the teacher's token grid, from one forward of a blank image each."""
        was_training = self.training
        self.eval()
        self.teachers[0](torch.zeros(1, 3, self.teacher_size, self.teacher_size))
        _, _, grid = self.tap.read()
        self.student(torch.zeros(1, 3, 64, 64))
        h_s = self.student_hooks.features["h_s"]
        if h_s.dim() != 4:
            raise UserError(f"CAP-KD needs a CNN student whose h_S is a (B, C, H, W) map, but the student layer gives "
                            f"a {h_s.dim()}-D output (student.name / distill.student_layer). Use a CNN student or "
                            "name a convolutional stage in `distill.student_layer`.")
        self.train(was_training)
        return h_s.shape[1], grid

    def ddp_ignored_prefixes(self) -> tuple[str, ...]:
        return (*super().ddp_ignored_prefixes(), "discriminator.")

    def forward(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> StepOutput:
        p: CAPKDParams = self.params
        teacher_images = align_to_grid(images, (self.teacher_size, self.teacher_size))  # same resize rule
        with torch.no_grad():
            teacher_logits = self.teacher_output(0, teacher_images)["logits"]  # online: the taps need this forward
            h_t, (q_t, k_t, v_t), _ = self.tap.read()
            attn_t = (q_t @ k_t.transpose(-2, -1) * self.tap.head_dim**-0.5).softmax(dim=-1)
            v_rel_t = v_t @ v_t.transpose(-2, -1) * self.tap.head_dim**-0.5

        student_images = self.views(images) if self.training else images
        logits = self.student(student_images)
        h_s = align_to_grid(self.student_hooks.features["h_s"], self.grid)

        # Eq. 4: L_proj1 = ‖Attn_T − PAttn_S‖² + ‖V_T V_Tᵀ/√d − V′_S V′_Sᵀ/√d‖²
        p_attn_s, v_rel_s = self.pca(h_s, (q_t, k_t, v_t), p.cross_prob if self.training else 0.0)
        proj1 = (p_attn_s - attn_t).pow(2).sum(-1).mean() + F.mse_loss(v_rel_s, v_rel_t)
        # Eq. 6: L_proj2 = ‖h_T − h′_S‖²
        h_s_proj = self.gl(h_s)
        proj2 = F.mse_loss(h_s_proj, h_t)
        # Eq. 9: the student makes the discriminator take h′_S for a teacher feature
        fake_scores = self.discriminator(h_s_proj)
        mvg = F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))
        ce = self.classification_loss(logits, targets)

        loss = ce + p.proj1_weight * proj1 + p.proj2_weight * proj2 + p.mvg_weight * mvg
        terms = {"ce": ce.detach(), "proj1": proj1.detach(), "proj2": proj2.detach(), "mvg": mvg.detach()}
        if p.kd_weight > 0:
            kd = kl_divergence(logits, teacher_logits, p.kd_temperature)
            loss = loss + p.kd_weight * kd
            terms["kd"] = kd.detach()
        self._pair = (h_t.detach().float(), h_s_proj.detach().float())
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


def _input_size(model: nn.Module) -> int:
    """The input side a timm model was built for: its patch embedding's, else its pretrained config's."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[-1])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
