"""`kd2deploy robustness TARGET… --sets DIR`: top-1 of run folders, student.pt files, export folders and single
artifacts on every set that `make-sets` wrote, the bias ratios, the cue-conflict shape bias and the corruption
figures; torch-free except for PyTorch checkpoints, so an INT8 artifact is measured on the edge install.

- bias = top-1 on the set / top-1 on `original/` (the same images unmanipulated);
- shape bias (cue conflict, `texture` set) = shape hits / (shape hits + texture hits), Geirhos et al. 2019;
- mean corruption accuracy = the mean top-1 over every corruption and severity;
- mCE (Hendrycks & Dietterich 2019) = mean over corruptions c of Σ_s err(model, c, s) / Σ_s err(reference, c, s),
  with the reference given by --reference (one of the targets' rows, or another target).
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Column, Table

from ..bench.resolve import resolve
from ..checkpoint import atomic_write_text
from ..console import print_table
from ..errors import UserError
from .make import CONFLICTS, ORIGINAL, SETS_FILE, tree_digest


def load_sets(sets_dir: Path, verify: bool = True) -> dict[str, Any]:
    """sets.json, with every set's folder present and (verify) unchanged since it was made."""
    path = Path(sets_dir) / SETS_FILE
    if not path.is_file():
        raise UserError(f"{sets_dir} holds no {SETS_FILE}: it is not a folder written by `kd2deploy robustness "
                        "make-sets`. Make the sets first: kd2deploy robustness make-sets --val VAL_DIR --out DIR.")
    try:
        record = json.loads(path.read_text())
        names = [ORIGINAL, *record["sets"]]
        digests = {ORIGINAL: record["source"]["sha256"], **{k: v["sha256"] for k, v in record["sets"].items()}}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid sets record ({exc}). Make the sets again.") from None
    missing = [name for name in names if not (Path(sets_dir) / name).is_dir()]
    if missing:
        raise UserError(f"{sets_dir} lacks the set folder(s) {', '.join(missing)} that {SETS_FILE} lists. Make the "
                        "sets again (kd2deploy robustness make-sets), or restore the folders.")
    if verify:
        changed = [name for name in names if tree_digest(Path(sets_dir) / name) != digests[name]]
        if changed:
            raise UserError(f"The set folder(s) {', '.join(changed)} in {sets_dir} changed since they were made "
                            f"(their sha256 differs from {SETS_FILE}). Make the sets again.")
    return record


def _predictions(run: Any, images: Any) -> tuple[np.ndarray, np.ndarray]:
    predicted, labels = [], []
    for batch, batch_labels in images.batches(64):
        predicted.append(np.asarray(run(batch)).argmax(axis=1))
        labels.append(batch_labels)
    return np.concatenate(predicted), np.concatenate(labels)


def _shape_hits(sets_dir: Path, images: Any, predicted: np.ndarray, class_index: dict[str, int]) -> dict[str, Any]:
    """Cue-conflict counts from conflicts.csv: how often the prediction is the shape's class or the texture's."""
    with open(sets_dir / "texture" / CONFLICTS) as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    shape = texture = 0
    for item, guess in zip(images.items, predicted, strict=True):
        row = rows[f"{Path(item).parent.name}/{Path(item).name}"]
        shape += int(guess == class_index[row["shape_class"]])
        texture += int(guess == class_index[row["texture_class"]])
    return {"shape_hits": shape, "texture_hits": texture,
            "shape_bias": shape / (shape + texture) if shape + texture else None}


def evaluate_target(target: Path, sets_dir: Path, record: dict[str, Any], samples: int | None,
                    console: Console) -> list[dict[str, Any]]:
    """One row per deployable of `target`: top-1 on every set."""
    model = resolve(target, 0, console=console)
    images = {name: resolve(target, samples, sets_dir / name, console).images
              for name in [ORIGINAL, *record["sets"]]}
    class_index = {name: i for i, name in enumerate(record["source"]["classes"])}
    rows = []
    for deployable in model.deployables:
        runner = deployable.load()
        top1, extra = {}, {}
        with console.status(f"{target}: {deployable.name} on {len(images)} sets"):
            for name, labelled in images.items():
                predicted, labels = _predictions(runner.run, labelled)
                top1[name] = 100 * float((predicted == labels).mean())
                if name == "texture":
                    extra = _shape_hits(sets_dir, labelled, predicted, class_index)
        rows.append({"target": str(target), "artifact": deployable.name, "backend": deployable.backend,
                     "precision": deployable.precision, "top1": top1, **extra})
    return rows


