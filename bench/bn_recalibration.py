"""Do a study student's BatchNorm running statistics cost it test accuracy?

A diagnostic for the CAP-KD rows of bench/study_cifar10.py: the multi-view generator's views (cropped, rotated,
jittered, noised, 25%-masked) pass through the student in train mode, so its BatchNorm running statistics, which
eval mode uses, average clean and transformed batches. Each kept student is scored on the 10,000 test images
twice: as trained, and after its running statistics are recomputed (cumulative average) from clean training
images. Students trained without views (CRD, CAP-KD with `mvg_prob: 0`) are the controls: what recalibration
gives a student whose statistics saw no views. A larger gain for the others says the views' statistics cost them.
Only students kept in bench/students/ are scored (the first rows of none, KD and CAP-KD were not kept).

    python bench/bn_recalibration.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_cifar10 as study

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.student import load_student

NAME = "bn_recalibration"


@torch.no_grad()
def top1(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, targets in loader:
        correct += (model(images).argmax(1) == targets).sum().item()
        total += len(targets)
    return 100 * correct / total


@torch.no_grad()
def recalibrate(model: torch.nn.Module, loader: DataLoader) -> None:
    """Recompute every BatchNorm's running mean and variance from `loader` (momentum None: a cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for images, _ in loader:
        model(images)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 JPEG root")
    parser.add_argument("--pair", default="vit_to_cnn", choices=list(study.PAIRS))
    parser.add_argument("--methods", nargs="+", default=["crd", "capkd_noviews", "capkd_proj0.1", "capkd_views_mvg"])
    parser.add_argument("--images", type=int, default=5000, help="clean training images for the statistics")
    args = parser.parse_args()
    torch.manual_seed(0)
    mean, std = study.DATA["mean"], study.DATA["std"]
    clean = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train = datasets.ImageFolder(str(args.data / "train"), clean)
    calibration = Subset(train, torch.randperm(len(train))[: args.images].tolist())
    test = DataLoader(datasets.ImageFolder(str(args.data / "test"), clean), batch_size=500, num_workers=2)
    rows: list[dict[str, Any]] = []
    study_rows = [r for r in json.loads((study.RESULTS / "study_cifar10.json").read_text())["rows"]
                  if r["pair"] == args.pair and r["method"] in args.methods]
    for row in sorted(study_rows, key=lambda r: (args.methods.index(r["method"]), r["seed"])):
        if not row.get("student_file"):
            print(f"{row['method']} seed {row['seed']}: no kept student, skipped")
            continue
        model, _ = load_student(study.ROOT / row["student_file"])
        model.float()
        as_trained = top1(model, test)
        recalibrate(model, DataLoader(calibration, batch_size=128, shuffle=True, num_workers=2))
        rows.append({"method": row["method"], "seed": row["seed"], "study_top1": row["val_top1"],
                     "as_trained": round(as_trained, 2), "recalibrated": round(top1(model, test), 2)})
        print(rows[-1])
    result = {"command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
              "context": training_machine(), "date": time.strftime("%Y-%m-%d"), "calibration_images": args.images,
              "rows": rows}
    atomic_write_text(study.RESULTS / f"{NAME}.json", json.dumps(result, indent=2, default=str) + "\n")
    lines = ["# BatchNorm recalibration of the study's students", "",
             f"Command: `{result['command']}` ({result['date']})  ",
             f"Each kept `{args.pair}` student on the 10,000 test images as trained, and after its BatchNorm running "
             f"statistics are recomputed from {args.images} clean training images.", "",
             "| method | seed | as trained % | recalibrated % | gain |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['as_trained']:.2f} | {r['recalibrated']:.2f} | "
              f"{r['recalibrated'] - r['as_trained']:+.2f} |" for r in rows]
    atomic_write_text(study.RESULTS / f"{NAME}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
