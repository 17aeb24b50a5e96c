"""The distillation study on CIFAR-10: does each method beat training the same student alone?

Two pairs, every row of a pair with the same student, data, augmentation, optimiser, schedule, epochs and seeds;
the teacher (and the method using it) is the only difference:
- `vit_to_cnn` (transformer -> CNN): the convolutional-stem ViT teacher -> a quarter-width ResNet-10-T;
  none, none at twice the epochs, KD, CAP-KD (and three variants: its projection losses at 0.1, without the
  multi-view generator's views, and with the views feeding only L_MVG), CRD, feature (FitNet), SSKD.
- `cnn_to_vit` (CNN + involution -> tiny ViT): the ResNet-9 teacher (and the RedNet-26 involution teacher) ->
  the ViT-nano with a distillation token; none, none at twice the epochs, KD, DeiT (hard), LIB-KD, CSKD, CRD (and CRD
  at β 0.2, a diagnostic), VLFKD. CiT needs its own student (conv and inv tokens, co-advise stems), so it has its
  own no-teacher row (`none_cit`).
The CRD, feature, SSKD and VLFKD rows take their `distill` section from their bundled recipes
(recipes/<method>_<pair>.yaml).

Teachers: `bench/teachers/teachers.json` names the committed fp16 checkpoints (with the recipe and command that
trained them, and their sha256); a missing one is trained with its recipe (recipes/study_*_teacher.yaml) and
written there. Students train on a seeded 10,000-image subset of the 50,000 training images and are scored on the
10,000 test images.

Each run is a fresh `kd2deploy train` process in runs/study/<pair>/<method>/seed<k> (resumed if interrupted); its
row goes to bench/results/study_cifar10.json as soon as it finishes, so the study can be run in parts, on any
machine, and continues where it stopped. Rows are run seed by seed, so an unfinished study has whole seeds.

    mkdir -p data/cifar10-jpeg && tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C data/cifar10-jpeg
    python bench/study_cifar10.py                      # everything missing, then the tables and plot
    python bench/study_cifar10.py --pairs vit_to_cnn --max-minutes 110 --commit   # one part of about two hours
    python bench/study_cifar10.py --teachers-only --commit   # first part: the three teachers (about 2 hours)
    python bench/study_cifar10.py --report             # only rewrite the .md and .png from the .json
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import STUDENT, atomic_save, atomic_write_text, load_checkpoint, sha256
from kd2deploy.machine import busy_cores_elsewhere, cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEACHERS_DIR = ROOT / "bench" / "teachers"
STUDENTS_DIR = ROOT / "bench" / "students"  # every finished run's student, fp16: the robustness study reads them
MANIFEST = TEACHERS_DIR / "teachers.json"
RECIPES = ROOT / "recipes"
STUDY = "study_cifar10"
SEEDS = (0, 1, 2)
EPOCHS = 15
TRAIN_SUBSET = 10_000

TEACHERS = {  # key -> the recipe that trains it (its `student` section is the teacher's model)
    "cnn": "study_cnn_teacher.yaml",
    "vit": "study_vit_teacher.yaml",
    "inn": "study_inn_teacher.yaml",
}

DATA = {"dataset": "imagefolder", "val_dir": "test", "img_size": 32, "train_subset": TRAIN_SUBSET,
        "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
        "augment": {"scale": [0.35, 1.0], "color_jitter": None}}
SGD = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1,
       "batch_size": 128, "amp": "auto"}
ADAMW = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1,
         "min_lr": 1e-5, "batch_size": 128, "clip_grad": 1.0, "amp": "auto"}


def recipe_distill(name: str) -> dict[str, Any]:
    """The `distill` section of a bundled recipe: the study runs each method as its recipe does."""
    return yaml.safe_load((RECIPES / name).read_text())["distill"]


KD = {"method": "kd", "temperature": 4.0, "alpha": 0.9}  # both pairs: the same vanilla KD
VIT_STUDENT = {"name": "libkd_nano_patch4_32", "kwargs": {"head_fusion": "mean"}}
CIT_STUDENT = {"name": "cit_nano_patch4_32", "kwargs": {}}  # head_fusion: cls, the CiT paper's inference

PAIRS: dict[str, dict[str, Any]] = {
    "vit_to_cnn": {
        "title": "transformer -> CNN", "student": {"name": "resnet10t", "kwargs": {"channels": [16, 32, 64, 128]}},
        "optim": SGD,
        "methods": {
            "none": {},
            "none_2x": {"epochs": 2 * EPOCHS},
            "kd": {"teachers": ["vit"], "distill": KD},
            "capkd": {"teachers": ["vit"], "distill": {"method": "capkd"}},
            # diagnostic, not the paper's setting: do the projection losses crowd out the small student's CE?
            "capkd_proj0.1": {"teachers": ["vit"], "distill": {"method": "capkd", "proj1_weight": 0.1,
                                                               "proj2_weight": 0.1}},
            # diagnostic: the multi-view generator feeds half the student's batches cropped, rotated, jittered,
            # noised and 25%-masked (its CE too); does that extra augmentation cost a 15-epoch student?
            "capkd_noviews": {"teachers": ["vit"], "distill": {"method": "capkd", "mvg_prob": 0.0}},
            # our option: the views feed only L_MVG; the CE and the projection losses see the clean batch
            "capkd_views_mvg": {"teachers": ["vit"], "distill": {"method": "capkd", "views_feed": "mvg"}},
            "crd": {"teachers": ["vit"], "distill": recipe_distill("crd_vit_to_cnn.yaml")},
            "feature": {"teachers": ["vit"], "distill": recipe_distill("feature_vit_to_cnn.yaml")},
            "sskd": {"teachers": ["vit"], "distill": recipe_distill("sskd_vit_to_cnn.yaml")},
        },
    },
    "cnn_to_vit": {
        "title": "CNN (+ involution) -> tiny ViT", "student": VIT_STUDENT, "optim": ADAMW,
        "methods": {
            "none": {},
            "none_2x": {"epochs": 2 * EPOCHS},
            "kd": {"teachers": ["cnn"], "distill": KD},
            "deit": {"teachers": ["cnn"], "distill": {"method": "deit", "distillation_type": "hard"}},
            "libkd": {"teachers": ["cnn", "inn"], "distill": {"method": "libkd"}},
            "cskd": {"teachers": ["cnn"], "distill": {"method": "cskd"},  # the authors' inference fusion
                     "student": {"name": "libkd_nano_patch4_32", "kwargs": {"head_fusion": "cls_dist_dense"}}},
            "none_cit": {"student": CIT_STUDENT},
            "cit": {"student": CIT_STUDENT, "teachers": ["cnn", "inn"], "distill": {"method": "cit"}},
            "crd": {"teachers": ["cnn"], "distill": recipe_distill("crd_cnn_to_vit.yaml")},
            # diagnostic, not the paper's setting: at β 0.8 the contrastive gradient sets most of the ViT's AdamW
            # steps (bench/gradient_split.py); does a quarter of it leave the labels in charge?
            "crd_beta0.2": {"teachers": ["cnn"], "distill": {**recipe_distill("crd_cnn_to_vit.yaml"), "beta": 0.2}},
            "vlfkd": {"teachers": ["cnn"], "distill": recipe_distill("vlfkd_cnn_to_vit.yaml")},
        },
    },
}
BASELINE = {"cit": "none_cit"}  # a method compared with another no-teacher row than `none` (its own student)


# ------------------------------------------------------------------------------------------------ teachers
def load_manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def teacher_spec(key: str) -> dict[str, Any]:
    """The teacher's model section for a student recipe, pointing at its committed checkpoint."""
    entry = load_manifest()[key]
    return {"name": entry["model"]["name"], "kwargs": entry["model"]["kwargs"],
            "checkpoint": str(TEACHERS_DIR / entry["file"])}


