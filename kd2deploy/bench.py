"""`kd2deploy bench`: top-1, latency and throughput of every artifact in an export folder, next to PyTorch eager."""
from __future__ import annotations

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
from rich.table import Table
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
from .backends import Backend
from .checkpoint import atomic_write_text, library_versions
from .machine import cpu_flags, cpu_model

# (row key, column header, format): one list drives the console table and bench.md; numbers align right
COLUMNS = [("artifact", "artifact", "{}"), ("backend", "backend", "{}"), ("precision", "precision", "{}"),
           ("batch", "batch", "{}"), ("top1", "top-1 %", "{:.2f}"), ("p50_ms", "p50 ms", "{:.3f}"),
           ("p90_ms", "p90 ms", "{:.3f}"), ("images_per_s", "images/s", "{:.0f}"), ("size_mb", "size MB", "{:.2f}")]
TEXT_COLUMNS = ("artifact", "backend", "precision")


def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Percentiles and throughput of timed runs of one batch (seconds per run)."""
    times = np.asarray(seconds, dtype=np.float64)
    p50, p90 = np.percentile(times, [50, 90])
    mean = float(times.mean())
    return {"p50_ms": 1e3 * float(p50), "p90_ms": 1e3 * float(p90), "mean_ms": 1e3 * mean, "images_per_s": batch / mean}


def time_runner(runner: Backend, batch: np.ndarray, iters: int, warmup: int) -> list[float]:
    """Seconds per run over `iters` runs, after `warmup` untimed ones (allocations, kernel selection, caches)."""
    for _ in range(warmup):
        runner.run(batch)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - start)
    return times


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


def machine_context(threads: int, iters: int, warmup: int, val_images: int, busy_before: float) -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads,
            "iters": iters, "warmup": warmup, "val_images": val_images, "busy_cores_before": busy_before,
            "versions": library_versions(),
            "command": " ".join(sys.argv), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def training_machine() -> dict[str, Any]:
    """Where a training benchmark ran: CPU, cores, GPU (if any) and library versions."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "versions": library_versions()}


def bench_deployable(deployable: Deployable, val: Dataset, batches: Sequence[int], input_shape: Sequence[int], *,
                     iters: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    """One row per batch size; top-1 is measured once, it does not depend on the batch size."""
    runner = deployable.load(threads)
    top1 = evaluate_runner(runner, val)["top1"]
    rng = np.random.default_rng(0)  # latency does not depend on pixel values; a fixed input keeps runs comparable
    rows = []
    for batch in batches:
        images = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        rows.append({"artifact": deployable.name, "backend": deployable.backend, "precision": deployable.precision,
                     "batch": batch, "top1": top1, **latency_stats(time_runner(runner, images, iters, warmup), batch),
                     "size_mb": deployable.size_bytes / 1e6})
    return rows


def _context_line(context: dict[str, Any]) -> str:
    threads = context["threads"] or "runtime default"
    versions = ", ".join(f"{k} {v}" for k, v in context["versions"].items() if k != "kd2deploy")
    flags = " ".join(context["cpu_flags"]) or "no listed SIMD flags"
    return (f"{context['cpu']} ({flags}), {context['cores']} cores ({context['busy_cores_before']:.2f} kept busy by "
            f"other processes at the start), threads: {threads}; {context['iters']} timed iterations after "
            f"{context['warmup']} warm-up; "
            f"top-1 on {context['val_images']} val images; {versions}")


def bench_markdown(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    lines = [f"# {title}", "", f"Machine: {_context_line(context)}", "", f"Command: `{context['command']}`", "",
             "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key in TEXT_COLUMNS else "---:" for key, _, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bench_table(title: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> Table:
    table = Table(title=title, caption=_context_line(context))
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="left" if key in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(fmt.format(row[key]) for key, _, fmt in COLUMNS))
    return table


def run_bench(artifact_dir: Path, batches: Sequence[int] = (1, 32), iters: int = 50, warmup: int = 10,
              threads: int = 0, val_samples: int | None = None, console: Console | None = None
              ) -> list[dict[str, Any]]:
    """Bench the PyTorch student (when its checkpoint is still there) and every artifact of an export folder;
    prints one table and writes bench.md and bench.json into the folder."""
    console = console or Console()
    folder = Path(artifact_dir)
    manifest = load_manifest(folder)
    busy_before = busy_cores_elsewhere()
    if busy_before > 0.25 * (os.cpu_count() or 1):
        console.print(f"[yellow]Other processes keep {busy_before:.1f} of {os.cpu_count()} cores busy: latencies "
                      "will be slower and noisier than on an idle machine.[/yellow]")
    deployables = manifest_deployables(folder, manifest)
    source = source_deployable(manifest)
    if source is None:
        console.print(f"[yellow]No PyTorch row: {manifest['source_checkpoint']['path']} is not on this machine, or "
                      "is no longer the checkpoint these artifacts were exported from.[/yellow]")
    val = val_split(*manifest_data(manifest, folder), val_samples)
    rows = []
    for deployable in ([source] if source else []) + deployables:
        with console.status(f"benchmarking {deployable.name}"):
            rows += bench_deployable(deployable, val, batches, manifest["input"]["shape"], iters=iters, warmup=warmup,
                                     threads=threads)

    context = machine_context(threads, iters, warmup, len(val), busy_before)
    title = f"kd2deploy bench: {manifest['model']['name']} ({folder})"
    atomic_write_text(folder / "bench.md", bench_markdown(title, rows, context))
    atomic_write_text(folder / "bench.json", json.dumps({"context": context, "rows": rows}, indent=2) + "\n")
    print_table(console, bench_table(title, rows, context))
    console.print(f"Written: {folder / 'bench.md'}, {folder / 'bench.json'}")
    return rows
