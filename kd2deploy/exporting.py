"""`kd2deploy export`: the student to ONNX (and INT8), verified against PyTorch on real images, with a manifest."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Column, Table

from .artifacts import (
    EVAL_BATCH,
    MANIFEST,
    MANIFEST_FORMAT,
    data_config,
    numpy_batches,
    print_table,
    random_subset,
    spread_subset,
)
from .backends import Backend, ExportRequest, get_backend
from .backends.base import CHANNELS
from .backends.pytorch import PyTorchBackend
from .checkpoint import atomic_write_text, provenance, sha256
from .data import DataInfo, build_datasets
from .engine import load_student, student_checkpoint
from .errors import CheckFailed
from .models import count_params

EXPORT_DIR = "export"


class ExportVerificationError(CheckFailed):
    """An exported artifact does not reproduce the PyTorch student within tolerance."""


def predict(runner: Backend, batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([runner.run(images) for images in batches])


def verification(precision: str, logits: np.ndarray, reference: np.ndarray, targets: np.ndarray,
                 atol: float) -> dict[str, Any]:
    """How an artifact's logits compare with the PyTorch student's on the same images.

    Full-precision artifacts must match the logits within atol; INT8 ones cannot, so they report how often
    their top-1 class agrees with the student's instead."""
    predicted = logits.argmax(axis=1)
    result: dict[str, Any] = {"samples": len(targets), "top1": 100 * float(np.mean(predicted == targets))}
    if precision == "int8":
        result["top1_agreement"] = 100 * float(np.mean(predicted == reference.argmax(axis=1)))
    else:
        max_abs_diff = float(np.abs(logits - reference).max())
        result.update(max_abs_diff=max_abs_diff, atol=atol, passed=bool(max_abs_diff <= atol))
    return result


def verify_artifacts(records: list[dict[str, Any]], out_dir: Path, reference: Backend,
                     batches: list[tuple[np.ndarray, np.ndarray]], atol: float, destination: Path) -> None:
    """Fill in each record's `verification`; raise ExportVerificationError for logits beyond atol."""
    images = [x for x, _ in batches]
    targets = np.concatenate([y for _, y in batches])
    expected = predict(reference, images)
    for record in records:
        runner = get_backend(record["backend"]).load(out_dir / record["file"])
        record["verification"] = verification(record["precision"], predict(runner, images), expected, targets, atol)
    for record in records:
        check = record["verification"]
        if check.get("passed") is False:
            raise ExportVerificationError(
                f"{record['name']} ({record['file']}) does not reproduce the PyTorch student: its logits differ by up "
                f"to {check['max_abs_diff']:.3g} on {check['samples']} val images, above the tolerance "
                f"atol={atol:g}. Nothing was written to {destination}; a previous export there is unchanged. Raise "
                "--atol if the difference is acceptable, or report the model as an exporter problem.")


def build_manifest(ckpt: dict[str, Any], info: DataInfo, student_path: Path, params: int,
                   records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**ckpt["model"], "params": params},
        "input": {"shape": [CHANNELS, info.img_size, info.img_size], "layout": "NCHW", "dtype": "float32",
                  "mean": list(info.mean), "std": list(info.std), "interpolation": info.interpolation,
                  "crop_pct": info.crop_pct, "img_size": info.img_size},
        "class_names": info.class_names,
        "data": ckpt["recipe"]["data"],
        "split_seed": ckpt["recipe"]["optim"]["seed"],
        "source_checkpoint": {"path": str(student_path.resolve()), "sha256": sha256(student_path)},
        "artifacts": records,
        **provenance(),
    }


def _check_summary(check: dict[str, Any]) -> str:
    if "top1_agreement" in check:
        return f"top-1 agreement {check['top1_agreement']:.1f}%"
    return f"max |Δ logit| {check['max_abs_diff']:.2g} (atol {check['atol']:g})"


def artifact_table(manifest: dict[str, Any]) -> Table:
    records = manifest["artifacts"]
    samples = records[0]["verification"]["samples"] if records else 0
    table = Table("artifact", "file", Column("size MB", justify="right"), Column("top-1 %", justify="right"),
                  "vs PyTorch", title=f"{manifest['model']['name']}: checked on {samples} val images")
    for r in records:
        check = r["verification"]
        table.add_row(r["name"], r["file"], f"{r['size_bytes'] / 1e6:.2f}", f"{check['top1']:.2f}",
                      _check_summary(check))
    return table


def export_run(run_dir: Path, out_dir: Path | None = None, int8: bool = False, calib_samples: int = 256,
               atol: float = 1e-3, parity_samples: int = 256, console: Console | None = None,
               backends: Sequence[str] = ("onnxruntime",)) -> dict[str, Any]:
    """Export a run's student with each backend, verify every artifact on real val images, write manifest.json."""
    console = console or Console()
    student_path = student_checkpoint(Path(run_dir))
    model, ckpt = load_student(student_path)
    out_dir = Path(out_dir) if out_dir is not None else student_path.parent / EXPORT_DIR
    seed = ckpt["recipe"]["optim"]["seed"]
    train, val, _ = build_datasets(data_config(ckpt["recipe"]["data"], student_path), seed, augment=False)
    calibration = random_subset(train, calib_samples, seed)
    info = DataInfo.from_dict(ckpt["data"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build and verify in a staging folder beside out_dir: a failed export leaves any previous export untouched
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent) as staging:
        stage = Path(staging)
        request = ExportRequest(model, info, stage,
                                precisions=("fp32", "int8") if int8 else ("fp32",),
                                calibration=lambda: (images for images, _ in numpy_batches(calibration, EVAL_BATCH)),
                                console=console)
        records = []
        for name in backends:
            with console.status(f"exporting {ckpt['model']['name']} with {name}"):
                records += get_backend(name).export(request)
        parity_batches = list(numpy_batches(spread_subset(val, parity_samples), EVAL_BATCH))
        with console.status("verifying against PyTorch"):
            verify_artifacts(records, stage, PyTorchBackend(model), parity_batches, atol, out_dir)
        manifest = build_manifest(ckpt, info, student_path, count_params(model), records)
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        replace_folder(stage, out_dir)
    print_table(console, artifact_table(manifest))
    return {**manifest, "artifact_dir": str(out_dir.resolve())}


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing what is there with two renames (never a half-written folder)."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(old / target.name)
    new.rename(target)
    shutil.rmtree(old)
