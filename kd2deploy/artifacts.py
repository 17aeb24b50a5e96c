"""Export folders and what reads them: manifest.json, the data artifacts are checked on, and `kd2deploy eval`."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from rich.console import Console
from rich.segment import Segments
from rich.table import Column, Table
from torch import nn
from torch.utils.data import Dataset, Subset

from .backends import Backend, get_backend
from .checkpoint import sha256
from .data import build_datasets, eval_loader
from .engine import STUDENT, load_student
from .errors import UserError
from .evaluate import evaluate
from .recipe import DataConfig

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kd2deploy.manifest/1"
EVAL_BATCH = 64
ACCEPTED_TARGETS = ("a run folder (holding student.pt), a student.pt, an export folder (holding manifest.json) "
                    "or an artifact file (.onnx, .xml, .engine) inside an export folder")
ARTIFACT_SUFFIXES = (".onnx", ".xml", ".engine")


def print_table(console: Console, table: Table) -> None:
    """Print at the table's natural width when the output is not a terminal (a log, a file), where rich would
    squeeze it into 80 columns and truncate the cells."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    options = console.options.update_width(max(console.width, natural))
    console.print(Segments(console.render(table, options)), crop=False)


def check_summary(check: dict[str, Any], with_top1: bool = False) -> str:
    """One line for an artifact's export verification: logit parity (FP32/FP16) or top-1 agreement (INT8)."""
    if "skipped" in check:
        return "not verified at export"
    if "max_abs_diff" in check:
        text = f"max |Δ logit| {check['max_abs_diff']:.2g} (atol {check['atol']:g})"
    else:
        text = f"top-1 agreement {check['top1_agreement']:.1f}%"
    if with_top1:
        text += f"; top-1 {check['top1']:.2f}% on {check['samples']} images"
    return text


# ----------------------------------------------------------------------------------------- data
def data_config(data_section: dict[str, Any], source: Path) -> DataConfig:
    """The recipe's data section, validated again: it rebuilds the exact train/val split of the run."""
    try:
        return DataConfig.model_validate(data_section)
    except ValidationError as exc:
        raise UserError(f"The data section recorded in {source} is not valid ({exc.errors()[0]['msg']}). "
                        "It was edited or written by another kd2deploy version; re-export the run.") from None


def spread_subset(dataset: Dataset, n: int | None) -> Dataset:
    """n images spread evenly over the split (all of them when n is None or larger): ImageFolder splits are
    sorted by class, so the first n images would cover only a few classes."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


def random_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    return Subset(dataset, sorted(np.random.default_rng(seed).choice(len(dataset), n, replace=False).tolist()))


def numpy_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images float32 NCHW, targets) batches in dataset order: what every runner takes."""
    for images, targets, _ in eval_loader(dataset, batch_size, num_workers=0):
        yield images.numpy(), targets.numpy()


class _RunnerModule(nn.Module):
    """Wraps a backend's runner as a module, so evaluate() (written for PyTorch models) scores any backend."""

    def __init__(self, runner: Backend):
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner.run(images.numpy()))


def evaluate_runner(runner: Backend, dataset: Dataset, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """{loss, top1, top5, count} of a runner on a dataset of (image, target, index)."""
    return evaluate(_RunnerModule(runner), eval_loader(dataset, batch_size, num_workers=0))


# ----------------------------------------------------------------------------------------- manifests
@dataclass
class Deployable:
    """Something a backend runs, named for tables: an artifact from a manifest, or a student checkpoint."""

    name: str
    backend: str
    precision: str
    path: Path
    record: dict[str, Any] | None = None  # the manifest entry, with the export's verification

    @property
    def size_bytes(self) -> int:
        """All the artifact's files (OpenVINO's weights are in the .bin beside the .xml)."""
        return self.record["size_bytes"] if self.record else self.path.stat().st_size

    def load(self, threads: int = 0) -> Backend:
        return get_backend(self.backend).load(self.path, threads)


def load_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"Export folder {folder} does not exist. Create it with `kd2deploy export RUN_DIR` "
                        "(it writes RUN_DIR/export unless given --out).")
    if not path.is_file():
        raise UserError(f"{folder} holds no {MANIFEST}, so it is not an export folder (or its export failed "
                        "verification). Create one with `kd2deploy export RUN_DIR`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}). It is corrupt; re-create it with "
                        "`kd2deploy export RUN_DIR`.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a kd2deploy manifest (format {MANIFEST_FORMAT}). Re-create it with "
                        "`kd2deploy export RUN_DIR`.")
    missing = [key for key in ("model", "input", "data", "split_seed", "source_checkpoint", "artifacts")
               if key not in manifest]
    if missing:
        raise UserError(f"{path} lacks the field(s) {', '.join(missing)}. It was edited or truncated; re-create it "
                        "with `kd2deploy export RUN_DIR`.")
    return manifest


