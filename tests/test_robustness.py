"""The bias and robustness sets: each generator, determinism, the bias arithmetic and the sets' validation."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import run_cli

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
