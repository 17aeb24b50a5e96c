"""`kd2deploy export`: the student to ONNX, OpenVINO and TensorRT artifacts at the precisions a device profile
names; every artifact verified on real val images (parity with PyTorch, top-1) and INT8 timed against FP32 on the
build machine; one folder per artifact and a manifest.json describing them all."""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Column, Table
from torch import nn

from ..backends import Backend, BackendUnavailable, ExportRequest, backend_for_format, backend_packages, get_backend
from ..backends.ort import ONNX_FILE
from ..backends.pytorch import PyTorchBackend
from ..checkpoint import atomic_write_text, provenance, sha256
from ..console import print_table
from ..data.loaders import build_datasets, numpy_batches, random_subset, spread_subset
from ..data.sources import CHANNELS, DataInfo
from ..errors import CheckFailed, UserError
from ..models import model_complexity
from ..student import load_student, student_checkpoint
from .manifest import MANIFEST, MANIFEST_FORMAT, check_summary, data_config, load_manifest
from .onnx import export_onnx
from .profiles import CALIB_METHODS, FORMATS, PRECISIONS, DeviceProfile, host_profile, load_profile

EXPORT_DIR = "export"
EVAL_BATCH = 64
FP32_ONNX = f"onnx-fp32/{ONNX_FILE}"
SPEED_SECONDS = 1.5  # per artifact: enough batch-1 runs for a stable median on a quiet machine


class ExportVerificationError(CheckFailed):
    """An exported artifact does not reproduce the PyTorch student within tolerance."""


@dataclass
class ExportSource:
    """What artifacts are built from: a trained student (a run folder) or an earlier export folder's ONNX graph
    (on a target device, to add TensorRT engines without PyTorch weights)."""

    model: nn.Module | None
    info: DataInfo
    data: dict[str, Any]  # the run's recipe data section: rebuilds its train/val split
    seed: int
    model_spec: dict[str, Any]
    checkpoint: dict[str, str]  # {"path", "sha256"} of the student.pt the artifacts descend from
    complexity: dict[str, Any]  # params and GFLOPs per image, for the manifest and bench tables
    recorded_in: Path  # the file the data section was read from (for messages)
    export_dir: Path | None = None  # set when building from an export folder


def load_source(source: Path) -> ExportSource:
    if source.is_dir() and (source / MANIFEST).is_file():
        manifest = load_manifest(source)
        if "data_info" not in manifest or not (source / FP32_ONNX).is_file():
            raise UserError(f"{source} was exported by an older kd2deploy (no {FP32_ONNX} or no data_info in its "
                            "manifest). Re-export it from its run folder with `kd2deploy export RUN_DIR`.")
        return ExportSource(None, DataInfo.from_dict(manifest["data_info"]), manifest["data"], manifest["split_seed"],
                            manifest["model"], manifest["source_checkpoint"],
                            {k: manifest["model"][k] for k in ("params", "gflops") if k in manifest["model"]},
                            source / MANIFEST, source)
    student_path = student_checkpoint(source)
    model, ckpt = load_student(student_path)
    recipe = ckpt["recipe"]
    checkpoint = {"path": str(student_path.resolve()), "sha256": sha256(student_path)}
    info = DataInfo.from_dict(ckpt["data"])
    return ExportSource(model, info, recipe["data"], recipe["optim"]["seed"], ckpt["model"], checkpoint,
                        model_complexity(model, (CHANNELS, info.img_size, info.img_size)), student_path)


