"""The bias and robustness sets: each generator, determinism, the bias arithmetic and the sets' validation."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from kd2deploy.data.sources import MINI_CIFAR10
from kd2deploy.errors import UserError
from kd2deploy.robustness import sets as gen
from kd2deploy.robustness.evaluate import load_sets, summarise
from kd2deploy.robustness.make import ORIGINAL, make_sets, tree_digest

pytest.importorskip("skimage", reason='scikit-image not installed (pip install "kd2deploy[robustness]")')

MINI_VAL = MINI_CIFAR10 / "val"


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def patches(x: np.ndarray, grid: int) -> list[bytes]:
    side = x.shape[0] // grid
    return sorted(x[r * side:(r + 1) * side, c * side:(c + 1) * side].tobytes()
                  for r in range(grid) for c in range(grid))


def test_scramble_is_a_true_permutation_of_the_patches():
    original = image()
    out = gen.scramble(original, np.random.default_rng(1), 4)
    assert patches(out, 4) == patches(original, 4) and not np.array_equal(out, original)
    assert all((gen.patch_permutation(2, np.random.default_rng(s)) != np.arange(4)).any() for s in range(50))


def test_noise_is_the_same_pattern_at_the_same_place_in_every_image():
    noise = gen.FixedNoise(seed=3, fraction=0.25, sigma=0.05)
    grey = [np.full((32, 32, 3), value, np.uint8) for value in (100, 140)]  # far from clipping
    deltas = [noise(g).astype(int) - g.astype(int) for g in grey]
    assert np.array_equal(deltas[0], deltas[1])
    top, left, side = noise.region(32, 32)
    assert side == 8 and np.count_nonzero(deltas[0].any(axis=2)) <= 64
    assert not deltas[0][:top].any() and not deltas[0][:, :left].any()


def test_locality_flattens_each_superpixel_to_one_colour():
    from skimage.segmentation import slic

    original = image()
    out = gen.locality(original, 16, 10.0)
    labels = slic(original, n_segments=16, compactness=10.0, start_label=0, channel_axis=-1)
    for label in np.unique(labels):
        colours = out[labels == label]
        assert (colours == colours[0]).all()


def test_shape_and_texture_constructions():
    edges = gen.edges(image())
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) <= {0, 255}
    same = image()
    assert np.abs(gen.amplitude_phase(same, same).astype(int) - same.astype(int)).max() <= 1  # its own spectrum


@pytest.mark.parametrize("name", sorted(gen.CIFAR_C))
def test_corruptions_grow_with_severity_and_repeat_under_a_seed(name):
    original = image(5)
    outs = [gen.corrupt(original, gen.image_rng(0, name, 7), name, s) for s in range(1, 6)]
    assert all(o.shape == original.shape and o.dtype == np.uint8 for o in outs)
    again = gen.corrupt(original, gen.image_rng(0, name, 7), name, 3)
    assert np.array_equal(again, outs[2])
    changes = [np.abs(o.astype(int) - original.astype(int)).mean() for o in outs]
    assert changes[4] > changes[0]  # severity 5 moves the pixels more than severity 1


def test_make_sets_is_deterministic_and_validated(tmp_path):
    first = make_sets(MINI_VAL, tmp_path / "a", ["bias", "contrast"], seed=1, samples=40,
                      corruption_samples=20, workers=1)
    second = make_sets(MINI_VAL, tmp_path / "b", ["bias", "contrast"], seed=1, samples=40,
                       corruption_samples=20, workers=1)
    assert first["sets"]["scramble_4"]["sha256"] == second["sets"]["scramble_4"]["sha256"]
    assert first["sets"]["contrast_3"]["images"] == 20 and first["source"]["images"] == 40
    assert (tmp_path / "a" / "texture" / "conflicts.csv").read_text().count("\n") == 41
    other = make_sets(MINI_VAL, tmp_path / "c", ["scramble_4"], seed=2, samples=40, workers=1)
    assert other["sets"]["scramble_4"]["sha256"] != first["sets"]["scramble_4"]["sha256"]
    assert load_sets(tmp_path / "a")["seed"] == 1

    with pytest.raises(UserError, match="already holds sets"):
        make_sets(MINI_VAL, tmp_path / "a", ["noise"], samples=40, workers=1)
    victim = next((tmp_path / "a" / "noise").rglob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(UserError, match="changed since they were made"):
        load_sets(tmp_path / "a")
    shutil.rmtree(tmp_path / "b" / "shape")
    result = run_cli("robustness", tmp_path / "b", "--sets", tmp_path / "b")
    assert result.returncode == 2 and "lacks the set folder(s) shape" in result.stderr
    assert tree_digest(tmp_path / "c" / ORIGINAL) == first["source"]["sha256"]  # the same 40 source images


def test_bias_ratios_shape_bias_and_mce_arithmetic():
    record = {"sets": {"scramble_4": {"kind": "bias"}, "noise": {"kind": "bias"},
                       "contrast_1": {"kind": "corruption", "params": {"corruption": "contrast"}},
                       "contrast_2": {"kind": "corruption", "params": {"corruption": "contrast"}},
                       "pixelate_1": {"kind": "corruption", "params": {"corruption": "pixelate"}}}}
    row = {"top1": {ORIGINAL: 80.0, "scramble_4": 40.0, "noise": 60.0, "contrast_1": 70.0, "contrast_2": 50.0,
                    "pixelate_1": 90.0}}
    reference = {"top1": {ORIGINAL: 70.0, "scramble_4": 0, "noise": 0, "contrast_1": 60.0, "contrast_2": 40.0,
                          "pixelate_1": 80.0}}
    out = summarise(row, record, reference)
    assert out["bias"] == {"scramble_4": 0.5, "noise": 0.75}
    assert out["mean_corruption_top1"] == pytest.approx(70.0)
    ce_contrast = (30 + 50) / (40 + 60)  # Σ_s err(model) / Σ_s err(reference)
    ce_pixelate = 10 / 20
    assert out["mce"] == pytest.approx((ce_contrast + ce_pixelate) / 2)
    assert math.isclose(summarise(row, record, None)["bias"]["noise"], 0.75)
    assert "mce" not in summarise(row, record, None)
    assert json.dumps(out)  # serialisable for robustness.json


class SquareSegmenter:
    """A stand-in for FCN-ResNet-101: class 5 inside a known square, background elsewhere (or everywhere)."""

    def __init__(self, empty: bool = False):
        self.empty = empty

    def eval(self):
        return self

    def to(self, device):
        return self

    def __call__(self, x):
        import torch

        scores = torch.zeros(len(x), 21, *x.shape[2:])
        scores[:, 0] = 1.0
        side = x.shape[2]
        if not self.empty:
            scores[:, 5, side // 4:side // 2, side // 4:side // 2] = 2.0
        else:  # background everywhere, but less sure on the left half
            scores[:, 0, :, : side // 2] = 0.5
        return {"out": scores}


def test_pretrained_silhouettes_draw_the_segmented_object_black_on_white():
    pytest.importorskip("torchvision", reason='torchvision not installed (pip install "kd2deploy[train]")')
    from kd2deploy.robustness.pretrained import Silhouettes

    images = np.stack([image(0), image(1)])
    out = Silhouettes(size=64, model=SquareSegmenter())(images)
    expected = np.full((32, 32), 255, np.uint8)
    expected[8:16, 8:16] = 0
    assert out.shape == images.shape and np.array_equal(out[0, ..., 0], expected) and np.array_equal(out[0], out[1])
    # nothing segmented: the part of the image least sure to be background becomes the object
    empty = Silhouettes(size=64, model=SquareSegmenter(empty=True))(images)
    assert (empty[0, :, :16] == 0).all() and (empty[0, :, 16:] == 255).all()


def test_pretrained_style_transfer_moves_the_content_image_towards_the_style():
    tv = pytest.importorskip("torchvision", reason='torchvision not installed (pip install "kd2deploy[train]")')
    import torch

    from kd2deploy.robustness.pretrained import StyleTransfer

    torch.manual_seed(0)
    transfer = StyleTransfer(size=32, steps=15, style_weight=1e3, lr=0.05,
                             features=tv.models.vgg19(weights=None).features)
    textures, shapes = np.stack([image(2), image(3)]), np.stack([image(4) // 4, image(5) // 4])

    def style_distance(x: np.ndarray) -> float:
        from kd2deploy.robustness.pretrained import _to_tensor

        with torch.no_grad():
            grams = [transfer._activations(_to_tensor(y, 32, transfer.device))[0] for y in (x, textures)]
            return sum(float(((a - b) ** 2).sum()) for a, b in zip(*grams, strict=True))

    out = transfer(textures, shapes)
    assert out.shape == textures.shape and out.dtype == np.uint8
    assert style_distance(out) < 0.5 * style_distance(shapes)


def test_make_sets_chooses_the_construction_and_says_which(tmp_path, monkeypatch):
    pytest.importorskip("torchvision", reason='torchvision not installed (pip install "kd2deploy[train]")')
    from kd2deploy.robustness import pretrained

    monkeypatch.setattr(pretrained, "missing", lambda: ["/hub/checkpoints/vgg19-dcbb9e9d.pth is missing"])
    with pytest.raises(UserError, match=r"vgg19-dcbb9e9d\.pth is missing.*--construction offline"):
        make_sets(MINI_VAL, tmp_path / "p", ["shape"], samples=20, workers=1, construction="pretrained")
    auto = make_sets(MINI_VAL, tmp_path / "a", ["shape", "noise"], samples=20, workers=1, construction="auto")
    assert auto["sets"]["shape"]["construction"] == "offline"

    # with the weights "present", shape and texture come from the networks (stand-ins here), the rest stays offline
    monkeypatch.setattr(pretrained, "missing", lambda: [])
    silhouettes = pretrained.Silhouettes
    monkeypatch.setattr(pretrained, "Silhouettes", lambda size: silhouettes(size, model=SquareSegmenter()))
    monkeypatch.setattr(pretrained, "StyleTransfer", lambda size, steps, style_weight, lr: (
        lambda textures, shapes: np.minimum(textures, shapes)))
    record = make_sets(MINI_VAL, tmp_path / "n", ["shape", "texture", "noise"], samples=20, workers=1,
                       construction="auto")
    assert {n: s["construction"] for n, s in record["sets"].items()} == {
        "shape": "pretrained", "texture": "pretrained", "noise": "offline"}
    shape_png = next((tmp_path / "n" / "shape").rglob("*.png"))
    assert set(np.unique(np.asarray(Image.open(shape_png)))) == {0, 255}
    assert (tmp_path / "n" / "texture" / "conflicts.csv").read_text().count("\n") == 21
    assert "pretrained" in load_sets(tmp_path / "n")["sets"]["texture"]["construction"]
