"""CAP-KD (Liu et al. 2022): shapes for transformer x CNN pairs, the partially cross attention, the group-wise
linear projector, the multi-view generator, each loss term, the discriminator cadence, resume and torchrun
equality, and a plain exportable student."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from conftest import quiet, run_cli, tiny_recipe, write_recipe

import kd2deploy.models  # noqa: F401  (registers the CIFAR-size models)
from kd2deploy.checkpoint import load_checkpoint
from kd2deploy.data.sources import CIFAR_MEAN, CIFAR_STD
from kd2deploy.deploy.pipeline import export_run
from kd2deploy.distill import get_method_class
from kd2deploy.distill.capkd import CAPKDParams, GroupwiseLinearProjector, MultiViewGenerator
from kd2deploy.recipe import load_recipe
from kd2deploy.train.engine import Trainer, train

CAPKD = get_method_class("capkd")
SWIN = ("swin_tiny_patch4_window7_224",
        {"embed_dim": 24, "depths": (1, 1), "num_heads": (1, 2), "img_size": 32, "patch_size": 2, "window_size": 4})
TINY_VIT = ("vit_nano_patch4_32", {"depth": 1, "embed_dim": 32, "num_heads": 2})
TINY_CNN = {"name": "resnet10_cifar", "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8}}


def build(teacher=TINY_VIT, student=("resnet10_cifar", TINY_CNN["kwargs"]), **params) -> torch.nn.Module:
    torch.manual_seed(0)
    t = timm.create_model(teacher[0], num_classes=10, **teacher[1])
    s = timm.create_model(student[0], num_classes=10, **student[1])
    return CAPKD(s, [t], CAPKDParams(**params), 10, mean=CIFAR_MEAN, std=CIFAR_STD).train()


@pytest.mark.parametrize(("teacher", "student", "student_size", "grid", "teacher_size", "layer"), [
    (("test_vit", {}), ("test_resnet", {}), 32, (10, 10), 160, "layer1"),  # 160 ViT teacher, 32 student: 8x8 map
    (("test_vit", {}), ("mobilenetv2_050", {}), 224, (10, 10), 160, "blocks.4"),  # 14x14 student map -> 10x10
    (("deit_nano_distilled_patch4_32", {}), ("test_efficientnet", {}), 32, (8, 8), 32, "blocks.1"),  # 2 prefix tokens
    (("deit_nano_distilled_patch4_32", {}), ("resnet10_cifar", {}), 32, (8, 8), 32, "layer3"),  # 8x8 -> 8x8
    (SWIN, ("test_resnet", {}), 32, (8, 8), 32, "layer1"),
    (SWIN, ("mobilenetv2_050", {}), 64, (8, 8), 32, "blocks.2"),
    (("vit_nano_patch4_32", {"img_size": 64}), ("test_efficientnet", {}), 64, (16, 16), 64, "blocks.1"),
])
def test_shapes_for_transformer_teachers_and_cnn_students(teacher, student, student_size, grid, teacher_size, layer):
    distiller = build(teacher, student, student_img_size=student_size)
    assert distiller.grid == grid and distiller.teacher_size == teacher_size and distiller.student_layer == layer
    n, tap = grid[0] * grid[1], distiller.tap
    images = torch.randn(2, 3, student_size, student_size)
    out = distiller(images, torch.tensor([1, 2]))

    h_t, (q_t, _, v_t), _ = tap.read()
    assert h_t.shape == (2, n, tap.embed_dim) and q_t.shape == v_t.shape == (2, tap.num_heads, n, tap.head_dim)
    assert distiller._pair[1].shape == h_t.shape  # h'_S lives in the teacher's token space
    assert out.logits.shape == (2, 10) and torch.isfinite(out.loss)
    assert set(out.terms) == {"ce", "proj1", "proj2", "mvg"}
    out.loss.backward()
    assert all(p.grad is not None for p in [*distiller.pca.parameters(), *distiller.gl.parameters()])
    assert distiller.student.get_classifier().weight.grad is not None
    assert all(p.grad is None for p in distiller.teachers.parameters())


@pytest.mark.parametrize("name", ["resnet10_cifar", "resnet18_cifar"])
def test_cifar_resnets_keep_a_4x4_last_stage_map(name):
    model = timm.create_model(name, num_classes=10)
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert [info["reduction"] for info in model.feature_info] == [1, 1, 2, 4, 8]


def _teacher_attention_probe(teacher):
    """timm's own per-head attention output softmax(QKᵀ/√d)·V in the teacher's last block (read at proj's input)."""
    attn = teacher.blocks[-1].attn
    seen = {}

    def record(_module, inputs):
        b, n, _ = inputs[0].shape
        seen["out"] = inputs[0].reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    attn.proj.register_forward_pre_hook(record)
    return seen


def test_cross_probability_one_reproduces_teacher_attention_and_zero_is_pure_student():
    # no class token, so the teacher's attention covers exactly the patch tokens the student mimics
    distiller = build(("vit_nano_patch4_32", {"depth": 1, "embed_dim": 32, "num_heads": 2, "class_token": False,
                                              "global_pool": "avg"}))
    seen = _teacher_attention_probe(distiller.teachers[0])
    images = torch.randn(2, 3, 32, 32)
    distiller.teachers[0](images)
    h_s = torch.randn(2, 16, 8, 8)
    _, qkv_t, _ = distiller.tap.read()
    pca, d = distiller.pca, distiller.tap.head_dim
    q, k, v = (x.reshape(2, 2, d, 64).transpose(-1, -2) for x in (pca.q(h_s), pca.k(h_s), pca.v(h_s)))

    p_attn, v_rel = distiller.pca(h_s, qkv_t, p=1.0)
    torch.testing.assert_close(p_attn, seen["out"], rtol=1e-5, atol=1e-6)  # Eq. 3 with every element swapped
    torch.testing.assert_close(v_rel, v @ v.transpose(-2, -1) / d**0.5)  # Eq. 4: still the student's own V_S

    p_attn0, v_rel0 = distiller.pca(h_s, qkv_t, p=0.0)
    torch.testing.assert_close(p_attn0, (q @ k.transpose(-2, -1) / d**0.5).softmax(-1) @ v)
    torch.testing.assert_close(v_rel0, v_rel)

    torch.manual_seed(0)
    p_half, _ = distiller.pca(h_s, qkv_t, p=0.5)
    assert not torch.allclose(p_half, p_attn) and not torch.allclose(p_half, p_attn0)


def test_group_wise_linear_projector_shares_one_fc_per_4x4_neighbourhood():
    gl = GroupwiseLinearProjector(5, 7, (14, 14), group=4, dropout=0.0)
    assert gl.num_groups == 16  # as in the paper: 14x14 map -> 196 tokens, 16 FCs

    features = torch.randn(2, 5, 14, 14)
    out = gl(features)
    assert out.shape == (2, 196, 7)
    for i, j in [(0, 0), (3, 3), (4, 0), (13, 13), (12, 5)]:
        group = (i // 4) * 4 + j // 4
        expected = features[:, :, i, j] @ gl.weight[group] + gl.bias[group]
        torch.testing.assert_close(out[:, i * 14 + j], expected)


def test_multi_view_generator_transforms_about_half_the_images_within_pixel_range():
    params = CAPKDParams()
    views = MultiViewGenerator(params, CIFAR_MEAN, CIFAR_STD)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    images = (torch.rand(400, 3, 32, 32) - mean) / std
    torch.manual_seed(0)
    out, teacher_view = views(images)
    assert teacher_view is None
    changed = (out - images).flatten(1).abs().amax(1) > 0
    assert out.shape == images.shape and 150 < changed.sum() < 250
    pixels = out * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # still images in [0, 1]
    masked = (out[changed] == 0).all(dim=1).float().mean()  # whole masked patches hold the mean colour
    assert masked > 0.15
    assert torch.equal(MultiViewGenerator(CAPKDParams(mvg_prob=0.0), CIFAR_MEAN, CIFAR_STD)(images)[0], images)


@pytest.mark.parametrize("term", ["proj1", "proj2", "mvg", "ce"])
def test_each_loss_term_decreases_when_optimised_alone(term):
    weights = {"proj1_weight": 0.0, "proj2_weight": 0.0, "mvg_weight": 0.0}
    if term != "ce":
        weights[f"{term}_weight"] = 1.0
    distiller = build(cross_prob=0.0, mvg_prob=0.0, gl_dropout=0.0, **weights)
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8)
    optimizer = torch.optim.Adam([p for _, p in distiller.trainable_parameters()], lr=1e-2)
    values = []
    for _ in range(15):
        out = distiller(images, targets)
        loss = out.loss  # the CE (always in the total) is taken out to optimise one term alone
        if term != "ce":
            loss = loss - distiller.classification_loss(out.logits, targets)
        values.append(out.terms[term].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < 0.8 * values[0], values


def test_discriminator_steps_every_fifth_iteration_and_learns():
    distiller = build(cross_prob=0.0, mvg_prob=0.0)
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    losses, changed_at = [], []
    for step in range(1, 21):
        before = distiller.discriminator.net[0].weight.detach().clone()
        extra = distiller.on_step_end(step, distiller(images, targets))
        if not torch.equal(before, distiller.discriminator.net[0].weight):
            changed_at.append(step)
            losses.append(extra["disc"].item())
        else:
            assert extra == {}
    assert changed_at == [5, 10, 15, 20] and distiller.disc_steps == 4
    assert losses[-1] < losses[0]


def _capkd_recipe(run_dir, **distill):
    return tiny_recipe(run_dir, teacher={"name": TINY_VIT[0], "kwargs": TINY_VIT[1]}, student=TINY_CNN,
                       distill={"method": "capkd", **distill})


def test_training_saves_a_plain_student_that_exports_to_onnx(tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", {**_capkd_recipe(run_dir),
                                  "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05}})), console=quiet())
    metrics = trainer.fit()
    assert trainer.distiller.disc_steps == trainer.global_step // 5 > 0
    assert all(metrics[f"loss_{t}"] > 0 for t in ("ce", "proj1", "proj2"))
    assert metrics["loss_mvg"] < 0  # the paper's minimax L_MVG = mean log(1 − D(h'_S)) (Eq. 9)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in [*trainer.distiller.pca.parameters(), *trainer.distiller.gl.parameters()])
    assert not any(id(p) in optimized for p in trainer.distiller.discriminator.parameters())

    student = load_checkpoint(run_dir / "student.pt")
    assert not any(k.startswith(("pca", "gl", "discriminator", "teachers", "student.")) for k in student["state_dict"])
    assert set(student["state_dict"]) == set(timm.create_model(TINY_CNN["name"], num_classes=10,
                                                               **TINY_CNN["kwargs"]).state_dict())
    last = load_checkpoint(run_dir / "last.pt")["distiller"]
    assert any(k.startswith("discriminator.") for k in last["modules"]) and last["extra"]["disc_steps"] > 0

    manifest = export_run(run_dir, formats=["onnx"], precisions=["fp32"], val_samples=64, speed=False, console=quiet())
    fp32 = next(a for a in manifest["artifacts"] if a["precision"] == "fp32")
    assert fp32["format"] == "onnx" and fp32["verification"]["passed"]


def test_resume_reproduces_an_uninterrupted_run_discriminator_included(tmp_path):
    def recipe(run_dir, epochs):
        return {**_capkd_recipe(run_dir, disc_every=3), "optim": {"epochs": epochs, "batch_size": 32, "lr": 0.05,
                                                                  "schedule": "constant"}}
    reference = tmp_path / "reference"
    train(load_recipe(write_recipe(tmp_path / "ref.yaml", recipe(reference, 2))), console=quiet())
    resumed = tmp_path / "resumed"
    train(load_recipe(write_recipe(tmp_path / "a.yaml", recipe(resumed, 1))), console=quiet())
    train(load_recipe(write_recipe(tmp_path / "b.yaml", recipe(resumed, 2))), resume=True, console=quiet())

    expected, got = (load_checkpoint(r / "last.pt")["distiller"] for r in (reference, resumed))
    assert got["extra"]["disc_steps"] == expected["extra"]["disc_steps"]
    for key, value in expected["modules"].items():
        torch.testing.assert_close(got["modules"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_torchrun_two_processes_match_one_process(tmp_path):
    """The discriminator is outside DDP; its gradients are averaged by hand, so 2 processes match 1. The random
    parts (cross swap, views, dropout) and BatchNorm are off, as per-process randomness cannot match."""
    def recipe(run_dir):
        r = _capkd_recipe(run_dir, cross_prob=0.0, mvg_prob=0.0, gl_dropout=0.0, disc_every=2)
        r["student"] = {**TINY_CNN, "kwargs": {**TINY_CNN["kwargs"], "norm_layer": "layernorm2d"}}
        r["data"] = {**r["data"], "augment": {"enabled": False}}
        r["optim"] = {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05}
        return r
    train(load_recipe(write_recipe(tmp_path / "single.yaml", recipe(tmp_path / "single"))), console=quiet())
    path = write_recipe(tmp_path / "multi.yaml", recipe(tmp_path / "multi"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "kd2deploy", "train", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single, multi = (load_checkpoint(tmp_path / r / "last.pt")["distiller"]["modules"] for r in ("single", "multi"))
    assert any(k.startswith("discriminator.") for k in single)
    for key, value in single.items():
        torch.testing.assert_close(multi[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_cnn_teacher_or_a_wrong_student_layer_is_a_clear_error(tmp_path):
    cnn_teacher = {**_capkd_recipe(tmp_path / "run"), "teacher": {"name": "test_resnet"}}
    bad_teacher = write_recipe(tmp_path / "t.yaml", cnn_teacher)
    result = run_cli("train", bad_teacher)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "teachers.0.name" in result.stderr and "transformer" in result.stderr

    bad_layer = write_recipe(tmp_path / "l.yaml", _capkd_recipe(tmp_path / "run", student_layer="layer9"))
    result = run_cli("train", bad_layer)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "distill.student_layer" in result.stderr and "layer9" in result.stderr
    assert not (tmp_path / "run").exists()
