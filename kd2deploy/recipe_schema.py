"""The recipe's schema: its sections as pydantic models, with their defaults and descriptions.

Every later stage (data, distill, train, deploy) reads its section from here. This module checks only what a section
can check on its own (types, ranges, a registered dataset); `kd2deploy.recipe` loads YAML files and also checks the
names that later stages register (distillation methods, timm models) and the files a recipe points to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .data.sources import dataset_names


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(Section):
    """A timm model: `name` is any timm model name (or one kd2deploy registers with timm)."""

    name: str
    pretrained: bool = Field(False, description="load timm's pretrained weights (needs the internet or a HF cache)")
    checkpoint: Path | None = Field(None, description="local weights: a kd2deploy checkpoint or a plain state_dict")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model keyword arguments")


class AugmentConfig(Section):
    """Training augmentation, built by timm.data.create_transform and timm.data.Mixup."""

    enabled: bool = Field(True, description="false trains on the eval transform (no randomness)")
    crop: Literal["random_resized", "padded"] = Field(
        "random_resized", description="random_resized: timm's RandomResizedCrop over scale and ratio; padded: the "
                                      "CIFAR rule, reflect-pad by `padding` pixels and crop img_size at random "
                                      "(scale and ratio unused)")
    padding: int = Field(4, ge=0, description="pixels of reflect padding on each side for crop: padded")
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = 0.4
    auto_augment: str | None = Field(None, description="timm auto-augment string, e.g. rand-m9-mstd0.5")
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability")
    cutout: int = Field(0, ge=0, description="Cutout (DeVries & Taylor 2017): zero a square of this many pixels at a "
                                             "random centre of every training image, after normalisation; 0: off")
    mixup: float = Field(0.0, ge=0, description="mixup alpha, 0 disables")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha, 0 disables")
    mixup_prob: float = Field(1.0, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class DataConfig(Section):
    dataset: str = Field("mini_cifar10", description="a registered dataset: mini_cifar10, cifar10, cifar100, "
                                                    "imagefolder (kd2deploy.data.sources)")
    root: Path | None = Field(None, description="dataset root; for imagefolder the folder holding train/ and val/")
    download: bool = Field(False, description="let torchvision download CIFAR into root")
    train_dir: str = "train"
    val_dir: str = "val"
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="imagefolder without a val folder: hold out this seeded fraction of train"
    )
    split_rng: Literal["numpy", "torch"] = Field(
        "numpy", description="the generator of the val_fraction split; torch only in runs recorded by kd2deploy < 0.2")
    img_size: int = Field(32, ge=8)
    mean: tuple[float, float, float] | None = Field(None, description="defaults to the dataset's statistics")
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = Field(1.0, gt=0, le=1)
    train_subset: int | None = Field(None, ge=1, description="train on a seeded random subset of this many images")
    max_bad_fraction: float = Field(0.001, ge=0, le=1, description="image folders: the largest fraction of "
                                    "unreadable images that training leaves out (more stops the run, exit 2)")
    num_workers: int = Field(2, ge=0)
    on_device: bool | Literal["auto"] = Field(
        "auto", description="keep the decoded training set on the training device and augment it there in batches "
                            "(no loader processes); auto: when it fits on_device_limit_mb and the augmentation is "
                            "crop/flip only")
    on_device_limit_mb: int = Field(4096, ge=1, description="largest decoded (uint8) training set kept on the device")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("dataset")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in dataset_names():
            raise ValueError(f"unknown dataset; expected one of {', '.join(dataset_names())}")
        return name


class DistillConfig(BaseModel):
    """`method` picks a registered Distiller; the other keys are that method's parameters."""

    model_config = ConfigDict(extra="allow")
    method: str | None = Field(None, description="kd, deit, none; defaults to kd with teachers, none without")


class OptimConfig(Section):
    optimizer: str = Field("sgd", description="any timm.optim.create_optimizer_v2 name: sgd, adamw, lamb...")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-4, ge=0)
    min_lr: float = Field(0.0, ge=0)
    decay_epochs: float = Field(30, gt=0, description="step schedule: epochs between decays")
    decay_milestones: list[int] = Field(default_factory=lambda: [60, 120, 160], description="multistep schedule")
    decay_rate: float = Field(0.1, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch, split evenly over torchrun processes")
    amp: bool | Literal["auto"] = Field(
        False, description="mixed precision: amp_dtype autocast on CUDA, bfloat16 on CPUs with native bf16 "
                           "(AVX512-BF16/AMX); auto: on wherever the hardware supports it")
    amp_dtype: Literal["float16", "bfloat16"] = Field("float16", description="the autocast dtype on CUDA")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="NHWC memory layout for the models; auto: for convolutional ones")
    compile: bool = Field(False, description="torch.compile the student (compile time reported apart)")
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="CPU intra-op threads; auto: the usable cores other processes leave free, per epoch")
    clip_grad: float | None = Field(None, gt=0)
    seed: int = 0


class TeacherCacheConfig(Section):
    """Precomputed teacher outputs (kd2deploy/teacher_cache.py): computed once, memory-mapped, shared by runs."""

    enabled: bool = Field(False, description="read teacher outputs from the cache instead of running the teachers")
    views: int = Field(4, ge=1, description="stored crop/flip views per image (FKD-style); 1 when augment is off")
    dir: Path | None = Field(None, description="cache folder (also of SSKD's teacher head, which is trained once "
                                               "even when the cache is off); default "
                                               "$KD2DEPLOY_CACHE/teacher_outputs or ~/.cache/kd2deploy/teacher_outputs")
    dense_topk: int = Field(10, ge=1, description="dense (per-position, CSKD) logits keep the top-k per position; "
                                                  "the rest are stored as their mean")
    batch_size: int = Field(256, ge=1, description="views per teacher forward while building")


class OutputConfig(Section):
    dir: Path = Field(Path("runs/{name}"), description="run folder; {name} is the recipe name")
    save_every: int = Field(1, ge=1, description="write the resumable checkpoint every N epochs")
    tensorboard: bool = Field(True, description="also log to TensorBoard when it is installed")


class Recipe(Section):
    name: str
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: list[ModelSpec] = Field(default_factory=list)
    student: ModelSpec
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _single_teacher(cls, data: Any) -> Any:
        if isinstance(data, dict) and "teacher" in data:
            if "teachers" in data:
                raise ValueError("give either `teacher` or `teachers`, not both")
            data = dict(data)
            single_teacher_to_list(data)
        return data

    @property
    def run_dir(self) -> Path:
        return Path(str(self.output.dir).format(name=self.name))


def single_teacher_to_list(raw: dict) -> None:
    """`teacher:` is shorthand for a one-element `teachers:` list; rewrite it in place."""
    if "teacher" in raw:
        teacher = raw.pop("teacher")
        raw["teachers"] = [] if teacher is None else [teacher]


def migrate_data_section(data: dict[str, Any]) -> dict[str, Any]:
    """A data section recorded in a checkpoint or manifest, in today's schema: sections written before kd2deploy 0.2
    held out val_fraction with torch's generator and have no `split_rng`."""
    return {"split_rng": "torch", **data}
