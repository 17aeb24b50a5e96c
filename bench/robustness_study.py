"""Which biases and how much robustness transfer from a teacher to a student of another architecture?

The analogues of the cross-architecture study's Table 1 (CNN -> ViT) and Table 3 (ViT -> CNN) on the CIFAR-10 JPEG
copy: for every student that bench/study_cifar10.py trained (one row per method, mean ± std over its seeds), for
the pair's teachers, and for the best distilled student of each direction as FP32 and INT8 ONNX artifacts, the
five bias values (top-1 on the set / top-1 on the original images), the cue-conflict shape bias and the mean
corruption top-1, all from `kd2deploy robustness` on sets made once by `kd2deploy robustness make-sets`.

Every evaluation is one JSON row in bench/results/robustness_study.json, written as soon as it is done, so the
study resumes where it stopped and runs on any machine: the students are the fp16 copies the study commits in
bench/students/ (or, for a row without one, its run folder when it is on this machine). Rows whose student was
never kept (they trained on another machine before the study kept students) are left out, or, with
--retrain-missing PAIR, trained again with the same recipe and seed and marked `retrained` in the table.

    python bench/robustness_study.py                    # sets (once), then everything missing, then the tables
    python bench/robustness_study.py --retrain-missing vit_to_cnn   # also retrain that pair's missing students
    python bench/robustness_study.py --pairs vit_to_cnn --retrain-missing vit_to_cnn   # only that pair's rows
    python bench/robustness_study.py --report           # only rewrite the .md and .png from the .json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_cifar10 as study

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.machine import busy_cores_elsewhere
from kd2deploy.robustness.evaluate import evaluate_target, load_sets, summarise
from kd2deploy.robustness.make import ORIGINAL, SETS_FILE, make_sets

NAME = "robustness_study"
BIAS = ["texture", "shape", "locality", "scramble_4", "noise"]  # the study's five, scramble at 4x4


def evaluate(key: str, target: Path, sets: Path, record: dict[str, Any], samples: int | None,
             console: Console) -> list[dict[str, Any]]:
    busy, started = busy_cores_elsewhere(), time.perf_counter()
    rows = evaluate_target(target, sets, record, samples, console)
    for row in rows:  # seconds and what else ran: evaluation time compares only on one quiet machine
        row.update(summarise(row, record, None), key=key, seconds=round(time.perf_counter() - started, 1),
                   busy_cores_at_start=round(busy, 2))
    return rows


def student_of(row: dict[str, Any], runs: Path) -> Path:
    """A study row's student: its committed fp16 copy, else its run folder."""
    if row.get("student_file"):
        return study.ROOT / row["student_file"]
    return runs / row["pair"] / row["method"] / f"seed{row['seed']}"


def retrained_student(row: dict[str, Any], data_root: Path, root: Path) -> Path:
    """A study row's student trained again with the row's recipe and seed, for rows whose student was not kept
    (rows from before the study kept them, trained on another machine). Its top-1 differs from the study row's by
    run-to-run noise (thread scheduling, BF16 on one machine and FP32 on another), so its rows say `retrained`."""
    run_dir = root / row["pair"] / row["method"] / f"seed{row['seed']}"
    if not (run_dir / study.STUDENT).is_file():
        study.train_student(row["pair"], row["method"], row["seed"], data_root, run_dir)
    return run_dir


def best_method(results: dict[str, Any], pair: str) -> str | None:
    """The distilled method with the highest mean top-1 in the study (one of its students is exported)."""
    stats = study.summarise(results["rows"])
    candidates = [(s["mean"], m) for (p, m), s in stats.items() if p == pair and not m.startswith("none")]
    return max(candidates)[1] if candidates else None


def best_export(studied: dict[str, Any], pair: str, runs: Path,
                exports: Path) -> tuple[str, Path, Path] | None:
    """The best method's lowest seed whose student is here: its row key, its student and its export folder."""
    best = best_method(studied, pair)
    kept = sorted((r for r in studied["rows"] if (r["pair"], r["method"]) == (pair, best)
                   and student_of(r, runs).exists()), key=lambda r: r["seed"])
    if not kept:
        return None
    name = f"{best}_seed{kept[0]['seed']}"
    return f"{pair}/{best} (best) export/{name}", student_of(kept[0], runs), exports / f"{pair}_{name}"


def exported(student: Path, export: Path, console: Console) -> Path:
    """`student` as FP32 and INT8 ONNX artifacts in `export` (exported once)."""
    if not (export / "manifest.json").exists():
        from kd2deploy.deploy.pipeline import export_run

        export_run(student, export, formats=["onnx"], precisions=["fp32", "int8"], console=console)
    return export


METRICS = [*BIAS, "shape_bias", "mean_corruption_top1"]  # the columns after top-1


def _metric(row: dict[str, Any], name: str) -> float | None:
    if name in BIAS:
        return row["bias"][name]
    return row.get(name)


