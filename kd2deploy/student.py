"""A run's deployable student: finding student.pt in a run folder, reading it, rebuilding the model from it. Only
rebuilding needs torch and timm, so tools that run on an edge install find and describe students without them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import STUDENT, STUDENT_FORMAT, load_checkpoint
from .errors import UserError


def find_student(path: Path) -> Path | None:
    """The student.pt that `path` names (a run folder holding one, or a .pt file), or None."""
    path = Path(path)
    if path.is_dir() and (path / STUDENT).is_file():
        return path / STUDENT
    return path if path.is_file() and path.suffix == ".pt" else None


def student_checkpoint(run_dir: Path) -> Path:
    """The student.pt of a run folder (or the file itself), with errors that say what to pass instead."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise UserError(f"Run folder {run_dir} does not exist. Give a run folder written by `kd2deploy train` "
                        "(its output.dir, holding student.pt) or the student.pt itself.")
    if not (run_dir / STUDENT).is_file():
        raise UserError(f"{run_dir} holds no {STUDENT}. `kd2deploy train` writes it when a run finishes; finish the "
                        "run (`kd2deploy train RECIPE --resume`) or give another run folder.")
    return run_dir / STUDENT


def read_student(path: Path) -> dict[str, Any]:
    """The checkpoint dict of student.pt (or of a run folder's), checked to be one."""
    path = student_checkpoint(path)
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != STUDENT_FORMAT:
        raise UserError(f"{path} is not a kd2deploy student checkpoint (format {STUDENT_FORMAT}). Give a run folder "
                        "or its student.pt, written by `kd2deploy train`.")
    return checkpoint


def load_student(path: Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild a student from student.pt (or a run folder holding one); returns (model in eval mode, checkpoint)."""
    from .models import create_model

    checkpoint = read_student(path)
    spec = checkpoint["model"]
    model = create_model(spec["name"], spec["num_classes"], kwargs=spec["kwargs"],
                         field=f"{student_checkpoint(path)}: model.name")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint
