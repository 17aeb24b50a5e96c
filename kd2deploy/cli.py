"""The `kd2deploy` command: one sub-command per job."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .errors import CheckFailed, UserError
from .machine import sleep_idle_openmp_threads_when_busy

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill edge-friendly students from recipes, export them (ONNX, INT8) and benchmark them.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(no_args_is_help=True, help="Check datasets.")
app.add_typer(data_app, name="data")


class EvaluateByDefault(TyperGroup):
    """`kd2deploy robustness TARGET… --sets DIR` runs the hidden `evaluate` command; `make-sets` is a sub-command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["evaluate", *args]
        return super().parse_args(ctx, args)


robustness_app = typer.Typer(cls=EvaluateByDefault, no_args_is_help=True, help=(
    "Bias and robustness sets, and every model's top-1 on them: `kd2deploy robustness make-sets --val DIR --out "
    "SETS`, then `kd2deploy robustness TARGET... --sets SETS`."))
app.add_typer(robustness_app, name="robustness")
console = Console()
err_console = Console(stderr=True)
TRAINING_STACK = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnxslim")  # kd2deploy[train]


def extra_for(module: str) -> str | None:
    """The kd2deploy extra that installs `module` (a training-stack or backend-runtime package), or None."""
    if module in TRAINING_STACK:
        return "train"
    if module in ("skimage", "scipy"):
        return "robustness"
    from .backends import backend_packages

    return backend_packages().get(module)


