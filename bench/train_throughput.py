"""Training throughput: one epoch on the full CIFAR-10 copy, plain training vs KD with an online teacher.

Both runs happen in one invocation, one after the other, on the same machine state, so their ratio is
comparable. Results go to bench/results/train_throughput.{md,json} with the command and the machine.

    mkdir -p ~/.cache/kd2deploy/cifar10
    tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C ~/.cache/kd2deploy/cifar10
    python bench/train_throughput.py --data ~/.cache/kd2deploy/cifar10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.recipe import validate_recipe
from kd2deploy.train.engine import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def recipe(name: str, args: argparse.Namespace, run_dir: Path, teacher: bool) -> dict:
    raw = {
        "name": name,
        # the copy's official test split serves as val; CIFAR-10 JPEGs in ImageFolder layout
        "data": {"dataset": "imagefolder", "root": str(args.data), "val_dir": "test", "img_size": 32,
                 "num_workers": args.workers, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
                 "augment": {"scale": [0.5, 1.0], "color_jitter": None}},
        "student": {"name": args.student},
        "optim": {"epochs": 1, "batch_size": args.batch_size, "lr": 0.05, "weight_decay": 4e-5},
        "output": {"dir": str(run_dir), "tensorboard": False},
        "device": "cpu" if args.cpu else "auto",
    }
    if teacher:
        raw["teacher"] = {"name": args.teacher}
        raw["distill"] = {"method": "kd", "temperature": 4.0, "alpha": 0.9}
    return raw


def loader_only(loader) -> dict:
    """One epoch of the training loader alone (decode + augmentation): the ceiling for any training run."""
    start, images = time.perf_counter(), 0
    for batch, _, _ in loader:
        images += len(batch)
    elapsed = time.perf_counter() - start
    return {"run": "data loading only (no model)", "student": "-", "images": images, "epoch_s": elapsed,
            "images_per_s": images / elapsed, "val_top1": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache/kd2deploy/cifar10")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    args = parser.parse_args()
    console = Console()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, label, with_teacher in (("plain", "plain (no teacher)", False),
                                          ("kd", f"KD, online {args.teacher} teacher", True)):
            trainer = Trainer(validate_recipe(recipe(name, args, Path(tmp) / name, with_teacher)), console=console)
            if not rows:
                rows.append(loader_only(trainer.train_loader))
            metrics = trainer.fit()
            rows.append({"run": label, "student": args.student, "images": metrics["train_images"],
                         "epoch_s": metrics["epoch_s"], "images_per_s": metrics["images_per_s"],
                         "val_top1": metrics["val_top1"]})
    ratio = rows[2]["images_per_s"] / rows[1]["images_per_s"]
    context = training_machine()
    command = "python " + " ".join(sys.argv)
    lines = [
        "# Training throughput, one epoch on the full CIFAR-10 JPEG copy", "",
        f"Command: `{command}`  ",
        f"Machine: {context['cpu']}, {context['cores']} cores, GPU: {context['gpu'] or 'none'}; "
        f"torch {context['versions'].get('torch')}, timm {context['versions'].get('timm')}. "
        f"Global batch {args.batch_size}, {args.workers} loader workers.", "",
        "| run | student | images | epoch s | images/s | val top-1 % (1 epoch) |", "|---|---|---|---|---|---|",
        *[f"| {r['run']} | {r['student']} | {r['images']} | {r['epoch_s']:.1f} | {r['images_per_s']:.0f} | "
          f"{'-' if r['val_top1'] is None else format(r['val_top1'], '.2f')} |" for r in rows],
        "", f"KD with an online teacher runs at {ratio:.2f}x the plain-training throughput (same run, same machine).",
        "The teacher is randomly initialised (its speed does not depend on its weights), so the KD run's accuracy "
        "says nothing about KD; accuracy after one epoch only shows the runs trained. The JPEG copy differs "
        "slightly from the original CIFAR-10 binaries.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "train_throughput.md", "\n".join(lines) + "\n")
    atomic_write_text(RESULTS / "train_throughput.json",
                      json.dumps({"command": command, "context": context, "rows": rows, "kd_over_plain": ratio},
                                 indent=2))
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
