"""Device-resident data for small datasets: every training image decoded once into one uint8 tensor on the training
device, and each batch augmented there in a few batched operations, with no loader processes.

JPEG decoding in loader processes is what limits small-image training: on a GPU the model waits for it, and on a
CPU the loader processes take the cores the training step needs. A CIFAR-sized set (50,000 × 3 × 32 × 32 bytes,
150 MB) fits any device many times over.

- **What it covers.** Random-resized crop (timm's sampling rule: ten tries of area and log-ratio, then the
  centre crop) with bilinear resampling (`torchvision.ops.roi_align`, half-pixel centres; it averages several samples
  per output pixel when it shrinks a crop), the padded crop (reflect padding, integer shifts: exact pixels, for images
  already `img_size`), horizontal flip and normalisation. Images must all have one size
  (CIFAR, the mini set, uniform ImageFolders). Colour jitter, auto-augment, random erasing and other interpolations
  stay on the loader path: `data.on_device: auto` falls back to it and says why; `true` refuses with the field.
- **Pixels.** The same crops and flips as the loader path draws, but resampled by roi_align instead of PIL: the same
  pixel statistics, not the same pixels (an output pixel on a crop's edge may blend in the neighbouring pixel that
  PIL's crop-then-resize clamps away).
- **Validation.** Resident too when the eval transform is only a normalisation (images already `img_size`,
  `crop_pct` 1): then its pixels equal the loader path's exactly.
- **Teacher-output cache.** The stored views are rendered by this module's renderer when the cache is built and
  when the student trains, so the outputs belong to exactly the pixels the student sees; the renderer is part of the
  cache key.
- **Randomness.** Crops and flips come from torch's global generator, which the engine seeds per epoch, so a
  resumed run replays the same batches; the order comes from the same DistributedSampler as the loader path.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.ops import roi_align

from ..errors import UserError

if TYPE_CHECKING:
    from ..recipe_schema import DataConfig

RENDERER = "roi_align"  # recorded in the teacher-output cache key


def unsupported_augmentation(cfg: DataConfig) -> list[str]:
    """The recipe fields the resident path cannot reproduce (empty: it can)."""
    aug = cfg.augment
    fields = {"data.augment.color_jitter": aug.enabled and aug.color_jitter,
              "data.augment.auto_augment": aug.enabled and aug.auto_augment,
              "data.augment.re_prob": aug.enabled and aug.re_prob,
              "data.interpolation": cfg.interpolation != "bilinear"}
    return [name for name, used in fields.items() if used]


def decision(cfg: DataConfig, raw: Dataset, device: torch.device) -> tuple[bool, str]:
    """Whether to keep the training set `raw` (PIL images and targets) resident, and why (for the run log)."""
    if cfg.on_device is False:
        return False, "data: loader processes (data.on_device: false)"
    blockers = unsupported_augmentation(cfg)
    first = np.asarray(raw[0][0])
    size_mb = len(raw) * first.size / 2**20
    if not cfg.augment.enabled and not eval_is_normalise_only(cfg, first.shape[:2]):
        blockers.append("data.augment.enabled: false with an eval transform that resizes")
    if cfg.augment.enabled and cfg.augment.crop == "padded" and first.shape[:2] != (cfg.img_size, cfg.img_size):
        blockers.append("data.augment.crop: padded on images that are not img_size")
    if not blockers and size_mb > cfg.on_device_limit_mb:
        blockers = [f"the decoded set ({size_mb:,.0f} MB) exceeds data.on_device_limit_mb "
                    f"({cfg.on_device_limit_mb:,} MB)"]
    if blockers:
        if cfg.on_device is True:
            raise UserError(f"data.on_device: true keeps the training images on {device} and augments them there, "
                            f"which supports crop, flip and normalisation only, but the recipe sets "
                            f"{', '.join(blockers)}. Drop those settings or set `data.on_device: auto`.")
        return False, f"data: loader processes ({', '.join(blockers)})"
    return True, f"data: resident on {device} ({len(raw):,} images, {size_mb:,.0f} MB uint8), augmented in batches"


class MixedSizes(Exception):
    """The training images do not all have one size."""


def load(cfg: DataConfig, raw: Dataset, device: torch.device) -> tuple[ResidentImages | None, str]:
    """The resident training set, or None when the loader path serves this recipe; and the log line saying why."""
    use, note = decision(cfg, raw, device)
    if not use:
        return None, note
    try:
        return ResidentImages.decode(raw, device, cfg.num_workers), note
    except MixedSizes as exc:
        if cfg.on_device is True:
            raise UserError(f"data.on_device: true stacks the training images into one tensor, but they have "
                            f"several sizes ({exc}). Set `data.on_device: auto` (or false) to use loader "
                            "processes, or resize the images to one size.") from None
        return None, "data: loader processes (the training images have several sizes)"


@dataclass
class ResidentImages:
    """Every image of a dataset as uint8 (N, 3, H, W) on `device`, with its targets."""

    pixels: Tensor
    targets: Tensor

    @classmethod
    def decode(cls, raw: Dataset, device: torch.device, num_workers: int) -> ResidentImages:
        """Decode `raw` (PIL images and targets) with `num_workers` processes, once. Raises MixedSizes."""
        loader = DataLoader(_AsArray(raw), batch_size=512, num_workers=num_workers, collate_fn=list)
        images, targets, shapes = [], [], set()
        for items in loader:
            shapes.update(item[0].shape for item in items)
            if len(shapes) > 1:
                raise MixedSizes(f"images of sizes {sorted(shapes)}")
            images.append(torch.from_numpy(np.stack([item[0] for item in items])))
            targets.append(torch.tensor([item[1] for item in items]))
        pixels = torch.cat(images).permute(0, 3, 1, 2).contiguous()
        return cls(pixels.to(device), torch.cat(targets).to(device))

    def __len__(self) -> int:
        return len(self.pixels)


class _AsArray(Dataset):
    def __init__(self, raw: Dataset):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, target = self.raw[index]
        return np.asarray(image.convert("RGB"), dtype=np.uint8), target


def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 hflip: float) -> Tensor:
    """(n, 5) float boxes (top, left, height, width, flip): timm's RandomResizedCrop rule, vectorised over n
    images (ten tries of area and log-aspect, the first that fits, else the centre crop)."""
    area = height * width
    tries = 10
    target_area = area * torch.empty(n, tries).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    in_ratio = width / height  # the fallback: the whole image, its aspect clamped to `ratio`
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    pick = first.clamp(min=0)[:, None]
    ok = first >= 0
    crop_w = torch.where(ok, w.gather(1, pick)[:, 0], torch.tensor(float(fallback_w)))
    crop_h = torch.where(ok, h.gather(1, pick)[:, 0], torch.tensor(float(fallback_h)))
    top = torch.where(ok, torch.floor(torch.rand(n) * (height - crop_h + 1)), (height - crop_h) // 2)
    left = torch.where(ok, torch.floor(torch.rand(n) * (width - crop_w + 1)), (width - crop_w) // 2)
    flip = (torch.rand(n) < hflip).float()
    return torch.stack([top, left, crop_h, crop_w, flip], dim=1)


def sample_shifts(n: int, height: int, width: int, padding: int, hflip: float) -> Tensor:
    """(n, 5) boxes of the padded crop: torchvision's RandomCrop(padding) rule, a whole-image box shifted by up to
    `padding` pixels each way (its outside is the reflect padding that `render` adds)."""
    top, left = (torch.randint(-padding, padding + 1, (n,)).float() for _ in range(2))
    flip = (torch.rand(n) < hflip).float()
    return torch.stack([top, left, torch.full((n,), float(height)), torch.full((n,), float(width)), flip], dim=1)


def sample_boxes(n: int, height: int, width: int, cfg: DataConfig) -> Tensor:
    aug = cfg.augment
    if aug.crop == "padded":
        return sample_shifts(n, height, width, aug.padding, aug.hflip)
    return sample_crops(n, height, width, aug.scale, aug.ratio, aug.hflip)


def render(pixels: Tensor, boxes: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
           padding: int = 0) -> Tensor:
    """Normalised float views (n, 3, size, size) of uint8 images (n, 3, H, W) cropped at `boxes` (n, 5: top, left,
    height, width, flip), bilinear with half-pixel centres, then flipped where flip is 1. With `padding`, the images
    are first reflect-padded by that many pixels (boxes stay in unpadded coordinates)."""
    images = pixels.float().div_(255)
    boxes = boxes.to(images.device, torch.float32)
    if padding:
        images = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
        boxes = boxes + torch.tensor([padding, padding, 0, 0, 0], device=images.device, dtype=torch.float32)
    top, left, height, width, flip = boxes.unbind(1)
    rois = torch.stack([torch.arange(len(images), device=images.device, dtype=torch.float32),
                        left, top, left + width, top + height], dim=1)
    views = roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return _standardise(torch.where(flip.bool()[:, None, None, None], views.flip(-1), views), mean, std)


def normalise(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """ToTensor + Normalize on uint8 images already at their final size (the eval transform's pixels exactly)."""
    return _standardise(pixels.float().div_(255), mean, std)


def _standardise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x − mean) / std per channel, in place."""
    return images.sub_(torch.tensor(mean, device=images.device).view(1, -1, 1, 1)).div_(
        torch.tensor(std, device=images.device).view(1, -1, 1, 1))


class ResidentLoader:
    """Batches of (images, targets, indices) like a DataLoader over a DistributedSampler with drop_last, built on
    the device by `make_batch(indices) -> (images, indices handed to the method)`."""

    def __init__(self, images: ResidentImages, sampler: Sequence[int] | DistributedSampler, batch_size: int,
                 make_batch: Callable[[Tensor], tuple[Tensor, Tensor]], drop_last: bool):
        self.images, self.sampler, self.batch_size = images, sampler, batch_size
        self.make_batch, self.drop_last = make_batch, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for b in range(len(self)):
            indices = order[b * self.batch_size:(b + 1) * self.batch_size]
            images, handed = self.make_batch(indices)
            yield images, self.images.targets[indices.to(self.images.targets.device)], handed


def augmenting_batches(images: ResidentImages, cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...]
                       ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Training batches: a fresh crop and flip per image (or, with augmentation off, the plain images)."""
    aug = cfg.augment
    height, width = images.pixels.shape[-2:]

    def make_batch(indices: Tensor) -> tuple[Tensor, Tensor]:
        pixels = images.pixels[indices.to(images.pixels.device)]
        if not aug.enabled:
            return normalise(pixels, mean, std), indices
        boxes = sample_boxes(len(indices), height, width, cfg)
        return cutout_(render(pixels, boxes, cfg.img_size, mean, std, crop_padding(cfg)), aug.cutout), indices
    return make_batch