# ----------------------------------------------------------------------------------------- verification
def predict(runner: Backend, batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([runner.run(images) for images in batches])


def verification(precision: str, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray,
                 atol: float) -> dict[str, Any]:
    """How an artifact's logits compare with the reference's (the PyTorch student's) on the same val images.

    FP32 and FP16 artifacts must match the logits within atol; INT8 ones cannot, so they are judged by how often
    their top-1 class agrees with the reference's. Every artifact reports its top-1 on the images."""
    predicted = logits.argmax(axis=1)
    result: dict[str, Any] = {"samples": len(labels), "top1": 100 * float(np.mean(predicted == labels)),
                              "top1_agreement": 100 * float(np.mean(predicted == reference.argmax(axis=1)))}
    if precision != "int8":
        max_abs_diff = float(np.abs(logits - reference).max())
        result.update(max_abs_diff=max_abs_diff, atol=atol, passed=bool(max_abs_diff <= atol))
    return result


def verify_artifacts(records: list[dict[str, Any]], out_dir: Path, reference: Backend,
                     batches: list[tuple[np.ndarray, np.ndarray]], atol: dict[str, float],
                     destination: Path) -> dict[str, Any]:
    """Fill in each record's `verification`; returns the reference's own top-1. Raises ExportVerificationError
    for logits beyond tolerance."""
    images = [x for x, _ in batches]
    labels = np.concatenate([y for _, y in batches])
    expected = predict(reference, images)
    reference_top1 = 100 * float(np.mean(expected.argmax(axis=1) == labels))
    for record in records:
        try:
            runner = get_backend(record["backend"]).load(out_dir / record["file"])
        except UserError as exc:  # a TensorRT engine built by trtexec where the Python runtime is missing
            record["verification"] = {"skipped": str(exc)}
            continue
        check = verification(record["precision"], predict(runner, images), expected, labels,
                             atol[record["precision"]])
        record["verification"] = {**check, "top1_drop": reference_top1 - check["top1"]}
    for record in records:
        check = record["verification"]
        if check.get("passed") is False:
            raise ExportVerificationError(
                f"{record['name']} ({record['file']}) does not reproduce the PyTorch student: its logits differ by up "
                f"to {check['max_abs_diff']:.3g} on {check['samples']} val images, above the tolerance "
                f"atol={check['atol']:g}. Nothing was written to {destination}; a previous export there is "
                "unchanged. Raise --atol (--atol-fp16 for FP16) if the difference is acceptable, or report the model "
                "as an exporter problem.")
    return {"backend": reference.name, "samples": len(labels), "top1": reference_top1}


def median_latency_ms(runner: Backend, shape: Sequence[int], seconds: float = SPEED_SECONDS) -> float:
    """Median batch-1 latency after a short warm-up, over `seconds` of runs (at least 10)."""
    batch = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    return 1e3 * float(np.median(runner.time_batch(batch, iters=10, warmup=5, duration=seconds)))  # as bench times


def speed_check(records: list[dict[str, Any]], out_dir: Path, shape: Sequence[int], threads: int,
                console: Console) -> dict[str, str]:
    """Time each format's FP32 and INT8 artifacts at batch 1 on this machine; returns the recommended artifact per
    format, and says so loudly when INT8 is not faster than FP32."""
    recommended: dict[str, str] = {}
    by_backend: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        if "skipped" in record["verification"] or record.get("intermediate"):  # built as another artifact's input
            continue
        by_backend.setdefault(record["backend"], {})[record["precision"]] = record
    for backend, by_precision in by_backend.items():
        for record in by_precision.values():
            runner = get_backend(backend).load(out_dir / record["file"], threads)
            record["speed"] = {"batch": 1, "threads": threads, "median_ms": median_latency_ms(runner, shape)}
        fp32, int8 = by_precision.get("fp32"), by_precision.get("int8")
        fastest = min(by_precision.values(), key=lambda r: r["speed"]["median_ms"])
        if fp32 and int8:
            fp32_ms, int8_ms = fp32["speed"]["median_ms"], int8["speed"]["median_ms"]
            int8["speed"]["speedup_vs_fp32"] = fp32_ms / int8_ms
            if int8_ms >= fp32_ms:
                fastest = fp32
                console.print(f"[bold yellow]{int8['name']} is not faster than {fp32['name']} on this machine "
                              f"({int8_ms:.2f} ms vs {fp32_ms:.2f} ms at batch 1): use {fp32['name']}. Try another "
                              "--target preset or exclude op types from INT8.[/bold yellow]")
        recommended[backend] = fastest["name"]
    return recommended


# ----------------------------------------------------------------------------------------- manifest and folders
def build_manifest(source: ExportSource, profile: DeviceProfile, records: list[dict[str, Any]],
                   reference: dict[str, Any], recommended: dict[str, str], skipped: list[dict[str, str]]
                   ) -> dict[str, Any]:
    info = source.info
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**source.model_spec, **source.complexity},
        "input": {"shape": [CHANNELS, info.img_size, info.img_size], "layout": "NCHW", "dtype": "float32",
                  "mean": list(info.mean), "std": list(info.std), "interpolation": info.interpolation,
                  "crop_pct": info.crop_pct, "img_size": info.img_size},
        "class_names": info.class_names,
        "data_info": info.to_dict(),
        "data": source.data,
        "split_seed": source.seed,
        "source_checkpoint": source.checkpoint,
        "target": profile.model_dump(),
        "reference": reference,
        "recommended": recommended,
        "skipped": skipped,
        "artifacts": records,
        **provenance(backend_packages()),
    }


