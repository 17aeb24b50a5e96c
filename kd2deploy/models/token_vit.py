"""Vision Transformers with distillation tokens, built on timm's VisionTransformer.

- One learned distillation token (DeiT, LIB-KD).
- One token per teacher with its own head (CiT, Ren et al., "Co-advise: Cross Inductive Bias Distillation",
  CVPR 2022): a class, a conv and an inv token. With `stem="co_advise"` (CiT §3.2, token inductive bias
  alignment) a convolution stem and an involution stem both embed the image: the patch tokens are their sum, and
  the conv and inv tokens are their average-pooled outputs, so each token carries its teacher's inductive bias.

In training with `set_distilled_training(True)` the model returns one logit tensor per head (class first); at
inference `head_fusion` decides: "cls" uses the class head alone, "mean" averages every head, "cls_dist_dense"
(one distillation token; CSKD's inference, github.com/Zzzzz1/CSKD cskd/models/vision_transformer.py `forward`)
averages the class head, the distillation head and the distillation head's mean prediction over the patch tokens.
The CiT students (cit_*) default to "cls", the class token as in the CiT paper; the others to "mean".
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import ConvNormAct, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, get_init_weights_vit
from torch import Tensor, nn

from ..errors import UserError
from .cifar import cifar_cfg
from .involution import Involution2d

HeadFusion = Literal["cls", "mean", "cls_dist_dense"]
HEAD_FUSIONS = ("cls", "mean", "cls_dist_dense")


class LearnedTokenEmbed(PatchEmbed):
    """timm's linear patch embedding plus `num_tokens` learned tokens; returns (patch tokens, extra tokens)."""

    def __init__(self, *args: Any, num_tokens: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens = nn.Parameter(torch.zeros(1, num_tokens, kwargs["embed_dim"]))
        trunc_normal_(self.tokens, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        patches = super().forward(x)
        # shape[0], not len(): the ONNX export keeps the batch dimension dynamic
        return patches, self.tokens.expand(patches.shape[0], -1, -1)


class CoAdviseStem(nn.Module):
    """A convolution stem and an involution stem (CiT §3.2), each a stack of stride-2 3x3 layers down to the patch
    grid. Returns (their summed outputs as patch tokens, [pooled conv output, pooled inv output] as tokens)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_tokens: int = 2, **_: Any):
        super().__init__()
        if num_tokens != 2:
            raise ValueError("the co-advise stem makes exactly two tokens (conv, inv); set num_distill_tokens: 2")
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size or stages < 1:
            raise ValueError(f"the co-advise stem needs a power-of-two patch_size, not {patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        widths = [max(16, embed_dim >> (stages - i)) for i in range(1, stages + 1)]
        conv, inv, c_in = [], [], in_chans
        for i, width in enumerate(widths):
            conv.append(ConvNormAct(c_in, width, 3, stride=2))
            if i == 0:  # involution needs a few channels to act on: the first layer is a convolution in both
                inv.append(ConvNormAct(c_in, width, 3, stride=2))
            else:
                inv += [Involution2d(c_in, 3, stride=2, group_channels=math.gcd(16, c_in)), nn.BatchNorm2d(c_in),
                        nn.ReLU(inplace=True), ConvNormAct(c_in, width, 1)]
            c_in = width
        self.conv_stem = nn.Sequential(*conv, nn.Conv2d(c_in, embed_dim, 1))
        self.inv_stem = nn.Sequential(*inv, nn.Conv2d(c_in, embed_dim, 1))

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        conv, inv = self.conv_stem(x), self.inv_stem(x)  # (B, D, h, w)
        patches = (conv + inv).flatten(2).transpose(1, 2)
        tokens = torch.stack([conv.mean(dim=(2, 3)), inv.mean(dim=(2, 3))], dim=1)
        return patches, tokens


class TokenViT(VisionTransformer):
    """timm's VisionTransformer with `num_distill_tokens` extra tokens after the class token, each with its own
    head. `stem`: "patch" (timm's linear patch embedding, learned tokens) or "co_advise" (CiT's stems)."""

    def __init__(self, *args: Any, num_distill_tokens: int = 1, stem: Literal["patch", "co_advise"] = "patch",
                 head_fusion: HeadFusion = "mean", **kwargs: Any):
        if head_fusion not in HEAD_FUSIONS:
            raise UserError(f"head_fusion {head_fusion!r} (the model's `kwargs.head_fusion`) is not one of "
                            f"{', '.join(HEAD_FUSIONS)}. Pick one of those.")
        if head_fusion == "cls_dist_dense" and num_distill_tokens != 1:
            raise UserError(f"head_fusion 'cls_dist_dense' (the model's `kwargs.head_fusion`) needs exactly one "
                            f"distillation token, but this model has {num_distill_tokens}. Use 'cls' or 'mean'.")
        embed = {"patch": LearnedTokenEmbed, "co_advise": CoAdviseStem}[stem]
        kwargs.setdefault("global_pool", "token")
        super().__init__(*args, embed_layer=partial(embed, num_tokens=num_distill_tokens), **kwargs)
        self.num_distill_tokens, self.stem, self.head_fusion = num_distill_tokens, stem, head_fusion
        self.num_prefix_tokens = 1 + num_distill_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  self.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.token_heads = nn.ModuleList(nn.Linear(self.embed_dim, self.num_classes)
                                         for _ in range(num_distill_tokens))
        self._init_token_heads(kwargs.get("weight_init", ""))
        self.distilled_training = False

    def _init_token_heads(self, mode: str) -> None:
        """Like timm's `head` (VisionTransformer.init_weights): trunc_normal(std .02) weights and zero bias by
        default, zero weights and `head_bias` in the jax modes; 'skip' keeps PyTorch's default, as for `head`."""
        if mode == "skip" or self.num_classes <= 0:
            return
        head_bias = -math.log(self.num_classes) if "nlhb" in mode else 0.0
        init = get_init_weights_vit(mode, head_bias)
        for head in self.token_heads:
            init(head, name="head")  # the name timm's jax init recognises as a classifier head

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's DeiT API: in training, return every head's logits instead of the fused prediction."""
        self.distilled_training = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "patch_embed.tokens"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return nn.ModuleList([self.head, *self.token_heads])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.token_heads = nn.ModuleList(nn.Linear(self.embed_dim, num_classes)
                                         for _ in range(self.num_distill_tokens))

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        patches, tokens = self.patch_embed(x)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, tokens, patches], dim=1) + self.pos_embed)
        x = self.norm_pre(self.patch_drop(x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, ...]:
        tokens = self.head_drop(x[:, : self.num_prefix_tokens])
        features, heads = list(tokens.unbind(dim=1)), [self.head, *self.token_heads]
        if self.head_fusion == "cls_dist_dense" and not (self.distilled_training and self.training):
            # the distillation head's mean logits over the patch tokens; the head is linear, so applying it to the
            # mean token equals the CSKD authors' mean of its per-patch logits
            features.append(self.head_drop(x[:, self.num_prefix_tokens:].mean(dim=1)))
            heads.append(self.token_heads[0])
        if pre_logits:
            return features[0] if self.head_fusion == "cls" else torch.stack(features).mean(dim=0)
        logits = [head(feature) for head, feature in zip(heads, features, strict=True)]
        if self.distilled_training and self.training:
            return tuple(logits)
        if self.head_fusion == "cls":
            return logits[0]
        return torch.stack(logits).mean(dim=0)


def num_distill_tokens(model: nn.Module) -> int:
    """How many distillation tokens (heads beside the class head) a student has: 0 for a plain model."""
    if isinstance(model, TokenViT):
        return model.num_distill_tokens
    return 1 if hasattr(model, "set_distilled_training") else 0  # timm's DeiT protocol: one distillation token


def distill_token_heads(model: nn.Module) -> list[nn.Module]:
    """The heads of the distillation tokens, in token order."""
    if isinstance(model, TokenViT):
        return list(model.token_heads)
    return [model.head_dist] if hasattr(model, "head_dist") else []


def _token_vit(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> TokenViT:
    return build_model_with_cfg(TokenViT, variant, pretrained, **{**defaults, **kwargs})


_NANO_32 = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
_TINY_32 = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3}
_TINY_224 = {"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
# CiT: the class token's prediction at inference, as the paper's text (its authors' code averages the three heads)
_CIT = {"num_distill_tokens": 2, "stem": "co_advise", "head_fusion": "cls"}
_HEADS = {"first_conv": "patch_embed.proj", "classifier": "head"}
_IMAGENET = {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), **_HEADS}
default_cfgs = generate_default_cfgs({
    "libkd_nano_patch4_32": cifar_cfg(**_HEADS), "libkd_tiny_patch16_224": _IMAGENET,
    "cit_nano_patch4_32": cifar_cfg(**_HEADS), "cit_tiny_patch4_32": cifar_cfg(**_HEADS),
    "cit_tiny_patch16_224": _IMAGENET,
})


@register_model
def libkd_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """CIFAR-size ViT (96 wide, 6 blocks) with one distillation token (LIB-KD)."""
    return _token_vit("libkd_nano_patch4_32", pretrained, {**_NANO_32, "num_distill_tokens": 1}, kwargs)


@register_model
def libkd_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """DeiT-Tiny-size ViT with one distillation token (LIB-KD at ImageNet scale)."""
    return _token_vit("libkd_tiny_patch16_224", pretrained, {**_TINY_224, "num_distill_tokens": 1}, kwargs)


@register_model
def cit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """CIFAR-size CiT student: class, conv and inv tokens and the co-advise stems (96 wide, 6 blocks)."""
    return _token_vit("cit_nano_patch4_32", pretrained, {**_NANO_32, **_CIT}, kwargs)


@register_model
def cit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """CIFAR-size CiT student at DeiT-Tiny width (192 wide, 12 blocks)."""
    return _token_vit("cit_tiny_patch4_32", pretrained, {**_TINY_32, **_CIT}, kwargs)


@register_model
def cit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """CiT-Tiny at 224 (the paper's ImageNet student size)."""
    return _token_vit("cit_tiny_patch16_224", pretrained, {**_TINY_224, **_CIT}, kwargs)
