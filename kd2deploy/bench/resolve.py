"""What `kd2deploy eval` and `kd2deploy bench` measure, from the path a user gives, and the val images to score it
on: a run folder or its student.pt (PyTorch rows), an export folder (its artifacts, plus PyTorch rows while the
student.pt they came from is on this machine), or one artifact file inside an export folder. Top-1 is measured on
the run's own val split (rebuilt from its recorded data section) or on --val DIR. Torch-free except for PyTorch
rows."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..backends import artifact_suffixes, get_backend
from ..data.sources import recorded_val_set
from ..data.valset import EvalTransform, LabelledImages, image_folder
from ..deploy.manifest import (
    MANIFEST,
    Deployable,
    artifact_deployable,
    data_config,
    load_manifest,
    manifest_deployables,
    source_deployable,
)
from ..errors import UserError
from ..student import find_student, read_student


def accepted() -> str:
    return ("a run folder (holding student.pt), a student.pt, an export folder (holding manifest.json) or an "
            f"artifact file ({', '.join(artifact_suffixes())}) inside an export folder")


@dataclass
class ModelUnderTest:
    """One model: the deployables to measure, its input, params/GFLOPs and the val images top-1 is measured on."""

    name: str
    folder: Path  # where a report about it goes by default
    deployables: list[Deployable]
    input_shape: list[int]
    complexity: dict[str, Any]
    images: LabelledImages | None


def pytorch_deployables(path: Path, backends: Sequence[str]) -> list[Deployable]:
    """Rows of a student.pt, one per PyTorch backend (eager, compiled); each uses the checkpoint as its file."""
    return [Deployable(f"{name}-fp32", name, "fp32", path) for name in backends]


def val_images(data: dict[str, Any], seed: int, class_names: Sequence[str], transform: EvalTransform,
               samples: int | None, val_dir: Path | None, where: Path) -> LabelledImages:
    """`val_dir` (one sub-folder per class) when given, else the recorded run's val split; `samples` spread evenly."""
    if val_dir is not None:
        return image_folder(val_dir, class_names, transform, "--val").spread(samples)
    return recorded_val_set(data_config(data, where).model_dump(), seed, class_names, transform, samples, str(where))


def manifest_val_set(manifest: dict[str, Any], folder: Path, samples: int | None = None,
                     val_dir: Path | None = None) -> LabelledImages | None:
    if samples == 0:
        return None
    return val_images(manifest["data"], manifest["split_seed"], manifest["class_names"],
                      EvalTransform.from_input(manifest["input"]), samples, val_dir, folder / MANIFEST)


def _complexity(student: Path, input_shape: Sequence[int]) -> dict[str, Any]:
    from ..models import model_complexity
    from ..student import load_student

    return model_complexity(load_student(student)[0], tuple(input_shape))


def _from_student(path: Path, samples: int | None, val_dir: Path | None, backends: Sequence[str],
                  complexity: bool) -> ModelUnderTest:
    reason = get_backend("pytorch").unavailable()
    if reason:
        raise UserError(f"{path} is a PyTorch checkpoint, but {reason}.")
    checkpoint = read_student(path)
    info, recipe = checkpoint["data"], checkpoint["recipe"]
    shape = [3, info["img_size"], info["img_size"]]
    images = None if samples == 0 else val_images(recipe["data"], recipe["optim"]["seed"], info["class_names"],
                                                  EvalTransform.from_input(info), samples, val_dir, path)
    return ModelUnderTest(checkpoint["model"]["name"], path.parent, pytorch_deployables(path, backends), shape,
                          _complexity(path, shape) if complexity else {}, images)


def _from_export(folder: Path, samples: int | None, val_dir: Path | None, console: Console,
                 backends: Sequence[str], complexity: bool) -> ModelUnderTest:
    manifest = load_manifest(folder)
    deployables = manifest_deployables(folder, manifest)  # checks every file's sha256 before anything runs
    shape = list(manifest["input"]["shape"])
    known = {k: manifest["model"][k] for k in ("params", "gflops") if k in manifest["model"]}
    source = source_deployable(manifest) if backends else None
    if backends and source is None:
        console.print(f"[yellow]{folder}: no PyTorch rows, {manifest['source_checkpoint']['path']} is not on this "
                      "machine, or is no longer the checkpoint these artifacts were exported from.[/yellow]")
    elif source is not None and (reason := get_backend("pytorch").unavailable()):
        console.print(f"[yellow]Skipping the PyTorch rows of {folder}: {escape(reason)}.[/yellow]")
    elif source is not None:
        deployables = pytorch_deployables(source.path, backends) + deployables
        if complexity and "gflops" not in known:  # exported before kd2deploy recorded it
            known = _complexity(source.path, shape)
    return ModelUnderTest(manifest["model"]["name"], folder, deployables, shape, known,
                          manifest_val_set(manifest, folder, samples, val_dir))


def _from_artifact(path: Path, samples: int | None, val_dir: Path | None) -> ModelUnderTest:
    folder = next((p for p in path.parents if (p / MANIFEST).is_file()), path.parent)
    manifest = load_manifest(folder)
    records = [r for r in manifest["artifacts"] if (folder / r["file"]).resolve() == path.resolve()]
    if not records:
        raise UserError(f"{path} is not listed in {folder / MANIFEST}. Give an artifact written by "
                        "`kd2deploy export`, inside its export folder.")
    chosen = [artifact_deployable(folder, records[0])]  # checks this artifact's files only
    known = {k: manifest["model"][k] for k in ("params", "gflops") if k in manifest["model"]}
    return ModelUnderTest(manifest["model"]["name"], path.parent, chosen, list(manifest["input"]["shape"]), known,
                          manifest_val_set(manifest, folder, samples, val_dir))


def resolve(path: Path, samples: int | None = None, val_dir: Path | None = None, console: Console | None = None,
            pytorch_backends: Sequence[str] = ("pytorch",), source_rows: bool = False,
            complexity: bool = False) -> ModelUnderTest:
    """The model at `path` and its val images (`samples` of them spread evenly; None: all, 0: none).
    `pytorch_backends` name the rows a student.pt gets; `source_rows` adds them to an export folder's artifacts
    while its student.pt is here; `complexity` fills in params/GFLOPs (from the manifest, or by loading the student)."""
    path, console = Path(path), console or Console()
    if not path.exists():
        raise UserError(f"{path} does not exist. Give {accepted()}.")
    if path.is_dir() and (path / MANIFEST).is_file():
        return _from_export(path, samples, val_dir, console, pytorch_backends if source_rows else (), complexity)
    if path.is_file() and path.suffix in artifact_suffixes():
        return _from_artifact(path, samples, val_dir)
    student = find_student(path)
    if student is None:
        raise UserError(f"{path} is none of what kd2deploy measures: {accepted()}.")
    return _from_student(student, samples, val_dir, pytorch_backends, complexity)
