"""Top-1 parity of two settings of one recipe on a short run, several seeds each, everything else equal: by default
bf16 autocast against FP32 on the quickstart's no-teacher student recipe (`--name amp`), or resident data against
loader processes (`--name on_device --compare data.on_device=false data.on_device=true`).

One JSON row per run goes to bench/results/parity_<name>.json as soon as the run ends (re-running continues where
it stopped); the table goes to bench/results/parity_<name>.md.

    python bench/parity.py [--seeds 0 1 2 3 4] [--recipe quickstart_baseline]
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", default="amp")
    parser.add_argument("--compare", nargs=2, default=["optim.amp=false", "optim.amp=auto"],
                        metavar=("A", "B"), help="the two overrides compared")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from rich.console import Console

    from kd2deploy.bench.harness import training_machine
    from kd2deploy.checkpoint import atomic_write_text
    from kd2deploy.machine import busy_cores_elsewhere, cpu_flags
    from kd2deploy.recipe import find_recipe, load_recipe
    from kd2deploy.train.engine import Trainer

    out = RESULTS / f"parity_{args.name}.json"
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    console = Console(stderr=True)
    path = find_recipe(args.recipe)
    for seed in args.seeds:
        for setting in args.compare:
            ident = f"{args.recipe}/{setting}/seed={seed}"
            if ident in results["rows"]:
                continue
            busy = busy_cores_elsewhere(1.0)
            with tempfile.TemporaryDirectory() as tmp:
                recipe = load_recipe(path, [setting, f"optim.seed={seed}", f"output.dir={tmp}/run",
                                            "output.tensorboard=false", "optim.threads=2"])
                trainer = Trainer(recipe, console=console)
                last = trainer.fit()
            results["rows"][ident] = {"recipe": args.recipe, "setting": setting, "seed": seed,
                                      "val_top1": last["val_top1"], "images_per_s": last["images_per_s"],
                                      "busy_cores_before": round(busy, 2), "log": trainer.acceleration.notes,
                                      "measured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
            results["context"] = {**training_machine(), "cpu_flags": cpu_flags(), "compare": args.compare,
                                  "command": "python " + " ".join(sys.argv)}
            atomic_write_text(out, json.dumps(results, indent=1))
    atomic_write_text(RESULTS / f"parity_{args.name}.md", render(results))
    print(render(results))


def render(results: dict) -> str:
    ctx, rows = results["context"], list(results["rows"].values())
    first, second = ctx["compare"]
    lines = [f"# Parity: `{second}` against `{first}`", "", f"Command: `{ctx['command']}`  ",
             f"Machine: {ctx['cpu']}, {ctx['cores']} cores ({', '.join(ctx['cpu_flags'])}); torch "
             f"{ctx['versions'].get('torch')}. Runs one at a time, nothing else running; 2 threads. Every other "
             "setting is the recipe's. Val top-1 on the mini set's 1,000 val images (0.1 point per image).", "",
             "| recipe | setting | seeds | val top-1 % per seed | mean ± std | images/s (mean) |",
             "|---|---|---:|---|---:|---:|"]
    summary = {}
    for recipe in sorted({r["recipe"] for r in rows}):
        for setting in (first, second):
            runs = sorted((r for r in rows if r["recipe"] == recipe and r["setting"] == setting),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            top1 = [r["val_top1"] for r in runs]
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            summary[setting] = (statistics.mean(top1), std, len(top1))
            lines.append(f"| {recipe} | `{setting}` | {len(runs)} | {', '.join(f'{t:.1f}' for t in top1)} | "
                         f"{statistics.mean(top1):.2f} ± {std:.2f} | "
                         f"{statistics.mean(r['images_per_s'] for r in runs):.0f} |")
    if len(summary) == 2:
        (mean_a, std_a, n_a), (mean_b, std_b, n_b) = summary[first], summary[second]
        diff, noise = mean_b - mean_a, max(std_a, std_b)
        error = (std_a**2 / n_a + std_b**2 / n_b) ** 0.5
        verdict = "within" if abs(diff) <= noise else "outside"
        lines += ["", f"`{second}` − `{first}`: {diff:+.2f} points (standard error of the difference {error:.2f}), "
                  f"{verdict} the seed spread (largest std {noise:.2f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
