"""The training engine: student-only artifacts, kill-and-resume equality, torchrun/DDP semantics, and the
Distiller extension points (hooks, projectors, a critic with its own optimizer) without engine special cases."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import quiet, tiny_recipe, write_recipe
from torch import nn

from kd2deploy.checkpoint import STUDENT, load_checkpoint
from kd2deploy.distill import Distiller, MethodParams, StepOutput, get_method_class, method_names, registry
from kd2deploy.errors import UserError
from kd2deploy.models import create_model
from kd2deploy.recipe import load_recipe
from kd2deploy.student import load_student
from kd2deploy.train.engine import Trainer, train
from kd2deploy.train.run_lock import run_folder_lock


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "student.pt")["state_dict"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_kd_run_writes_a_student_only_checkpoint(tmp_path):
    teacher_run = tmp_path / "teacher"
    train(load_recipe(write_recipe(tmp_path / "t.yaml", tiny_recipe(teacher_run, student={"name": "resnet10t"}))))
    recipe = tiny_recipe(tmp_path / "kd", teacher={"name": "resnet10t", "checkpoint": str(teacher_run / "student.pt")},
                         distill={"method": "kd", "temperature": 2.0, "alpha": 0.5}, optim={"epochs": 2})
    metrics = train(load_recipe(write_recipe(tmp_path / "kd.yaml", recipe)))
    assert metrics["epoch"] == 2 and 0 <= metrics["val_top1"] <= 100 and metrics["loss_kd"] > 0

    ckpt = load_checkpoint(tmp_path / "kd" / "student.pt")
    fresh_student = create_model("test_resnet", 10).state_dict()
    assert set(ckpt["state_dict"]) == set(fresh_student)  # no teacher, projector or discriminator tensors
    assert not any("teacher" in key for key in ckpt["state_dict"])
    assert ckpt["recipe"]["teachers"][0]["name"] == "resnet10t" and ckpt["method"] == "kd"
    assert ckpt["versions"]["torch"] and "git_commit" in ckpt
    assert ckpt["data"]["class_names"][0] == "airplane" and len(ckpt["data"]["class_names"]) == 10
    model, _ = load_student(tmp_path / "kd")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert [r["epoch"] for r in _rows(tmp_path / "kd")] == ["1", "2"]


def _resume_recipe(run_dir: Path, on_device: bool) -> dict:
    # augmentation, mixup, dropout and 2 loader workers (or batches built from resident images): every source of
    # randomness a resume must replay
    return tiny_recipe(run_dir, teacher={"name": "test_resnet"}, student={"name": "test_resnet",
                       "kwargs": {"drop_rate": 0.2}},
                       data={"train_subset": 1024, "num_workers": 2, "on_device": on_device,
                             "augment": {"mixup": 0.2, "scale": [0.5, 1],  # colour jitter: the loader path's
                                         "color_jitter": None if on_device else 0.4}},
                       optim={"epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
                              # bf16 autocast where the CPU has it, channels-last; a fixed thread count, since
                              # float summation order depends on it (`auto` would follow the machine's load)
                              "amp": "auto", "channels_last": True, "threads": torch.get_num_threads()})


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "resident"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, on_device):
    reference = tmp_path / "reference"
    train(load_recipe(write_recipe(tmp_path / "ref.yaml", _resume_recipe(reference, on_device))))

    killed = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", _resume_recipe(killed, on_device))
    # the same intra-op thread count as this process: float summation order depends on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "kd2deploy", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists():  # written atomically after epoch 1
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch 2, loader workers included
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "student.pt").exists()
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1

    train(load_recipe(path), resume=True)
    resumed, expected = _state(killed), _state(reference)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["epoch"] for r in _rows(killed)] == ["1", "2", "3"]
    assert _rows(killed)[-1]["val_top1"] == _rows(reference)[-1]["val_top1"]


def test_a_second_trainer_on_a_live_run_folder_stops_with_a_clear_error(tmp_path):
    run = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(run, data={"train_subset": 64}, optim={"batch_size": 32}))
    built_earlier = Trainer(load_recipe(path), console=quiet())
    with run_folder_lock(run):  # another trainer holds the folder (flock: a second open file conflicts)
        with pytest.raises(UserError, match=r"run folder .*run is in use by another training run \(pid \d+ on"):
            Trainer(load_recipe(path), resume="auto", console=quiet())
        with pytest.raises(UserError, match="in use by another training run"):
            built_earlier.fit()
        cli = subprocess.run([sys.executable, "-m", "kd2deploy", "train", str(path), "--resume"],
                             capture_output=True, text=True)
        assert cli.returncode == 2 and "in use by another training run" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert not (run / "last.pt").exists()
    assert built_earlier.fit()["epoch"] == 1  # free again once the holder is gone
    with run_folder_lock(run):  # and the finished run released it
        assert (run / STUDENT).exists()


TINY_RESNET = {"name": "test_resnet"}
TINY_REDNET = {"name": "rednet26_cifar", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8,
                                                     "involution_kernel": 3, "group_channels": 8}}
TINY_TOKEN_VIT = {"name": "libkd_nano_patch4_32", "kwargs": {"depth": 1}}
TINY_VIT = {"name": "vit_nano_patch4_32", "kwargs": {"depth": 1}}


@pytest.mark.parametrize(("method", "teachers", "student", "params"), [
    ("none", [], {"name": "test_resnet"}, None),
    ("kd", [TINY_RESNET], {"name": "test_resnet"}, None),
    ("deit", [TINY_RESNET], {"name": "deit_nano_distilled_patch4_32", "kwargs": {"depth": 1}}, None),
    ("capkd", [TINY_VIT], TINY_RESNET, None),
    ("libkd", [TINY_RESNET, TINY_REDNET], TINY_TOKEN_VIT, None),
    ("cit", [TINY_RESNET, TINY_REDNET], {"name": "cit_nano_patch4_32", "kwargs": {"depth": 1}}, None),
    ("cskd", [TINY_RESNET], TINY_TOKEN_VIT, None),
    ("crd", [TINY_VIT], TINY_RESNET, None),  # transformer -> CNN
    ("crd", [TINY_RESNET], TINY_TOKEN_VIT, None),  # CNN -> ViT
    ("feature", [TINY_VIT], TINY_RESNET, {"pairs": [["layer2", "blocks.0", 1.0]]}),
    ("feature", [TINY_RESNET], TINY_TOKEN_VIT, {"pairs": [["blocks.0", "layer2"]], "loss": "cosine"}),
    ("sskd", [TINY_VIT], TINY_RESNET, {"head_epochs": 1}),
    ("sskd", [TINY_RESNET], TINY_TOKEN_VIT, {"head_epochs": 1}),
    ("vlfkd", [TINY_RESNET], TINY_TOKEN_VIT, None),
])
def test_every_bundled_method_trains_through_the_engine(tmp_path, method, teachers, student, params):
    assert method in method_names()
    recipe = tiny_recipe(tmp_path / "run", student=student, distill={"method": method, **(params or {})},
                         teachers=teachers, data={"train_subset": 64}, optim={"batch_size": 32},
                         teacher_cache={"dir": str(tmp_path / "cache")})
    metrics = train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    assert metrics["epoch"] == 1 and metrics["train_images"] == 64
    saved = load_checkpoint(tmp_path / "run" / STUDENT)["state_dict"]  # heads, banks, projectors stay out
    assert set(saved) == set(create_model(student["name"], 10, kwargs=student.get("kwargs")).state_dict())
    trained = load_checkpoint(tmp_path / "run" / STUDENT)["training"]  # lets runs on two machines be compared
    assert trained["device"] == "cpu" and trained["precision"] in ("fp32", "bfloat16 autocast")
    bundled = {name for name in method_names() if get_method_class(name).__module__.startswith("kd2deploy.")}
    assert bundled == {"none", "kd", "deit", "capkd", "libkd", "cit", "cskd", "crd", "feature", "sskd",
                       "vlfkd"}  # each one is tested here


def test_torchrun_two_processes_match_one_process(tmp_path):
    """Global batch split over 2 gloo processes: the same global batches, so the same weights as 1 process.
    (A model without BatchNorm, no augmentation and SGD: per-process statistics and randomness cannot differ,
    and no adaptive optimizer magnifies float summation-order noise in near-zero gradients.)"""
    def recipe(run_dir):
        return tiny_recipe(run_dir, student={"name": "test_vit", "kwargs": {"img_size": 32}},
                           data={"train_subset": 512, "augment": {"enabled": False}},
                           optim={"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05})
    single = tmp_path / "single"
    train(load_recipe(write_recipe(tmp_path / "single.yaml", recipe(single))))
    multi = tmp_path / "multi"
    path = write_recipe(tmp_path / "multi.yaml", recipe(multi))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "kd2deploy", "train", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("epoch 2/2") == 1  # rank 0 alone logs

    for key, value in _state(single).items():
        torch.testing.assert_close(_state(multi)[key], value, rtol=1e-4, atol=1e-5, msg=key)
    single_rows, multi_rows = _rows(single), _rows(multi)
    assert len(multi_rows) == 2
    assert multi_rows[-1]["val_images"] == single_rows[-1]["val_images"] == "1000"  # every val image once
    assert float(multi_rows[-1]["val_top1"]) == pytest.approx(float(single_rows[-1]["val_top1"]), abs=0.2)
    assert float(multi_rows[-1]["train_loss"]) == pytest.approx(float(single_rows[-1]["train_loss"]), rel=1e-3)


class AuxParams(MethodParams):
    weight: float = 0.5


class ProjectorAndCritic(Distiller):
    """A test method using every extension point: a hooked feature, a projector the engine's optimizer trains,
    and a critic with its own optimizer stepped every 2nd iteration (as adversarial methods do)."""

    name = "test_projector_critic"
    Params = AuxParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.features = self.hook_features(self.student, {"pooled": "global_pool"})
        self.projector = nn.Linear(self.student.num_features, self.num_classes)
        self.critic = nn.Linear(self.num_classes, 1)
        self.critic_optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)
        self.critic_steps = 0

    def ddp_ignored_prefixes(self):
        return (*super().ddp_ignored_prefixes(), "critic.")

    def forward(self, images, targets, indices=None):
        teacher = self.teacher_logits(images, indices)[0]
        logits = self.student(images)
        projected = self.projector(self.features.features["pooled"])
        match = nn.functional.mse_loss(projected, teacher)
        ce = self.classification_loss(logits, targets)
        self._pair = (projected.detach(), teacher)
        return StepOutput(ce + self.params.weight * match, logits, {"ce": ce.detach(), "match": match.detach()})

    def on_step_end(self, step, output):
        if step % 2:
            return {}
        projected, teacher = self._pair
        loss = self.critic(projected).mean() - self.critic(teacher).mean()
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        self.critic_steps += 1
        return {"critic": loss.detach()}

    def extra_state(self):
        return {"critic_optimizer": self.critic_optimizer.state_dict(), "critic_steps": self.critic_steps}

    def load_extra_state(self, state):
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.critic_steps = state["critic_steps"]


def test_distiller_extension_points_need_no_engine_special_case(tmp_path, monkeypatch):
    # Registered for this test only, so other tests see the real method table.
    monkeypatch.setitem(registry._METHODS, ProjectorAndCritic.name, ProjectorAndCritic)
    recipe = tiny_recipe(tmp_path / "run", teacher={"name": "test_resnet"},
                         distill={"method": "test_projector_critic", "weight": 0.5}, optim={"epochs": 2})
    trainer = Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    critic_before = trainer.distiller.critic.weight.detach().clone()
    metrics = trainer.fit()

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in trainer.distiller.projector.parameters())
    assert not any(id(p) in optimized for p in trainer.distiller.critic.parameters())
    assert not any(id(p) in optimized for p in trainer.distiller.teachers.parameters())
    assert trainer.distiller.critic_steps == trainer.global_step // 2 > 0
    assert not torch.equal(critic_before, trainer.distiller.critic.weight)
    assert metrics["loss_match"] > 0 and "loss_critic" in metrics

    last = load_checkpoint(tmp_path / "run" / "last.pt")["distiller"]
    assert "projector.weight" in last["modules"] and last["extra"]["critic_steps"] == trainer.distiller.critic_steps
    assert not any(k.startswith("teachers.") for k in last["modules"])
    student = load_checkpoint(tmp_path / "run" / "student.pt")["state_dict"]
    assert not any(k.startswith(("projector", "critic", "teacher")) for k in student)

    resumed = Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", {**recipe, "optim": {**recipe["optim"],
                      "epochs": 3}})), resume=True, console=quiet())
    assert resumed.distiller.critic_steps == trainer.distiller.critic_steps
    torch.testing.assert_close(resumed.distiller.projector.weight, trainer.distiller.projector.weight)
