"""Shared helpers: tiny recipes on the bundled mini CIFAR-10 and a way to run the real CLI."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))
requires_openvino = pytest.mark.skipif(not HAS_OPENVINO,
                                       reason='OpenVINO/NNCF not installed (pip install "kd2deploy[openvino]")')
requires_optimum = pytest.mark.skipif(importlib.util.find_spec("optimum") is None,
                                      reason='optimum-onnx not installed (pip install "kd2deploy[optimum]"): the CPU '
                                             'INT8 presets fall back to `portable`')


def tiny_recipe(run_dir: Path, **sections: Any) -> dict[str, Any]:
    """A recipe that trains timm's tiny test_resnet for one short epoch; sections override whole keys."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "data": {"dataset": "mini_cifar10", "train_subset": 256, "num_workers": 0},
        "student": {"name": "test_resnet"},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "output": {"dir": str(run_dir), "tensorboard": False},
        "device": "cpu",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def quiet() -> Console:
    """A console that prints nowhere, for library calls whose output a test does not read."""
    return Console(file=io.StringIO(), width=200)


def train_run(folder: Path, **sections: Any) -> Path:
    """A one-epoch tiny run (test_resnet unless `student` is given); returns its run folder."""
    from kd2deploy.recipe import load_recipe
    from kd2deploy.train.engine import train

    run_dir = folder / "run"
    train(load_recipe(write_recipe(folder / "recipe.yaml", tiny_recipe(run_dir, **sections))), console=quiet())
    return run_dir


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd2deploy", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Factory: recipe_file(**sections) -> path of a tiny recipe writing into tmp_path/run."""
    def make(name: str = "recipe.yaml", **sections: Any) -> Path:
        return write_recipe(tmp_path / name, tiny_recipe(tmp_path / "run", **sections))
    return make
