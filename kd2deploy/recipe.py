"""Recipes: YAML files validated by pydantic, with dotted command-line overrides and key migrations.

The schema lives in `kd2deploy.recipe_schema` (which every later stage reads, so it imports none of them); this
module loads files and also checks the names later stages register (distillation methods and their parameters, timm
models) and the files a recipe points to. Every problem becomes a RecipeError that names the file, the field path
and what was expected. The bundled recipes are package data (`kd2deploy/recipes/`), so a wheel install has them too.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .data.sources import get_dataset
from .errors import RecipeError, validation_problems
from .recipe_schema import (
    AugmentConfig,
    DataConfig,
    DistillConfig,
    ModelSpec,
    OptimConfig,
    OutputConfig,
    Recipe,
    TeacherCacheConfig,
    migrate_data_section,
    single_teacher_to_list,
)

__all__ = [
    "AugmentConfig", "DataConfig", "DistillConfig", "ModelSpec", "OptimConfig", "OutputConfig", "Recipe",
    "TeacherCacheConfig", "apply_override", "bundled_recipes_dir", "check_files", "check_model_name",
    "distill_params", "find_recipe", "load_recipe", "migrate_data_section", "missing_files", "parse_overrides",
    "resolved_recipe", "single_teacher_to_list", "validate_recipe",
]


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


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """Plain, JSON-safe dict of every field, defaults filled in (the method's too): what checkpoints carry."""
    resolved = recipe.model_dump(mode="json")
    resolved["distill"] = {"method": recipe.distill.method, **distill_params(recipe).model_dump(mode="json")}
    return resolved


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
