"""The LIB-KD family on the CIFAR-10 JPEG copy, CPU budget: epoch time with and without the teacher-output cache,
and val top-1 of a tiny ViT with no teacher, each teacher alone, LIB-KD, CiT and CSKD at the same budget.

1. Trains the CNN and the involution teacher (recipes/libkd_cifar10_{cnn,inn}_teacher.yaml) if their runs are
   missing or unfinished.
2. Timing: one epoch of the LIB-KD recipe each (a) with no teacher, (b) with both teachers online, (c) with the
   teacher-output cache, in this order, in this process. The cache is built (or found) before (c) and its build
   time is reported separately: it is paid once per teacher, data and view set, not per run or epoch.
3. Accuracy: six students on the same data, epochs, schedule and seed; they differ only in student head and
   method. The distilled ones read their teachers through the cache.

    mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C data/cifar10-jpeg
    python bench/libkd_cifar10.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.models import count_params
from kd2deploy.recipe import bundled_recipes_dir, load_recipe
from kd2deploy.train.engine import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = bundled_recipes_dir()


def flow(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def teacher_specs() -> list[dict]:
    return yaml.safe_load((RECIPES / "libkd_cifar10_vit_tiny.yaml").read_text())["teachers"]


def runs() -> list[tuple[str, str, str, list[str]]]:
    """(folder, label, recipe, overrides) of the accuracy runs."""
    cnn, inn = teacher_specs()
    no_cache = "teacher_cache.enabled=false"
    return [
        ("none", "no teacher", "libkd_cifar10_vit_tiny",
         ["teachers=[]", "distill={method: none}", "student.name=vit_nano_patch4_32", "student.kwargs={}",
          no_cache]),
        ("cnn", "CNN teacher only (LIB-KD, 1 teacher)", "libkd_cifar10_vit_tiny",
         [f"teachers=[{flow(cnn)}]", "distill.teacher_weights=null"]),
        ("inn", "INN teacher only (LIB-KD, 1 teacher)", "libkd_cifar10_vit_tiny",
         [f"teachers=[{flow(inn)}]", "distill.teacher_weights=null"]),
        ("libkd", "LIB-KD (CNN + INN)", "libkd_cifar10_vit_tiny", []),
        ("cit", "CiT (conv + inv tokens)", "cit_cifar10", []),
        ("cskd", "CSKD (CNN, dense)", "cskd_cifar10", []),
    ]


def train(recipe_name: str, overrides: list[str], console: Console) -> tuple[Trainer, dict, float]:
    path = RECIPES / f"{recipe_name}.yaml"
    recipe = load_recipe(path, overrides)
    start = time.perf_counter()
    trainer = Trainer(recipe, str(path), resume="auto", console=console)
    setup_s = time.perf_counter() - start
    return trainer, trainer.fit(), setup_s


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_libkd"), help="run folders")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run, e.g. optim.epochs=1")
    args = parser.parse_args()
    console = Console()
    common = [f"data.root={args.data}", *args.overrides]
    teacher_dirs = {}
    rows = []

    for kind in ("cnn", "inn"):
        folder = args.out / f"teacher_{kind}"
        trainer, metrics, _ = train(f"libkd_cifar10_{kind}_teacher", [*common, f"output.dir={folder}"], console)
        teacher_dirs[kind] = folder
        rows.append({"run": f"{kind.upper()} teacher", "method": "-", "model": trainer.recipe.student.name,
                     "params_m": count_params(trainer.distiller.student) / 1e6, "epochs": trainer.recipe.optim.epochs,
                     "val_top1": metrics["val_top1"], "epoch_s": mean(trainer.history, "epoch_s")})
    teachers = [f"teachers.0.checkpoint={teacher_dirs['cnn'] / 'student.pt'}",
                f"teachers.1.checkpoint={teacher_dirs['inn'] / 'student.pt'}"]

    timing = []
    for folder, label, extra in [
        ("none", "(1) no teacher", ["teachers=[]", "distill={method: none}", "teacher_cache.enabled=false"]),
        ("online", "(2) LIB-KD, both teachers online", [*teachers, "teacher_cache.enabled=false"]),
        ("cache", "(3) LIB-KD, teacher-output cache", teachers),
    ]:
        trainer, _, setup_s = train("libkd_cifar10_vit_tiny", [*common, *extra, "optim.epochs=1",
                                                              f"output.dir={args.out / 'timing' / folder}"], console)
        statuses = trainer.distiller.teacher_cache.statuses if trainer.distiller.teacher_cache else []
        timing.append({"run": label, "epoch_s": trainer.history[-1]["epoch_s"],
                       "images_per_s": trainer.history[-1]["images_per_s"], "setup_s": setup_s,
                       "cache": ", ".join(statuses) or "-"})

    pinned_teachers = {"none": [], "cnn": [f"teachers.0.checkpoint={teacher_dirs['cnn'] / 'student.pt'}"],
                       "inn": [f"teachers.0.checkpoint={teacher_dirs['inn'] / 'student.pt'}"],
                       "libkd": teachers, "cit": teachers, "cskd": teachers[:1]}
    for folder, label, recipe_name, extra in runs():
        pinned = pinned_teachers[folder]
        trainer, metrics, _ = train(recipe_name, [*common, *extra, *pinned, f"output.dir={args.out / folder}"],
                                    console)
        rows.append({"run": label, "method": trainer.recipe.distill.method, "model": trainer.recipe.student.name,
                     "params_m": count_params(trainer.distiller.student) / 1e6, "epochs": trainer.recipe.optim.epochs,
                     "val_top1": metrics["val_top1"], "epoch_s": mean(trainer.history, "epoch_s")})

    write_results(rows, timing, console)


def versus(row: dict, base: dict) -> str:
    return "" if row["method"] == "-" else f"{row['val_top1'] - base['val_top1']:+.2f}"


def write_results(rows: list[dict], timing: list[dict], console: Console) -> None:
    context = training_machine()
    command = "python " + " ".join(sys.argv)
    none, online, cached = timing
    base = next(r for r in rows if r["run"] == "no teacher")
    lines = [
        "# LIB-KD family on the CIFAR-10 JPEG copy, CPU budget", "",
        f"Command: `{command}`  ",
        f"Machine: {context['cpu']}, {context['cores']} cores, GPU: {context['gpu'] or 'none'}; "
        f"torch {context['versions'].get('torch')}, timm {context['versions'].get('timm')}. Recipes: "
        "`recipes/libkd_cifar10_{cnn,inn}_teacher.yaml`, `libkd_cifar10_vit_tiny.yaml`, `cit_cifar10.yaml`, "
        "`cskd_cifar10.yaml`. Every run trains on the same seeded 10,000-image subset of the training set; "
        "val = the 10,000 test images. One seed.", "",
        "## Seconds per training epoch (10,000 images, batch 128), measured one after another in this run", "",
        "| run | s / epoch | images / s | setup s (teacher cache) | ratio to (1) |", "|---|---:|---:|---|---:|",
        *[f"| {t['run']} | {t['epoch_s']:.1f} | {t['images_per_s']:.0f} | {t['setup_s']:.1f} ({t['cache']}) | "
          f"{t['epoch_s'] / none['epoch_s']:.2f} |" for t in timing],
        "",
        f"Goal (3)/(1) ≤ 1.15: measured {cached['epoch_s'] / none['epoch_s']:.2f} "
        f"({'met' if cached['epoch_s'] / none['epoch_s'] <= 1.15 else 'missed'}); online teachers "
        f"{online['epoch_s'] / none['epoch_s']:.2f}. Setup of (3) includes building the cache when it was missing "
        "(a one-off per teacher, data and view set).", "",
        "## Val top-1 at the same budget", "",
        "| run | method | model | parameters | epochs | val top-1 % | vs no teacher | s / epoch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *[f"| {r['run']} | {r['method']} | {r['model']} | {r['params_m']:.2f}M | {r['epochs']} | "
          f"{r['val_top1']:.2f} | {versus(r, base)} | "
          f"{r['epoch_s']:.0f} |" for r in rows],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "libkd_cifar10.md", "\n".join(lines) + "\n")
    atomic_write_text(RESULTS / "libkd_cifar10.json", json.dumps(
        {"command": command, "context": context, "timing": timing, "rows": rows}, indent=2, default=str))
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
