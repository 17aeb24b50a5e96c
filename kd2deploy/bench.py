"""`kd2deploy bench`: top-1, latency and throughput of every artifact in an export folder, next to PyTorch eager."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Column, Table
from torch.utils.data import Dataset

from .artifacts import (
    Deployable,
    evaluate_runner,
    load_manifest,
    manifest_data,
    manifest_deployables,
    print_table,
    source_deployable,
    val_split,
)
from .backends import Backend, get_backend
from .checkpoint import atomic_write, atomic_write_text, library_versions
from .errors import UserError
from .machine import cpu_flags, cpu_model

# (row key, column header, format): one list drives the console table and bench.md; numbers align right
COLUMNS = [("artifact", "artifact", "{}"), ("backend", "backend", "{}"), ("precision", "precision", "{}"),
           ("batch", "batch", "{}"), ("top1", "top-1 %", "{:.2f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p90_ms", "p90 ms", "{:.3f}"), ("p99_ms", "p99 ms", "{:.3f}"), ("mean_ms", "mean ms", "{:.3f}"),
           ("images_per_s", "images/s", "{:.0f}"), ("size_mb", "size MB", "{:.2f}")]
TEXT_COLUMNS = ("artifact", "backend", "precision")


def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Percentiles (numpy's linear interpolation), mean and throughput of timed runs of one batch."""
    times = np.asarray(seconds, dtype=np.float64)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return {"p50_ms": 1e3 * float(p50), "p90_ms": 1e3 * float(p90), "p99_ms": 1e3 * float(p99),
            "mean_ms": 1e3 * mean, "images_per_s": batch / mean, "runs": len(times)}


def time_runner(runner: Backend, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None
                ) -> list[float]:
    """Seconds per run after `warmup` untimed runs (allocations, kernel selection, caches): `iters` runs, or with
    `duration`, as many as fit in that many seconds (at least `iters`)."""
    for _ in range(warmup):
        runner.run(batch)
    times: list[float] = []
    deadline = time.perf_counter() + (duration or 0.0)
    while len(times) < iters or time.perf_counter() < deadline:
        start = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - start)
    return times


class _NullRunner:
    """Returns its input: timing it measures what the harness itself adds to every timed call."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch


def harness_overhead_us(runs: int = 2000) -> float:
    """Median microseconds the timing loop adds per call (timer reads, list append, the call itself)."""
    return 1e6 * float(np.median(time_runner(_NullRunner(), np.zeros(1, np.float32), runs, 10)))


def busy_cores_elsewhere(window_s: float = 0.5) -> float:
    """Cores other processes kept busy over a short window: /proc/stat's busy time minus this process's own.
    Unlike the load average, which decays over a minute, this reads the machine as the timing starts."""
    def sample() -> tuple[float, float]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system
    try:
        busy0, own0 = sample()
        time.sleep(window_s)
        busy1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]  # not Linux: the load average is the best there is
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / window_s


def machine_context(threads: int, iters: int, warmup: int, val_images: int, busy_before: float,
                    duration: float | None = None) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads,
            "iters": iters, "warmup": warmup, "duration_s": duration, "val_images": val_images,
            "busy_cores_before": busy_before, "harness_overhead_us": harness_overhead_us(),
            "versions": library_versions(),
            "command": " ".join(sys.argv), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def training_machine() -> dict[str, Any]:
    """Where a training benchmark ran: CPU, cores, GPU (if any) and library versions."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "versions": library_versions()}


def bench_deployable(deployable: Deployable, val: Dataset, batches: Sequence[int], input_shape: Sequence[int], *,
                     iters: int, warmup: int, threads: int, duration: float | None = None) -> list[dict[str, Any]]:
    """One row per batch size; top-1 is measured once, it does not depend on the batch size."""
    runner = deployable.load(threads)
    top1 = evaluate_runner(runner, val)["top1"]
    rng = np.random.default_rng(0)  # latency does not depend on pixel values; a fixed input keeps runs comparable
    rows = []
    for batch in batches:
        images = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        rows.append({"artifact": deployable.name, "backend": deployable.backend, "precision": deployable.precision,
                     "batch": batch, "top1": top1,
                     **latency_stats(time_runner(runner, images, iters, warmup, duration), batch),
                     "size_mb": deployable.size_bytes / 1e6})
    return rows


