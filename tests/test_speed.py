"""Training speed features: bf16 autocast by CPU flags, channels-last and compiled steps against eager, the fast
involution against the unfold one, device-resident data against the loader path, the per-phase timing columns, and
threads chosen from the free cores."""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet, tiny_recipe, write_recipe
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from kd2deploy.data import resident
from kd2deploy.data.loaders import build_datasets
from kd2deploy.distill.teacher_cache import ViewSpec
from kd2deploy.errors import UserError
from kd2deploy.models import create_model
from kd2deploy.models.involution import _ShiftInvolution, involution, unfold_involution
from kd2deploy.recipe import load_recipe
from kd2deploy.train import acceleration
from kd2deploy.train.engine import Trainer

CPU = torch.device("cpu")


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("flags, expected", [(["avx2", "avx512f", "avx512_bf16"], torch.bfloat16),
                                             (["avx2", "amx_bf16"], torch.bfloat16),
                                             (["avx2", "avx512f", "avx512_vnni"], None)])
def test_cpu_bf16_autocast_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(acceleration, "cpu_flags", lambda: flags)
    for setting in (True, "auto"):
        dtype, reason = acceleration.resolve_amp(setting, "float16", CPU)
        assert dtype == expected
        assert ("avx512_bf16" in reason or "amx_bf16" in reason)  # the log names the deciding flag(s)
        if expected is None:
            assert reason.startswith("FP32") and "emulated" in reason
    assert acceleration.resolve_amp(False, "bfloat16", CPU)[0] is None
    # CUDA keeps optim.amp_dtype whatever the host CPU has
    assert acceleration.resolve_amp("auto", "float16", torch.device("cuda"))[0] == torch.float16


def test_the_engine_trains_in_the_chosen_precision_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(acceleration, "cpu_flags", lambda: ["avx512_bf16"])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run", optim={"amp": "auto"})))
    trainer = Trainer(recipe, console=quiet())
    assert trainer.acceleration.autocast().fast_dtype == torch.bfloat16
    assert any("bfloat16 autocast on the CPU: the CPU has avx512_bf16" in n for n in trainer.acceleration.notes)
    assert trainer.acceleration.eval_autocast() is None  # validation scores FP32, like the exported artifact
    images, targets, indices = next(iter(trainer.train_loader))
    with trainer.acceleration.forward_context():
        output = trainer.model(trainer.acceleration.layout(images), targets, indices)
    assert output.logits.dtype == torch.bfloat16 and output.loss.dtype == torch.float32


