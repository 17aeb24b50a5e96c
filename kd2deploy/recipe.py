"""Recipes: YAML files validated by pydantic, with dotted command-line overrides and key migrations.

Every problem becomes a RecipeError that names the file, the field path and what was expected. The bundled recipes
are package data (`kd2deploy/recipes/`), so a wheel install has them too.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.sources import dataset_names, get_dataset
from .errors import RecipeError, validation_problems


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

    def resolved(self) -> dict[str, Any]:
        """Plain, JSON-safe dict of every field, defaults filled in (the method's too): what checkpoints carry."""
        resolved = self.model_dump(mode="json")
        resolved["distill"] = {"method": self.distill.method, **distill_params(self).model_dump(mode="json")}
        return resolved


# ----------------------------------------------------------------------------------------- loading


def single_teacher_to_list(raw: dict) -> None:
    """`teacher:` is shorthand for a one-element `teachers:` list; rewrite it in place."""
    if "teacher" in raw:
        teacher = raw.pop("teacher")
        raw["teachers"] = [] if teacher is None else [teacher]


def parse_overrides(overrides: list[str], file: str | None = None) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(file, None, f"override `{item}` is not of the form dotted.key=value.",
                              "Write for example optim.lr=0.05.")
        try:
            parsed.append((key.strip().split("."), yaml.safe_load(value) if value != "" else None))
        except yaml.YAMLError:
            parsed.append((key.strip().split("."), value))
    return parsed


def apply_override(raw: dict, path: list[str], value: Any, file: str | None) -> None:
    if path[0] == "teacher":  # `teacher.x=...` addresses the single teacher, in whichever form the file has
        if len(path) == 1:
            raw["teachers"] = [] if value is None else [value]
            return
        teachers = raw.get("teachers") or []
        raw["teachers"] = teachers if teachers else [{}]
        path = ["teachers", "0", *path[1:]]
    node: Any = raw
    for depth, key in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(file, where, f"override indexes a list of {len(node)} items with `{key}`.",
                                  "Use a 0-based index into the existing list.")
            node = node[int(key)]
        elif isinstance(node, dict):
            if node.get(key) is None:  # absent or `key: null`
                node[key] = {}
            node = node[key]
        else:
            raise RecipeError(file, where, "override walks into a value that is not a mapping.", "")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(file, ".".join(path), "override indexes past the end of a list.", "")
        node[int(last)] = value
    else:
        node[last] = value


def _format_validation_error(err: ValidationError, file: str | None) -> RecipeError:
    return RecipeError(file, None, validation_problems(err, _known_keys_hint) + ".",
                       "Correct the value in the file or the command-line override; "
                       "`kd2deploy recipes show RECIPE` prints a recipe with every default filled in.")


def _known_keys_hint(loc: tuple) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    keys = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"{hint}; expected one of: {', '.join(keys)}" if keys else ""


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_names: bool = True) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError on any problem."""
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(file, None, "the file does not exist.",
                          "Give the path of a YAML recipe; `kd2deploy recipes list` shows the bundled ones.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(file, None, f"is not valid YAML{where}: {getattr(exc, 'problem', exc)}.",
                          "Fix the YAML syntax (indentation, colons, quotes).") from None
    if not isinstance(raw, dict):
        raise RecipeError(file, None, "must be a YAML mapping of sections (name, data, student, ...).", "")
    if "teachers" not in raw:  # one form, so overrides can address either
        single_teacher_to_list(raw)
    for keys, value in parse_overrides(overrides or [], file):
        apply_override(raw, keys, value, file)
    return validate_recipe(raw, file, check_names=check_names)


def validate_recipe(raw: dict, file: str | None = None, check_names: bool = True) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err, file) from None
    _check_distill(recipe, file)
    if check_names:
        for i, spec in enumerate(recipe.teachers):
            check_model_name(spec.name, file, f"teachers.{i}.name")
        check_model_name(recipe.student.name, file, "student.name")
    return recipe


def _check_distill(recipe: Recipe, file: str | None) -> None:
    from .distill import get_method_class, method_names

    method = recipe.distill.method or ("kd" if recipe.teachers else "none")
    recipe.distill.method = method
    try:
        cls = get_method_class(method)
    except KeyError:
        close = difflib.get_close_matches(method, method_names(), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise RecipeError(file, "distill.method", f"unknown method `{method}`.",
                          f"Expected one of: {', '.join(method_names())}.{hint}") from None
    params = {k: v for k, v in (recipe.distill.model_extra or {}).items()}
    try:
        cls.Params.model_validate(params)
    except ValidationError as err:
        e = err.errors()[0]
        loc = "distill." + ".".join(str(x) for x in e["loc"])
        known = ", ".join(cls.Params.model_fields) or "(none)"
        msg = "is not a parameter of this method" if e["type"] == "extra_forbidden" else e["msg"]
        raise RecipeError(file, loc, f"{msg} (method `{method}`).",
                          f"Parameters of `{method}`: {known}.") from None
    n_teachers = len(recipe.teachers)
    if not cls.min_teachers <= n_teachers <= cls.max_teachers:
        want = (f"exactly {cls.min_teachers}" if cls.min_teachers == cls.max_teachers
                else f"{cls.min_teachers} to {cls.max_teachers}")
        raise RecipeError(file, "teachers",
                          f"method `{method}` needs {want} teacher(s), the recipe gives {n_teachers}.",
                          "Add or remove `teacher`/`teachers` entries, or pick another `distill.method`.")


def distill_params(recipe: Recipe) -> BaseModel:
    from .distill import get_method_class

    cls = get_method_class(recipe.distill.method or "none")
    return cls.Params.model_validate(dict(recipe.distill.model_extra or {}))


def check_model_name(name: str, file: str | None, field: str) -> None:
    import timm

    from . import models  # noqa: F401  registers kd2deploy's own timm models

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise RecipeError(file, field, f"`{name}` is not a timm model name.",
                      "Use a name from timm.list_models() (e.g. resnet18, mobilenetv2_100, deit_tiny_patch16_224)."
                      f"{hint}")


def missing_files(recipe: Recipe) -> list[tuple[str, str]]:
    """(field, problem) for every referenced file or folder that does not exist yet."""
    problems = []
    for i, spec in enumerate(recipe.teachers):
        if spec.checkpoint is not None and not spec.checkpoint.is_file():
            problems.append((f"teachers.{i}.checkpoint", f"{spec.checkpoint} does not exist"))
    if recipe.student.checkpoint is not None and not recipe.student.checkpoint.is_file():
        problems.append(("student.checkpoint", f"{recipe.student.checkpoint} does not exist"))
    data, source = recipe.data, get_dataset(recipe.data.dataset)
    if source.needs_root:
        if data.root is None:
            problems.append(("data.root", f"dataset `{data.dataset}` needs a root folder"))
        elif not data.root.exists() and not (data.download and source.downloadable):
            problems.append(("data.root", f"{data.root} does not exist"))
    return problems


def check_files(recipe: Recipe, file: str | None) -> None:
    problems = missing_files(recipe)
    if problems:
        field, problem = problems[0]
        raise RecipeError(file, field, problem + ".",
                          "Fix the path (relative paths start from the current folder), or produce the file first, "
                          "e.g. train the teacher with its own recipe.")


def migrate_data_section(data: dict[str, Any]) -> dict[str, Any]:
    """A data section recorded in a checkpoint or manifest, in today's schema: sections written before kd2deploy 0.2
    held out val_fraction with torch's generator and have no `split_rng`."""
    return {"split_rng": "torch", **data}


def bundled_recipes_dir() -> Path:
    """The recipes shipped inside the package (package data: present in wheel and editable installs alike)."""
    return Path(__file__).resolve().parent / "recipes"


def find_recipe(name_or_path: str) -> Path:
    """A path, or the name of a bundled recipe (with or without .yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    bundled = bundled_recipes_dir()  # `recipes/NAME.yaml` as README writes it works from any folder
    for candidate in (bundled / name_or_path, bundled / f"{name_or_path}.yaml", bundled / p.name):
        if candidate.is_file():
            return candidate
    return p
