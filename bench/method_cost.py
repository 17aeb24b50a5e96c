"""What each distillation method costs: seconds per training epoch against no teacher on the same student, in one run.

Every method of bench/study_cifar10.py's two pairs (the same students, teachers, optimisers and recipes) trains for
2 epochs on a seeded subset of the CIFAR-10 JPEG training images, each in a fresh `kd2deploy train` process, one
after the other; the second epoch's time (the first includes warm-up) is scaled to 10,000 images. "setup s" is the
rest of the process's wall time (start, data, models, a method's preparatory stage such as SSKD's teacher head,
the two evaluations); it is reported, not hidden. Nothing else may run meanwhile: the table records the load.

    python bench/method_cost.py                     # both pairs, every method
    python bench/method_cost.py --pairs cnn_to_vit  # measure one pair again (the other's rows are kept)
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_cifar10 as study

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.machine import busy_cores_elsewhere

NAME = "method_cost"
SKIP = {"none_2x"}  # the same cost per epoch as none


def run(pair: str, method: str, images: int, data_root: Path, run_root: Path) -> dict[str, Any]:
    run_dir = run_root / pair / method
    raw = study.student_recipe(pair, method, 0, data_root, run_dir)
    raw["data"]["train_subset"] = images
    raw["optim"]["epochs"] = 2
    raw["name"] = f"{NAME}_{pair}_{method}"
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = run_dir / "cost_recipe.yaml"
    atomic_write_text(recipe, yaml.safe_dump(raw, sort_keys=False))
    busy = busy_cores_elsewhere()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kd2deploy", "train", str(recipe), "--overwrite"], check=True,
                         cwd=study.ROOT)
    wall = time.perf_counter() - started
    with open(run_dir / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    second = history[-1]
    epoch_s = float(second["epoch_s"])
    return {"pair": pair, "method": method, "train_images": int(float(second["train_images"])),
            "s_per_epoch_10k": round(epoch_s * 10_000 / float(second["train_images"]), 2),
            "images_per_s": round(float(second["images_per_s"]), 1),
            "setup_s": round(wall - sum(float(r["epoch_s"]) for r in history), 1), "wall_s": round(wall, 1),
            "busy_cores_at_start": round(busy, 2)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Cost of each distillation method (seconds per epoch)", "",
             "Each pair is measured in one run, methods one after the other, nothing else running (busy cores at "
             "each start in the JSON), so its ratios compare like with like. Second of 2 epochs on a seeded subset, "
             "scaled to 10,000 images; the study's students, teachers, optimisers and bf16 autocast.", ""]
    for pair, spec in study.PAIRS.items():
        rows = [r for r in result["rows"] if r["pair"] == pair]
        if not rows:
            continue
        base = next((r["s_per_epoch_10k"] for r in rows if r["method"] == "none"), None)
        measured = result["runs"][pair]
        ctx = measured["context"]
        lines += [f"## {spec['title']} (`{pair}`)", "",
                  f"Command: `{measured['command']}` ({measured['date']})  ",
                  f"Machine: {ctx.get('cpu', '?')}, {ctx.get('cores', '?')} cores, GPU: {ctx.get('gpu') or 'none'}; "
                  f"torch {ctx.get('versions', {}).get('torch', '?')}.", "",
                  *([] if measured["complete"] else [f"Partial: the run stopped after `{rows[-1]['method']}`; "
                                                      "measure the pair again for its other methods.", ""]),
                  "| method | s / epoch (10k images) | × no teacher | images/s | setup s |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            ratio = f"{r['s_per_epoch_10k'] / base:.2f}" if base else ""
            lines.append(f"| {r['method']} | {r['s_per_epoch_10k']:.1f} | {ratio} | {r['images_per_s']:.0f} | "
                         f"{r['setup_s']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 JPEG root")
    parser.add_argument("--runs", type=Path, default=Path("runs/method_cost"))
    parser.add_argument("--pairs", nargs="*", default=list(study.PAIRS), choices=list(study.PAIRS))
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch")
    args = parser.parse_args()
    for key in sorted({k for pair in args.pairs for k in study.pair_teachers(study.PAIRS[pair])}):
        study.ensure_teacher(key, args.data)
    # a pair is always measured whole, in one run; the other pairs' rows of an earlier run are kept
    path = study.RESULTS / f"{NAME}.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if "runs" not in result:  # written before pairs were recorded one by one: one run for every pair in it
        result["runs"] = {pair: {"command": result.get("command", "?"), "context": result.get("context", {}),
                                 "date": "2026-12-01", "complete": set(study.PAIRS[pair]["methods"]) - SKIP
                                 <= {r["method"] for r in result["rows"] if r["pair"] == pair}}
                          for pair in {r["pair"] for r in result["rows"]}}
    command = "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    for pair in args.pairs:
        result["rows"] = [r for r in result["rows"] if r["pair"] != pair]
        result["runs"][pair] = {"command": command, "context": training_machine(),
                                "date": time.strftime("%Y-%m-%d"), "complete": False}
        for method in study.PAIRS[pair]["methods"]:
            if method in SKIP:
                continue
            result["rows"].append(run(pair, method, args.images, args.data, args.runs))
            result["runs"][pair]["complete"] = method == list(study.PAIRS[pair]["methods"])[-1]
            study.RESULTS.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
            atomic_write_text(study.RESULTS / f"{NAME}.md", markdown(result))
    print((study.RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
