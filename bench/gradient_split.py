"""How much of a distilled student's gradient is the cross-entropy's, and how much the method's other terms'?

A diagnostic for the study's rows that lose to no teacher (bench/study_cifar10.py): CRD helps the CNN student
(transformer -> CNN, SGD) but hurts the tiny ViT (CNN -> ViT, AdamW with gradients clipped to norm 1), and VLFKD
hurts it too. For each kept run of these methods it rebuilds the run's trainer (its recipe, data and seed) twice, at
initialisation and from the run's final checkpoint (CRD's memory banks included), and on a few training batches
splits the student's gradient into the cross-entropy's, w·∇CE, and that of the method's other terms together,
∇(L − w·CE) (CRD's β·L_crd, Eq. 20; VLFKD's four feature terms). It reports their norms, their ratio, their cosine,
the share of the student's weights whose gradient the other terms dominate (what Adam's per-weight normalisation
sees) and the factor by which clipping shrinks the summed gradient. Nothing is trained or written to the run folders.

    python bench/gradient_split.py             # every kept CRD and VLFKD run (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_cifar10 as study
from rich.console import Console

from kd2deploy.bench.harness import training_machine
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.recipe import load_recipe
from kd2deploy.train.engine import Trainer

NAME = "gradient_split"
LAST = "last.pt"
CE_WEIGHT = {"crd": "gamma", "vlfkd": "ce_weight"}  # each method's weight w of its CE


def flat_gradient(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    """∂loss/∂params as one vector; zeros for the weights the loss does not reach."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)])


def gradient_split(trainer: Trainer, batches: int) -> dict[str, float]:
    """Means over `batches` training batches of the CE's and the other terms' gradient statistics on the student's
    weights."""
    distiller, params = trainer.distiller, [p for p in trainer.distiller.student.parameters() if p.requires_grad]
    weight = getattr(distiller.params, CE_WEIGHT[distiller.name])
    clip = trainer.recipe.optim.clip_grad
    distiller.train()
    stats: dict[str, list[float]] = {}
    for step, (images, targets, indices) in enumerate(trainer.train_loader):
        if step == batches:
            break
        with trainer.acceleration.forward_context():
            output = distiller(trainer.acceleration.layout(images), targets, indices)
        ce = weight * distiller.classification_loss(output.logits, targets)
        g_ce = flat_gradient(ce, params, retain_graph=True)
        g_rest = flat_gradient(output.loss - ce, params)
        total = (g_ce + g_rest).norm().item()
        for key, value in {
            "ce_grad_norm": g_ce.norm().item(), "rest_grad_norm": g_rest.norm().item(),
            "cosine": torch.nn.functional.cosine_similarity(g_ce, g_rest, dim=0).item(),
            "rest_dominated_share": (g_rest.abs() > g_ce.abs()).float().mean().item(),
            "clip_factor": min(1.0, clip / total) if clip else 1.0,
            "ce": ce.item(), "rest": (output.loss - ce).item(),
        }.items():
            stats.setdefault(key, []).append(value)
    means = {k: sum(v) / len(v) for k, v in stats.items()}
    means["rest_to_ce_ratio"] = means["rest_grad_norm"] / means["ce_grad_norm"]
    return means


def trainer_for(run: Path, scratch: Path, state: str) -> Trainer:
    """The run's trainer in a scratch folder: freshly initialised (`init`) or resumed from its last checkpoint."""
    scratch.mkdir(parents=True)
    if state == "final":
        shutil.copy(run / LAST, scratch / LAST)
    recipe = load_recipe(run / "study_recipe.yaml", [f"output.dir={scratch}"])
    return Trainer(recipe, resume=state == "final", console=Console(stderr=True, quiet=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    parser.add_argument("--batches", type=int, default=8, help="training batches per measurement")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair, method in [(p, m) for p in ("vit_to_cnn", "cnn_to_vit") for m in CE_WEIGHT]:
            for run in sorted((args.runs / pair / method).glob("seed*")):
                if not (run / LAST).is_file():
                    continue
                for state in ("init", "final"):
                    trainer = trainer_for(run, Path(tmp) / pair / method / run.name / state, state)
                    row = {"pair": pair, "method": method, "seed": int(run.name.removeprefix("seed")), "state": state,
                           "student": trainer.recipe.student.name, "optimizer": trainer.recipe.optim.optimizer,
                           **{k: round(v, 4) for k, v in gradient_split(trainer, args.batches).items()}}
                    rows.append(row)
                    print(row)
    result = {"command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
              "context": training_machine(), "date": time.strftime("%Y-%m-%d"), "batches": args.batches,
              "rows": rows}
    atomic_write_text(study.RESULTS / f"{NAME}.json", json.dumps(result, indent=2, default=str) + "\n")
    lines = ["# The gradient split of distilled students in the study's two directions", "",
             f"Command: `{result['command']}` ({result['date']})  ",
             f"Means over {args.batches} training batches of each kept run, at initialisation and after its 15 "
             "epochs: the loss values of w·CE and of the method's other terms, the norms of the student's gradient "
             "from each, their ratio and cosine, the share of student weights whose gradient the other terms "
             "dominate, and clipping's factor on the sum (1: no clipping).", "",
             "| pair | method | student (optimizer) | seed | state | w·CE | other terms | ‖∇CE‖ | ‖∇other‖ | ratio | "
             "cosine | other-dominated weights | clip factor |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['pair']} | {r['method']} | {r['student']} ({r['optimizer']}) | {r['seed']} | {r['state']} | "
              f"{r['ce']:.3f} | {r['rest']:.2f} | {r['ce_grad_norm']:.3f} | {r['rest_grad_norm']:.3f} | "
              f"{r['rest_to_ce_ratio']:.2f} | {r['cosine']:+.3f} | {100 * r['rest_dominated_share']:.0f}% | "
              f"{r['clip_factor']:.3f} |" for r in rows]
    atomic_write_text(study.RESULTS / f"{NAME}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