def stored_view_batches(images: ResidentImages, views: Any, cfg: DataConfig, mean: tuple[float, ...],
                        std: tuple[float, ...]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Teacher-cache batches: each image's stored view of the epoch, handing the method the view ids."""
    def make_batch(indices: Tensor) -> tuple[Tensor, Tensor]:
        boxes, view_ids = views.view_params(indices)
        pixels = images.pixels[indices.to(images.pixels.device)]
        if not cfg.augment.enabled:  # one view per image: the eval transform, which only normalises here
            return normalise(pixels, mean, std), view_ids
        return render(pixels, boxes, cfg.img_size, mean, std, crop_padding(cfg)), view_ids
    return make_batch


def cutout_(images: Tensor, size: int) -> Tensor:
    """Cutout (DeVries & Taylor 2017, their code's rule): in each normalised image (n, C, H, W), in place, zero the
    square [y - size/2, y + size/2) x [x - size/2, x + size/2) around a uniformly random pixel (y, x), clipped at
    the border. Zero after normalisation is the dataset's mean colour."""
    if size <= 0:
        return images
    n, _, height, width = images.shape
    top = torch.randint(0, height, (n,), device=images.device)[:, None] - size // 2
    left = torch.randint(0, width, (n,), device=images.device)[:, None] - size // 2
    rows = torch.arange(height, device=images.device)[None]
    cols = torch.arange(width, device=images.device)[None]
    inside = (((rows >= top) & (rows < top + size))[:, :, None]
              & ((cols >= left) & (cols < left + size))[:, None, :])
    return images.masked_fill_(inside[:, None], 0.0)


def crop_padding(cfg: DataConfig) -> int:
    """The reflect padding `render` adds under this recipe's crop rule."""
    return cfg.augment.padding if cfg.augment.crop == "padded" else 0


def eval_is_normalise_only(cfg: DataConfig, image_size: tuple[int, int]) -> bool:
    """Whether the eval transform leaves the pixels as they are (then resident validation is exact)."""
    return cfg.crop_pct == 1.0 and tuple(image_size) == (cfg.img_size, cfg.img_size)


def eval_batches(images: ResidentImages, mean: tuple[float, ...], std: tuple[float, ...]
                 ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def make_batch(indices: Tensor) -> tuple[Tensor, Tensor]:
        return normalise(images.pixels[indices.to(images.pixels.device)], mean, std), indices
    return make_batch


def train_loader(images: ResidentImages, train_set: Dataset, cfg: DataConfig, mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int, seed: int, rank: int, world_size: int) -> ResidentLoader:
    """The resident counterpart of data.train_loader: the same DistributedSampler, so the same global batches."""
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if hasattr(train_set, "view_params"):  # the teacher-output cache's stored views
        make_batch = stored_view_batches(images, train_set, cfg, mean, std)
    else:
        make_batch = augmenting_batches(images, cfg, mean, std)
    return ResidentLoader(images, sampler, batch_size, make_batch, drop_last=True)


def eval_loader(images: ResidentImages, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                rank: int, world_size: int) -> ResidentLoader:
    """The resident counterpart of data.eval_loader: a strided shard per process, every image once."""
    return ResidentLoader(images, range(rank, len(images), world_size), batch_size, eval_batches(images, mean, std),
                          drop_last=False)