def artifact_table(manifest: dict[str, Any]) -> Table:
    reference = manifest["reference"]
    table = Table("artifact", "file", Column("size MB", justify="right"), Column("top-1 %", justify="right"),
                  Column("drop", justify="right"), "vs PyTorch", Column("ms (batch 1)", justify="right"),
                  title=f"{manifest['model']['name']}: checked on {reference['samples']} val images "
                        f"(PyTorch top-1 {reference['top1']:.2f}%)")
    recommended = set(manifest["recommended"].values())
    for r in manifest["artifacts"]:
        check, speed = r["verification"], r.get("speed", {})
        name = r["name"] + (" *" if r["name"] in recommended else "")
        table.add_row(name, r["file"], f"{r['size_bytes'] / 1e6:.2f}",
                      f"{check['top1']:.2f}" if "top1" in check else "-",
                      f"{check['top1_drop']:+.2f}" if "top1_drop" in check else "-", check_summary(check),
                      f"{speed['median_ms']:.2f}" if speed else "-")
    if recommended:
        table.caption = "* recommended for its runtime on this machine (fastest at batch 1)"
    return table


def _carry_over(previous_dir: Path, stage: Path, source: ExportSource, rebuilt: set[str]) -> list[dict[str, Any]]:
    """Artifacts of an earlier export of the same student that this export does not rebuild: their folders are
    copied into the staging folder, so adding TensorRT engines on a device keeps the CPU artifacts."""
    if not (previous_dir / MANIFEST).is_file():
        return []
    try:
        previous = load_manifest(previous_dir)
    except UserError:
        return []
    if previous["source_checkpoint"]["sha256"] != source.checkpoint["sha256"]:
        return []  # another student: its artifacts do not belong next to these
    kept = []
    for record in previous["artifacts"]:
        folder = Path(record["file"]).parent
        if record["name"] in rebuilt or not (previous_dir / folder).is_dir() or (stage / folder).exists():
            continue
        shutil.copytree(previous_dir / folder, stage / folder)
        kept.append(record)
    return kept


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing what is there with two renames (never a half-written folder)."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(old / target.name)
    new.rename(target)
    shutil.rmtree(old)


def _checked(values: Sequence[str] | None, allowed: Sequence[str], option: str) -> list[str] | None:
    if values is None:
        return None
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UserError(f"{option} takes a comma-separated list of {', '.join(allowed)}; got "
                        f"`{','.join(values)}`.")
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------------------- kd2deploy export
@dataclass
class ExportPlan:
    """What one export builds: from which source, for which profile, into which folder."""

    source: ExportSource
    profile: DeviceProfile
    out_dir: Path
    formats: list[str]
    precisions: list[str]
    calib_method: str
    dynamic_size: bool

    @property
    def backends(self) -> list[type[Backend]]:
        """The FP32 ONNX graph's backend first: every other artifact is built from that graph."""
        return [backend_for_format(f) for f in ["onnx", *(f for f in self.formats if f != "onnx")]]


