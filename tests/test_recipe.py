"""Recipe validation, overrides and the one-paragraph errors (exit 2, no traceback)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, tiny_recipe

from kd2deploy.errors import RecipeError, UserError
from kd2deploy.recipe import check_files, load_recipe, validate_recipe

BUNDLED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_bundled_recipes_validate(path: Path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.student.name


def test_defaults_and_method_inference(tmp_path):
    plain = validate_recipe(tiny_recipe(tmp_path))
    assert plain.distill.method == "none" and plain.teachers == []
    kd = validate_recipe(tiny_recipe(tmp_path, teacher={"name": "test_resnet"}))
    assert kd.distill.method == "kd" and [t.name for t in kd.teachers] == ["test_resnet"]


def test_dotted_overrides(recipe_file, tmp_path):
    path = recipe_file(teacher={"name": "test_resnet"})
    recipe = load_recipe(path, ["optim.lr=0.05", "optim.amp=true", "teacher.checkpoint=t.pt",
                                "data.augment.scale=[0.5, 1.0]", "distill.temperature=2"])
    assert recipe.optim.lr == 0.05 and recipe.optim.amp is True
    assert recipe.teachers[0].checkpoint == Path("t.pt")
    assert recipe.data.augment.scale == (0.5, 1.0)
    assert recipe.distill.model_extra["temperature"] == 2
    assert load_recipe(path, ["teachers.0.name=resnet18"]).teachers[0].name == "resnet18"


@pytest.mark.parametrize("override, field, expected", [
    (["optim.lrr=0.1"], "optim.lrr", "did you mean `lr`"),
    (["optim.lr=abc"], "optim.lr", "valid number"),
    (["optim.epochs=0"], "optim.epochs", "greater than or equal to 1"),
    (["data.dataset=imagenet21k"], "data.dataset", "mini_cifar10"),
    (["student.name=resnet_999"], "student.name", "not a timm model name"),
    (["distill.method=kd"], "teachers", "needs 1 to 8 teacher"),
    (["distill.method=mgd"], "distill.method",
     "Expected one of: capkd, cit, crd, cskd, deit, feature, kd, libkd, none, sskd, vlfkd"),
    (["teacher.name=test_resnet", "distill.tempreature=3"], "distill.tempreature", "Parameters of `kd`"),
    (["optim.lr"], None, "dotted.key=value"),
])
def test_recipe_errors_name_the_field(recipe_file, override, field, expected):
    path = recipe_file()
    with pytest.raises(RecipeError) as info:
        load_recipe(path, override)
    message = str(info.value)
    assert str(path) in message and expected in message
    if field:
        assert f"`{field}`" in message
    assert "\n" not in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstudent:\n  name: [test_resnet\n")
    with pytest.raises(RecipeError, match=r"broken.yaml.*line \d+"):
        load_recipe(path)


def test_missing_files_are_reported(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(teacher={"name": "test_resnet", "checkpoint": str(tmp_path / "nope.pt")}))
    with pytest.raises(RecipeError, match=r"teachers\.0\.checkpoint.*nope\.pt does not exist"):
        check_files(recipe, "r.yaml")
    recipe = load_recipe(recipe_file(data={"dataset": "imagefolder", "root": str(tmp_path / "absent")}))
    with pytest.raises(RecipeError, match=r"data\.root.*absent does not exist"):
        check_files(recipe, "r.yaml")


def _assert_clean_failure(result, *needles: str):
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    for needle in needles:
        assert needle in " ".join(output.split()), output


def test_cli_bad_inputs_exit_2_without_traceback(recipe_file, tmp_path):
    _assert_clean_failure(run_cli("train", recipe_file(), "optim.lr=abc"), "optim.lr", "valid number")
    _assert_clean_failure(run_cli("train", tmp_path / "missing.yaml"), "missing.yaml", "does not exist")
    _assert_clean_failure(run_cli("recipes", "validate", recipe_file(student={"name": "resnet_999"})),
                          "student.name", "resnet_999")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    _assert_clean_failure(run_cli("train", recipe_file(data={"dataset": "imagefolder", "root": str(empty)})),
                          "holds no images")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    _assert_clean_failure(run_cli("train", recipe_file(teacher={"name": "test_resnet", "checkpoint": str(corrupt)})),
                          "corrupt.pt", "cannot be read")


def test_teacher_checkpoint_must_fit_the_model(tmp_path):
    from kd2deploy.models import create_model

    path = tmp_path / "wrong.pt"
    torch.save(create_model("test_resnet", num_classes=100).state_dict(), path)
    with pytest.raises(UserError, match=r"wrong\.pt.*do not fit.*shape mismatch"):
        create_model("test_resnet", num_classes=10, checkpoint=path, field="teachers.0.name")


def test_existing_run_is_not_overwritten(recipe_file, tmp_path):
    path = recipe_file()
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"previous run")
    _assert_clean_failure(run_cli("train", path), "--resume", "--overwrite")
    assert last.read_bytes() == b"previous run"


def test_recipes_cli_show_and_list(recipe_file):
    shown = run_cli("recipes", "show", recipe_file(), "optim.lr=0.2")
    assert shown.returncode == 0, shown.stderr
    assert "lr: 0.2" in shown.stdout and "weight_decay" in shown.stdout
    listed = run_cli("recipes", "list")
    assert listed.returncode == 0 and "quickstart" in listed.stdout
