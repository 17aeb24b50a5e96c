"""Atomic checkpoint files and the provenance every artifact carries."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
STUDENT_FORMAT = "kd2deploy.student/1"
STUDENT = "student.pt"  # the deployable file of a run folder
RUN_FORMAT = "kd2deploy.run/1"


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: export folders are read on devices without torch (kd2deploy[edge])

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist. Give the path of a student.pt or last.pt from a run.")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"Checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                        "It is corrupt or not a PyTorch file; re-export it, or point to another checkpoint "
                        "(a run keeps last.pt and student.pt).") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions(packages: Iterable[str] = ()) -> dict[str, str]:
    """Installed versions of kd2deploy, its training stack and `packages` (what deploying adds: every backend's
    runtime, `backends.backend_packages()`)."""
    versions = {}
    for dist in ("kd2deploy", "torch", "torchvision", "timm", "onnx", "numpy", *packages):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """Commit of the kd2deploy source tree, with '+dirty' when it has uncommitted changes; None outside git."""
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(packages: Iterable[str] = ()) -> dict[str, Any]:
    return {"versions": library_versions(packages), "git_commit": git_commit()}