def ensure_teacher(key: str, data_root: Path) -> dict[str, Any]:
    """The committed teacher if its file matches its sha256; otherwise train it with its recipe (resuming its run
    folder) and write an fp16 copy of its weights, in the same checkpoint format as any run's student.pt."""
    entry = load_manifest().get(key)
    if entry and (TEACHERS_DIR / entry["file"]).exists() and sha256(TEACHERS_DIR / entry["file"]) == entry["sha256"]:
        return entry
    recipe = RECIPES / TEACHERS[key]
    run_dir = ROOT / yaml.safe_load(recipe.read_text())["output"]["dir"]  # the recipe's own folder: CLI runs count
    overrides = [f"data.root={data_root}"]
    train(recipe, run_dir, overrides)
    path = TEACHERS_DIR / f"{key}.pt"
    student = fp16_copy(run_dir / STUDENT, path)
    history = student["history"]
    entry = {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size, "model": student["model"],
             "recipe": f"recipes/{TEACHERS[key]}",
             "command": f"kd2deploy train recipes/{TEACHERS[key]} {' '.join(overrides)}",
             "val_top1": history[-1]["val_top1"], "val_images": history[-1]["val_images"],
             "epochs": len(history), "train_s": round(sum(row["epoch_s"] for row in history), 1),
             "machine": training_machine()}
    manifest = load_manifest()
    manifest[key] = entry
    atomic_write_text(MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return entry


def fp16_copy(student_pt: Path, path: Path) -> dict[str, Any]:
    """Write an fp16 copy of a run's student.pt (same checkpoint format, without the per-epoch history, which the
    manifest or the study's row keeps); returns the full checkpoint as read."""
    student = load_checkpoint(student_pt)
    copy = {k: v for k, v in student.items() if k != "history"}
    copy["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in student["state_dict"].items()}
    copy["precision"] = "fp16 copy of the run's FP32 student.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(copy, path)
    return student


# ------------------------------------------------------------------------------------------------ runs
def train(recipe: Path, run_dir: Path, overrides: list[str]) -> None:
    """`kd2deploy train` in a fresh process, resuming the run folder's checkpoint when there is one."""
    cmd = [sys.executable, "-m", "kd2deploy", "train", str(recipe), *overrides]
    if (run_dir / "last.pt").exists():
        cmd.append("--resume")
    subprocess.run(cmd, check=True, cwd=ROOT)


def student_recipe(pair: str, method: str, seed: int, data_root: Path, run_dir: Path) -> dict[str, Any]:
    spec, row = PAIRS[pair], PAIRS[pair]["methods"][method]
    return {
        "name": f"{STUDY}_{pair}_{method}_seed{seed}",
        "description": f"{STUDY}: {spec['title']}, {method}, seed {seed} (written by bench/study_cifar10.py)",
        "data": {**DATA, "root": str(data_root)},
        "teachers": [teacher_spec(key) for key in row.get("teachers", [])],
        "student": row.get("student", spec["student"]),
        "distill": row.get("distill", {"method": "none"}),
        "optim": {**spec["optim"], "epochs": row.get("epochs", EPOCHS), "seed": seed},
        "output": {"dir": str(run_dir), "tensorboard": False},
    }


def predictions(checkpoint: Path, model: dict[str, Any], data: dict[str, Any]) -> list[int]:
    """Top-1 class of every test image (FP32, the eval transform)."""
    import torch

    from kd2deploy.data.loaders import eval_loader, val_dataset
    from kd2deploy.models import create_model
    from kd2deploy.recipe import DataConfig

    net = create_model(model["name"], 10, checkpoint=checkpoint, kwargs=model.get("kwargs")).eval()
    out: list[int] = []
    with torch.no_grad():
        for images, _, _ in eval_loader(val_dataset(DataConfig(**data)), 500, 2):
            out += net(images).argmax(dim=-1).tolist()
    return out


def teacher_predictions(key: str, data: dict[str, Any]) -> list[int]:
    entry = load_manifest()[key]
    return predictions(TEACHERS_DIR / entry["file"], entry["model"], data)


def agreement(student_preds: list[int], teacher_preds: dict[str, list[int]], keys: list[str]) -> dict[str, float]:
    """Top-1 agreement (%) of a student's test predictions with each teacher's."""
    return {k: round(100 * sum(a == b for a, b in zip(student_preds, teacher_preds[k], strict=True))
                     / len(student_preds), 2) for k in keys}


def keep_student(row: dict[str, Any], runs: Path) -> bool:
    """Copy a finished row's student (fp16) to bench/students/ and record it in the row, when its run folder is
    on this machine; run folders are not committed, the students are (about 1 MB each)."""
    student = runs / row["pair"] / row["method"] / f"seed{row['seed']}" / STUDENT
    if row.get("student_file") or not student.is_file():
        return False
    path = STUDENTS_DIR / row["pair"] / row["method"] / f"seed{row['seed']}.pt"
    fp16_copy(student, path)
    row["student_file"] = str(path.relative_to(ROOT))
    return True


def backfill_agreement(results: dict[str, Any], data: dict[str, Any], runs: Path,
                       teacher_preds: dict[str, list[int]]) -> None:
    """Agreement with every pair teacher for rows written before it was recorded (the no-teacher rows), from
    their run folders when they are on this machine."""
    for row in results["rows"]:
        keys = pair_teachers(PAIRS[row["pair"]])
        student = runs / row["pair"] / row["method"] / f"seed{row['seed']}" / STUDENT
        if set(keys) <= set(row.get("agreement", {})) or not student.is_file():
            continue
        for key in keys:
            teacher_preds.setdefault(key, teacher_predictions(key, data))
        row["agreement"] = agreement(predictions(student, row["student"], data), teacher_preds, keys)


def train_student(pair: str, method: str, seed: int, data_root: Path, run_dir: Path) -> dict[str, Any]:
    """Write a row's recipe into its run folder and train it there (resuming); returns the recipe."""
    raw = student_recipe(pair, method, seed, data_root, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = run_dir / "study_recipe.yaml"
    atomic_write_text(recipe, yaml.safe_dump(raw, sort_keys=False))
    train(recipe, run_dir, [])
    return raw


def run_row(pair: str, method: str, seed: int, data_root: Path, run_root: Path,
            teacher_preds: dict[str, list[int]]) -> dict[str, Any]:
    run_dir = run_root / pair / method / f"seed{seed}"
    busy = busy_cores_elsewhere()
    started = time.perf_counter()
    raw = train_student(pair, method, seed, data_root, run_dir)
    with open(run_dir / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    keys = PAIRS[pair]["methods"][method].get("teachers", [])
    for key in pair_teachers(PAIRS[pair]):  # every row's agreement, the no-teacher rows' too (the baseline)
        teacher_preds.setdefault(key, teacher_predictions(key, raw["data"]))
    student_preds = predictions(run_dir / STUDENT, raw["student"], raw["data"])
    trained = load_checkpoint(run_dir / STUDENT).get("training", {})
    manifest = load_manifest()
    return {
        "pair": pair, "method": method, "seed": seed, "epochs": len(history),
        "val_top1": float(history[-1]["val_top1"]),
        "s_per_epoch": round(statistics.mean(float(r["epoch_s"]) for r in history), 2),
        "teacher_top1": manifest[keys[0]]["val_top1"] if keys else None,
        "student": raw["student"], "teachers": keys, "distill": raw["distill"],
        "train_images": TRAIN_SUBSET, "val_images": int(float(history[-1]["val_images"])),
        # evidence for the reading: per-epoch loss terms and test-set top-1 agreement with each teacher
        "loss_terms": {k: [round(float(r[k]), 4) for r in history] for k in history[0] if k.startswith("loss_")},
        "val_top1_curve": [round(float(r["val_top1"]), 2) for r in history],
        "agreement": agreement(student_preds, teacher_preds, pair_teachers(PAIRS[pair])),
        "wall_s": round(time.perf_counter() - started, 1),
        "busy_cores_at_start": round(busy, 2),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags()},  # s_per_epoch compares only within one machine
        "precision": trained.get("precision"),  # optim.amp auto: bf16 autocast where the CPU has it, else FP32
    }


# ------------------------------------------------------------------------------------------------ results
def load_results() -> dict[str, Any]:
    path = RESULTS / f"{STUDY}.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{STUDY}.json", json.dumps(results, indent=2, default=str) + "\n")


def pair_teachers(spec: dict[str, Any]) -> list[str]:
    """The teacher keys any row of a pair uses."""
    return sorted({k for m in spec["methods"].values() for k in m.get("teachers", [])})


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["method"]), []).append(row)
    out = {}
    for key, group in groups.items():
        top1 = [r["val_top1"] for r in group]
        out[key] = {"n": len(top1), "mean": statistics.mean(top1),
                    "std": statistics.stdev(top1) if len(top1) > 1 else float("nan"), "rows": group}
    return out