def artifact_deployable(folder: Path, record: dict[str, Any]) -> Deployable:
    """The artifact a manifest record names, after checking the file is the one that was exported and verified."""
    path = folder / record["file"]
    if not path.is_file():
        raise UserError(f"{path}, listed in {folder / MANIFEST} as `{record['name']}`, does not exist. Re-export "
                        "with `kd2deploy export RUN_DIR`, or copy the whole export folder.")
    expected = {record["file"]: record["sha256"], **record.get("companions", {})}
    for relative, digest in expected.items():
        file = folder / relative
        if not file.is_file() or sha256(file) != digest:
            raise UserError(f"{file} is missing or changed since it was exported and verified (its sha256 differs "
                            f"from {folder / MANIFEST}). Re-export with `kd2deploy export RUN_DIR`, or copy the whole "
                            "export folder.")
    return Deployable(record["name"], record["backend"], record["precision"], path, record)


def manifest_deployables(folder: Path, manifest: dict[str, Any]) -> list[Deployable]:
    return [artifact_deployable(folder, record) for record in manifest["artifacts"]]


def source_deployable(manifest: dict[str, Any]) -> Deployable | None:
    """The student.pt the artifacts were exported from; None once it is gone (an export folder copied to a device)
    or replaced (the run was trained again)."""
    source = manifest["source_checkpoint"]
    path = Path(source["path"])
    if not path.is_file() or sha256(path) != source["sha256"]:
        return None
    return Deployable("pytorch-fp32", "pytorch", "fp32", path)


def manifest_data(manifest: dict[str, Any], folder: Path) -> tuple[DataConfig, int]:
    """The data section and seed of the run the artifacts come from: what rebuilds its val split."""
    return data_config(manifest["data"], folder / MANIFEST), manifest["split_seed"]


def val_split(cfg: DataConfig, seed: int, samples: int | None = None) -> Dataset:
    return spread_subset(build_datasets(cfg, seed, augment=False)[1], samples)


# ----------------------------------------------------------------------------------------- kd2deploy eval
def _student_path(target: Path) -> Path | None:
    if target.is_dir() and (target / STUDENT).is_file():
        return target / STUDENT
    return target if target.is_file() and target.suffix == ".pt" else None


def _resolve_target(target: Path) -> tuple[list[Deployable], DataConfig, int]:
    """What to evaluate for any target `kd2deploy eval` accepts, and the data config and seed of its val split."""
    if not target.exists():
        raise UserError(f"{target} does not exist. `kd2deploy eval` takes {ACCEPTED_TARGETS}.")
    if target.is_dir() and (target / MANIFEST).is_file():
        manifest = load_manifest(target)
        return manifest_deployables(target, manifest), *manifest_data(manifest, target)
    if target.is_file() and target.suffix in ARTIFACT_SUFFIXES:
        folder = next((p for p in target.parents if (p / MANIFEST).is_file()), target.parent)
        manifest = load_manifest(folder)
        records = [r for r in manifest["artifacts"] if (folder / r["file"]).resolve() == target.resolve()]
        if not records:
            raise UserError(f"{target} is not listed in {folder / MANIFEST}. Evaluate an artifact written by "
                            "`kd2deploy export`, inside its export folder.")
        return [artifact_deployable(folder, records[0])], *manifest_data(manifest, folder)
    student = _student_path(target)
    if student is None:
        raise UserError(f"{target} is none of what `kd2deploy eval` takes: {ACCEPTED_TARGETS}.")
    recipe = load_student(student)[1]["recipe"]
    deployable = Deployable(student.name, "pytorch", "fp32", student)
    return [deployable], data_config(recipe["data"], student), recipe["optim"]["seed"]


def evaluate_target(target: Path, val_samples: int | None = None, console: Console | None = None
                    ) -> dict[str, Any]:
    """Top-1/top-5 on the val split of a run folder, student.pt, export folder or exported .onnx file."""
    console = console or Console()
    target = Path(target)
    deployables, cfg, seed = _resolve_target(target)
    val = val_split(cfg, seed, val_samples)
    results = []
    for deployable in deployables:
        with console.status(f"evaluating {deployable.name} on {len(val)} val images"):
            metrics = evaluate_runner(deployable.load(), val)
        export_check = deployable.record["verification"] if deployable.record else None
        results.append({"target": deployable.name, "backend": deployable.backend,
                        "precision": deployable.precision, **metrics, "export_check": export_check})
    table = Table("target", "backend", "precision", Column("top-1 %", justify="right"),
                  Column("top-5 %", justify="right"), Column("images", justify="right"), "checked at export",
                  title=f"{target} on {cfg.dataset} val")
    for r in results:
        check = r["export_check"]
        table.add_row(r["target"], r["backend"], r["precision"], f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      str(r["count"]), check_summary(check, with_top1=True) if check else "-")
    print_table(console, table)
    return {"target": str(target), "dataset": cfg.dataset, "results": results}