def summarise(row: dict[str, Any], record: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Bias ratios, mean corruption accuracy and (with a reference row) mCE of one row."""
    top1, base = row["top1"], row["top1"][ORIGINAL]
    sets = record["sets"]
    bias = {name: top1[name] / base if base else None for name, spec in sets.items() if spec["kind"] == "bias"}
    corruptions = {name: top1[name] for name, spec in sets.items() if spec["kind"] == "corruption"}
    out = {"bias": bias, "mean_corruption_top1": statistics.mean(corruptions.values()) if corruptions else None}
    if reference is not None and corruptions:
        ces = []
        for kind in sorted({sets[name]["params"]["corruption"] for name in corruptions}):
            names = [n for n in corruptions if sets[n]["params"]["corruption"] == kind]
            ref_err = sum(100 - reference["top1"][n] for n in names)
            ces.append(sum(100 - top1[n] for n in names) / ref_err if ref_err else float("nan"))
        out["mce"] = statistics.mean(ces)
    return out


def robustness(targets: list[Path], sets_dir: Path, samples: int | None = None, reference: Path | None = None,
               out: Path | None = None, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    sets_dir = Path(sets_dir)
    record = load_sets(sets_dir)
    rows = [row for target in targets for row in evaluate_target(Path(target), sets_dir, record, samples, console)]
    reference_row = None
    if reference is not None:
        matches = [r for r in rows if Path(r["target"]) == Path(reference)]
        reference_row = (matches or evaluate_target(Path(reference), sets_dir, record, samples, console))[0]
    for row in rows:
        row.update(summarise(row, record, reference_row))
    result = {"sets": str(sets_dir), "sets_record": {k: record[k] for k in ("seed", "source", "kd2deploy")},
              "constructions": {name: spec["construction"] for name, spec in record["sets"].items()},
              "reference": str(reference) if reference else None, "rows": rows}
    out = Path(out or ".")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "robustness.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "robustness.csv", _csv(rows, record))
    atomic_write_text(out / "robustness.md", markdown(result, record))
    _plot(rows, record, out / "robustness.png", console)
    _print(rows, record, console)
    return result


def _bias_names(record: dict[str, Any]) -> list[str]:
    return [name for name, spec in record["sets"].items() if spec["kind"] == "bias"]


def _csv(rows: list[dict[str, Any]], record: dict[str, Any]) -> str:
    names = [ORIGINAL, *record["sets"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["target", "artifact", "backend", "precision", *[f"top1_{n}" for n in names],
                     *[f"bias_{n}" for n in _bias_names(record)], "shape_bias", "mean_corruption_top1", "mce"])
    for r in rows:
        writer.writerow([r["target"], r["artifact"], r["backend"], r["precision"],
                         *[f"{r['top1'][n]:.2f}" for n in names],
                         *[_fmt(r["bias"].get(n), 3) for n in _bias_names(record)],
                         _fmt(r.get("shape_bias"), 3), _fmt(r["mean_corruption_top1"], 2), _fmt(r.get("mce"), 3)])
    return buffer.getvalue()


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any], record: dict[str, Any]) -> str:
    bias_names = _bias_names(record)
    lines = ["# Robustness and bias", "",
             f"Sets: `{result['sets']}` (seed {record['seed']}, {record['source']['images']} source images from "
             f"`{record['source']['dir']}`). Constructions: "
             + ", ".join(f"{n}: {c}" for n, c in result["constructions"].items() if n in bias_names)
             + ". Corruptions: CIFAR-10-C parameters, regenerated (not the official files). Bias = top-1 on the set "
             "/ top-1 on the original images; shape bias = shape hits / (shape + texture hits) on the cue-conflict "
             "`texture` set.", "",
             "| target | artifact | top-1 original | " + " | ".join(bias_names)
             + " | shape bias | mean corruption top-1 | mCE |",
             "|---|---|---:|" + "---:|" * (len(bias_names) + 3)]
    for r in result["rows"]:
        lines.append(f"| {r['target']} | {r['artifact']} | {r['top1'][ORIGINAL]:.2f} | "
                     + " | ".join(_fmt(r["bias"][n], 3) for n in bias_names)
                     + f" | {_fmt(r.get('shape_bias'), 3)} | {_fmt(r['mean_corruption_top1'], 2)} | "
                     f"{_fmt(r.get('mce'), 3)} |")
    return "\n".join(lines) + "\n"


def _print(rows: list[dict[str, Any]], record: dict[str, Any], console: Console) -> None:
    bias_names = _bias_names(record)
    table = Table("target", "artifact", Column("original", justify="right"),
                  *[Column(n, justify="right") for n in bias_names], Column("shape bias", justify="right"),
                  Column("corruption top-1", justify="right"), Column("mCE", justify="right"),
                  title="top-1 on the original images; bias ratios (set / original)")
    for r in rows:
        table.add_row(r["target"], r["artifact"], f"{r['top1'][ORIGINAL]:.2f}",
                      *[_fmt(r["bias"][n], 3) for n in bias_names], _fmt(r.get("shape_bias"), 3),
                      _fmt(r["mean_corruption_top1"], 2), _fmt(r.get("mce"), 3))
    print_table(console, table)


def _plot(rows: list[dict[str, Any]], record: dict[str, Any], path: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print(f"[yellow]matplotlib is not installed: no {path.name} (the tables are written).[/yellow]")
        return
    names = _bias_names(record)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(names))], [r["bias"][n] or 0 for n in names], width,
               label=f"{Path(r['target']).name} {r['artifact']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30)
    ax.set_ylabel("top-1 on the set / top-1 on the original")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
