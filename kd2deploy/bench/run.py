"""`kd2deploy bench`: the matrix of export folders and run folders x backends x precisions x batch sizes, each
artifact timed in a fresh process, with top-1, latency percentiles, throughput, peak memory, size, params and GFLOPs.

Runs without torch (kd2deploy[edge]) on export folders; PyTorch rows need the training stack.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from ..backends import get_backend, list_backends
from ..data.valset import LabelledImages
from ..deploy.manifest import Deployable
from ..deploy.profiles import PRECISIONS
from ..errors import CheckFailed, UserError
from ..machine import busy_cores_elsewhere
from .harness import machine_context, measure
from .report import recommendation, write_report
from .resolve import ModelUnderTest, resolve

DEFAULT_OUT = Path("runs/bench")
PYTORCH_ROWS = ("pytorch", "pytorch-compiled")  # a student.pt is timed eager and compiled


def select(deployables: list[Deployable], backends: Sequence[str] | None, precisions: Sequence[str] | None,
           console: Console) -> list[Deployable]:
    """The deployables the filters keep and whose runtime is here; the others are named and skipped."""
    chosen = []
    for d in deployables:
        if (backends and d.backend not in backends) or (precisions and d.precision not in precisions):
            continue
        reason = get_backend(d.backend).unavailable()
        if reason:  # a TensorRT engine on a machine without TensorRT: bench it on its device
            console.print(f"[yellow]Skipping {d.name}: {escape(reason)}.[/yellow]")
        else:
            chosen.append(d)
    return chosen


def check_filters(backends: Sequence[str] | None, precisions: Sequence[str] | None) -> None:
    for values, known, option in ((backends, list_backends(), "--backends"), (precisions, PRECISIONS, "--precisions")):
        unknown = [v for v in values or () if v not in known]
        if unknown:
            raise UserError(f"{option} takes a comma-separated list of {', '.join(known)}; unknown: "
                            f"{', '.join(unknown)}.")


# ----------------------------------------------------------------------------------------- one artifact, one process
def _save_val(images: LabelledImages, folder: Path) -> dict[str, str]:
    """Decode and transform the val images once for all the model's artifacts."""
    arrays, labels = zip(*images.batches(64), strict=True)
    paths = {"images": str(folder / "val_images.npy"), "labels": str(folder / "val_labels.npy")}
    np.save(paths["images"], np.concatenate(arrays))
    np.save(paths["labels"], np.concatenate(labels))
    return paths


def run_isolated(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """measure(job) in a fresh interpreter: one runtime's threads, caches and allocator state do not slow the next
    (timing ONNX Runtime after other models in one process slowed ResNet-18 from 20 to 33 ms), and the process's
    peak RSS is this artifact's alone."""
    job_file, result_file = scratch / "job.json", scratch / "result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "kd2deploy.bench.run", str(job_file), str(result_file)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result_file.is_file():
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-6:]
        raise CheckFailed(f"{job['name']} failed in its benchmark process (exit {done.returncode}): "
                          + " | ".join(tail))
    return json.loads(result_file.read_text())


def bench_deployable(model: ModelUnderTest, deployable: Deployable, val: dict[str, str] | None, batches: Sequence[int],
                     scratch: Path, **timing: Any) -> list[dict[str, Any]]:
    job = {"name": deployable.name, "backend": deployable.backend, "path": str(deployable.path), "batches": batches,
           "input_shape": model.input_shape, "val": val, **timing}
    result = run_isolated(job, scratch)
    params, gflops = model.complexity.get("params"), model.complexity.get("gflops")
    return [{"model": model.name, "artifact": deployable.name, "backend": deployable.backend,
             "precision": deployable.precision, "top1": result["top1"], **row,
             "size_mb": deployable.size_bytes / 1e6, "params_m": params and params / 1e6, "gflops": gflops}
            for row in result["rows"]]


