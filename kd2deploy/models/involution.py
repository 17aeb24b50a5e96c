"""Involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021)
and RedNet, registered in timm's model registry as timm ResNets whose 3x3 convolutions are involutions.

Involution is spatial-specific and channel-agnostic, the mirror image of convolution: kd2deploy uses RedNets as
the "INN" teachers of the LIB-KD family.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

from .cifar import cifar_cfg, cifar_stem

# elements of one (images × channels × output pixels) chunk in the shift-and-accumulate kernel: a chunk's input,
# output and kernels stay in the CPU's L2/L3 cache across the K² passes (measured best between 2^18 and 2^20)
CHUNK_ELEMENTS = 1 << 19


def unfold_involution(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, groups: int) -> Tensor:
    """Eq. 4 as written: unfold the K×K neighbourhoods, multiply by the kernels, sum over the window. This is the
    form exported to ONNX and traced by torch.compile (Inductor fuses it into one loop); eager training uses
    `involution`, which never materialises the (B, C, K², H, W) neighbourhoods."""
    b, c = x.shape[:2]
    _, _, h, w = kernel.shape
    k2 = kernel_size * kernel_size
    kernel = kernel.view(b, groups, 1, k2, h, w)  # shared by the channels of a group
    patches = F.unfold(x, kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    return (kernel * patches.view(b, groups, c // groups, k2, h, w)).sum(dim=3).view(b, c, h, w)


def _phases(x_pad: Tensor, stride: int, spatial_dim: int) -> dict[tuple[int, int], Tensor]:
    """The stride² sub-grids x_pad[p::s, q::s], each contiguous: every window of a strided involution is then a
    stride-1 slice of one of them, whose rows stay contiguous (a strided slice made each multiply-add 3x slower)."""
    if stride == 1:
        return {(0, 0): x_pad}
    lead = (slice(None),) * spatial_dim
    return {(p, q): x_pad[(*lead, slice(p, None, stride), slice(q, None, stride))].contiguous()
            for p in range(stride) for q in range(stride)}


def _windows(kernel_size: int, stride: int, h: int, w: int, spatial_dim: int):
    """(k, phase, index) for each window position k = u·K + v: the padded input's rows u, u+s, … and columns
    v, v+s, … that line up with the output are rows u//s… and columns v//s… of phase (u % s, v % s)."""
    lead = (slice(None),) * spatial_dim
    for u in range(kernel_size):
        for v in range(kernel_size):
            yield (u * kernel_size + v, (u % stride, v % stride),
                   (*lead, slice(u // stride, u // stride + h), slice(v // stride, v // stride + w)))


class _ShiftInvolution(torch.autograd.Function):
    """Eq. 4 as K² shifted multiply-accumulates over cache-sized batch chunks, with the matching hand-written
    backward: dX_pad[shift k] += dY·H_k and dH_k = Σ_(c∈group) dY·X_pad[shift k]. Same sums as `unfold_involution`
    in another order (float tolerance), several times faster on CPU and without its K²-fold memory.

    Works in the input's memory layout: NCHW as (B, G, C/G, H, W) with kernels (B, G, K², 1, H, W), channels-last
    as (B, H, W, G, C/G) with kernels (B, H, W, G, K²), so the K² window is always the kernels' dim 2 or -1.
    Strided involutions split the padded input into its stride² phases first (`_phases`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor, kernel_size: int, stride: int, groups: int) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, kernel.dtype)  # what the unfold form returns under autocast
        # CPUs do bf16/fp16 element-wise arithmetic through fp32 anyway: compute there, round once at the end
        reduced = out_dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
        dtype = torch.float32 if reduced else out_dtype
        b, c, height, width = x.shape
        _, _, h, w = kernel.shape
        pad = (kernel_size - 1) // 2
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and c > 1
        if channels_last:
            x_pad = F.pad(x.to(dtype).permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad)).view(
                b, height + 2 * pad, width + 2 * pad, groups, c // groups)
            kernels = kernel.to(dtype).permute(0, 2, 3, 1).reshape(b, h, w, groups, kernel_size * kernel_size)
            out = x_pad.new_empty(b, h, w, groups, c // groups)
        else:
            x_pad = F.pad(x.to(dtype).contiguous(), (pad, pad, pad, pad)).view(
                b, groups, c // groups, height + 2 * pad, width + 2 * pad)
            kernels = kernel.to(dtype).reshape(b, groups, kernel_size * kernel_size, 1, h, w)
            out = x_pad.new_empty(b, groups, c // groups, h, w)
        phases = _phases(x_pad, stride, 1 if channels_last else 3)
        step = max(1, CHUNK_ELEMENTS // (c * (height + 2 * pad) * (width + 2 * pad)))
        for i in range(0, b, step):
            out_i, kernels_i = out[i:i + step], kernels[i:i + step]
            for k, phase, window in _windows(kernel_size, stride, h, w, 1 if channels_last else 3):
                x_k = phases[phase][i:i + step][window]
                kernel_k = kernels_i[..., k:k + 1] if channels_last else kernels_i[:, :, k]
                if k == 0:
                    torch.mul(x_k, kernel_k, out=out_i)
                else:
                    out_i.addcmul_(x_k, kernel_k)
        keys = sorted(phases)
        ctx.save_for_backward(kernels, *(phases[key] for key in keys))
        ctx.config = (kernel_size, stride, channels_last, keys, x.shape, x_pad.shape, x.dtype, kernel.dtype)
        if channels_last:
            return out.view(b, h, w, c).permute(0, 3, 1, 2).to(out_dtype)
        return out.view(b, c, h, w).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        kernels, *saved = ctx.saved_tensors
        kernel_size, stride, channels_last, keys, (b, c, height, width), padded, x_dtype, kernel_dtype = ctx.config
        phases = dict(zip(keys, saved, strict=True))
        h, w = grad.shape[-2:]
        pad = (kernel_size - 1) // 2
        spatial_dim = 1 if channels_last else 3
        if channels_last:
            groups = kernels.shape[3]
            grad = grad.to(kernels.dtype).permute(0, 2, 3, 1).contiguous().view(b, h, w, groups, c // groups)
        else:
            groups = kernels.shape[1]
            grad = grad.to(kernels.dtype).contiguous().view(b, groups, c // groups, h, w)
        grad_phases = {key: torch.zeros_like(phase) for key, phase in phases.items()}
        grad_kernels = torch.empty_like(kernels)
        step = max(1, CHUNK_ELEMENTS // (c * (height + 2 * pad) * (width + 2 * pad)))
        for i in range(0, b, step):
            g_i, kernels_i, gk_i = grad[i:i + step], kernels[i:i + step], grad_kernels[i:i + step]
            for k, phase, window in _windows(kernel_size, stride, h, w, spatial_dim):
                x_k, gx_k = phases[phase][i:i + step][window], grad_phases[phase][i:i + step][window]
                if channels_last:  # the group's channels are the last dim
                    gx_k.addcmul_(g_i, kernels_i[..., k:k + 1])
                    torch.sum(g_i * x_k, dim=-1, keepdim=True, out=gk_i[..., k:k + 1])
                else:
                    gx_k.addcmul_(g_i, kernels_i[:, :, k])
                    torch.sum(g_i * x_k, dim=2, keepdim=True, out=gk_i[:, :, k])
        if stride == 1:
            grad_x_pad = grad_phases[(0, 0)]
        else:  # the phases partition the padded input: put each back on its sub-grid
            grad_x_pad = grad.new_empty(padded)
            lead = (slice(None),) * spatial_dim
            for (p, q), grad_phase in grad_phases.items():
                grad_x_pad[(*lead, slice(p, None, stride), slice(q, None, stride))] = grad_phase
        if channels_last:
            grad_x = grad_x_pad.view(b, height + 2 * pad, width + 2 * pad, c)[:, pad:pad + height, pad:pad + width]
            grad_x = grad_x.permute(0, 3, 1, 2)
            grad_kernel = grad_kernels.view(b, h, w, -1).permute(0, 3, 1, 2)
        else:
            grad_x = grad_x_pad.view(b, c, height + 2 * pad, width + 2 * pad)[:, :, pad:pad + height, pad:pad + width]
            grad_kernel = grad_kernels.view(b, -1, h, w)
        return grad_x.to(x_dtype), grad_kernel.to(kernel_dtype), None, None, None


def involution(x: Tensor, kernel: Tensor, kernel_size: int, stride: int, groups: int) -> Tensor:
    """Y = Σ_k H_k · X[shift k] (Eq. 4) for kernels (B, G·K², H', W'); the unfold form when exporting or compiling."""
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return unfold_involution(x, kernel, kernel_size, stride, groups)
    return _ShiftInvolution.apply(x, kernel, kernel_size, stride, groups)


class Involution2d(nn.Module):
    """Y[i,j,c] = Σ_(u,v)∈Δ_K H[i,j,u,v,g(c)] · X[i+u,j+v,c] (Eq. 4), with the kernel generated from the pixel
    itself, H[i,j] = W1 σ(W0 X[i,j]) (Eq. 6): a channel reduction by `reduction` (1x1 conv, BN, ReLU) and a span
    to K·K weights per group of `group_channels` channels. Strided involutions average-pool before generating
    kernels, as the paper does. Trained with a shift-and-accumulate kernel (`involution`), exported with unfold."""

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction: int = 4):
        super().__init__()
        group_channels = min(group_channels, channels)
        if channels % group_channels:
            raise ValueError(f"involution channels ({channels}) must be a multiple of group_channels "
                             f"({group_channels})")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = channels // group_channels
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.reduce = ConvNormAct(channels, max(1, channels // reduction), 1)
        self.span = nn.Conv2d(max(1, channels // reduction), kernel_size * kernel_size * self.groups, 1)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.span(self.reduce(self.pool(x)))  # (B, K²·G, H', W')
        return involution(x, kernel, self.kernel_size, self.stride, self.groups)


class InvolutionBottleneck(Bottleneck):
    """timm's ResNet bottleneck with the 3x3 convolution replaced by a KxK involution (RedNet, §4.1)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *args: Any, involution_kernel: int = 7,
                 group_channels: int = 16, **kwargs: Any):
        super().__init__(inplanes, planes, stride, *args, **kwargs)
        width = self.conv2.out_channels
        self.conv2 = Involution2d(width, involution_kernel, stride, group_channels)


_REDNET_LAYERS = {"rednet26": (1, 2, 4, 1), "rednet38": (2, 3, 5, 2), "rednet50": (3, 4, 6, 3)}
_IMAGENET = {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "interpolation": "bicubic",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "conv1.0", "classifier": "fc"}
default_cfgs = generate_default_cfgs({
    **{name: _IMAGENET for name in _REDNET_LAYERS},
    **{f"{name}_cifar": cifar_cfg(first_conv="conv1.0", classifier="fc") for name in _REDNET_LAYERS},
})


def _rednet(variant: str, pretrained: bool, cifar: bool, kwargs: dict[str, Any]) -> ResNet:
    """A RedNet: deep stem (3x3 conv, 3x3 involution, 3x3 conv) and involution bottlenecks.
    `involution_kernel` (7) and `group_channels` (16) are kwargs; the CIFAR variants use a stride-1 stem."""
    block_args = {"involution_kernel": kwargs.pop("involution_kernel", 7),
                  "group_channels": kwargs.pop("group_channels", 16), **kwargs.pop("block_args", {})}
    args = {"stem_type": "deep", "stem_width": 32, **kwargs}
    model = build_model_with_cfg(ResNet, variant, pretrained, block=InvolutionBottleneck,
                                 layers=_REDNET_LAYERS[variant.removesuffix("_cifar")], block_args=block_args,
                                 **args)
    stem = model.conv1
    stem[3] = Involution2d(stem[3].in_channels, 3, 1, block_args["group_channels"])  # the RedNet stem
    if cifar:
        cifar_stem(model)
    return model


@register_model
def rednet26(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-26 (9.2M parameters at ImageNet size)."""
    return _rednet("rednet26", pretrained, False, kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-38."""
    return _rednet("rednet38", pretrained, False, kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-50."""
    return _rednet("rednet50", pretrained, False, kwargs)


@register_model
def rednet26_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-26 for 32x32 inputs: stride-1 stem, no max-pool (8x downsampling, a 4x4 last map)."""
    return _rednet("rednet26_cifar", pretrained, True, kwargs)


@register_model
def rednet38_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-38 for 32x32 inputs."""
    return _rednet("rednet38_cifar", pretrained, True, kwargs)


@register_model
def rednet50_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """RedNet-50 for 32x32 inputs."""
    return _rednet("rednet50_cifar", pretrained, True, kwargs)