def markdown(results: dict[str, Any]) -> str:
    stats = summarise(results["rows"])
    ctx = results.get("context", {})
    lines = ["# Distillation study, CIFAR-10 (CPU budget)", "",
             f"Command: `{results.get('command', 'python bench/study_cifar10.py')}`  ",
             f"Machine: {ctx.get('cpu', '?')}, {ctx.get('cores', '?')} cores, GPU: {ctx.get('gpu') or 'none'}; "
             f"torch {ctx.get('versions', {}).get('torch', '?')}, timm {ctx.get('versions', {}).get('timm', '?')}. "
             f"Students: {EPOCHS} epochs (none_2x: {2 * EPOCHS}) on a seeded {TRAIN_SUBSET:,}-image subset of the "
             "50,000 training images, top-1 on the 10,000 test images, bf16 autocast where the CPU has it; "
             "each run alone on the machine unless `busy_cores_at_start` in the JSON says otherwise. "
             "Mean ± std over seeds; Δ is against the pair's no-teacher row of the same student. Seeds ran in "
             "several sessions, not all on one machine, so the JSON's per-row `s_per_epoch` (with its `machine`) "
             "is no cost comparison: each method's cost against no teacher, measured in one run, is in "
             "method_cost.md.", ""]
    manifest = load_manifest()
    lines += ["| teacher | model | test top-1 % | training |", "|---|---|---:|---|"]
    for key, entry in manifest.items():
        lines.append(f"| {key} | {entry['model']['name']} {entry['model']['kwargs']} | {entry['val_top1']:.2f} | "
                     f"{entry['epochs']} epochs, {entry['train_s'] / 60:.0f} min (`{entry['recipe']}`) |")
    for pair, spec in PAIRS.items():
        teachers = pair_teachers(spec)
        lines += ["", f"## {spec['title']} (`{pair}`)", "",
                  f"Student: `{spec['student']['name']}` {spec['student']['kwargs']}"
                  + ("".join(sorted({f" (`{m}` rows: `{row['student']['name']}` {row['student']['kwargs']})"
                                     for m, row in spec["methods"].items() if "student" in row})))
                  + f"; teachers: {', '.join(teachers)}; optimiser: {spec['optim']}.", "",
                  "| method | seeds | val top-1 % | Δ vs no teacher | beats it by more than the noise | "
                  f"top-1 agreement with the {teachers[0]} teacher % |", "|---|---:|---:|---:|---|---:|"]
        for method in spec["methods"]:
            s = stats.get((pair, method))
            if s is None:
                lines.append(f"| {method} | 0 | not run yet | | | |")
                continue
            base = stats.get((pair, BASELINE.get(method, "none")))
            delta, verdict = "", ""
            if base is not None and not method.startswith("none"):
                d = s["mean"] - base["mean"]
                delta = f"{d:+.2f}"
                verdict = ("yes" if d > max(s["std"], base["std"]) else "no") if min(s["n"], base["n"]) > 1 else "-"
            agreement = [r["agreement"][teachers[0]] for r in s["rows"] if teachers[0] in r["agreement"]]
            agree = f"{statistics.mean(agreement):.1f}" if agreement else ""
            spread = f" ± {s['std']:.2f}" if s["n"] > 1 else " (one seed)"
            lines.append(f"| {method} | {s['n']} | {s['mean']:.2f}{spread} | {delta} | {verdict} | {agree} |")
        precisions: dict[str, int] = {}
        for r in results["rows"]:
            if r["pair"] == pair:
                key = r.get("precision") or "not recorded (earlier sessions: an AVX-512 BF16 EPYC, so bf16 autocast)"
                precisions[key] = precisions.get(key, 0) + 1
        lines += ["", "Training precision (`optim.amp: auto` follows the CPU): "
                  + "; ".join(f"{k}: {n} runs" for k, n in precisions.items()) + "."]
        notes = [f"- {r['method']} seed {r['seed']}: {r['note']}" for r in results["rows"]
                 if r["pair"] == pair and r.get("note")]
        lines += ["", "Notes on single runs:", *notes] if notes else []
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(results["rows"])
    fig, axes = plt.subplots(1, len(PAIRS), figsize=(6 * len(PAIRS), 4), squeeze=False)
    for ax, (pair, spec) in zip(axes[0], PAIRS.items(), strict=True):
        methods = [m for m in spec["methods"] if (pair, m) in stats]
        means = [stats[(pair, m)]["mean"] for m in methods]
        stds = [0 if stats[(pair, m)]["n"] < 2 else stats[(pair, m)]["std"] for m in methods]
        colours = ["tab:grey" if m.startswith("none") else "tab:blue" for m in methods]
        ax.bar(methods, means, yerr=stds, capsize=4, color=colours)
        if (pair, "none") in stats:
            ax.axhline(stats[(pair, "none")]["mean"], color="black", lw=0.8, ls="--", label="none (mean)")
            ax.legend(loc="lower right")
        if means:
            ax.set_ylim(min(means) - 5, max(means) + 3)
        ax.set_title(spec["title"])
        ax.set_ylabel("test top-1 % (mean ± std over seeds)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any]) -> None:
    atomic_write_text(RESULTS / f"{STUDY}.md", markdown(results))
    plot(results, RESULTS / f"{STUDY}.png")


def commit(message: str, paths: list[Path] | None = None) -> None:
    """git-commit `paths` (default: this study's results, teachers and students) so a stopped session keeps them."""
    paths = paths or [RESULTS / f"{STUDY}.{ext}" for ext in ("json", "md", "png")] + [TEACHERS_DIR, STUDENTS_DIR]
    subprocess.run(["git", "add", *(str(p) for p in paths if p.exists())], cwd=ROOT, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=ROOT, check=False)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 JPEG root")
    parser.add_argument("--runs", type=Path, default=Path("runs/study"), help="where the run folders go")
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new run after this many minutes (a part of the study)")
    parser.add_argument("--commit", action="store_true", help="git-commit the results after every finished run")
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and plot")
    parser.add_argument("--teachers-only", action="store_true",
                        help="only train (or verify) the teachers and write their fp16 checkpoints")
    args = parser.parse_args()
    if args.teachers_only:
        for key in TEACHERS:
            entry = ensure_teacher(key, args.data)
            print(f"{key}: {entry['model']['name']} {entry['val_top1']:.2f}% ({entry['file']}, {entry['sha256']})")
            if args.commit:
                commit(f"study_cifar10: the {key} teacher")
        return
    results = load_results()
    if not args.report:
        started = time.perf_counter()
        results["command"] = "python bench/study_cifar10.py"
        results["context"] = training_machine()
        results["pairs"] = {pair: {"title": spec["title"], "student": spec["student"],
                                   "teachers": pair_teachers(spec)}
                            for pair, spec in PAIRS.items()}
        done = {(r["pair"], r["method"], r["seed"]) for r in results["rows"]}
        teacher_preds: dict[str, list[int]] = {}
        backfill_agreement(results, {**DATA, "root": str(args.data)}, args.runs, teacher_preds)
        for row in results["rows"]:
            keep_student(row, args.runs)
        save_results(results)
        for seed in args.seeds:
            for pair in args.pairs:
                for method in PAIRS[pair]["methods"]:
                    if (pair, method, seed) in done or (args.methods and method not in args.methods):
                        continue
                    if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
                        print(f"--max-minutes {args.max_minutes} reached; run the command again to continue")
                        report(results)
                        return
                    for key in pair_teachers(PAIRS[pair]):
                        ensure_teacher(key, args.data)
                    results["rows"].append(run_row(pair, method, seed, args.data, args.runs, teacher_preds))
                    keep_student(results["rows"][-1], args.runs)
                    save_results(results)
                    report(results)
                    if args.commit:
                        commit(f"study_cifar10: {pair} {method} seed {seed}")
    report(results)
    print((RESULTS / f"{STUDY}.md").read_text())


if __name__ == "__main__":
    main()