def user_errors(fn: Callable) -> Callable:
    """Bad input ends in one paragraph on stderr and exit code 2, a failed check in exit code 1; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=UserError.exit_code) from None
        except CheckFailed as exc:
            err_console.print(f"[bold red]failed:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=CheckFailed.exit_code) from None
        except ModuleNotFoundError as exc:
            extra = extra_for((exc.name or "").split(".")[0])
            if extra is None:
                raise
            command = f"kd2deploy {fn.__name__.rstrip('_')}"
            message = (f"`{command}` needs {exc.name}, which is not installed here. Install it with "
                       f'`pip install "kd2deploy[{extra}]"`.')
            if extra == "train":
                message += (" Without the training stack (an edge install, kd2deploy[edge]) kd2deploy benchmarks and "
                            "evaluates export folders only.")
            err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=UserError.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; the last completed checkpoint is kept (continue with --resume)")
            raise typer.Exit(code=130) from None

    return wrapper


def _csv_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 1,32, not `{text}`.") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} needs at least one positive integer, not `{text}`.")
    return values


@app.command()
@user_errors
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe (a path, or the name of a bundled recipe)."),
    overrides: list[str] | None = typer.Argument(None, help="dotted.key=value overrides, e.g. optim.lr=0.05"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output.dir that holds a run."),
) -> None:
    """Train a student (distilled, or plainly when the recipe has no teacher).

    Multi-GPU / multi-process: torchrun --nproc_per_node N -m kd2deploy train RECIPE
    """
    sleep_idle_openmp_threads_when_busy()  # before torch is imported: OpenMP reads its policy once
    from .recipe import find_recipe, load_recipe
    from .train.engine import train as run_training

    path = find_recipe(str(recipe))
    loaded = load_recipe(path, overrides or [])
    run_training(loaded, str(path), resume=resume, overwrite=overwrite)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip().lower() for v in text.split(",") if v.strip()]


@app.command()
@user_errors
def export(
    source: Path = typer.Argument(..., help="A run folder (or its student.pt); or an export folder, to add artifacts "
                                            "built from its ONNX graph (TensorRT engines on the target device)."),
    formats: str | None = typer.Option(None, "--format", help="Comma-separated: onnx, openvino, tensorrt "
                                                              "(default: the target's)."),
    precisions: str | None = typer.Option(None, "--precision", help="Comma-separated: fp32, fp16, int8 "
                                                                    "(default: the target's)."),
    int8: bool = typer.Option(False, "--int8", help="Add int8 to the precisions."),
    target: str | None = typer.Option(None, "--target", help="Target profile: a bundled one (laptop-x86, "
                                                             "arm64-cpu, jetson-orin, rtx-gpu) or a YAML path. "
                                                             "Default: this machine's CPU profile."),
    calib_samples: int = typer.Option(256, "--calib-samples", min=1, help="Training images used for calibration."),
    calib_method: str | None = typer.Option(None, "--calib-method", help="minmax, entropy or percentile "
                                                                          "(default: the target's)."),
    max_drop: float | None = typer.Option(None, "--max-drop", min=0, help="OpenVINO INT8: accuracy-controlled "
                                          "quantization, at most this many top-1 points lost on the val images."),
    out: Path | None = typer.Option(None, "--out", help="Export folder (default: RUN_DIR/export, or SOURCE itself "
                                                        "when it is an export folder)."),
    atol: float = typer.Option(1e-3, "--atol", help="Max abs logit difference allowed for FP32 artifacts."),
    atol_fp16: float = typer.Option(5e-2, "--atol-fp16", help="Max abs logit difference allowed for FP16 ones."),
    val_samples: int = typer.Option(1000, "--val-samples", min=1, help="Val images every artifact is checked on."),
    dynamic_size: bool | None = typer.Option(None, "--dynamic-size/--static-size", help="Dynamic height and width "
                                             "in the ONNX graph (default: the target's)."),
    speed_check: bool = typer.Option(True, "--speed-check/--no-speed-check", help="Time INT8 against FP32 at "
                                     "batch 1 on this machine and recommend the faster."),
) -> None:
    """Export the student to ONNX, OpenVINO and TensorRT artifacts, verify each on real val images, write
    manifest.json. Exits 2, after writing the rest, when a requested backend is missing here."""
    from .deploy.pipeline import export_run

    precision_list = _csv(precisions)
    if int8:
        precision_list = [*(precision_list or ["fp32"]), "int8"]
    manifest = export_run(source, out_dir=out, formats=_csv(formats), precisions=precision_list, profile=target,
                          calib_samples=calib_samples, calib_method=calib_method, max_drop=max_drop, atol=atol,
                          atol_fp16=atol_fp16, val_samples=val_samples, dynamic_size=dynamic_size,
                          speed=speed_check, console=console)
    console.print(f"Artifacts and manifest: {manifest['artifact_dir']}")


@app.command()
@user_errors
def bench(
    paths: list[Path] | None = typer.Argument(None, help="Export folders (holding manifest.json) and run folders "
                                              "(holding student.pt), benchmarked into one table."),
    backends: str | None = typer.Option(None, "--backends", help="Comma-separated: pytorch, pytorch-compiled, "
                                        "onnxruntime, openvino, tensorrt (default: all that run here)."),
    precisions: str | None = typer.Option(None, "--precisions", help="Comma-separated: fp32, fp16, int8 "
                                          "(default: all)."),
    batch: str = typer.Option("1,32", "--batch", help="Comma-separated batch sizes."),
    iters: int = typer.Option(50, "--iters", min=1, help="Timed runs per row (at least this many with --duration)."),
    duration: float | None = typer.Option(None, "--duration", min=0, help="Seconds of timed runs per row."),
    warmup: int = typer.Option(10, "--warmup", min=1, help="Untimed warm-up runs per row (compilation, caches), "
                                                           "excluded from the figures."),
    threads: int | None = typer.Option(None, "--threads", min=0, help="CPU threads per runtime, recorded "
                                       "(default: all cores; 0: each runtime's own default)."),
    val: Path | None = typer.Option(None, "--val", help="Val images for top-1: a folder with one sub-folder per "
                                                        "class (default: the run's own val split)."),
    val_samples: int | None = typer.Option(None, "--val-samples", min=0, help="Score top-1 on this many val images, "
                                           "spread over the classes (default: all; 0: no top-1)."),
    max_drop: float = typer.Option(1.0, "--max-drop", min=0, help="Top-1 points the recommendation may lose."),
    out: Path | None = typer.Option(None, "--out", help="Folder for bench.md/csv/json/png (default: the one folder "
                                                        "benchmarked, or runs/bench for several)."),
    compare: tuple[Path, Path] | None = typer.Option(None, "--compare", help="Show two bench.json files side by side "
                                                     "instead of benchmarking."),
) -> None:
    """Benchmark every artifact x backend x precision x batch size of the given folders, each artifact in a fresh
    process: top-1, latency p50/p90/p99/mean, images/s, peak memory, size, params and GFLOPs; write
    bench.md/csv/json and an accuracy-vs-latency plot; or compare two runs with --compare A.json B.json."""
    from .bench.report import compare_reports
    from .bench.run import run_bench

    if compare:
        compare_reports(*compare, console=console)
        return
    if not paths:
        raise UserError("`kd2deploy bench` needs export or run folders (PATHS...), or --compare A.json B.json.")
    run_bench(paths, batches=_csv_ints(batch, "--batch"), iters=iters, warmup=warmup, threads=threads,
              val_samples=val_samples, duration=duration, max_drop=max_drop, backends=_csv(backends),
              precisions=_csv(precisions), val_dir=val, out=out, console=console)


@app.command(name="eval")
@user_errors
def eval_(
    target: Path = typer.Argument(..., help="A run folder, student.pt, an export folder or an artifact file "
                                            "(.onnx, .xml, .engine) inside one."),
    val: Path | None = typer.Option(None, "--val", help="Val images: a folder with one sub-folder per class "
                                                        "(default: the run's own val split)."),
    val_samples: int = typer.Option(0, "--val-samples", min=0, help="Limit the evaluation (0: whole val split)."),
) -> None:
    """Top-1/top-5 of a trained student or an exported artifact on its val split (or on --val DIR)."""
    from .bench.accuracy import evaluate_target

    evaluate_target(target, val_samples=val_samples or None, console=console, val_dir=val)


@app.command()
@user_errors
def quickstart(
    overrides: list[str] | None = typer.Argument(None, help="dotted.key=value overrides for all three recipes"),
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Folder for the quickstart's runs."),
) -> None:
    """Train a CNN teacher, distill a student with KD (plus a no-teacher baseline), export FP32+INT8, bench.

    Runs on the bundled mini CIFAR-10 in about 5 minutes on 2 CPU cores. Re-running continues where it stopped.
    """
    sleep_idle_openmp_threads_when_busy()
    from .quickstart import run_quickstart

    run_quickstart(out, console=console, overrides=overrides or [])


@data_app.command("check")
@user_errors
def data_check(
    target: Path = typer.Argument(..., help="A recipe (checks its data.root's train and val folders), a folder "
                                            "holding train/ and val/, or one folder with a sub-folder per class."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding processes (0: one per core)."),
) -> None:
    """Decode every image and report unreadable or truncated files, non-image files, non-RGB modes, empty class
    folders and train/val class sets that differ. Exit 1 when there are errors (not warnings)."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from .console import print_table
    from .data.checks import check_tree, findings, trees_to_check
    from .data.sources import recipe_folders
    from .recipe import find_recipe, load_recipe

    path = find_recipe(str(target)) if target.suffix in (".yaml", ".yml") else target
    trees = (recipe_folders(load_recipe(path, check_names=False).data, path) if path.is_file()
             else trees_to_check(path))
    reports = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        for split, root in trees:
            task = progress.add_task(f"decoding {split}", total=None)
            reports[split] = check_tree(root, workers or os.cpu_count() or 1,
                                        lambda done, total, task=task: progress.update(task, completed=done,
                                                                                       total=total))
    table = Table("split", "folder", "classes", "images", "unreadable", "not images", "non-RGB", "empty classes",
                  title=f"kd2deploy data check {target}")
    for split, r in reports.items():
        modes = ", ".join(f"{m}: {len(p)}" for m, p in sorted(r.odd_modes.items())) or "0"
        table.add_row(split, str(r.root), str(len(r.classes)), str(r.images), str(len(r.unreadable)),
                      str(len(r.not_images)), modes, str(len(r.empty_classes)))
    print_table(console, table)
    errors, warnings = findings(reports)
    for line in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(line)}", soft_wrap=True)
    for line in errors:
        console.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True)
    if errors:
        raise CheckFailed(f"{len(errors)} problem(s) in {target}; training leaves unreadable images out (up to "
                          "data.max_bad_fraction) but the others need fixing.")
    console.print("No errors.")


