"""The teacher-output cache: hit, miss, invalidation, stored views reproducing their pixels, dense outputs, and the
setups it refuses."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import quiet, tiny_recipe, write_recipe

from kd2deploy.data.loaders import SampleDataset
from kd2deploy.distill.teacher_cache import StoredViewDataset
from kd2deploy.errors import UserError
from kd2deploy.models import create_model
from kd2deploy.recipe import load_recipe
from kd2deploy.train.engine import Trainer

TEACHER = {"name": "resnet10_cifar", "kwargs": {"channels": [8, 8, 16, 16]}}
STUDENT = {"name": "libkd_nano_patch4_32", "kwargs": {"depth": 1}}


def cached_recipe(tmp_path, teachers=None, **sections):
    recipe = tiny_recipe(tmp_path / "run", teachers=teachers or [TEACHER], student=STUDENT,
                         distill={"method": "libkd"},  # the loader path's PIL views (test_speed: resident ones)
                         data={"train_subset": 48, "on_device": False, "augment": {"color_jitter": None}},
                         optim={"batch_size": 16},
                         teacher_cache={"enabled": True, "views": 3, "dir": str(tmp_path / "cache")})
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(cached_recipe(tmp_path, **kwargs), overwrite=True, console=quiet())


def test_miss_then_hit_then_rebuild_for_a_changed_teacher(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save(create_model(TEACHER["name"], 10, kwargs=TEACHER["kwargs"]).state_dict(), checkpoint)
    teacher = {**TEACHER, "checkpoint": str(checkpoint)}

    first = trainer(tmp_path, teachers=[teacher]).distiller.teacher_cache
    assert first.statuses == ["built"]
    logits = np.load(first.folders[0] / "logits.npy", mmap_mode="r")
    assert logits.shape == (48 * 3, 10) and logits.dtype == np.float16  # N·K rows, memory-mapped
    built_at = (first.folders[0] / "logits.npy").stat().st_mtime_ns

    second = trainer(tmp_path, teachers=[teacher]).distiller.teacher_cache
    assert second.statuses == ["hit"] and second.folders == first.folders
    assert (first.folders[0] / "logits.npy").stat().st_mtime_ns == built_at  # read, not rewritten

    changed = torch.load(checkpoint)
    changed["fc.bias"] += 1.0
    torch.save(changed, checkpoint)
    third = trainer(tmp_path, teachers=[teacher]).distiller.teacher_cache
    assert third.statuses == ["built"] and third.folders != first.folders  # a new key: never the stale outputs
    stale = np.load(first.folders[0] / "logits.npy").astype(np.float32)
    fresh = np.load(third.folders[0] / "logits.npy").astype(np.float32)
    assert np.allclose(fresh - stale, 1.0, atol=1e-2)  # same views, outputs of the changed teacher

    fewer_views = trainer(tmp_path, teachers=[teacher], teacher_cache={"views": 2}).distiller.teacher_cache
    assert fewer_views.statuses == ["built"]  # the view set is part of the key too


def test_an_incomplete_cache_is_rebuilt(tmp_path):
    folder = trainer(tmp_path).distiller.teacher_cache.folders[0]
    (folder / "logits.npy").unlink()
    assert trainer(tmp_path).distiller.teacher_cache.statuses == ["built"]
    shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    assert (folder / "logits.npy").is_file()


def test_a_stored_view_reproduces_its_pixels_and_its_outputs(tmp_path):
    t = trainer(tmp_path)
    dataset: StoredViewDataset = t.train_set
    assert isinstance(dataset, StoredViewDataset)
    view, _, view_id = dataset[5]
    again, _, same_id = dataset[5]
    assert view_id == same_id and torch.equal(view, again)  # the same pixels every time
    image_index, k = divmod(view_id, 3)
    assert image_index == 5 and torch.equal(view, dataset.spec.render(dataset.images[5][0], dataset.params[5, k]))

    teacher = t.distiller.teachers[0]
    with torch.no_grad():
        online = teacher(view[None])
    cached = t.distiller.teacher_cache.lookup(torch.tensor([view_id]), torch.device("cpu"))[0]["logits"]
    assert torch.allclose(cached, online, atol=2e-2, rtol=1e-2)  # fp16 storage of the very same view's logits

    shown = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        shown.append(dataset[5][2])
    assert set(shown[:3]) == {15, 16, 17}  # K epochs show each of the K stored views once
    assert shown[3] == shown[0]  # then the cycle repeats


def test_training_with_the_cache_never_runs_the_teachers(tmp_path):
    t = trainer(tmp_path, optim={"epochs": 2})
    calls = []
    t.distiller.teachers[0].register_forward_hook(lambda *_: calls.append(1))
    metrics = t.fit()
    assert metrics["epoch"] == 2 and metrics["loss_distill"] > 0 and calls == []


def test_dense_outputs_are_cached_as_top_k(tmp_path):
    from kd2deploy.distill.cskd import ckf_logits

    exact = trainer(tmp_path, distill={"method": "cskd"}, teacher_cache={"dense_topk": 10})
    view, _, view_id = exact.train_set[0]
    with torch.no_grad():
        online = exact.distiller.teacher_output(0, view[None])
    cached = exact.distiller.teacher_cache.lookup(torch.tensor([view_id]), torch.device("cpu"))[0]
    assert cached["dense"].shape == (1, 16, 10)  # the teacher's 4x4 grid, every class's logit
    assert torch.allclose(cached["dense"], online["dense"], atol=1e-2, rtol=1e-3)  # fp16 logits
    for r in (0.0, 0.3, 0.7, 1.0):  # the CKF targets from the cache are those of the online teacher
        assert torch.equal(ckf_logits(cached["logits"], cached["dense"], r).argmax(-1),
                           ckf_logits(online["logits"], online["dense"], r).argmax(-1))

    top3 = trainer(tmp_path, distill={"method": "cskd"}, teacher_cache={"dense_topk": 3})
    assert top3.distiller.teacher_cache.statuses == ["built"]  # k is part of the key
    dense = top3.distiller.teacher_cache.lookup(torch.tensor([view_id]), torch.device("cpu"))[0]["dense"]
    top = online["dense"].topk(3, dim=-1)  # the kept entries are the online top 3 (fp16 rounded)
    assert torch.allclose(dense.gather(-1, top.indices), top.values, atol=1e-2, rtol=1e-3)
    rest = (online["dense"].sum(-1) - top.values.sum(-1)) / 7  # the other 7 hold the mean of their logits
    dropped = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, top.indices, False)
    assert torch.allclose(dense[dropped].reshape(1, 16, 7), rest[..., None].expand(1, 16, 7), atol=1e-2, rtol=1e-3)


def test_without_augmentation_there_is_one_view_the_eval_transform(tmp_path):
    t = trainer(tmp_path, data={"augment": {"enabled": False}})
    view, _, view_id = t.train_set[7]
    assert t.train_set.spec.views == 1 and view_id == 7
    eval_view, _, _ = SampleDataset(t.train_set.images, t.val_set.transform)[7]
    assert torch.equal(view, eval_view)


CAPKD = {"distill": {"method": "capkd"}, "student": {"name": "test_resnet"},
         "teachers": [{"name": "vit_nano_patch4_32", "kwargs": {"depth": 1}}]}


@pytest.mark.parametrize(("sections", "field"), [
    ({"data": {"augment": {"color_jitter": 0.4}}}, "data.augment.color_jitter"),
    ({"data": {"augment": {"color_jitter": None, "mixup": 0.2}}}, "data.augment.mixup"),
    ({"data": {"augment": {"color_jitter": None, "cutout": 8}}}, "data.augment.cutout"),
    (CAPKD, "teacher_cache.enabled"),
])
def test_setups_the_cache_cannot_serve_are_refused(tmp_path, sections, field):
    recipe = tiny_recipe(tmp_path / "run", teachers=[TEACHER], student=STUDENT, distill={"method": "libkd"},
                         data={"train_subset": 48, "augment": {"color_jitter": None}},
                         teacher_cache={"enabled": True, "dir": str(tmp_path / "cache")})
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key == "data" else value
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