# --------------------------------------------------------------------------------------------- layout, compile
def _loss_and_grads(model, images, targets):
    model.zero_grad()
    loss = F.cross_entropy(model(images), targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_channels_last_step_equals_the_nchw_step():
    torch.manual_seed(0)
    model = create_model("resnet10_cifar", 10, kwargs={"channels": [8, 8, 16, 16]})
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, grads = _loss_and_grads(model, images, targets)
    assert acceleration.is_convolutional(model)
    model.to(memory_format=torch.channels_last)
    cl_images = images.contiguous(memory_format=torch.channels_last)
    cl_loss, cl_grads = _loss_and_grads(model, cl_images, targets)
    torch.testing.assert_close(cl_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(cl_grads[name].contiguous(), grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not acceleration.is_convolutional(create_model("libkd_nano_patch4_32", 10, kwargs={"depth": 1}))


def test_a_compiled_run_matches_the_eager_run_and_reports_its_compile_time(tmp_path):
    """One epoch on identical batches (no augmentation): the same losses and weights within float tolerance."""
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        recipe = tiny_recipe(run_dir, data={"train_subset": 128, "augment": {"enabled": False}},
                             optim={"batch_size": 32, "compile": compiled, "threads": torch.get_num_threads()})
        trainer = Trainer(load_recipe(write_recipe(tmp_path / f"{compiled}.yaml", recipe)), console=quiet())
        trainer.fit()
        runs[compiled] = (_rows(run_dir)[0], trainer.distiller.student.state_dict())
    (eager_row, eager_state), (compiled_row, compiled_state) = runs[False], runs[True]
    assert float(compiled_row["train_loss"]) == pytest.approx(float(eager_row["train_loss"]), rel=1e-4)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert "compile_s" not in eager_row
    assert float(compiled_row["compile_s"]) > 0  # measured apart from the steady state
    assert float(compiled_row["steady_images_per_s"]) > float(compiled_row["images_per_s"])


# --------------------------------------------------------------------------------------------- involution
@pytest.mark.parametrize("shape, channels_last", list(itertools.product(
    [(5, 16, 9, 3, 1, 1), (4, 32, 12, 7, 1, 4), (3, 32, 12, 3, 2, 2), (2, 8, 8, 7, 2, 1), (2, 16, 9, 3, 2, 1)],
    [False, True])))
def test_fast_involution_equals_the_unfold_involution(shape, channels_last):
    """Outputs and both gradients of the shift-and-accumulate kernel against Eq. 4 computed with unfold."""
    batch, channels, size, k, stride, groups = shape
    out = (size + 2 * ((k - 1) // 2) - k) // stride + 1
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=torch.float64)
    kernel = torch.randn(batch, groups * k * k, out, out, dtype=torch.float64)
    if channels_last:
        x, kernel = (t.contiguous(memory_format=torch.channels_last) for t in (x, kernel))
    results = []
    for fn in (unfold_involution, _ShiftInvolution.apply):
        xg, kg = x.clone().requires_grad_(), kernel.clone().requires_grad_()
        y = fn(xg, kg, k, stride, groups)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y))
        results.append((y.detach(), xg.grad, kg.grad))
    for reference, fast in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)


def test_fast_involution_under_bf16_autocast_and_in_export():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    kernel = torch.randn(2, 9, 8, 8).bfloat16().requires_grad_()  # the span conv's output under autocast
    y = involution(x, kernel, 3, 1, 1)
    assert y.dtype == torch.float32  # promoted like the unfold form
    torch.testing.assert_close(y, unfold_involution(x, kernel.float(), 3, 1, 1), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and kernel.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- resident data
def _data_recipe(tmp_path, **augment):
    """The quickstart's data section: mini CIFAR-10, crops of 50-100% of the image, flips."""
    return load_recipe(write_recipe(tmp_path / "data.yaml", tiny_recipe(
        tmp_path / "run", data={"train_subset": None, "augment": {"scale": [0.5, 1.0], "color_jitter": None,
                                                                  **augment}})))


def test_resident_crops_follow_timms_sampling_rule():
    torch.manual_seed(0)
    boxes = resident.sample_crops(20000, 32, 32, (0.35, 1.0), (3 / 4, 4 / 3), 0.5)
    image = Image.new("RGB", (32, 32))
    reference = [RandomResizedCropAndInterpolation.get_params(image, (0.35, 1.0), (3 / 4, 4 / 3))
                 for _ in range(20000)]
    ref = torch.tensor(reference, dtype=torch.float32)  # (top, left, height, width)
    for column, name in enumerate(["top", "left", "height", "width"]):
        assert boxes[:, column].mean().item() == pytest.approx(ref[:, column].mean().item(), abs=0.15), name
        assert boxes[:, column].std().item() == pytest.approx(ref[:, column].std().item(), abs=0.15), name
    assert (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    assert boxes[:, 4].mean().item() == pytest.approx(0.5, abs=0.02)


def test_resident_augmentation_has_the_loader_paths_pixel_statistics(tmp_path):
    recipe = _data_recipe(tmp_path)
    train, _, info = build_datasets(recipe.data, seed=0)
    torch.manual_seed(0)
    loader_pixels = torch.stack([train[i][0] for i in range(0, len(train), 3)])
    images = resident.ResidentImages.decode(train.dataset, CPU, num_workers=0)
    make_batch = resident.augmenting_batches(images, recipe.data, info.mean, info.std)
    resident_pixels, _ = make_batch(torch.arange(0, len(train), 3))
    assert resident_pixels.shape == loader_pixels.shape
    dims = (0, 2, 3)
    torch.testing.assert_close(resident_pixels.mean(dims), loader_pixels.mean(dims), atol=0.02, rtol=0)
    torch.testing.assert_close(resident_pixels.std(dims), loader_pixels.std(dims), atol=0.02, rtol=0)
    # the spatial structure too: mean absolute difference between horizontal neighbours (blur from resampling)
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()
    assert roughness(resident_pixels) == pytest.approx(roughness(loader_pixels), rel=0.05)


def test_resident_validation_equals_the_eval_transform_exactly(tmp_path):
    recipe = _data_recipe(tmp_path)
    _, val, info = build_datasets(recipe.data, seed=0)
    images = resident.ResidentImages.decode(val.dataset, CPU, num_workers=0)
    assert resident.eval_is_normalise_only(recipe.data, images.pixels.shape[-2:])
    loader = resident.eval_loader(images, info.mean, info.std, batch_size=64, rank=0, world_size=1)
    batch, targets, indices = next(iter(loader))
    expected = torch.stack([val[i][0] for i in range(64)])
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert targets.tolist() == [val[i][1] for i in range(64)] and indices.tolist() == list(range(64))


def test_the_padded_crop_gives_the_loader_paths_exact_pixels(tmp_path):
    """Each resident padded crop equals torchvision's RandomCrop(padding, reflect) on the same image and shift."""
    recipe = _data_recipe(tmp_path, crop="padded", padding=4)
    train, _, info = build_datasets(recipe.data, seed=0)
    images = resident.ResidentImages.decode(train.dataset, CPU, num_workers=0)
    torch.manual_seed(0)
    boxes = resident.sample_boxes(400, 32, 32, recipe.data)
    assert set(boxes[:, 0].tolist()) == set(range(-4, 5)) and set(boxes[:, 1].tolist()) == set(range(-4, 5))
    assert (boxes[:, 2:4] == 32).all() and boxes[:, 4].mean().item() == pytest.approx(0.5, abs=0.1)
    views = resident.render(images.pixels[:400], boxes, 32, info.mean, info.std, padding=4)
    for i in (0, 7, 123):
        top, left, _, _, flip = (int(v) for v in boxes[i])
        padded = F.pad(images.pixels[i].float()[None], (4, 4, 4, 4), mode="reflect")[0]
        expected = padded[:, top + 4:top + 36, left + 4:left + 36].div(255)
        expected = expected.flip(-1) if flip else expected
        mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
        torch.testing.assert_close(views[i], (expected - mean) / std, rtol=0, atol=1e-5)
    torch.manual_seed(0)  # the loader path's views are the same family: exact shifts of the reflect-padded image
    for i in range(10):
        view = train[i][0]
        candidates = resident.render(images.pixels[i:i + 1].expand(162, -1, -1, -1), torch.tensor(
            [[dy, dx, 32, 32, flip] for dy in range(-4, 5) for dx in range(-4, 5) for flip in (0, 1)],
            dtype=torch.float32), 32, info.mean, info.std, padding=4)
        assert min((candidate - view).abs().max().item() for candidate in candidates) < 1e-5


def test_the_teacher_caches_padded_views_are_the_same_pixels_on_both_paths(tmp_path):
    recipe = _data_recipe(tmp_path, crop="padded", padding=4)
    train, _, info = build_datasets(recipe.data, seed=0)
    spec = ViewSpec.from_recipe(recipe, info)
    images = resident.ResidentImages.decode(train.dataset, CPU, num_workers=0)
    params = np.stack([spec.draw(train.dataset[i][0], i, k) for i in range(6) for k in range(4)])
    assert spec.padding == 4 and np.abs(params[:, :2]).max() <= 4 and (params[:, 2:4] == 32).all()
    assert len({tuple(p) for p in params}) > 12  # seeded per (image, view): different shifts
    pil_views = torch.stack([spec.render(train.dataset[i // 4][0], p) for i, p in enumerate(params)])
    resident_views = resident.render(images.pixels[:6].repeat_interleave(4, 0), torch.from_numpy(params), 32,
                                     info.mean, info.std, padding=spec.padding)
    torch.testing.assert_close(resident_views, pil_views, rtol=0, atol=1e-5)


def test_cutout_zeroes_one_square_clipped_at_the_border():
    torch.manual_seed(0)
    images = resident.cutout_(torch.ones(4000, 3, 32, 32), 8)
    zeros = images == 0
    assert torch.equal(zeros.all(1), zeros.any(1))  # every channel of a pixel together
    square = zeros[:, 0]
    rows, cols, area = square.any(2).sum(1), square.any(1).sum(1), square.sum((1, 2))
    assert torch.equal(area, rows * cols) and rows.max() == 8 and cols.max() == 8
    assert rows.min() >= 4 and cols.min() >= 4  # its centre is always inside the image
    unclipped = (area == 64).float().mean().item()
    assert unclipped == pytest.approx((25 / 32) ** 2, abs=0.03)  # centres 4..28 keep the whole square


def test_cutout_on_the_loader_and_resident_paths(tmp_path):
    recipe = _data_recipe(tmp_path, crop="padded", cutout=8)
    train, _, info = build_datasets(recipe.data, seed=0)
    torch.manual_seed(0)
    loader = torch.stack([train[i][0] for i in range(0, 600, 3)])
    images = resident.ResidentImages.decode(train.dataset, CPU, num_workers=0)
    resident_batch, _ = resident.augmenting_batches(images, recipe.data, info.mean, info.std)(torch.arange(0, 600, 3))
    for batch in (loader, resident_batch):
        per_image = (batch == 0).all(1).sum((1, 2)).float()
        assert per_image.min() >= 16 and per_image.max() == 64
        assert per_image.mean().item() == pytest.approx(7.5**2, abs=3)  # E[side] is 7.5 with clipping


@pytest.mark.parametrize("augment, field", [({"color_jitter": 0.4}, "data.augment.color_jitter"),
                                            ({"auto_augment": "rand-m9-mstd0.5"}, "data.augment.auto_augment")])
def test_resident_falls_back_for_augmentations_it_cannot_do(tmp_path, augment, field):
    recipe = _data_recipe(tmp_path, **augment)
    train, _, _ = build_datasets(recipe.data, seed=0)
    use, note = resident.decision(recipe.data, train.dataset, CPU)
    assert not use and field in note
    strict = recipe.data.model_copy(update={"on_device": True})
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        resident.decision(strict, train.dataset, CPU)


def test_the_teacher_cache_stays_exact_with_resident_data(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", teacher={"name": "resnet10_cifar", "kwargs": {"channels": [8, 8, 16, 16]}},
                         student={"name": "test_resnet"}, data={"train_subset": 48, "on_device": True,
                                                                "augment": {"color_jitter": None}},
                         optim={"batch_size": 16},
                         teacher_cache={"enabled": True, "views": 3, "dir": str(tmp_path / "cache")})
    trainer = Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    assert trainer.resident is not None and trainer.train_set.spec.renderer == resident.RENDERER
    teacher = trainer.distiller.teachers[0]
    for epoch in range(2):
        trainer.train_loader.sampler.set_epoch(epoch)
        trainer.train_set.set_epoch(epoch)
        images, _, view_ids = next(iter(trainer.train_loader))
        with torch.no_grad():
            online = teacher(images)
        cached = trainer.distiller.teacher_cache.lookup(view_ids, CPU)[0]["logits"]
        torch.testing.assert_close(cached, online, atol=2e-2, rtol=1e-2)  # fp16 storage of the same pixels


# --------------------------------------------------------------------------------------------- phases, threads
def test_phase_columns_add_up_to_the_epoch(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", teacher={"name": "test_resnet"}, data={"train_subset": 512},
                         optim={"epochs": 2, "batch_size": 32})
    Trainer(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet()).fit()
    for row in _rows(tmp_path / "run"):
        phases = {p: float(row[f"time_{p}_s"]) for p in ("data", "teacher", "student", "optimizer")}
        assert all(seconds > 0 for seconds in phases.values()), phases
        assert sum(phases.values()) == pytest.approx(float(row["epoch_s"]), rel=0.10)
        assert int(row["threads"]) >= 1


def test_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.setattr(acceleration, "usable_cores", lambda: 2)
    monkeypatch.setattr(acceleration, "busy_cores_elsewhere", lambda window_s: 1.9)
    assert acceleration.free_threads("auto", 0.01) == (1, 1.9)
    monkeypatch.setattr(acceleration, "busy_cores_elsewhere", lambda window_s: 0.1)
    assert acceleration.free_threads("auto", 0.01) == (2, 0.1)
    assert acceleration.free_threads(3, 0.01) == (3, 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this machine share the free cores
    assert acceleration.free_threads("auto", 0.01) == (1, 0.1)


def test_sampled_phase_timing_splits_the_epoch_in_the_sampled_proportions():
    """CUDA's mode (kernels run asynchronously): only every CUDA_SAMPLE-th step synchronises and is timed."""
    import time

    from kd2deploy.train.timing import CUDA_SAMPLE, PhaseClock

    teacher = torch.nn.Sequential(torch.nn.Identity())
    clock = PhaseClock(CPU, torch.nn.ModuleList([teacher]))
    syncs = []
    clock.sync = lambda: syncs.append(1)  # stands in for torch.cuda.synchronize
    clock.start_epoch()
    for step in range(1, 2 * CUDA_SAMPLE + 1):
        clock.start_step(step)
        time.sleep(0.002)
        teacher(torch.zeros(1))  # the hooks time it
        time.sleep(0.004)
        clock.lap("student")
        time.sleep(0.002)
        clock.lap("optimizer")
    assert len(syncs) == 2 * 5  # two sampled steps, five synchronised clock reads each
    split = clock.epoch_split(10.0)
    assert sum(split.values()) == pytest.approx(10.0)
    assert split["time_student_s"] > split["time_optimizer_s"] > split["time_teacher_s"]