@recipes_app.command("list")
@user_errors
def recipes_list() -> None:
    """The bundled recipes, with their descriptions."""
    import yaml
    from rich.table import Table

    from .recipe import bundled_recipes_dir

    table = Table("recipe", "description")
    for path in sorted(bundled_recipes_dir().glob("*.yaml")):
        try:
            description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            description = "(invalid YAML)"
        table.add_row(path.stem, str(description))
    console.print(table)


@recipes_app.command("show")
@user_errors
def recipes_show(
    recipe: Path = typer.Argument(..., help="Recipe path or bundled name."),
    overrides: list[str] | None = typer.Argument(None, help="dotted.key=value overrides"),
) -> None:
    """Print the recipe with every default filled in (what a run records)."""
    import yaml

    from .recipe import find_recipe, load_recipe, resolved_recipe

    loaded = load_recipe(find_recipe(str(recipe)), overrides or [])
    sys.stdout.write(yaml.safe_dump(resolved_recipe(loaded), sort_keys=False))


@recipes_app.command("validate")
@user_errors
def recipes_validate(
    recipes: list[Path] = typer.Argument(..., help="Recipe paths or bundled names."),
) -> None:
    """Check recipes: schema, method parameters and model names. Files a recipe needs that do not exist yet
    (a teacher checkpoint a previous run will write) are reported as warnings."""
    from .recipe import find_recipe, load_recipe, missing_files

    for name in recipes:
        path = find_recipe(str(name))
        loaded = load_recipe(path)
        console.print(f"[green]ok[/green] {path}: {loaded.name}")
        for field, problem in missing_files(loaded):
            console.print(f"  [yellow]warning[/yellow] {field}: {problem} (needed before training)")


