"""Teacher-output cache: teacher outputs computed once, stored memory-mapped on disk, reused across epochs and runs.

Correct under augmentation the FKD way (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022): for every training image, K crop + flip views (random-resized or padded) are drawn
once, their parameters are stored, and the teacher outputs are computed on exactly those views. In training, epoch
e shows image i its view (e + offset_i) mod K, re-rendered from the stored parameters, and the dataset hands out the
view's id, so the student always gets the outputs of the very pixels it sees. With `data.augment.enabled: false`
there is one view per image (the eval transform). Photometric augmentations, random erasing and mixup/cutmix would
change the pixels after the teacher saw them, so a recipe with them and a cache is refused.

Layout: one folder per teacher under `teacher_cache.dir`, named by the cache key, the sha256 of everything that
determines the outputs (the teacher's weights, model name and kwargs, the training images, the view transform and
its resolution, K and the method's output signature). A changed anything is a different key, so a stale cache is
never read; it is rebuilt beside the old one. Each folder holds meta.json, views.npy (N, K, 5: top, left, height,
width, flip), logits.npy (N·K, C, fp16) and, for dense outputs (per-position logits), dense_logit.npy /
dense_index.npy (N·K, P, k: the top-k logits per position, fp16, and their classes) and, when k < C, dense_rest.npy
(N·K, P: the mean of the other C − k logits, which stand in for each of them; with k ≥ C the dense logits are
exact up to fp16). A build writes to `<key>.partial` and renames it when complete, sharded over torchrun ranks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ..data.loaders import SampleDataset, eval_transform
from ..data.resident import RENDERER as RESIDENT_RENDERER
from ..data.resident import ResidentImages, crop_padding, normalise, render
from ..data.sources import DataInfo
from ..distributed import DistEnv, barrier
from ..errors import UserError

if TYPE_CHECKING:
    from ..recipe_schema import Recipe

FORMAT = 1
DENSE_LAYOUT = "topk-logits+rest-mean"  # part of the key of dense caches: older layouts held probabilities
DEFAULT_DIR = Path(os.environ.get("KD2DEPLOY_CACHE", Path.home() / ".cache" / "kd2deploy")) / "teacher_outputs"


@dataclass(frozen=True)
class ViewSpec:
    """How stored views are drawn and rendered."""

    img_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    augment: bool  # False: one view, the eval transform
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    views: int
    seed: int
    renderer: str = "pil"  # "pil": timm/torchvision on PIL images; resident.RENDERER: batched on the device
    padding: int = 0  # > 0: the padded crop (boxes shifted by up to this many pixels), not the random-resized one

    @classmethod
    def from_recipe(cls, recipe: Recipe, info: DataInfo, renderer: str = "pil") -> ViewSpec:
        aug = recipe.data.augment
        return cls(img_size=info.img_size, interpolation=info.interpolation, mean=tuple(info.mean),
                   std=tuple(info.std), crop_pct=info.crop_pct, augment=aug.enabled, scale=tuple(aug.scale),
                   ratio=tuple(aug.ratio), hflip=aug.hflip, views=recipe.teacher_cache.views if aug.enabled else 1,
                   seed=recipe.optim.seed, renderer=renderer, padding=crop_padding(recipe.data))

    def draw(self, image: Any, image_index: int, view_index: int) -> np.ndarray:
        """(top, left, height, width, flip) of one view, from a generator seeded by (seed, image, view)."""
        if not self.augment:
            return np.zeros(5, dtype=np.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, image_index, view_index]).generate_state(1)[0]))
            if self.padding:  # in img_size coordinates, like data.train_transform's resize-then-pad
                top, left = (int(torch.randint(-self.padding, self.padding + 1, ())) for _ in range(2))
                height = width = self.img_size
            else:
                top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            flip = float(torch.rand(1).item() < self.hflip)
        return np.array([top, left, height, width, flip], dtype=np.float32)

    def render(self, image: Any, params: np.ndarray) -> Tensor:
        """The normalised view tensor for stored parameters: the same pixels every time."""
        if not self.augment:
            return _eval_transform(self)(image)
        top, left, height, width, flip = (int(v) for v in params)
        interpolation = InterpolationMode(self.interpolation)
        if self.padding:
            image = TF.pad(TF.resize(image, [self.img_size, self.img_size], interpolation, antialias=True),
                           self.padding, padding_mode="reflect")
            view = TF.crop(image, top + self.padding, left + self.padding, height, width)
        else:
            view = TF.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                                   interpolation=interpolation, antialias=True)
        if flip:
            view = TF.hflip(view)
        return TF.normalize(TF.to_tensor(view), list(self.mean), list(self.std))



@functools.cache
def _eval_transform(spec: ViewSpec) -> Any:
    """The eval transform of the no-augmentation mode, built once per spec rather than per image."""
    return eval_transform(DataInfo("", 0, [], spec.img_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct))


class _AllViews(Dataset):
    """Image i -> (its K views drawn and rendered (K, 3, H, W), their parameters (K, 5), i): the build pass."""

    def __init__(self, images: Dataset, spec: ViewSpec, indices: list[int]):
        self.images, self.spec, self.indices = images, spec, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        i = self.indices[item]
        image = self.images[i][0]
        params = np.stack([self.spec.draw(image, i, k) for k in range(self.spec.views)])
        return torch.stack([self.spec.render(image, p) for p in params]), torch.from_numpy(params), i


class StoredViewDataset(Dataset):
    """Training images rendered from stored view parameters; yields (view, target, view id = i·K + k)."""

    def __init__(self, images: Dataset, spec: ViewSpec, params: np.ndarray):
        self.images, self.spec, self.params = images, spec, params
        self.offsets = np.random.default_rng(spec.seed).integers(0, spec.views, size=len(images))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Which of its K views each image shows depends only on the epoch (so resume replays it)."""
        self.epoch = epoch

    def view_of(self, index: int) -> int:
        return int((self.epoch + self.offsets[index]) % self.spec.views)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, target = self.images[index]
        k = self.view_of(index)
        return self.spec.render(image, self.params[index, k]), target, index * self.spec.views + k

    def view_params(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The epoch's stored view of each image: its parameters (n, 5) and view ids (the resident path's batches)."""
        index = indices.numpy()
        k = (self.epoch + self.offsets[index]) % self.spec.views
        return torch.from_numpy(self.params[index, k]), torch.from_numpy(index * self.spec.views + k)


class TeacherCache:
    """The stored outputs of every teacher of a run, opened memory-mapped; `lookup` replaces the teachers."""

    def __init__(self, folders: list[Path], statuses: list[str]):
        self.folders, self.statuses = folders, statuses  # statuses: "hit" or "built", per teacher
        self.arrays = [_open_arrays(folder) for folder in folders]

    def lookup(self, view_ids: Tensor, device: torch.device) -> list[dict[str, Tensor]]:
        rows = view_ids.cpu().numpy()
        outputs = []
        for arrays in self.arrays:
            out = {"logits": torch.from_numpy(arrays["logits"][rows].astype(np.float32)).to(device)}
            if "dense_logit" in arrays:
                top = torch.from_numpy(arrays["dense_logit"][rows].astype(np.float32))
                index = torch.from_numpy(arrays["dense_index"][rows].astype(np.int64))
                classes = out["logits"].shape[-1]
                dense = torch.zeros(*top.shape[:2], classes)
                if "dense_rest" in arrays:  # the classes outside the top k get the mean of their logits
                    dense += torch.from_numpy(arrays["dense_rest"][rows].astype(np.float32))[..., None]
                out["dense"] = dense.scatter_(-1, index, top).to(device)
            outputs.append(out)
        return outputs


def _open_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.load(path, mmap_mode="r") for path in sorted(folder.glob("*.npy"))}


# ------------------------------------------------------------------------------------------------- cache keys
def tensor_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's weights and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_digest(images: Dataset) -> dict[str, Any]:
    """What identifies the training images: their count and, for file-backed datasets, every file's path, size,
    modification time and label (in order); for in-memory datasets (torchvision CIFAR) a hash of the pixels."""
    indices = None
    while isinstance(images, Subset):
        indices = images.indices if indices is None else [images.indices[i] for i in indices]
        images = images.dataset
    order = indices if indices is not None else range(len(images))
    digest = hashlib.sha256()
    if hasattr(images, "samples"):
        for i in order:
            path, target = images.samples[i]
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{target}\n".encode())
    else:
        data, targets = images.data, images.targets
        for i in order:
            digest.update(np.ascontiguousarray(data[i]).tobytes())
            digest.update(str(targets[i]).encode())
    kind = next(c.__name__ for c in type(images).__mro__ if not c.__module__.startswith("kd2deploy"))
    return {"type": kind, "root": str(getattr(images, "root", "")), "count": len(order),
            "sha256": digest.hexdigest()}


def cache_key(teacher: dict[str, Any], data: dict[str, Any], spec: ViewSpec, signature: dict[str, Any],
              dense_topk: int) -> tuple[str, dict[str, Any]]:
    fields = {"format": FORMAT, "teacher": teacher, "data": data, "views": asdict(spec), "outputs": signature,
              "dense_topk": [dense_topk, DENSE_LAYOUT] if "dense" in signature.get("outputs", []) else None}
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest(), fields


# ------------------------------------------------------------------------------------------------- building
def _valid(folder: Path, key: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = _open_arrays(folder)
    except (OSError, ValueError):
        return False
    rows = meta.get("rows")
    return meta.get("key") == key and "logits" in arrays and all(
        len(array) == rows for name, array in arrays.items() if name != "views")


def cache_dir(cfg: Any) -> Path:
    """The folder of a recipe's `teacher_cache` section: its `dir`, or DEFAULT_DIR."""
    return Path(cfg.dir) if cfg.dir is not None else DEFAULT_DIR


