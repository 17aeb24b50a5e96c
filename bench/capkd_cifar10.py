"""CAP-KD against logit KD and no teacher, on the CIFAR-10 JPEG copy, CPU budget.

Trains the small ViT teacher (recipes/capkd_cifar10_teacher_cpu.yaml) if its run is missing or unfinished, then
three students from recipes/capkd_cifar10_cpu.yaml that differ only in the distillation method: the same
student, data, epochs, schedule and seed. Results go to bench/results/capkd_cifar10.{md,json} with the command
and the machine.

    mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C data/cifar10-jpeg
    python bench/capkd_cifar10.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import STUDENT, atomic_write_text
from kd2deploy.models import count_params
from kd2deploy.recipe import bundled_recipes_dir, load_recipe
from kd2deploy.train.engine import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = [  # (run folder, label, overrides of recipes/capkd_cifar10_cpu.yaml)
    ("plain", "no teacher", ["teacher=null", "distill={method: none}"]),
    ("kd", "logit KD (Hinton, τ=4, α=0.9)", ["distill={method: kd, temperature: 4.0, alpha: 0.9}"]),
    ("capkd", "CAP-KD (paper defaults)", []),
]


def mean_epoch_s(trainer: Trainer) -> float:
    return sum(row["epoch_s"] for row in trainer.history) / len(trainer.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"))
    parser.add_argument("--teacher-dir", type=Path, default=Path("runs/capkd_cifar10_teacher_cpu"),
                        help="the teacher's run folder (trained or continued there if unfinished)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_capkd"), help="the students' run folders")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run, e.g. optim.epochs=1")
    args = parser.parse_args()
    console = Console()
    common = [f"data.root={args.data}", *args.overrides]

    teacher_path = bundled_recipes_dir() / "capkd_cifar10_teacher_cpu.yaml"
    teacher_recipe = load_recipe(teacher_path, [*common, f"output.dir={args.teacher_dir}"])
    teacher = Trainer(teacher_recipe, str(teacher_path), resume="auto", console=console)
    teacher_metrics = teacher.fit()
    rows = [{"run": "teacher", "method": "-", "model": teacher_recipe.student.name,
             "params_m": count_params(teacher.distiller.student) / 1e6, "epochs": teacher_recipe.optim.epochs,
             "val_top1": teacher_metrics["val_top1"], "epoch_s": mean_epoch_s(teacher)}]

    student_path = bundled_recipes_dir() / "capkd_cifar10_cpu.yaml"
    for folder, label, method_overrides in METHODS:
        recipe = load_recipe(student_path, [*common, *method_overrides, f"output.dir={args.out / folder}"])
        if recipe.teachers:
            recipe.teachers[0].checkpoint = args.teacher_dir / STUDENT
        trainer = Trainer(recipe, str(student_path), resume="auto", console=console)
        metrics = trainer.fit()
        rows.append({"run": label, "method": recipe.distill.method or "none", "model": recipe.student.name,
                     "params_m": count_params(trainer.distiller.student) / 1e6, "epochs": recipe.optim.epochs,
                     "val_top1": metrics["val_top1"], "epoch_s": mean_epoch_s(trainer)})

    context = training_machine()
    command = "python " + " ".join(sys.argv)
    plain, kd, capkd = rows[1:]
    lines = [
        "# CAP-KD vs logit KD vs no teacher, CIFAR-10 JPEG copy, CPU budget", "",
        f"Command: `{command}`  ",
        f"Machine: {context['cpu']}, {context['cores']} cores, GPU: {context['gpu'] or 'none'}; "
        f"torch {context['versions'].get('torch')}, timm {context['versions'].get('timm')}. "
        f"Recipes: `recipes/capkd_cifar10_teacher_cpu.yaml` (teacher), `recipes/capkd_cifar10_cpu.yaml` (students; "
        "the no-teacher and KD runs override only `teacher` and `distill`). One seed; val = the 10,000 test images.",
        "",
        "| run | model | parameters | epochs | val top-1 % | s / epoch |", "|---|---|---:|---:|---:|---:|",
        *[f"| {r['run']} | {r['model']} | {r['params_m']:.2f}M | {r['epochs']} | {r['val_top1']:.2f} | "
          f"{r['epoch_s']:.0f} |" for r in rows],
        "",
        f"Against no teacher: logit KD {kd['val_top1'] - plain['val_top1']:+.2f} points, CAP-KD "
        f"{capkd['val_top1'] - plain['val_top1']:+.2f} points; CAP-KD minus logit KD: "
        f"{capkd['val_top1'] - kd['val_top1']:+.2f} points. CAP-KD epochs take "
        f"{capkd['epoch_s'] / plain['epoch_s']:.2f}x the no-teacher time, logit KD "
        f"{kd['epoch_s'] / plain['epoch_s']:.2f}x (same run, same machine).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "capkd_cifar10.md", "\n".join(lines) + "\n")
    atomic_write_text(RESULTS / "capkd_cifar10.json",
                      json.dumps({"command": command, "context": context, "rows": rows}, indent=2, default=str))
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