@robustness_app.command("make-sets")
@user_errors
def robustness_make_sets(
    val: Path = typer.Option(..., "--val", help="The val images: a folder with one sub-folder per class."),
    out: Path = typer.Option(..., "--out", help="Where the sets go (one ImageFolder tree per set, and sets.json)."),
    sets: str | None = typer.Option(None, "--sets", help="Comma-separated: bias, corruptions, or set names "
                                    "(locality, scramble_2/4/8, noise, shape, texture, a corruption for all its "
                                    "severities, or one severity such as contrast_3). Default: all."),
    seed: int = typer.Option(0, "--seed", help="Seeds every random choice; the same seed gives the same sets."),
    samples: int | None = typer.Option(None, "--samples", min=1, help="Use this many val images, spread over "
                                       "the classes (default: all)."),
    corruption_samples: int = typer.Option(2000, "--corruption-samples", min=0, help="Images per corruption and "
                                           "severity, spread over the classes (0: all)."),
    noise_fraction: float = typer.Option(1.0, "--noise-fraction", min=0.01, max=1.0, help="Side of the noisy "
                                         "square relative to the image side."),
    noise_sigma: float = typer.Option(0.1, "--noise-sigma", min=0.0, help="Std of the fixed noise pattern, "
                                      "in [0, 1] pixel units."),
    segments: int = typer.Option(64, "--segments", min=2, help="SLIC superpixels per image (locality)."),
    construction: str = typer.Option("auto", "--construction", help="How shape and texture are made: pretrained "
                                     "(FCN-ResNet-101 silhouettes, VGG-19 style transfer; weights from torch's hub "
                                     "cache, never downloaded), offline (edges, amplitude-phase cue conflict; no "
                                     "weights) or auto (pretrained when its weights are here)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes (0: one per core)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace sets already in --out."),
) -> None:
    """Write the bias sets and the CIFAR-10-C-style corruptions of a val set, deterministically."""
    from .robustness.make import make_sets

    record = make_sets(val, out, [s.strip() for s in sets.split(",") if s.strip()] if sets else None, seed, samples,
                       corruption_samples or None, workers or None, noise_fraction, noise_sigma, segments,
                       err_console, overwrite, command="kd2deploy " + " ".join(sys.argv[1:]),
                       construction=construction)
    console.print(f"{len(record['sets'])} sets of {record['source']['images']} images in {out} "
                  f"({record['seconds']:.0f} s); see {out / 'sets.json'}")


@robustness_app.command("evaluate", hidden=True)
@user_errors
def robustness_evaluate(
    targets: list[Path] = typer.Argument(..., help="Run folders, student.pt files, export folders or artifacts."),
    sets: Path = typer.Option(..., "--sets", help="A folder written by `kd2deploy robustness make-sets`."),
    val_samples: int | None = typer.Option(None, "--val-samples", min=1, help="Images per set, spread over the "
                                           "classes (default: all)."),
    reference: Path | None = typer.Option(None, "--reference", help="The model mCE is relative to (one of the "
                                          "targets, or another)."),
    out: Path = typer.Option(Path("runs/robustness"), "--out", help="Where robustness.{md,csv,json,png} go."),
) -> None:
    """Top-1 of every target on every set, the bias ratios, the shape bias and the corruption figures."""
    from .robustness.evaluate import robustness

    robustness(targets, sets, val_samples, reference, out, console)
    console.print(f"Report: {out / 'robustness.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