def _groups(rows: list[dict[str, Any]], pair: str) -> dict[str, list[dict[str, Any]]]:
    """A pair's rows by model: its teachers, then its methods in the study's order, then the exported artifacts."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in (r for r in rows if r["key"].startswith(f"{pair}/")):
        name = r["key"].split("/")[1]
        groups.setdefault(name + ("" if r["backend"] == "pytorch" else f" {r['artifact']}"), []).append(r)
    order = [f"teacher_{k}" for k in study.pair_teachers(study.PAIRS[pair])] + list(study.PAIRS[pair]["methods"])
    return dict(sorted(groups.items(), key=lambda g: order.index(g[0]) if g[0] in order else len(order)))


def _shift(method: list[dict[str, Any]], baseline: list[dict[str, Any]], teacher: list[dict[str, Any]],
           metric: str) -> str:
    """The method's mean minus its no-teacher baseline's; `*` where that exceeds twice its standard error (both
    with several seeds); ↑ where the method's mean is nearer the teacher's value than the baseline's, ↓ where not."""
    ms, bs = ([v for r in g if (v := _metric(r, metric)) is not None] for g in (method, baseline))
    if not ms or not bs:
        return ""
    delta = statistics.mean(ms) - statistics.mean(bs)
    cell = f"{delta:+.{2 if metric == 'mean_corruption_top1' else 3}f}"
    if len(ms) > 1 and len(bs) > 1:
        error = (statistics.variance(ms) / len(ms) + statistics.variance(bs) / len(bs)) ** 0.5
        cell += "*" if abs(delta) > 2 * error else ""
    target = _metric(teacher[0], metric) if teacher else None
    if target is not None and delta:
        cell += " ↑" if abs(statistics.mean(ms) - target) < abs(statistics.mean(bs) - target) else " ↓"
    return cell


