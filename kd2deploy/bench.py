"""`kd2deploy bench`: the matrix of export folders and run folders x backends x precisions x batch sizes, each
artifact timed in a fresh process, with top-1, latency percentiles, throughput, peak memory, size, params and GFLOPs.

Runs without torch (kd2deploy[edge]) on export folders; PyTorch rows need the training stack.
"""
from __future__ import annotations

import csv
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Column, Table

from .artifacts import (
    Deployable,
    load_manifest,
    manifest_deployables,
    manifest_val_set,
    print_table,
    source_deployable,
)
from .backends import get_backend, list_backends
from .backends.base import host_timings
from .checkpoint import STUDENT, atomic_write, atomic_write_text, library_versions
from .errors import CheckFailed, UserError
from .machine import busy_cores_elsewhere, cpu_flags, cpu_model, gpu_info
from .targets import PRECISIONS
from .valdata import LabelledImages, evaluate_runner

# (row key, column header, format): one list drives the console table and bench.md; numbers align right. A column
# with no value in any row (top-1 without val images, GPU memory on a CPU) is left out of both.
COLUMNS = [("model", "model", "{}"), ("artifact", "artifact", "{}"), ("backend", "backend", "{}"),
           ("batch", "batch", "{}"), ("top1", "top-1 %", "{:.2f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p90_ms", "p90 ms", "{:.3f}"), ("p99_ms", "p99 ms", "{:.3f}"), ("mean_ms", "mean ms", "{:.3f}"),
           ("runtime_p50_ms", "runtime p50 ms", "{:.3f}"),
           ("images_per_s", "images/s", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
           ("gpu_mem_mb", "GPU MB", "{:.0f}"), ("size_mb", "size MB", "{:.2f}"), ("params_m", "params M", "{:.2f}"),
           ("gflops", "GFLOPs", "{:.2f}")]
TEXT_COLUMNS = ("model", "artifact", "backend")
CSV_FIELDS = ["model", "artifact", "backend", "precision", "batch", "top1", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
              "runtime_p50_ms", "images_per_s", "runs", "peak_rss_mb", "gpu_mem_mb", "size_mb", "params_m", "gflops",
              "timing"]
DEFAULT_OUT = Path("runs/bench")


def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Percentiles (numpy's linear interpolation), mean and throughput of timed runs of one batch."""
    times = np.asarray(seconds, dtype=np.float64)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return {"p50_ms": 1e3 * float(p50), "p90_ms": 1e3 * float(p90), "p99_ms": 1e3 * float(p99),
            "mean_ms": 1e3 * mean, "images_per_s": batch / mean, "runs": len(times)}


def time_runner(runner: Any, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None
                ) -> list[float]:
    """Host wall-clock seconds per runner.run(batch), warm-up excluded (see backends.base.host_timings)."""
    return host_timings(runner.run, batch, iters, warmup, duration)


class _NullRunner:
    """Returns its input: timing it measures what the harness itself adds to every timed call."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch


def harness_overhead_us(runs: int = 2000) -> float:
    """Median microseconds the timing loop adds per call (timer reads, list append, the call itself)."""
    return 1e6 * float(np.median(time_runner(_NullRunner(), np.zeros(1, np.float32), runs, 10)))


def machine_context(threads: int, iters: int, warmup: int, val_images: int | None, busy_before: float,
                    duration: float | None = None, timing: Sequence[str] = ()) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "gpu": gpu_info(),
            "threads": threads, "iters": iters, "warmup": warmup, "duration_s": duration, "val_images": val_images,
            "busy_cores_before": busy_before, "harness_overhead_us": harness_overhead_us(),
            "isolation": "each artifact in a fresh process", "timing": sorted(set(timing)),
            "versions": library_versions(), "command": invocation(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def invocation() -> str:
    """The command line as typed: `kd2deploy ...` whether it ran as the console script or `python -m kd2deploy`."""
    if Path(sys.argv[0]).name in ("kd2deploy", "__main__.py"):
        return shlex.join(["kd2deploy", *sys.argv[1:]])
    return shlex.join(sys.argv)


def training_machine() -> dict[str, Any]:
    """Where a training benchmark ran: CPU, cores, GPU (if any) and library versions."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "versions": library_versions()}


# ----------------------------------------------------------------------------------------- what is benchmarked
@dataclass
class BenchTarget:
    """One model: the deployables to time, its input, params/GFLOPs and the val images top-1 is measured on."""

    model: str
    folder: Path
    deployables: list[Deployable]
    input_shape: list[int]
    complexity: dict[str, Any]
    images: LabelledImages | None


def _pytorch_deployables(path: Path) -> list[Deployable]:
    """Eager and compiled rows of a student.pt; both use the checkpoint as their file."""
    return [Deployable(f"{name}-fp32", name, "fp32", path) for name in ("pytorch", "pytorch-compiled")]


def _student_target(path: Path, val_samples: int | None, val_dir: Path | None) -> BenchTarget:
    reason = get_backend("pytorch").unavailable()
    if reason:
        raise UserError(f"{path} is a run folder or student.pt, but {reason}.")
    from .artifacts import _resolve_target  # the same val images `kd2deploy eval` uses
    from .engine import load_student
    from .models import model_complexity

    model, checkpoint = load_student(path)
    size = checkpoint["data"]["img_size"]
    images = _resolve_target(path, val_samples, val_dir)[1] if val_samples != 0 else None
    return BenchTarget(checkpoint["model"]["name"], path if path.is_dir() else path.parent,
                       _pytorch_deployables(path if path.is_file() else path / STUDENT), [3, size, size],
                       model_complexity(model, (3, size, size)), images)


def _export_target(folder: Path, val_samples: int | None, val_dir: Path | None, console: Console) -> BenchTarget:
    manifest = load_manifest(folder)
    deployables = manifest_deployables(folder, manifest)  # checks every file's sha256 before anything runs
    complexity = {k: manifest["model"][k] for k in ("params", "gflops") if k in manifest["model"]}
    source = source_deployable(manifest)
    if source is None:
        console.print(f"[yellow]{folder}: no PyTorch rows, {manifest['source_checkpoint']['path']} is not on this "
                      "machine, or is no longer the checkpoint these artifacts were exported from.[/yellow]")
    elif reason := get_backend("pytorch").unavailable():
        console.print(f"[yellow]Skipping the PyTorch rows of {folder}: {reason}.[/yellow]")
    else:
        deployables = _pytorch_deployables(source.path) + deployables
        if "gflops" not in complexity:  # exported before kd2deploy recorded it
            from .engine import load_student
            from .models import model_complexity

            complexity = model_complexity(load_student(source.path)[0], tuple(manifest["input"]["shape"]))
    images = manifest_val_set(manifest, folder, val_samples, val_dir) if val_samples != 0 else None
    return BenchTarget(manifest["model"]["name"], folder, deployables, list(manifest["input"]["shape"]), complexity,
                       images)


def bench_target(path: Path, val_samples: int | None, val_dir: Path | None, console: Console) -> BenchTarget:
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        return _export_target(path, val_samples, val_dir, console)
    if (path.is_dir() and (path / STUDENT).is_file()) or (path.is_file() and path.suffix == ".pt"):
        return _student_target(path, val_samples, val_dir)
    if not path.exists():
        raise UserError(f"{path} does not exist. `kd2deploy bench` takes export folders (holding manifest.json) and "
                        "run folders (holding student.pt).")
    load_manifest(path)  # raises the export-folder error that says what is missing
    raise AssertionError("unreachable")


def select(deployables: list[Deployable], backends: Sequence[str] | None, precisions: Sequence[str] | None,
           console: Console) -> list[Deployable]:
    """The deployables the filters keep and whose runtime is here; the others are named and skipped."""
    chosen = []
    for d in deployables:
        if (backends and d.backend not in backends) or (precisions and d.precision not in precisions):
            continue
        reason = get_backend(d.backend).unavailable()
        if reason:  # a TensorRT engine on a machine without TensorRT: bench it on its device
            console.print(f"[yellow]Skipping {d.name}: {reason}.[/yellow]")
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
def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this program's own memory map;
    getrusage's ru_maxrss would also count the parent's RSS, which Linux carries across fork and exec."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Time one deployable at each batch size, smallest first, recording the process's peak RSS after each, then
    score top-1 on the val images at the largest batch (padded, so runtimes that compile per shape reuse it)."""
    rss_before = _peak_rss_mb()
    runner = get_backend(job["backend"]).load(Path(job["path"]), job["threads"])
    rng = np.random.default_rng(0)  # latency does not depend on pixel values; a fixed input keeps runs comparable
    rows = []
    for batch in sorted(job["batches"]):
        images = rng.standard_normal((batch, *job["input_shape"]), dtype=np.float32)
        times = runner.time_batch(images, job["iters"], job["warmup"], job["duration"])
        gpu, runtime = runner.device_memory_bytes(), runner.runtime_timings
        rows.append({"batch": batch, **latency_stats(times, batch),
                     "runtime_p50_ms": 1e3 * float(np.median(runtime)) if runtime else None,
                     "peak_rss_mb": _peak_rss_mb(),
                     "gpu_mem_mb": None if gpu is None else gpu / 2**20, "timing": runner.timing_method})
    top1 = None
    if job["val"]:
        data = np.load(job["val"]["images"], mmap_mode="r")
        labels = np.load(job["val"]["labels"])
        size = max(job["batches"])

        def padded(batch: np.ndarray) -> np.ndarray:
            count = len(batch)
            if count < size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], size - count, axis=0)])
            return runner.run(np.ascontiguousarray(batch))[:count]

        top1 = evaluate_runner(padded, _ArrayImages(data, labels), size)["top1"]
    return {"rows": rows, "top1": top1, "rss_before_load_mb": rss_before}


class _ArrayImages:
    """Pre-processed val images in a .npy file, shared by every artifact's process."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            stop = start + batch_size  # np.array copies: runners may write into their input
            yield np.array(self.images[start:stop]), self.labels[start:stop]


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
    done = subprocess.run([sys.executable, "-m", "kd2deploy.bench", str(job_file), str(result_file)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result_file.is_file():
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-6:]
        raise CheckFailed(f"{job['name']} failed in its benchmark process (exit {done.returncode}): "
                          + " | ".join(tail))
    return json.loads(result_file.read_text())


def bench_deployable(target: BenchTarget, deployable: Deployable, val: dict[str, str] | None, batches: Sequence[int],
                     scratch: Path, **timing: Any) -> list[dict[str, Any]]:
    job = {"name": deployable.name, "backend": deployable.backend, "path": str(deployable.path), "batches": batches,
           "input_shape": target.input_shape, "val": val, **timing}
    result = run_isolated(job, scratch)
    params, gflops = target.complexity.get("params"), target.complexity.get("gflops")
    return [{"model": target.model, "artifact": deployable.name, "backend": deployable.backend,
             "precision": deployable.precision, "top1": result["top1"], **row,
             "size_mb": deployable.size_bytes / 1e6, "params_m": params and params / 1e6, "gflops": gflops}
            for row in result["rows"]]


# ----------------------------------------------------------------------------------------- reports
def _context_line(context: dict[str, Any]) -> str:
    threads = context["threads"] or "runtime default"
    versions = ", ".join(f"{k} {v}" for k, v in context["versions"].items() if k != "kd2deploy")
    flags = " ".join(context["cpu_flags"]) or "no listed SIMD flags"
    gpu = context.get("gpu")
    gpu_text = f"; GPU {gpu['name']} (driver {gpu['driver']})" if gpu else ""
    runs = (f"at least {context['iters']} timed runs and {context['duration_s']:g} s" if context.get("duration_s")
            else f"{context['iters']} timed runs")
    overhead = context.get("harness_overhead_us")
    overhead_text = f"; harness overhead {overhead:.2f} µs per call" if overhead is not None else ""
    isolation = f"; {context['isolation']}" if context.get("isolation") else ""
    val = (f"top-1 on {context['val_images']} val images" if context.get("val_images")
           else "no top-1 (no val images)")
    return (f"{context['cpu']} ({flags}), {context['cores']} cores{gpu_text} ({context['busy_cores_before']:.2f} "
            f"cores kept busy by other processes at the start), threads: {threads}; {runs} after {context['warmup']} "
            f"warm-up runs (excluded){overhead_text}{isolation}; {val}; {versions}")


def _shown_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return "-" if row.get(key) is None else fmt.format(row[key])


def bench_markdown(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    columns = _shown_columns(rows)
    lines = [f"# {title}", "", f"Machine: {_context_line(context)}", "", f"Command: `{context['command']}`", "",
             "| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _, _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bench_table(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> Table:
    table = Table(title=title, caption=_context_line(context))
    for key, header, _ in _shown_columns(rows):
        table.add_column(header, justify="left" if key in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in _shown_columns(rows)))
    return table


def bench_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, top-1) points no other point beats on both: as fast or faster and as accurate or
    more, better on at least one. Sorted by latency."""
    front = []
    for i, (latency, top1) in enumerate(points):
        dominated = any(x <= latency and y >= top1 and (x, y) != (latency, top1) for x, y in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The artifact's name, prefixed by its model when the run has several."""
    several = len({r.get("model") for r in rows}) > 1
    return f"{row['model']}/{row['artifact']}" if several else row["artifact"]


def recommendation(rows: list[dict[str, Any]], max_drop: float) -> dict[str, Any] | None:
    """The fastest artifact at the smallest batch whose top-1 is within max_drop points of the most accurate one
    (any model of the run); without top-1, the fastest."""
    batch = min((r["batch"] for r in rows), default=None)
    candidates = [r for r in rows if r["batch"] == batch]
    if not candidates:
        return None
    scored = [r for r in candidates if r.get("top1") is not None]
    best_top1 = max((r["top1"] for r in scored), default=None)
    eligible = [r for r in scored if r["top1"] >= best_top1 - max_drop] if scored else candidates
    fastest = min(eligible, key=lambda r: r["p50_ms"])
    return {"artifact": _label(fastest, rows), "batch": batch, "p50_ms": fastest["p50_ms"], "top1": fastest.get("top1"),
            "drop": None if best_top1 is None else best_top1 - fastest["top1"], "max_drop": max_drop}


def recommendation_line(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "No rows, no recommendation."
    if rec["drop"] is None:
        return (f"Fastest at batch {rec['batch']}: {rec['artifact']} ({rec['p50_ms']:.3f} ms p50); no val images, so "
                "no accuracy was weighed.")
    return (f"Recommended: {rec['artifact']}, the fastest at batch {rec['batch']} ({rec['p50_ms']:.3f} ms p50) within "
            f"{rec['max_drop']:g} top-1 points of the most accurate (it loses {rec['drop']:.2f}).")


BACKEND_MARKERS = {"pytorch": "o", "pytorch-compiled": "D", "onnxruntime": "s", "openvino": "^", "tensorrt": "*"}


def plot_accuracy_latency(rows: list[dict[str, Any]], path: Path) -> bool:
    """Top-1 against p50 latency at the smallest batch: one point per artifact, coloured by model, shaped by
    backend, the Pareto front drawn and its points named (naming every point would pile labels up). Returns False
    (no plot) when no row has a top-1."""
    batch = min(r["batch"] for r in rows)
    chosen = [r for r in rows if r["batch"] == batch and r.get("top1") is not None]
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and boards
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    models = sorted({r["model"] for r in chosen})
    colors = {model: plt.get_cmap("tab10")(i % 10) for i, model in enumerate(models)}
    points = [(r["p50_ms"], r["top1"]) for r in chosen]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    for r, (x, y) in zip(chosen, points, strict=True):
        ax.scatter(x, y, color=colors[r["model"]], marker=BACKEND_MARKERS.get(r["backend"], "o"), s=40, zorder=3,
                   edgecolors="black", linewidths=0.4)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="black", lw=1, zorder=2)
    for k, i in enumerate(front):  # alternately above and below: neighbours on the front are often close
        ax.annotate(_label(chosen[i], rows), points[i], textcoords="offset points", xytext=(5, 5 if k % 2 else -12),
                    fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 0.2, 5, 20 rather than 2x10^-1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=f"p50 latency at batch {batch} (ms, log scale)", ylabel="val top-1 (%)",
           title=f"Top-1 vs latency at batch {batch}" + (f": {models[0]}" if len(models) == 1 else ""))
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], ls="", marker="o", color=colors[m], label=m) for m in models]
    handles += [Line2D([], [], ls="", marker=BACKEND_MARKERS.get(b, "o"), color="gray", label=b)
                for b in sorted({r["backend"] for r in chosen})]
    handles.append(Line2D([], [], ls="--", color="black", label="Pareto front (named)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


def compare_reports(a_path: Path, b_path: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Two bench.json files side by side, rows matched on (model, artifact, batch): laptop vs Jetson, before vs
    after."""
    console = console or Console()
    reports = []
    for path in (a_path, b_path):
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not a readable bench.json ({exc}). Give two files written by "
                            "`kd2deploy bench`.") from None
        if not isinstance(reports[-1], dict) or "rows" not in reports[-1] or "context" not in reports[-1]:
            raise UserError(f"{path} is not a bench.json written by `kd2deploy bench` (no rows/context).")
    a, b = ({(r.get("model", ""), r["artifact"], r["batch"]): r for r in report["rows"]} for report in reports)
    rows = []
    for key in [*a, *(k for k in b if k not in a)]:
        ra, rb = a.get(key), b.get(key)
        rows.append({"model": key[0], "artifact": key[1], "batch": key[2], "a_p50_ms": ra and ra["p50_ms"],
                     "b_p50_ms": rb and rb["p50_ms"], "b_vs_a": ra and rb and ra["p50_ms"] / rb["p50_ms"],
                     "a_top1": ra and ra.get("top1"), "b_top1": rb and rb.get("top1")})
    table = Table("model", "artifact", Column("batch", justify="right"), Column("A p50 ms", justify="right"),
                  Column("B p50 ms", justify="right"), Column("B speed-up", justify="right"),
                  Column("A top-1 %", justify="right"), Column("B top-1 %", justify="right"),
                  title=f"A: {a_path}  vs  B: {b_path}",
                  caption=f"A: {_context_line(reports[0]['context'])}\nB: {_context_line(reports[1]['context'])}")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        table.add_row(r["model"], r["artifact"], str(r["batch"]), fmt(r["a_p50_ms"], ".3f"), fmt(r["b_p50_ms"], ".3f"),
                      fmt(r["b_vs_a"], ".2f") + ("x" if r["b_vs_a"] else ""), fmt(r["a_top1"], ".2f"),
                      fmt(r["b_top1"], ".2f"))
    print_table(console, table)
    return rows


# ----------------------------------------------------------------------------------------- the command
def default_out(paths: Sequence[Path]) -> Path:
    """One export or run folder: the report goes beside its artifacts; several: runs/bench."""
    if len(paths) == 1:
        path = Path(paths[0])
        return path if path.is_dir() else path.parent
    return DEFAULT_OUT


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
    targets = [bench_target(path, val_samples, val_dir, console) for path in paths]
    plan = [(t, select(t.deployables, backends, precisions, console)) for t in targets]
    if not any(chosen for _, chosen in plan):
        raise UserError("Nothing to benchmark: no artifact matches --backends/--precisions and runs here.")
    busy_before = busy_cores_elsewhere()
    if busy_before > 0.25 * (os.cpu_count() or 1):
        console.print(f"[yellow]Other processes keep {busy_before:.1f} of {os.cpu_count()} cores busy: latencies "
                      "will be slower and noisier than on an idle machine.[/yellow]")
    rows, failures = [], []
    timing = {"iters": iters, "warmup": warmup, "duration": duration, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="kd2deploy-bench-") as scratch:
        for index, (target, chosen) in enumerate(plan):
            if not chosen:
                continue
            val = None
            if target.images is not None:
                with console.status(f"reading {len(target.images)} val images for {target.model}"):
                    folder = Path(scratch) / str(index)
                    folder.mkdir()
                    val = _save_val(target.images, folder)
            for deployable in chosen:
                with console.status(f"benchmarking {target.model}: {deployable.name}"):
                    try:
                        rows += bench_deployable(target, deployable, val, list(batches), Path(scratch), **timing)
                    except CheckFailed as exc:
                        failures.append(str(exc))
                        console.print(f"[red]{exc}[/red]")
    if not rows:
        raise CheckFailed("No artifact could be benchmarked: " + "; ".join(failures))
    val_images = {len(t.images) for t in targets if t.images is not None}
    context = machine_context(threads, iters, warmup, max(val_images) if val_images else None, busy_before, duration,
                              [r["timing"] for r in rows])
    rec = recommendation(rows, max_drop)
    models = sorted({t.model for t in targets})
    title = f"kd2deploy bench: {', '.join(models)}"
    markdown = bench_markdown(title, rows, context) + f"\n{recommendation_line(rec)}\n"
    atomic_write_text(out / "bench.md", markdown)
    atomic_write_text(out / "bench.csv", bench_csv(rows))
    atomic_write_text(out / "bench.json", json.dumps({"context": context, "rows": rows, "recommendation": rec,
                                                      "failures": failures}, indent=2) + "\n")
    plotted = plot_accuracy_latency(rows, out / "bench.png")
    if not plotted:
        (out / "bench.png").unlink(missing_ok=True)  # an earlier run's plot would not match this report
    print_table(console, bench_table(title, rows, context))
    console.print(recommendation_line(rec))
    written = [out / f"bench.{ext}" for ext in ("md", "csv", "json")] + ([out / "bench.png"] if plotted else [])
    console.print(f"Written: {', '.join(map(str, written))}")
    if failures:
        raise CheckFailed(f"{len(failures)} artifact(s) failed; the others are in the report: " + "; ".join(failures))
    return rows


def _worker_main(job_file: str, result_file: str) -> None:
    """`python -m kd2deploy.bench JOB RESULT`: what run_isolated starts for one artifact."""
    job = json.loads(Path(job_file).read_text())
    result = measure(job)
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker_main(*sys.argv[1:3])