# ----------------------------------------------------------------------------------------- the command
def default_out(paths: Sequence[Path]) -> Path:
    """One export or run folder: the report goes beside its artifacts; several: runs/bench."""
    if len(paths) == 1:
        path = Path(paths[0])
        return path if path.is_dir() else path.parent
    return DEFAULT_OUT


def measure_all(plan: list[tuple[ModelUnderTest, list[Deployable]]], batches: list[int], timing: dict[str, Any],
                console: Console) -> tuple[list[dict[str, Any]], list[str]]:
    """Every chosen deployable in its own process, each model's val images decoded once for all of them;
    returns (rows, failures)."""
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="kd2deploy-bench-") as scratch:
        for index, (model, chosen) in enumerate(plan):
            if not chosen:
                continue
            val = None
            if model.images is not None:
                with console.status(f"reading {len(model.images)} val images for {model.name}"):
                    folder = Path(scratch) / str(index)
                    folder.mkdir()
                    val = _save_val(model.images, folder)
            for deployable in chosen:
                with console.status(f"benchmarking {model.name}: {deployable.name}"):
                    try:
                        rows += bench_deployable(model, deployable, val, batches, Path(scratch), **timing)
                    except CheckFailed as exc:
                        failures.append(str(exc))
                        console.print(f"[red]{escape(str(exc))}[/red]")
    if not rows:
        raise CheckFailed("No artifact could be benchmarked: " + "; ".join(failures))
    return rows, failures


def run_bench(paths: Sequence[Path] | Path, batches: Sequence[int] = (1, 32), iters: int = 50, warmup: int = 10,
              threads: int | None = None, val_samples: int | None = None, duration: float | None = None,
              max_drop: float = 1.0, backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
              val_dir: Path | None = None, out: Path | None = None, console: Console | None = None
              ) -> list[dict[str, Any]]:
    """Bench every deployable of the given export folders and run folders that the filters keep and that runs
    here, each in its own process; print one table and a recommendation, and write bench.md, bench.csv,
    bench.json and the accuracy-vs-latency plot bench.png into `out`. val_samples=0 skips top-1."""
    console = console or Console()
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    check_filters(backends, precisions)
    threads = (os.cpu_count() or 1) if threads is None else threads
    out = Path(out) if out is not None else default_out(paths)
    models = [resolve(path, val_samples, val_dir, console, PYTORCH_ROWS, source_rows=True, complexity=True)
              for path in paths]
    plan = [(m, select(m.deployables, backends, precisions, console)) for m in models]
    if not any(chosen for _, chosen in plan):
        raise UserError("Nothing to benchmark: no artifact matches --backends/--precisions and runs here.")
    busy_before = busy_cores_elsewhere()
    if busy_before > 0.25 * (os.cpu_count() or 1):
        console.print(f"[yellow]Other processes keep {busy_before:.1f} of {os.cpu_count()} cores busy: latencies "
                      "will be slower and noisier than on an idle machine.[/yellow]")
    timing = {"iters": iters, "warmup": warmup, "duration": duration, "threads": threads}
    rows, failures = measure_all(plan, list(batches), timing, console)
    val_images = {len(m.images) for m in models if m.images is not None}
    context = machine_context(threads, iters, warmup, max(val_images) if val_images else None, busy_before, duration,
                              [r["timing"] for r in rows])
    title = f"kd2deploy bench: {', '.join(sorted({m.name for m in models}))}"
    write_report(out, title, rows, context, recommendation(rows, max_drop), failures, console)
    if failures:
        raise CheckFailed(f"{len(failures)} artifact(s) failed; the others are in the report: " + "; ".join(failures))
    return rows


def _worker_main(job_file: str, result_file: str) -> None:
    """`python -m kd2deploy.bench.run JOB RESULT`: what run_isolated starts for one artifact."""
    job = json.loads(Path(job_file).read_text())
    result = measure(job)
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker_main(*sys.argv[1:3])
