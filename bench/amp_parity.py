"""Top-1 parity of bf16 autocast with FP32 on a short run: the quickstart's no-teacher student recipe, several seeds
each, everything else equal (resident data, channels-last, the same threads).

One JSON row per run goes to bench/results/amp_parity.json as soon as the run ends (re-running continues where it
stopped); the table goes to bench/results/amp_parity.md.

    python bench/amp_parity.py [--seeds 0 1 2] [--recipe quickstart_baseline]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart_baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from rich.console import Console

    from kd2deploy.bench import training_machine
    from kd2deploy.checkpoint import atomic_write_text
    from kd2deploy.engine import Trainer
    from kd2deploy.machine import busy_cores_elsewhere, cpu_flags
    from kd2deploy.recipe import find_recipe, load_recipe

    out = RESULTS / "amp_parity.json"
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    console = Console(stderr=True)
    path = find_recipe(args.recipe)
    for seed in args.seeds:
        for amp in ("false", "auto"):
            ident = f"{args.recipe}/amp={amp}/seed={seed}"
            if ident in results["rows"]:
                continue
            busy = busy_cores_elsewhere(1.0)
            with tempfile.TemporaryDirectory() as tmp:
                recipe = load_recipe(path, [f"optim.amp={amp}", f"optim.seed={seed}", f"output.dir={tmp}/run",
                                            "output.tensorboard=false", "optim.threads=2"])
                trainer = Trainer(recipe, console=console)
                last = trainer.fit()
            results["rows"][ident] = {"recipe": args.recipe, "amp": amp, "seed": seed, "val_top1": last["val_top1"],
                                      "images_per_s": last["images_per_s"], "busy_cores_before": round(busy, 2),
                                      "precision": trainer.acceleration.notes[0],
                                      "measured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            results["context"] = {**training_machine(), "cpu_flags": cpu_flags(),
                                  "command": "python " + " ".join(sys.argv)}
            atomic_write_text(out, json.dumps(results, indent=1))
    atomic_write_text(RESULTS / "amp_parity.md", render(results))
    print(render(results))


def render(results: dict) -> str:
    ctx, rows = results["context"], list(results["rows"].values())
    lines = ["# bf16 autocast against FP32: top-1 parity", "", f"Command: `{ctx['command']}`  ",
             f"Machine: {ctx['cpu']}, {ctx['cores']} cores ({', '.join(ctx['cpu_flags'])}); torch "
             f"{ctx['versions'].get('torch')}. Runs one at a time, nothing else running. Every setting but "
             "`optim.amp` is the recipe's (resident data, channels-last, 2 threads).", "",
             "| recipe | precision | seeds | val top-1 % per seed | mean ± std | images/s (mean) |",
             "|---|---|---:|---|---:|---:|"]
    summary = {}
    for recipe in sorted({r["recipe"] for r in rows}):
        for amp in ("false", "auto"):
            runs = sorted((r for r in rows if r["recipe"] == recipe and r["amp"] == amp), key=lambda r: r["seed"])
            if not runs:
                continue
            top1 = [r["val_top1"] for r in runs]
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            summary[amp] = (statistics.mean(top1), std)
            label = "FP32" if amp == "false" else "bf16 autocast"
            lines.append(f"| {recipe} | {label} | {len(runs)} | {', '.join(f'{t:.1f}' for t in top1)} | "
                         f"{statistics.mean(top1):.2f} ± {std:.2f} | "
                         f"{statistics.mean(r['images_per_s'] for r in runs):.0f} |")
    if len(summary) == 2:
        diff = summary["auto"][0] - summary["false"][0]
        noise = max(summary["auto"][1], summary["false"][1])
        verdict = "within" if abs(diff) <= noise else "outside"
        lines += ["", f"bf16 − FP32: {diff:+.2f} points, {verdict} the seed spread (largest std {noise:.2f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
