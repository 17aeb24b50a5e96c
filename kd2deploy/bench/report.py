"""Bench reports: the console table, bench.md/csv/json, the recommendation, the accuracy-vs-latency plot with its
Pareto front, and `--compare` of two bench.json files."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from ..backends import get_backend, list_backends
from ..checkpoint import atomic_write, atomic_write_text
from ..console import print_table
from ..errors import UserError

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


def _marker(backend: str) -> str:
    return get_backend(backend).marker if backend in list_backends() else "o"


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
        ax.scatter(x, y, color=colors[r["model"]], marker=_marker(r["backend"]), s=40, zorder=3,
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
    handles += [Line2D([], [], ls="", marker=_marker(b), color="gray", label=b)
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


def write_report(out: Path, title: str, rows: list[dict[str, Any]], context: dict[str, Any],
                 rec: dict[str, Any] | None, failures: list[str], console: Console) -> list[Path]:
    """bench.md, bench.csv, bench.json and (with top-1) bench.png into `out`; the table and recommendation on the
    console. Returns the files written."""
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
    return written