def prepare_teacher_cache(distiller: Any, train_set: SampleDataset, info: DataInfo, recipe: Recipe, env: DistEnv,
                          console: Console, resident: ResidentImages | None = None) -> StoredViewDataset:
    """Open (or build) the cache of every teacher, attach it to the distiller and return the training dataset
    that renders the stored views. With `resident` images, the views are rendered by the resident path's renderer
    when building, as they will be in training. Raises UserError for setups the cache cannot serve correctly."""
    check_cacheable(distiller, recipe)
    cfg = recipe.teacher_cache
    root = cache_dir(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the teacher-output cache folder {root} (teacher_cache.dir): {exc}. Point "
                        "`teacher_cache.dir` at a writable folder.") from None
    images = train_set.dataset
    spec = ViewSpec.from_recipe(recipe, info, renderer="pil" if resident is None else RESIDENT_RENDERER)
    data = dataset_digest(images)
    signature = distiller.teacher_output_signature()
    folders, keys, fields = [], [], []
    for t, teacher_spec in enumerate(recipe.teachers):
        teacher = {"name": teacher_spec.name, "kwargs": teacher_spec.kwargs, "num_classes": info.num_classes,
                   "weights_sha256": tensor_digest(distiller.teachers[t])}
        key, key_fields = cache_key(teacher, data, spec, signature, cfg.dense_topk)
        folders.append(root / key[:32])
        keys.append(key)
        fields.append(key_fields)
    missing = [t for t, (folder, key) in enumerate(zip(folders, keys, strict=True)) if not _valid(folder, key)]
    if missing:
        _build(distiller, images, spec, missing, folders, keys, fields, cfg, recipe.data.num_workers, env, console,
               resident)
    statuses = ["built" if t in missing else "hit" for t in range(len(folders))]
    views = [np.load(folder / "views.npy") for folder in folders]
    if any(not np.array_equal(views[0], v) for v in views[1:]):  # never pair outputs with another view
        raise UserError(f"The teacher caches in {root} hold different views of the same images. Delete them "
                        "(teacher_cache.dir) and train again to rebuild them.")
    if env.is_main:
        for t, (folder, status) in enumerate(zip(folders, statuses, strict=True)):
            console.print(f"Teacher-output cache for teachers.{t} ({recipe.teachers[t].name}): {status}, {folder}")
    distiller.teacher_cache = TeacherCache(folders, statuses)
    return StoredViewDataset(images, spec, views[0])