def markdown(result: dict[str, Any], record: dict[str, Any]) -> str:
    lines = ["# Bias and robustness transfer, CIFAR-10 (CPU budget)", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['context'].get('cpu', '?')}, {result['context'].get('cores', '?')} cores. Sets: "
             f"seed {record['seed']}, {record['source']['images']} test images; every bias set made offline "
             "(shape: Canny edges; texture: amplitude-phase cue conflict; no pretrained networks), corruptions at "
             "CIFAR-10-C's parameters, regenerated. Bias = top-1 on the set / top-1 on the original images (1 = "
             "unaffected); shape bias = shape / (shape + texture) hits on the cue-conflict images. Students: "
             "bench/study_cifar10.py's runs (15 epochs, 10,000 images; `retrained`: trained again here with the "
             "row's recipe and seed because the study did not keep that student); mean ± std over seeds.", ""]
    for pair, spec in study.PAIRS.items():
        groups = _groups(result["rows"], pair)
        if not groups:
            continue
        lines += [f"## {spec['title']} (`{pair}`)", "",
                  "| model | n | top-1 | " + " | ".join(BIAS) + " | shape bias | mean corruption top-1 |",
                  "|---|---:|---:|" + "---:|" * len(METRICS)]
        for name, group in groups.items():
            cells = [_stat([r["top1"][ORIGINAL] for r in group], 2)]
            cells += [_stat([_metric(r, m) for r in group], 2 if m == "mean_corruption_top1" else 3)
                      for m in METRICS]
            retrained = sum(r["key"].endswith(" retrained") for r in group)
            name += f" ({retrained} retrained)" if retrained else ""
            lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
        lines.append("")
        teachers = [k for k in groups if k.startswith("teacher_")]
        distilled = [m for m, s in spec["methods"].items() if s.get("teachers") and m in groups]
        if teachers and distilled:
            teacher = groups[teachers[0]]
            lines += [f"Shift from the no-teacher student (`none`, or the method's own student; `none_2x`: the "
                      f"same student trained twice as long, an accuracy control), method mean − baseline mean. "
                      f"`*`: more than twice its standard error; ↑: nearer the teacher's ({teachers[0]}) value "
                      "than the baseline is, ↓: farther.", "",
                      "| model | vs | top-1 | " + " | ".join(BIAS) + " | shape bias | mean corruption top-1 |",
                      "|---|---|---:|" + "---:|" * len(METRICS)]
            for method in [m for m in ("none_2x", *distilled) if m in groups]:
                base = study.BASELINE.get(method, "none")
                if base not in groups:
                    continue
                top1 = [statistics.mean(r["top1"][ORIGINAL] for r in g) for g in (groups[method], groups[base])]
                cells = [f"{top1[0] - top1[1]:+.2f}"]
                cells += [_shift(groups[method], groups[base], teacher, m) for m in METRICS]
                lines.append(f"| {method} | {base} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Each model's bias profile (the five ratios and the shape bias), one panel per pair, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [*BIAS, "shape_bias"]
    fig, axes = plt.subplots(1, len(study.PAIRS), figsize=(7 * len(study.PAIRS), 4.5), squeeze=False)
    for ax, (pair, spec) in zip(axes[0], study.PAIRS.items(), strict=True):
        groups = _groups(result["rows"], pair)
        for i, (name, group) in enumerate(groups.items()):
            values = [[v for r in group if (v := _metric(r, m)) is not None] for m in ratios]
            means = [statistics.mean(v) if v else float("nan") for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            style = ({"color": "black", "lw": 2.5, "ls": "-" if i == 0 else ":"} if name.startswith("teacher_") else
                     {"color": "grey", "ls": {"none": "--", "none_2x": "-."}.get(name, ":")} if name.startswith("none")
                     else {"lw": 1.2})
            ax.errorbar([j + 0.03 * (i - len(groups) / 2) for j in range(len(ratios))], means, yerr=stds,
                        marker="o", ms=3, capsize=2, label=name, **style)
        ax.set_xticks(range(len(ratios)), ratios)
        ax.set_ylabel("top-1 ratio to the originals; shape bias")
        ax.set_title(spec["title"])
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    partial_path = path.with_suffix(".partial.png")  # written whole, then moved: a stopped run leaves no torn file
    fig.savefig(partial_path, dpi=110)
    plt.close(fig)
    partial_path.replace(path)


def _stat(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(result: dict[str, Any], record: dict[str, Any]) -> None:
    atomic_write_text(study.RESULTS / f"{NAME}.md", markdown(result, record))
    plot(result, study.RESULTS / f"{NAME}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 JPEG root")
    parser.add_argument("--runs", type=Path, default=Path("runs/study"), help="the study's run folders")
    parser.add_argument("--sets", type=Path, default=Path("runs/robustness/sets"))
    parser.add_argument("--val-samples", type=int, default=None, help="images per set (default: all)")
    parser.add_argument("--pairs", nargs="+", default=list(study.PAIRS), choices=list(study.PAIRS), metavar="PAIR",
                        help="evaluate only these pairs' rows (default: both)")
    parser.add_argument("--retrain-missing", nargs="+", choices=list(study.PAIRS), metavar="PAIR",
                        help="retrain (same recipe and seed) the students of these pairs' study rows that were not "
                             "kept, instead of leaving those rows out")
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the JSON")
    parser.add_argument("--commit", action="store_true", help="git-commit the results after every evaluation")
    args = parser.parse_args()
    console = Console(stderr=True)
    path = study.RESULTS / f"{NAME}.json"
    if args.report and not path.exists():
        print(f"{path} does not exist yet: run `python bench/robustness_study.py` first (--report only rewrites "
              "the table from it).", file=sys.stderr)
        sys.exit(2)
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if not (args.sets / SETS_FILE).exists():
        make_sets(args.data / "test", args.sets, seed=0, console=console)
    record = load_sets(args.sets)
    if not args.report:
        if result["rows"] and result.get("val_samples") != args.val_samples:
            print(f"{path} holds rows evaluated with --val-samples {result.get('val_samples')}; resume with the "
                  "same value, or move the file away to start over with another.", file=sys.stderr)
            sys.exit(2)
        result.update(command="python bench/robustness_study.py", context=training_machine(),
                      val_samples=args.val_samples)
        done = {r["key"] for r in result["rows"]}
        studied = study.load_results()
        # each row's target, made only when the row is still to do: what is here first, then the retrains,
        # cheapest first (a session that stops keeps what it finished)
        kept: list[tuple[str, Callable[[], Path]]] = []
        retrain: list[tuple[float, str, Callable[[], Path]]] = []
        for pair, spec in study.PAIRS.items():
            if pair not in args.pairs:
                continue
            kept += [(f"{pair}/teacher_{k}", partial(Path, study.TEACHERS_DIR / study.load_manifest()[k]["file"]))
                     for k in study.pair_teachers(spec)]
            for r in studied["rows"]:
                key, target = f"{pair}/{r['method']}/seed{r['seed']}", student_of(r, args.runs)
                if r["pair"] != pair or key in done or f"{key} retrained" in done:
                    continue
                if target.exists():
                    kept.append((key, partial(Path, target)))
                elif pair in (args.retrain_missing or []):
                    retrain.append((r["wall_s"], f"{key} retrained",
                                    partial(retrained_student, r, args.data, args.sets.parent / "retrained")))
            best = best_export(studied, pair, args.runs, args.sets.parent / "exports")
            if best:
                key, student, export = best
                kept.append((key, partial(exported, student, export, console)))
        todo = kept + [(key, make) for _, key, make in sorted(retrain, key=lambda t: t[0])]
        for key, make in todo:
            if key in done:
                continue
            target = make()
            if not target.exists():
                continue
            result["rows"] += evaluate(key, target, args.sets, record, args.val_samples, console)
            atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
            report(result, record)
            if args.commit:
                study.commit(f"robustness_study: {key}", [study.RESULTS / f"{NAME}.{e}" for e in ("json", "md", "png")])
    report(result, record)
    print((study.RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
