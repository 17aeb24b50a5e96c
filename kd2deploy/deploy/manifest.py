"""Export folders: manifest.json (its format, reading it back with checks) and the deployables it lists, each
verified against the sha256 recorded at export. Torch-free: export folders are read on devices without it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..backends import Backend, get_backend
from ..checkpoint import sha256
from ..errors import UserError, validation_problems
from ..recipe_schema import DataConfig, migrate_data_section

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kd2deploy.manifest/1"


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
        return DataConfig.model_validate(migrate_data_section(data_section))
    except ValidationError as exc:
        raise UserError(f"The data section recorded in {source} is not valid ({validation_problems(exc)}). "
                        "It was edited or written by another kd2deploy version; re-export the run.") from None


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