def check_cacheable(distiller: Any, recipe: Recipe) -> None:
    aug = recipe.data.augment
    if not distiller.cacheable:
        raise UserError(f"distill.method `{recipe.distill.method}` reads more than the teachers' outputs (e.g. "
                        "their features) every step, so it cannot use a teacher-output cache. Set "
                        "`teacher_cache.enabled: false`.")
    if not recipe.teachers:
        raise UserError("`teacher_cache.enabled: true` needs at least one teacher. Add a teacher or disable the cache.")
    if aug.enabled:
        changing = {"data.augment.color_jitter": aug.color_jitter, "data.augment.auto_augment": aug.auto_augment,
                    "data.augment.re_prob": aug.re_prob, "data.augment.mixup": aug.mixup,
                    "data.augment.cutmix": aug.cutmix, "data.augment.cutout": aug.cutout}
        on = [name for name, value in changing.items() if value]
        if on:
            raise UserError(
                f"The teacher-output cache stores outputs for crop-and-flip views only, but {', '.join(on)} would "
                "change the pixels after the teacher saw them, pairing stored outputs with a different view. Set "
                f"{' and '.join(f'`{name}`' for name in on)} to null/0, or set `teacher_cache.enabled: false`.")


def _build(distiller: Any, images: Dataset, spec: ViewSpec, missing: list[int], folders: list[Path],
           keys: list[str], fields: list[dict[str, Any]], cfg: Any, num_workers: int, env: DistEnv,
           console: Console, resident: ResidentImages | None = None) -> None:
    """Compute the missing teachers' outputs over every stored view, each rank a strided share of the images."""
    n, k = len(images), spec.views
    partials = [folders[t].with_name(folders[t].name + ".partial") for t in missing]
    probe = _AllViews(images, spec, [0])[0][0][:1].to(env.device)
    with torch.no_grad():
        shapes = {t: {name: tuple(v.shape[1:]) for name, v in distiller.teacher_output(t, probe).items()}
                  for t in missing}
    if env.is_main:
        for t, partial in zip(missing, partials, strict=True):
            shutil.rmtree(partial, ignore_errors=True)  # a crashed build's leftovers
            partial.mkdir(parents=True)
            _create_arrays(partial, shapes[t], n, k, cfg.dense_topk)
    barrier(env)
    arrays = {t: {path.stem: np.load(path, mmap_mode="r+") for path in sorted(partial.glob("*.npy"))}
              for t, partial in zip(missing, partials, strict=True)}
    share = list(range(env.rank, n, env.world_size))
    per_batch = max(1, cfg.batch_size // k)
    if resident is None:
        loader = DataLoader(_AllViews(images, spec, share), batch_size=per_batch, num_workers=num_workers)
    else:
        loader = _ResidentViews(resident, spec, share, per_batch)
    start = time.perf_counter()
    with Progress(TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=not env.is_main) as progress:
        task = progress.add_task("cache", total=len(loader))
        for views, params, index in loader:
            rows = (index[:, None] * k + torch.arange(k)).flatten().numpy()
            batch = views.flatten(0, 1).to(env.device, non_blocking=True)
            with torch.no_grad():
                for t in missing:
                    _write_rows(arrays[t], index.numpy(), rows, params.numpy(), distiller.teacher_output(t, batch))
            progress.advance(task)
    for a in arrays.values():
        for array in a.values():
            array.flush()
    del arrays
    barrier(env)
    if env.is_main:
        seconds = time.perf_counter() - start
        for t, partial in zip(missing, partials, strict=True):
            meta = {"key": keys[t], "rows": n * k, "images": n, "views": k, "built_s": round(seconds, 1),
                    "fields": fields[t]}
            (partial / "meta.json").write_text(json.dumps(meta, indent=1, default=list))
            shutil.rmtree(folders[t], ignore_errors=True)  # an invalid (corrupt or incomplete) cache
            partial.rename(folders[t])
        console.print(f"Computed teacher outputs for {n} images x {k} views in {seconds:.1f} s")
    barrier(env)


class _ResidentViews:
    """The build pass over resident images: batches of (views (B, K, 3, H, W), parameters (B, K, 5), indices), drawn
    like `_AllViews` and rendered by the resident renderer."""

    def __init__(self, resident: ResidentImages, spec: ViewSpec, indices: list[int], per_batch: int):
        self.resident, self.spec, self.indices, self.per_batch = resident, spec, indices, per_batch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.per_batch)

    def __iter__(self):
        k = self.spec.views
        for start in range(0, len(self.indices), self.per_batch):
            index = torch.tensor(self.indices[start:start + self.per_batch])
            pixels = self.resident.pixels[index.to(self.resident.pixels.device)]
            params = torch.from_numpy(np.stack([[self.spec.draw(pixels[b], int(i), v) for v in range(k)]
                                                for b, i in enumerate(index.tolist())]))
            repeated = pixels.repeat_interleave(k, dim=0)
            if self.spec.augment:
                views = render(repeated, params.flatten(0, 1), self.spec.img_size, self.spec.mean, self.spec.std,
                               self.spec.padding)
            else:
                views = normalise(repeated, self.spec.mean, self.spec.std)
            yield views.unflatten(0, (len(index), k)), params, index


