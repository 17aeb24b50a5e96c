"""The edge install: a fresh venv with kd2deploy[edge] only (no torch, torchvision or timm) benchmarks and
evaluates an export folder with ONNX Runtime, reading val images with numpy and Pillow. This is how a Jetson or a
laptop without the training stack is benchmarked. It builds a venv (about a minute from pip's cache)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import quiet, train_run

from kd2deploy.bench.accuracy import evaluate_target
from kd2deploy.deploy.pipeline import export_run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # builds a venv


def run(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": ""})


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("edge") / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    # a regular (not editable) install, from a copy of the source: what `pip install "kd2deploy[edge]"` gives
    installed = run(python, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", f"{REPO}[edge]")
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    run_dir = train_run(tmp_path_factory.mktemp("edge-run"), data={"train_subset": 64})
    manifest = export_run(run_dir, formats=["onnx"], precisions=["fp32", "int8"], calib_samples=32, val_samples=32,
                          speed=False, console=quiet())
    return Path(manifest["artifact_dir"])


def test_edge_install_has_no_training_stack(edge_python):
    for module in ("torch", "torchvision", "timm"):
        result = run(edge_python, "-c", f"import {module}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, module
    result = run(edge_python, "-c", "import kd2deploy.bench.run, kd2deploy.bench.accuracy, kd2deploy.cli, sys; "
                                    "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    assert result.returncode == 0 and result.stdout.strip() == "[]"


def test_edge_bench_and_eval_on_an_export_folder(edge_python, export_dir, tmp_path):
    kd2deploy = edge_python.parent / "kd2deploy"
    out = tmp_path / "report"
    result = run(kd2deploy, "bench", export_dir, "--batch", "1,2", "--iters", "3", "--warmup", "1", "--threads", "1",
                 "--val-samples", "40", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert [(r["artifact"], r["batch"]) for r in report["rows"]] == [
        ("onnx-fp32", 1), ("onnx-fp32", 2), ("onnx-int8", 1), ("onnx-int8", 2)]
    assert "torch" not in report["context"]["versions"]
    assert "Skipping the PyTorch rows" in result.stdout and "torch is not installed" in result.stdout
    assert (out / "bench.png").is_file() and (out / "bench.md").is_file()

    result = run(kd2deploy, "eval", export_dir, "--val-samples", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    # the same top-1 as the training stack's evaluation of the same artifacts on the same images
    expected = evaluate_target(export_dir, val_samples=40, console=quiet())["results"]
    for r in expected:
        assert f"│ {r['artifact']} " in result.stdout and f" {r['top1']:.2f} " in result.stdout
    bench_top1 = {row["artifact"]: row["top1"] for row in report["rows"]}
    assert bench_top1 == {r["artifact"]: pytest.approx(r["top1"]) for r in expected}


def test_edge_refuses_training_with_a_clear_error(edge_python, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nstudent:\n  name: resnet18\ndata:\n  dataset: mini_cifar10\n")
    kd2deploy = edge_python.parent / "kd2deploy"
    for args in (["train", recipe], ["quickstart", "--out", tmp_path / "qs"], ["export", tmp_path]):
        result = run(kd2deploy, *args)
        assert result.returncode == 2 and 'pip install "kd2deploy[train]"' in result.stderr, args
        assert "Traceback" not in result.stderr
    listed = run(kd2deploy, "recipes", "list")  # bundled with the package: no clone needed
    assert listed.returncode == 0 and "quickstart" in listed.stdout


def test_edge_robustness_of_int8_and_fp32_artifacts(edge_python, export_dir, tmp_path):
    """The sets are plain image folders, so an export's robustness is measured where it is deployed: the same
    top-1 per set as the training stack's evaluation of the same artifacts."""
    pytest.importorskip("skimage", reason='making the sets needs scikit-image (pip install "kd2deploy[robustness]")')
    from kd2deploy.data.sources import MINI_CIFAR10
    from kd2deploy.robustness.evaluate import robustness
    from kd2deploy.robustness.make import make_sets

    sets = tmp_path / "sets"
    make_sets(MINI_CIFAR10 / "val", sets, ["scramble_4", "texture", "contrast_5"], samples=30, workers=1)
    out = tmp_path / "report"
    result = run(edge_python.parent / "kd2deploy", "robustness", export_dir, "--sets", sets, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "robustness.json").read_text())
    assert [r["artifact"] for r in report["rows"]] == ["onnx-fp32", "onnx-int8"]
    assert (out / "robustness.png").is_file() and "onnx-int8" in (out / "robustness.md").read_text()
    expected = robustness([export_dir], sets, out=tmp_path / "here", console=quiet())["rows"]
    for edge_row, row in zip(report["rows"], expected, strict=True):
        assert edge_row["top1"] == pytest.approx(row["top1"]) and edge_row["bias"] == pytest.approx(row["bias"])
        assert edge_row["shape_hits"] + edge_row["texture_hits"] <= 30


def test_the_bare_core_install_names_the_extra_it_lacks(edge_python, export_dir):
    """Without onnxruntime (the core install, no extras) eval and bench say which extra runs the artifacts. Runs
    last in this module: it uninstalls onnxruntime from the edge venv."""
    removed = run(edge_python, "-m", "pip", "uninstall", "-y", "-q", "onnxruntime")
    assert removed.returncode == 0, removed.stderr[-2000:]
    kd2deploy = edge_python.parent / "kd2deploy"
    for command in ("eval", "bench"):
        result = run(kd2deploy, command, export_dir, "--val-samples", "8")
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "kd2deploy[edge]" in result.stdout + result.stderr and "Traceback" not in result.stderr