def _context_line(context: dict[str, Any]) -> str:
    threads = context["threads"] or "runtime default"
    versions = ", ".join(f"{k} {v}" for k, v in context["versions"].items() if k != "kd2deploy")
    flags = " ".join(context["cpu_flags"]) or "no listed SIMD flags"
    runs = (f"at least {context['iters']} timed runs and {context['duration_s']:g} s" if context.get("duration_s")
            else f"{context['iters']} timed runs")
    overhead = context.get("harness_overhead_us")
    overhead_text = f"; harness overhead {overhead:.2f} µs per call" if overhead is not None else ""
    return (f"{context['cpu']} ({flags}), {context['cores']} cores ({context['busy_cores_before']:.2f} kept busy by "
            f"other processes at the start), threads: {threads}; {runs} after {context['warmup']} warm-up runs "
            f"(excluded){overhead_text}; top-1 on {context['val_images']} val images; {versions}")


def bench_markdown(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    lines = [f"# {title}", "", f"Machine: {_context_line(context)}", "", f"Command: `{context['command']}`", "",
             "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bench_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[key for key, _, _ in COLUMNS], extrasaction="ignore", lineterminator="\n")
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


def recommendation(rows: list[dict[str, Any]], max_drop: float) -> dict[str, Any] | None:
    """The fastest artifact at the smallest batch whose top-1 is within max_drop points of the most accurate one."""
    batch = min((r["batch"] for r in rows), default=None)
    candidates = [r for r in rows if r["batch"] == batch]
    if not candidates:
        return None
    best_top1 = max(r["top1"] for r in candidates)
    fastest = min((r for r in candidates if r["top1"] >= best_top1 - max_drop), key=lambda r: r["p50_ms"])
    return {"artifact": fastest["artifact"], "batch": batch, "p50_ms": fastest["p50_ms"], "top1": fastest["top1"],
            "drop": best_top1 - fastest["top1"], "max_drop": max_drop}


def recommendation_line(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "No rows, no recommendation."
    return (f"Recommended: {rec['artifact']}, the fastest at batch {rec['batch']} ({rec['p50_ms']:.3f} ms p50) within "
            f"{rec['max_drop']:g} top-1 points of the most accurate (it loses {rec['drop']:.2f}).")


def plot_accuracy_latency(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Top-1 against p50 latency at the smallest batch, one point per artifact, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and boards
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batch = min(r["batch"] for r in rows)
    chosen = [r for r in rows if r["batch"] == batch]
    points = [(r["p50_ms"], r["top1"]) for r in chosen]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(*zip(*points, strict=True), color="tab:gray", zorder=2)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color="tab:red", zorder=3,
            label="Pareto front")
    for r, (x, y) in zip(chosen, points, strict=True):
        ax.annotate(r["artifact"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        set_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 2, 3, 5 rather than 2x10^0
    ax.set(xlabel=f"p50 latency, batch {batch} (ms, log scale)", ylabel="val top-1 (%)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def compare_reports(a_path: Path, b_path: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Two bench.json files side by side, rows matched on (artifact, batch): laptop vs Jetson, before vs after."""
    console = console or Console()
    reports = []
    for path in (a_path, b_path):
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not a readable bench.json ({exc}). Give two files written by "
                            "`kd2deploy bench`.") from None
        if not isinstance(reports[-1], dict) or "rows" not in reports[-1] or "context" not in reports[-1]:
            raise UserError(f"{path} is not a bench.json written by `kd2deploy bench` (no rows/context).")
    a, b = ({(r["artifact"], r["batch"]): r for r in report["rows"]} for report in reports)
    rows = []
    for key in [*a, *(k for k in b if k not in a)]:
        ra, rb = a.get(key), b.get(key)
        rows.append({"artifact": key[0], "batch": key[1], "a_p50_ms": ra and ra["p50_ms"],
                     "b_p50_ms": rb and rb["p50_ms"], "b_vs_a": ra and rb and ra["p50_ms"] / rb["p50_ms"],
                     "a_top1": ra and ra["top1"], "b_top1": rb and rb["top1"]})
    table = Table("artifact", Column("batch", justify="right"), Column("A p50 ms", justify="right"),
                  Column("B p50 ms", justify="right"), Column("B speed-up", justify="right"),
                  Column("A top-1 %", justify="right"), Column("B top-1 %", justify="right"),
                  title=f"A: {a_path}  vs  B: {b_path}",
                  caption=f"A: {_context_line(reports[0]['context'])}\nB: {_context_line(reports[1]['context'])}")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        table.add_row(r["artifact"], str(r["batch"]), fmt(r["a_p50_ms"], ".3f"), fmt(r["b_p50_ms"], ".3f"),
                      fmt(r["b_vs_a"], ".2f") + ("x" if r["b_vs_a"] else ""), fmt(r["a_top1"], ".2f"),
                      fmt(r["b_top1"], ".2f"))
    print_table(console, table)
    return rows


def bench_table(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> Table:
    table = Table(title=title, caption=_context_line(context))
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="left" if key in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(fmt.format(row[key]) for key, _, fmt in COLUMNS))
    return table


def run_bench(artifact_dir: Path, batches: Sequence[int] = (1, 32), iters: int = 50, warmup: int = 10,
              threads: int = 0, val_samples: int | None = None, duration: float | None = None,
              max_drop: float = 1.0, console: Console | None = None) -> list[dict[str, Any]]:
    """Bench the PyTorch student (when its checkpoint is still there) and every artifact of an export folder that
    runs here; prints one table and a recommendation, and writes bench.md, bench.csv, bench.json and the
    accuracy-vs-latency plot bench.png into the folder."""
    console = console or Console()
    folder = Path(artifact_dir)
    manifest = load_manifest(folder)
    busy_before = busy_cores_elsewhere()
    if busy_before > 0.25 * (os.cpu_count() or 1):
        console.print(f"[yellow]Other processes keep {busy_before:.1f} of {os.cpu_count()} cores busy: latencies "
                      "will be slower and noisier than on an idle machine.[/yellow]")
    deployables = []
    for deployable in manifest_deployables(folder, manifest):
        reason = get_backend(deployable.backend).unavailable()
        if reason:  # a TensorRT engine on a machine without TensorRT: bench it on its device
            console.print(f"[yellow]Skipping {deployable.name}: {reason}.[/yellow]")
        else:
            deployables.append(deployable)
    source = source_deployable(manifest)
    if source is None:
        console.print(f"[yellow]No PyTorch row: {manifest['source_checkpoint']['path']} is not on this machine, or "
                      "is no longer the checkpoint these artifacts were exported from.[/yellow]")
    val = val_split(*manifest_data(manifest, folder), val_samples)
    rows = []
    for deployable in ([source] if source else []) + deployables:
        with console.status(f"benchmarking {deployable.name}"):
            rows += bench_deployable(deployable, val, batches, manifest["input"]["shape"], iters=iters, warmup=warmup,
                                     threads=threads, duration=duration)

    context = machine_context(threads, iters, warmup, len(val), busy_before, duration)
    rec = recommendation(rows, max_drop)
    title = f"kd2deploy bench: {manifest['model']['name']} ({folder})"
    markdown = bench_markdown(title, rows, context) + f"\n{recommendation_line(rec)}\n"
    atomic_write_text(folder / "bench.md", markdown)
    atomic_write_text(folder / "bench.csv", bench_csv(rows))
    atomic_write_text(folder / "bench.json",
                      json.dumps({"context": context, "rows": rows, "recommendation": rec}, indent=2) + "\n")
    plot_accuracy_latency(rows, folder / "bench.png", f"{manifest['model']['name']}: top-1 vs latency")
    print_table(console, bench_table(title, rows, context))
    console.print(recommendation_line(rec))
    console.print(f"Written: {', '.join(str(folder / f'bench.{ext}') for ext in ('md', 'csv', 'json', 'png'))}")
    return rows