def plan_export(source_path: Path, out_dir: Path | None, formats: Sequence[str] | None,
                precisions: Sequence[str] | None, profile_name: str | None, calib_method: str | None,
                dynamic_size: bool | None) -> ExportPlan:
    """Check the options against the profile, then load the source (a run's student, or an export folder)."""
    profile = load_profile(profile_name) if profile_name else host_profile()
    formats = _checked(formats, FORMATS, "--format") or list(profile.formats)
    precisions = _checked(precisions, PRECISIONS, "--precision") or list(profile.precisions)
    calib_method = calib_method or profile.onnxruntime.calib_method
    if calib_method not in CALIB_METHODS:
        raise UserError(f"--calib-method takes one of {', '.join(CALIB_METHODS)}; got `{calib_method}`.")
    source = load_source(Path(source_path))
    out_dir = Path(out_dir) if out_dir is not None else (
        source.export_dir or Path(source.checkpoint["path"]).parent / EXPORT_DIR)
    return ExportPlan(source, profile, out_dir, formats, precisions, calib_method,
                      profile.input.dynamic_size if dynamic_size is None else dynamic_size)


@dataclass
class ExportData:
    """The run's own images: calibration (training images, eval transform) and validation batches."""

    calibration: Any
    val_batches: list[tuple[np.ndarray, np.ndarray]]

    @functools.cached_property
    def calibration_batches(self) -> list[np.ndarray]:  # decoded once, on first use, for every INT8 backend
        return [images for images, _ in numpy_batches(self.calibration, EVAL_BATCH)]


def export_data(plan: ExportPlan, calib_samples: int, val_samples: int) -> ExportData:
    source = plan.source
    train, val, _ = build_datasets(data_config(source.data, source.recorded_in), source.seed, augment=False)
    return ExportData(random_subset(train, calib_samples, source.seed),
                      list(numpy_batches(spread_subset(val, val_samples), EVAL_BATCH)))


def write_onnx(plan: ExportPlan, stage: Path, console: Console) -> dict[str, Any] | None:
    """The FP32 ONNX graph every artifact is built from: exported from the student, or copied from the source
    export folder. Returns the exporter's details for its manifest record."""
    onnx_path = stage / FP32_ONNX
    onnx_path.parent.mkdir(parents=True)
    source = plan.source
    if source.model is None:
        shutil.copy2(source.export_dir / FP32_ONNX, onnx_path)
        return None
    with console.status(f"exporting {source.model_spec['name']} to ONNX"):
        return export_onnx(source.model, source.info, onnx_path, console, plan.profile.onnx.opset, plan.dynamic_size,
                           plan.profile.onnx.simplify)


def build_artifacts(plan: ExportPlan, data: ExportData, stage: Path, max_drop: float | None, console: Console
                    ) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    """Every backend's artifacts in the staging folder: (records, skipped precisions, unavailable backends)."""
    request = ExportRequest(
        stage / FP32_ONNX, plan.source.info, stage, precisions=tuple(plan.precisions), profile=plan.profile,
        calibration=lambda: iter(data.calibration_batches), calib_method=plan.calib_method,
        validation=lambda: iter(data.val_batches), max_drop=max_drop, console=console)
    records, skipped, unavailable = [], [], []
    for backend in plan.backends:
        asked = backend.format in plan.formats
        skipped += [{"format": backend.format, "precision": p, "reason": f"{backend.name} does not build {p} artifacts"}
                    for p in plan.precisions if p not in backend.precisions and asked]
        reason = backend.unavailable() if backend.export_needs_runtime else None
        if reason:
            unavailable.append(f"No {backend.format} artifact was built: {reason}.")
            continue
        wanted = plan.precisions if asked else ["fp32"]  # the ONNX graph always; its INT8 only when asked for
        try:
            with console.status(f"building {backend.format} artifacts"):
                records += backend.export(replace(request, precisions=tuple(wanted)))
        except BackendUnavailable as exc:
            records += exc.records
            unavailable.append(str(exc))
    return records, skipped, unavailable


