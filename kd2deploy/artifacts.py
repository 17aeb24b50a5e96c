"""Export folders and what reads them: manifest.json, the val images artifacts are scored on, and `kd2deploy eval`.
Nothing here needs torch, except evaluating a student.pt: export folders are read on devices without it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.segment import Segments
from rich.table import Column, Table

from .backends import Backend, get_backend
from .checkpoint import STUDENT, STUDENT_FORMAT, sha256
from .errors import UserError
from .recipe import DataConfig
from .valdata import EvalTransform, LabelledImages, evaluate_runner, image_folder, is_held_out_split, recorded_val_set

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


def manifest_val_set(manifest: dict[str, Any], folder: Path, samples: int | None = None,
                     val_dir: Path | None = None) -> LabelledImages:
    """What top-1 is measured on: `val_dir` (a folder with one sub-folder per class) when given, otherwise the val
    split of the run the artifacts come from; with the manifest's eval transform either way."""
    transform = EvalTransform.from_input(manifest["input"])
    if val_dir is not None:
        return image_folder(val_dir, manifest["class_names"], transform, "--val").spread(samples)
    data = data_config(manifest["data"], folder / MANIFEST).model_dump()
    return run_val_set(data, manifest["split_seed"], manifest["class_names"], transform, samples,
                       str(folder / MANIFEST))


def run_val_set(data: dict[str, Any], seed: int, class_names: list[str], transform: EvalTransform,
                samples: int | None, where: str) -> LabelledImages:
    """The val split of the run a model comes from: read with numpy and Pillow, or, for a split held out of the
    training folder by torch's generator (data.val_fraction), rebuilt by the training stack."""
    if not is_held_out_split(data):
        return recorded_val_set(data, seed, class_names, transform, samples, where)
    try:
        from .data import HeldOutValSplit
    except ImportError:
        raise UserError("The run held out data.val_fraction of its training folder as val split, which only the "
                        "training stack rebuilds. Give --val DIR (a folder with one sub-folder per class), or "
                        "install kd2deploy[train].") from None
    return HeldOutValSplit(data, seed, samples)


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
    """The artifact a manifest record names, after checking its backend is known here and the file is the one that
    was exported and verified."""
    get_backend(record["backend"])
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


# ----------------------------------------------------------------------------------------- kd2deploy eval
def _student_path(target: Path) -> Path | None:
    if target.is_dir() and (target / STUDENT).is_file():
        return target / STUDENT
    return target if target.is_file() and target.suffix == ".pt" else None


def _resolve_target(target: Path, samples: int | None, val_dir: Path | None
                    ) -> tuple[list[Deployable], LabelledImages]:
    """What to evaluate for any target `kd2deploy eval` accepts, and the val images to score it on."""
    if not target.exists():
        raise UserError(f"{target} does not exist. `kd2deploy eval` takes {ACCEPTED_TARGETS}.")
    if target.is_dir() and (target / MANIFEST).is_file():
        manifest = load_manifest(target)
        return manifest_deployables(target, manifest), manifest_val_set(manifest, target, samples, val_dir)
    if target.is_file() and target.suffix in ARTIFACT_SUFFIXES:
        folder = next((p for p in target.parents if (p / MANIFEST).is_file()), target.parent)
        manifest = load_manifest(folder)
        records = [r for r in manifest["artifacts"] if (folder / r["file"]).resolve() == target.resolve()]
        if not records:
            raise UserError(f"{target} is not listed in {folder / MANIFEST}. Evaluate an artifact written by "
                            "`kd2deploy export`, inside its export folder.")
        return [artifact_deployable(folder, records[0])], manifest_val_set(manifest, folder, samples, val_dir)
    student = _student_path(target)
    if student is None:
        raise UserError(f"{target} is none of what `kd2deploy eval` takes: {ACCEPTED_TARGETS}.")
    reason = get_backend("pytorch").unavailable()
    if reason:
        raise UserError(f"{student} is a PyTorch checkpoint, but {reason}.")
    from .checkpoint import load_checkpoint

    checkpoint = load_checkpoint(student)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != STUDENT_FORMAT:
        raise UserError(f"{student} is not a kd2deploy student checkpoint (format {STUDENT_FORMAT}). Give a run "
                        "folder or its student.pt, written by `kd2deploy train`.")
    info = checkpoint["data"]
    transform = EvalTransform.from_input(info)
    if val_dir is not None:
        images = image_folder(val_dir, info["class_names"], transform, "--val").spread(samples)
    else:
        recipe = checkpoint["recipe"]
        images = run_val_set(data_config(recipe["data"], student).model_dump(), recipe["optim"]["seed"],
                             info["class_names"], transform, samples, str(student))
    return [Deployable(student.name, "pytorch", "fp32", student)], images


def evaluate_target(target: Path, val_samples: int | None = None, console: Console | None = None,
                    val_dir: Path | None = None) -> dict[str, Any]:
    """Top-1/top-5 of a run folder, student.pt, export folder or exported artifact file, on its run's val split
    or on `val_dir`."""
    console = console or Console()
    target = Path(target)
    deployables, images = _resolve_target(target, val_samples, val_dir)
    results = []
    for deployable in deployables:
        with console.status(f"evaluating {deployable.name} on {len(images)} val images"):
            metrics = evaluate_runner(deployable.load().run, images)
        export_check = deployable.record["verification"] if deployable.record else None
        results.append({"target": deployable.name, "backend": deployable.backend,
                        "precision": deployable.precision, **metrics, "export_check": export_check})
    source = getattr(images, "source", "val")
    table = Table("target", "backend", "precision", Column("top-1 %", justify="right"),
                  Column("top-5 %", justify="right"), Column("images", justify="right"), "checked at export",
                  title=f"{target} on {source}")
    for r in results:
        check = r["export_check"]
        table.add_row(r["target"], r["backend"], r["precision"], f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      str(r["count"]), check_summary(check, with_top1=True) if check else "-")
    print_table(console, table)
    return {"target": str(target), "val": source, "results": results}