def _create_arrays(folder: Path, shapes: dict[str, tuple[int, ...]], n: int, k: int, topk: int) -> None:
    np.lib.format.open_memmap(folder / "views.npy", mode="w+", dtype=np.float32, shape=(n, k, 5))
    np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float16, shape=(n * k, *shapes["logits"]))
    if "dense" in shapes:
        positions, classes = shapes["dense"]
        top = min(topk, classes)
        index_dtype = np.int16 if classes < 2**15 else np.int32
        np.lib.format.open_memmap(folder / "dense_logit.npy", mode="w+", dtype=np.float16,
                                  shape=(n * k, positions, top))
        np.lib.format.open_memmap(folder / "dense_index.npy", mode="w+", dtype=index_dtype,
                                  shape=(n * k, positions, top))
        if top < classes:
            np.lib.format.open_memmap(folder / "dense_rest.npy", mode="w+", dtype=np.float16, shape=(n * k, positions))


def _write_rows(arrays: dict[str, np.ndarray], index: np.ndarray, rows: np.ndarray, params: np.ndarray,
                outputs: dict[str, Tensor]) -> None:
    arrays["views"][index] = params
    arrays["logits"][rows] = outputs["logits"].float().cpu().numpy().astype(np.float16)
    if "dense" in outputs:
        dense = outputs["dense"].float()
        top = arrays["dense_logit"].shape[-1]
        values, cls = dense.topk(top, dim=-1)
        arrays["dense_logit"][rows] = values.cpu().numpy().astype(np.float16)
        arrays["dense_index"][rows] = cls.cpu().numpy().astype(arrays["dense_index"].dtype)
        if "dense_rest" in arrays:
            rest = (dense.sum(dim=-1) - values.sum(dim=-1)) / (dense.shape[-1] - top)
            arrays["dense_rest"][rows] = rest.cpu().numpy().astype(np.float16)