def export_run(source_path: Path, out_dir: Path | None = None, formats: Sequence[str] | None = None,
               precisions: Sequence[str] | None = None, profile: str | None = None, calib_samples: int = 256,
               calib_method: str | None = None, max_drop: float | None = None, atol: float = 1e-3,
               atol_fp16: float = 5e-2, val_samples: int = 1000, dynamic_size: bool | None = None,
               speed: bool = True, console: Console | None = None) -> dict[str, Any]:
    """Build the artifacts a device profile (`--target`) asks for, verify each on real val images, time INT8 against
    FP32, and write them, one folder each, with manifest.json. Returns the manifest plus `artifact_dir`.

    The flow runs one way: plan (options, profile, source) -> data (calibration and val images) -> the FP32 ONNX
    graph -> each backend's artifacts -> verification against the PyTorch student -> timing -> the manifest, all in
    a staging folder that replaces `out_dir` only when everything passed. source_path is a run folder / student.pt,
    or an export folder (then the artifacts are built from its ONNX graph and added to it). Formats and precisions
    default to the profile's."""
    console = console or Console()
    plan = plan_export(source_path, out_dir, formats, precisions, profile, calib_method, dynamic_size)
    data = export_data(plan, calib_samples, val_samples)
    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build and verify in a staging folder beside out_dir: a failed export leaves any previous export untouched
    with tempfile.TemporaryDirectory(prefix=f".{plan.out_dir.name}.staging-", dir=plan.out_dir.parent) as staging:
        stage = Path(staging)
        onnx_details = write_onnx(plan, stage, console)
        records, skipped, unavailable = build_artifacts(plan, data, stage, max_drop, console)
        fp32_onnx = next((r for r in records if r["file"] == FP32_ONNX), None)
        if fp32_onnx is None:  # nothing can be verified without the ONNX graph's runtime
            raise BackendUnavailable(" ".join(unavailable) + " Nothing was written.")
        if onnx_details is not None:
            fp32_onnx.update(onnx_details)
        samples = sum(len(y) for _, y in data.val_batches)
        with console.status(f"verifying {len(records)} artifacts on {samples} val images"):
            reference = (PyTorchBackend(plan.source.model) if plan.source.model is not None
                         else get_backend("onnxruntime").load(stage / FP32_ONNX))
            reference_check = verify_artifacts(records, stage, reference, data.val_batches,
                                               {"fp32": atol, "fp16": atol_fp16, "int8": atol}, plan.out_dir)
        recommended = {}
        if speed:
            size = plan.source.info.img_size
            with console.status("timing the artifacts at batch 1"):
                recommended = speed_check(records, stage, [CHANNELS, size, size], plan.profile.threads, console)
        records += _carry_over(plan.out_dir, stage, plan.source, {r["name"] for r in records})
        manifest = build_manifest(plan.source, plan.profile, records, reference_check, recommended, skipped)
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        replace_folder(stage, plan.out_dir)
    print_table(console, artifact_table(manifest))
    for item in skipped:
        console.print(f"[yellow]skipped {item['format']} {item['precision']}: {item['reason']}[/yellow]")
    if unavailable:
        raise BackendUnavailable(f"{' '.join(unavailable)} The other artifacts and the manifest are in "
                                 f"{plan.out_dir}.")
    return {**manifest, "artifact_dir": str(plan.out_dir.resolve())}
