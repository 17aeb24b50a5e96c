"""The package as a whole: its modules import each other without a cycle (deferred imports inside functions and
type-only imports included, so the layers read recipe -> data -> models -> distill -> train -> deploy/backends ->
bench), every module imports on its own in a fresh interpreter, and a regular, non-editable install from a wheel
carries its recipes and target profiles and works from any folder: `recipes list`, a (shortened) quickstart and
`export --target laptop-x86`."""
from __future__ import annotations

import ast
import graphlib
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kd2deploy

REPO = Path(__file__).resolve().parent.parent


def kd2deploy_imports(path: Path, module: str, package: str) -> set[str]:
    """The kd2deploy modules that a module's source imports anywhere (in functions and under `if TYPE_CHECKING:`
    too); importing a submodule counts as importing its parent packages."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` names a module
        stack.extend(ast.iter_child_nodes(node))
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(2, name.count(".") + 1)}
    return {m for m in found | parents if m.startswith("kd2deploy.") and m != module
            and not module.startswith(m + ".")}


def test_the_package_has_no_import_cycle():
    root = Path(kd2deploy.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = kd2deploy_imports(path, module, package) & files.keys()
    assert "kd2deploy.data.sources" in graph["kd2deploy.recipe"]  # the walk sees imports
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle (each imports the next): {' -> '.join(reversed(cycle.args[1]))}")


@pytest.mark.slow  # one interpreter per module (about a minute on 2 cores)
def test_every_module_imports_in_a_fresh_interpreter():
    modules = [m.name for m in pkgutil.walk_packages(kd2deploy.__path__, "kd2deploy.")
               if m.name != "kd2deploy.__main__"]  # __main__ runs the CLI
    assert len(modules) > 40 and "kd2deploy.models.involution" in modules

    def imports(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(modules, pool.map(imports, modules), strict=True))
    failed = {m: r.stderr.strip().splitlines()[-1] for m, r in results.items() if r.returncode != 0}
    assert not failed


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """kd2deploy installed from a freshly built wheel into a folder of its own (no link to the source tree)."""
    scratch = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", scratch / "dist", REPO],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((scratch / "dist").glob("kd2deploy-*.whl"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                scratch / "site", wheel], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return scratch / "site"


def run_installed(site: Path, cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """`kd2deploy ARGS` from the wheel's files only, in a folder without the repository's recipes/."""
    return subprocess.run([sys.executable, "-m", "kd2deploy", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"})


def test_the_wheel_carries_recipes_profiles_and_the_mini_dataset(wheel_site):
    package = wheel_site / "kd2deploy"
    assert {p.name for p in (package / "recipes").glob("*.yaml")} == {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert {"laptop-x86.yaml", "arm64-cpu.yaml", "jetson-orin.yaml", "rtx-gpu.yaml"} <= {
        p.name for p in (package / "deploy" / "profiles").glob("*.yaml")}
    assert len(list((package / "assets" / "mini_cifar10").rglob("*.jpg"))) == 7000


@pytest.mark.slow
def test_a_wheel_install_works_from_any_folder(wheel_site, tmp_path):
    where = run_installed(wheel_site, tmp_path, "recipes", "list")
    assert where.returncode == 0 and "quickstart" in where.stdout and "vit_to_mbv2" in where.stdout
    shown = run_installed(wheel_site, tmp_path, "recipes", "show", "recipes/quickstart.yaml")  # README's spelling
    assert shown.returncode == 0 and "mini_cifar10" in shown.stdout
    origin = subprocess.run([sys.executable, "-c", "import kd2deploy; print(kd2deploy.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(wheel_site)})
    assert Path(origin.stdout.strip()).is_relative_to(wheel_site)

    quick = run_installed(wheel_site, tmp_path, "quickstart", "--out", "qs", "optim.epochs=1", "data.train_subset=128")
    assert quick.returncode == 0, quick.stderr[-2000:]
    exported = run_installed(wheel_site, tmp_path, "export", "qs/kd", "--target", "laptop-x86", "--format", "onnx",
                             "--int8", "--out", "laptop", "--val-samples", "32", "--calib-samples", "32",
                             "--no-speed-check")
    assert exported.returncode == 0, exported.stderr[-2000:]
    manifest = json.loads((tmp_path / "laptop" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "laptop-x86"
    assert {a["name"] for a in manifest["artifacts"]} == {"onnx-fp32", "onnx-int8"}
