"""`kd2deploy eval`: top-1/top-5 of a run folder, student.pt, export folder or artifact file on its run's val split
(or --val DIR), one row per artifact, beside what the export's own verification found. Torch-free except for
PyTorch checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from ..console import print_table
from ..data.valset import evaluate_runner
from ..deploy.manifest import check_summary
from .resolve import resolve


def evaluate_target(path: Path, val_samples: int | None = None, console: Console | None = None,
                    val_dir: Path | None = None) -> dict[str, Any]:
    """Top-1/top-5 of every deployable at `path` on its run's val split or on `val_dir`."""
    console = console or Console()
    path = Path(path)
    model = resolve(path, val_samples or None, val_dir, console)  # eval always scores: 0 means all
    results = []
    for deployable in model.deployables:
        with console.status(f"evaluating {deployable.name} on {len(model.images)} val images"):
            metrics = evaluate_runner(deployable.load().run, model.images)
        export_check = deployable.record["verification"] if deployable.record else None
        results.append({"artifact": deployable.name, "backend": deployable.backend,
                        "precision": deployable.precision, **metrics, "export_check": export_check})
    source = getattr(model.images, "source", "val")
    table = Table("artifact", "backend", "precision", Column("top-1 %", justify="right"),
                  Column("top-5 %", justify="right"), Column("images", justify="right"), "checked at export",
                  title=f"{path} on {source}")
    for r in results:
        check = r["export_check"]
        table.add_row(r["artifact"], r["backend"], r["precision"], f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      str(r["count"]), check_summary(check, with_top1=True) if check else "-")
    print_table(console, table)
    return {"path": str(path), "val": source, "results": results}
