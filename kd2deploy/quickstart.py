"""`kd2deploy quickstart`: the whole chain on the bundled mini CIFAR-10, from the three quickstart recipes."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoint import STUDENT, atomic_write_text
from .console import print_table
from .models import count_params
from .recipe import bundled_recipes_dir, load_recipe
from .train.engine import Trainer

STEPS = [  # (run name, recipe file, extra overrides given the output folder)
    ("teacher", "quickstart_teacher.yaml", lambda out: []),
    ("baseline", "quickstart_baseline.yaml", lambda out: []),
    ("kd", "quickstart.yaml", lambda out: [f"teacher.checkpoint={out / 'teacher' / STUDENT}"]),
]


def run_quickstart(out: Path, console: Console, overrides: list[str] | None = None) -> dict:
    """Train teacher, no-teacher baseline and KD student; export the KD student to FP32 + INT8 ONNX; bench it.
    Each run resumes if it exists, so an interrupted quickstart continues where it stopped.
    `overrides` (dotted.key=value) apply to all three recipes, e.g. optim.epochs=2 for a smoke run."""
    from .bench.run import run_bench
    from .deploy.pipeline import export_run

    started = time.perf_counter()
    results, models = {}, {}
    for run, recipe_name, extra in STEPS:
        path = bundled_recipes_dir() / recipe_name
        recipe = load_recipe(path, [*(overrides or []), f"output.dir={out / run}", *extra(out)])
        console.rule(f"[bold]{run}[/bold]: {recipe.description}")
        trainer = Trainer(recipe, str(path), resume="auto", console=console)
        results[run] = trainer.fit()
        models[run] = (recipe.student.name, count_params(trainer.distiller.student))

    console.rule("[bold]export[/bold]: FP32 and INT8 ONNX, verified against PyTorch")
    manifest = export_run(out / "kd", out_dir=out / "kd" / "export", formats=["onnx"], precisions=["fp32", "int8"],
                          calib_samples=256, console=console)
    console.rule("[bold]bench[/bold]")
    rows = run_bench(Path(manifest["artifact_dir"]), batches=[1, 32], iters=30, warmup=5,
                     backends=["pytorch", "onnxruntime"],
                     val_samples=None, console=console)

    table = Table("run", "model", "parameters", "val top-1 %",
                  title="Quickstart: KD against the same-budget student without a teacher")
    for run in results:
        name, params = models[run]
        table.add_row(run, name, f"{params / 1e6:.2f}M", f"{results[run]['val_top1']:.2f}")
    gain = results["kd"]["val_top1"] - results["baseline"]["val_top1"]
    print_table(console, table)
    minutes = (time.perf_counter() - started) / 60
    console.print(f"KD changes the student's val top-1 by {gain:+.2f} points against the no-teacher baseline "
                  f"({results['kd']['val_images']:,} val images, one seed). Whole chain: {minutes:.1f} min.")
    summary = {"val_top1": {run: results[run]["val_top1"] for run in results}, "kd_gain_points": gain,
               "minutes": minutes, "bench": rows, "artifact_dir": manifest["artifact_dir"]}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
