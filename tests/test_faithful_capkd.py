"""CAP-KD against the paper's equations (Liu et al., ACCV 2022), checked with hand computations on tiny batches:
the attention outputs with ·V (Eq. 2-3), the value relation on the student's own V_S (Eq. 4), h_S picked by
reduction (the paper's stride-16 map for a ViT/16), the multi-view generator's geometry shared with the teacher
(Eq. 7) and its noise, the minimax and non-saturating generator losses (Eq. 9), and the paper's CIFAR schedule."""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from pydantic import ValidationError

import kd2deploy.models  # noqa: F401  (registers the CIFAR-size models)
from kd2deploy.data.sources import CIFAR_MEAN, CIFAR_STD
from kd2deploy.distill import get_method_class
from kd2deploy.distill.capkd import (
    CAPKDParams,
    MultiViewGenerator,
    PartialCrossAttentionProjector,
    generator_loss,
    heads_from_map,
    pick_student_layer,
)
from kd2deploy.recipe import bundled_recipes_dir, load_recipe

CAPKD = get_method_class("capkd")
# 8x8 input, 4x4 patches: a 2x2 token grid (N = 4), 2 heads of d = 4
MICRO_VIT = ("vit_nano_patch4_32", {"img_size": 8, "depth": 1, "embed_dim": 8, "num_heads": 2})
# CIFAR stem: layer3 has reduction 4, so a 2x2 map on an 8x8 input
MICRO_CNN = ("resnet10_cifar", {"channels": [4, 4, 4, 4], "stem_width": 4})
VIT16 = ("test_vit", {})  # ViT/16 at 160: 10x10 tokens
VIT4 = ("vit_nano_patch4_32", {"depth": 1})  # ViT/4 at 32: 8x8 tokens


def build(teacher=MICRO_VIT, student=MICRO_CNN, mean=CIFAR_MEAN, std=CIFAR_STD, **params):
    torch.manual_seed(0)
    t = timm.create_model(teacher[0], num_classes=10, **teacher[1])
    s = timm.create_model(student[0], num_classes=10, **student[1])
    return CAPKD(s, [t], CAPKDParams(**params), 10, mean=mean, std=std).train()


# ------------------------------------------------------------------------------ explicit loops, no tensor algebra


def loop_attention(q, k, v):
    """softmax(q kᵀ/√d)·v for nested lists [b][h][n][d], one scalar at a time."""
    out = []
    for qb, kb, vb in zip(q, k, v, strict=True):
        heads = []
        for qh, kh, vh in zip(qb, kb, vb, strict=True):
            d, rows = len(qh[0]), []
            for qi in qh:
                scores = [sum(a * b for a, b in zip(qi, kj, strict=True)) / math.sqrt(d) for kj in kh]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                rows.append([sum(w / total * vj[c] for w, vj in zip(weights, vh, strict=True)) for c in range(d)])
            heads.append(rows)
        out.append(heads)
    return out


def loop_relation(v):
    """v vᵀ/√d for nested lists [b][h][n][d]."""
    return [[[[sum(a * b for a, b in zip(vi, vj, strict=True)) / math.sqrt(len(vi)) for vj in vh] for vi in vh]
             for vh in vb] for vb in v]


def loop_mse(a, b):
    flat_a, flat_b = torch.tensor(a).flatten().tolist(), torch.tensor(b).flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a)


def student_qkv(distiller):
    """Q_S, K_S, V_S (Eq. 1) of the latest forward, as nested lists."""
    h_s = distiller.student_hooks.features["h_s"]
    pca = distiller.pca
    return [heads_from_map(conv(h_s), pca.num_heads).tolist() for conv in (pca.q, pca.k, pca.v)]


# ------------------------------------------------------------------------------------------------- Eq. 2-4


def test_eq2_3_attention_output_multiplies_by_v_as_explicit_loops_compute_it():
    torch.manual_seed(0)
    pca = PartialCrossAttentionProjector(in_channels=3, num_heads=2, head_dim=2)
    h_s = torch.randn(2, 3, 2, 3)  # N = 6 positions
    teacher = [torch.randn(2, 2, 6, 2) for _ in range(3)]
    q, k, v = (heads_from_map(conv(h_s), 2) for conv in (pca.q, pca.k, pca.v))

    p_attn, _ = pca(h_s, teacher, p=0.0)  # Eq. 2: the student's own attention output
    assert p_attn.shape == (2, 2, 6, 2)  # (B, heads, N, d), not the (N, N) map
    torch.testing.assert_close(p_attn, torch.tensor(loop_attention(q.tolist(), k.tolist(), v.tolist())))

    p_attn1, _ = pca(h_s, teacher, p=1.0)  # Eq. 3 with every element swapped: the teacher's Attn_T·V_T
    torch.testing.assert_close(p_attn1, torch.tensor(loop_attention(*(t.tolist() for t in teacher))))


def test_proj1_is_the_mean_squared_gap_of_attention_outputs_plus_value_relations():
    distiller = build(cross_prob=0.0, mvg_prob=0.0, gl_dropout=0.0)
    assert distiller.grid == (2, 2) and distiller.student_layer == "layer3"
    out = distiller(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    _, (q_t, k_t, v_t), _ = distiller.tap.read()
    q_s, k_s, v_s = student_qkv(distiller)

    attention_term = loop_mse(loop_attention(q_s, k_s, v_s), loop_attention(q_t.tolist(), k_t.tolist(), v_t.tolist()))
    relation_term = loop_mse(loop_relation(v_s), loop_relation(v_t.tolist()))
    assert attention_term > 0 and relation_term > 0
    assert out.terms["proj1"].item() == pytest.approx(attention_term + relation_term, rel=1e-5)


def test_eq4_value_relation_uses_the_students_own_v_even_when_every_element_is_swapped():
    distiller = build(cross_prob=1.0, mvg_prob=0.0, gl_dropout=0.0)
    out = distiller(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    _, (_, _, v_t), _ = distiller.tap.read()
    _, _, v_s = student_qkv(distiller)

    # p = 1: PAttn_S is exactly the teacher's Attn_T·V_T, so all of proj1 is the relation of the student's V_S
    relation_term = loop_mse(loop_relation(v_s), loop_relation(v_t.tolist()))
    assert relation_term > 0  # with the swapped V′_S it would be the teacher's own relation: exactly 0
    assert out.terms["proj1"].item() == pytest.approx(relation_term, rel=1e-5)

    h_s, qkv_t = distiller.student_hooks.features["h_s"].detach(), distiller.tap.read()[1]
    distiller.zero_grad(set_to_none=True)
    _, v_rel = distiller.pca(h_s, qkv_t, p=1.0)
    v_rel.pow(2).mean().backward()
    assert distiller.pca.v.weight.grad.abs().sum() > 0  # the student's v-conv learns from the relation term
    assert distiller.pca.q.weight.grad is None and distiller.pca.k.weight.grad is None  # not in Eq. 4's 2nd term

    distiller.zero_grad(set_to_none=True)
    p_attn, _ = distiller.pca(h_s, qkv_t, p=1.0)
    p_attn.sum().backward()  # every element swapped: the attention term has no path to the student
    assert all(not conv.weight.grad.any() for conv in (distiller.pca.q, distiller.pca.k, distiller.pca.v))


def test_value_relation_gradient_reaches_the_student_v_conv_through_the_training_loss():
    distiller = build(cross_prob=1.0, mvg_prob=0.0, gl_dropout=0.0, proj2_weight=0.0, mvg_weight=0.0)
    out = distiller(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    (out.loss - distiller.classification_loss(out.logits, torch.tensor([1, 2]))).backward()
    assert distiller.pca.v.weight.grad.abs().sum() > 0
    assert not distiller.pca.q.weight.grad.any() and not distiller.pca.k.weight.grad.any()


# ------------------------------------------------------------------------------------------- h_S by reduction


@pytest.mark.parametrize(("teacher", "student", "student_size", "layer", "side"), [
    (VIT16, "resnet18", None, "layer3", 10),  # reduction 16 = the patch: the paper's stride-16 layer3
    (VIT16, "mobilenetv2_050", None, "blocks.4", 10),
    (VIT4, "resnet18", None, "layer1", 8),  # reduction 4 = the patch
    (VIT4, "mobilenetv2_050", None, "blocks.1", 8),
    (VIT4, "resnet10_cifar", None, "layer3", 8),  # CIFAR stem: reductions 1, 1, 2, 4, 8
    (VIT16, "resnet10_cifar", None, "layer4", 20),  # no reduction 16: the nearest, 8
    (VIT16, "resnet18", 32, "layer1", 8),  # 32px student, 10x10 tokens: 32 / 10 = 3.2 -> reduction 4
    (VIT4, "resnet18", 224, "layer4", 7),  # 224px student, 8x8 tokens: 28 -> reduction 32
])
def test_h_s_is_the_stage_whose_map_on_the_student_input_matches_the_token_grid(teacher, student, student_size,
                                                                              layer, side):
    distiller = build(teacher, (student, {}), student_img_size=student_size)
    assert distiller.student_layer == layer
    h_s = distiller.student_hooks.features["h_s"]  # from the probe at the student's input size
    assert tuple(h_s.shape[-2:]) == (side, side)
    assert distiller.pca.q.in_channels == h_s.shape[1]


def test_pick_student_layer_takes_the_nearest_reduction_and_the_deeper_stage_on_ties():
    info = [{"module": f"s{r}", "reduction": r} for r in (2, 4, 8, 16, 32)]
    assert pick_student_layer(info, 16) == "s16"
    assert pick_student_layer(info, 12) == "s16"  # |log2(16/12)| = 0.42 < |log2(8/12)| = 0.58
    assert pick_student_layer(info, 10) == "s8"
    assert pick_student_layer(info, math.sqrt(8 * 16)) == "s16"  # halfway in log scale: the deeper one
    assert pick_student_layer(info, 100) == "s32" and pick_student_layer(info, 0.5) == "s2"
    cifar = [{"module": m, "reduction": r} for m, r in [("act1", 1), ("layer1", 1), ("layer2", 2)]]
    assert pick_student_layer(cifar, 1) == "layer1"


def test_a_batch_of_another_size_than_student_img_size_warns_and_an_explicit_layer_is_kept():
    distiller = build(VIT16, ("test_resnet", {}))  # student_img_size defaults to the teacher's 160
    assert distiller.student_layer == "layer3"
    with pytest.warns(UserWarning, match="student_img_size: 32"):
        distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))

    sized = build(VIT16, ("test_resnet", {}), student_img_size=32)
    assert sized.student_layer == "layer1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sized(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))

    named = build(VIT16, ("test_resnet", {}), student_layer="layer2")
    assert named.student_layer == "layer2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------ Eq. 7: the views


def _record_inputs(distiller):
    seen = {}
    distiller.teachers[0].register_forward_pre_hook(lambda _m, args: seen.update(teacher=args[0].detach().clone()))
    distiller.student.register_forward_pre_hook(lambda _m, args: seen.update(student=args[0].detach().clone()))
    return seen


GEOMETRIC_ONLY = {"mvg_prob": 1.0, "color_jitter": 0.0, "noise_std": 0.0, "mask_ratio": 0.0, "rotation": 30.0,
                  "crop_scale": (0.5, 0.5)}


def test_a_geometric_view_moves_the_teachers_input_the_same_way_so_tokens_stay_aligned():
    distiller = build(VIT4, MICRO_CNN, **GEOMETRIC_ONLY)
    seen = _record_inputs(distiller)
    images = torch.randn(3, 3, 32, 32)
    distiller(images, torch.tensor([1, 2, 3]))
    assert not torch.allclose(seen["student"], images)  # the view moved pixels...
    assert torch.equal(seen["teacher"], seen["student"])  # ...and the teacher sees the very same view


def _centroid(x):
    """Mean (row, col) in [0, 1] of a (B, C, H, W) batch's intensity, per image."""
    w = x.abs().sum(1)
    h_idx = (torch.arange(w.shape[1]) + 0.5) / w.shape[1]
    w_idx = (torch.arange(w.shape[2]) + 0.5) / w.shape[2]
    total = w.sum((1, 2))
    return torch.stack([(w.sum(2) * h_idx).sum(1) / total, (w.sum(1) * w_idx).sum(1) / total], 1)


def test_the_shared_geometry_holds_when_the_teacher_runs_at_another_size():
    distiller = build(VIT16, MICRO_CNN, student_img_size=32, **GEOMETRIC_ONLY)  # teacher at 160
    seen = _record_inputs(distiller)
    images = torch.zeros(4, 3, 32, 32)
    images[:, :, 12:18, 14:20] = 3.0  # one bright square off-centre; 0 is the mean colour
    distiller(images, torch.arange(4))
    assert seen["teacher"].shape[-1] == 160
    moved = _centroid(seen["student"])
    assert (moved - _centroid(images)).abs().max() > 0.05  # the crop and rotation moved the square
    torch.testing.assert_close(_centroid(seen["teacher"]), moved, rtol=0, atol=0.02)  # to the same place


def test_photometric_views_perturb_the_student_only():
    distiller = build(VIT4, MICRO_CNN, mvg_prob=1.0, rotation=0.0, crop_scale=(1.0, 1.0), noise_std=0.1)
    seen = _record_inputs(distiller)
    images = torch.randn(3, 3, 32, 32).clamp(-1.5, 1.5)
    distiller(images, torch.tensor([1, 2, 3]))
    assert torch.equal(seen["teacher"], images)  # jitter, noise and masks move no pixel: the clean view
    assert (seen["student"] - images).abs().amax() > 0.1


def test_views_feed_mvg_keeps_the_views_out_of_the_ce_and_projection_losses():
    distiller = build(VIT4, MICRO_CNN, views_feed="mvg", gl_dropout=0.0, **GEOMETRIC_ONLY)
    student_inputs, seen = [], _record_inputs(distiller)
    distiller.student.register_forward_pre_hook(lambda _m, args: student_inputs.append(args[0].detach().clone()))
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    out = distiller(images, targets)
    clean, view = student_inputs
    assert torch.equal(clean, images) and torch.equal(seen["teacher"], images)  # CE, L_proj: the clean batch
    assert not torch.allclose(view, images)  # a second forward of the moved view...
    with torch.no_grad():
        expected_ce = distiller.classification_loss(distiller.student(images), targets)
        distiller.student(view)
        h_view = distiller.gl(distiller.student_hooks.features["h_s"])  # layer3 is already on the 8x8 grid
        expected_mvg = generator_loss(distiller.discriminator(h_view), "minimax")
    torch.testing.assert_close(out.terms["ce"], expected_ce)
    torch.testing.assert_close(out.terms["mvg"], expected_mvg)  # ...feeds L_MVG
    torch.testing.assert_close(distiller._pair[1], h_view)  # and the discriminator's fake tokens
    assert CAPKDParams().views_feed == "all"


def test_views_feed_mvg_leaves_the_running_statistics_to_the_clean_batch():
    params = {"views_feed": "mvg", **GEOMETRIC_ONLY}
    distiller, clean_only = build(VIT4, MICRO_CNN, **params), build(VIT4, MICRO_CNN, **params)
    images = torch.randn(3, 3, 32, 32) * 2 + 1
    distiller(images, torch.tensor([1, 2, 3]))
    clean_only.student(images)  # the same student after one clean training forward, and nothing else
    buffers = dict(clean_only.student.named_buffers())
    norms = [(name, b) for name, b in distiller.student.named_buffers() if name.endswith(("running_mean",
                                                                                          "running_var", "tracked"))]
    assert len(norms) > 10 and all(torch.equal(b, buffers[name]) for name, b in norms)
    assert all(m.momentum == 0.1 for m in distiller.student.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("noise_std", [0.02, 0.05])
def test_noise_transform_adds_gaussian_pixel_noise_of_the_stated_std(noise_std):
    params = CAPKDParams(mvg_prob=1.0, color_jitter=0.0, rotation=0.0, crop_scale=(1.0, 1.0), mask_ratio=0.0,
                         noise_std=noise_std)
    views = MultiViewGenerator(params, CIFAR_MEAN, CIFAR_STD)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    grey = torch.full((16, 3, 32, 32), 0.5)  # pixel value 0.5: clamping to [0, 1] is 10 std away
    torch.manual_seed(0)
    out, _ = views((grey - mean) / std)
    noise = out * std + mean - 0.5  # back in pixel units
    assert noise.std().item() == pytest.approx(noise_std, rel=0.02)  # 49,152 samples
    assert abs(noise.mean().item()) < noise_std * 0.02
    neighbours = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert abs(neighbours.item()) < 0.02  # independent per pixel


# ------------------------------------------------------------------------------------------ Eq. 9: L_MVG


def test_generator_loss_minimax_and_non_saturating_for_known_discriminator_scores():
    scores = torch.tensor([0.0, 2.0, -1.0])  # D = σ(s) = 0.5, 0.880797, 0.268941
    # minimax (Eq. 9): mean log(1 − D) = (log 0.5 + log 0.119203 + log 0.731059) / 3
    assert generator_loss(scores, "minimax").item() == pytest.approx((-0.693147 - 2.126928 - 0.313262) / 3, abs=1e-5)
    # non-saturating: mean −log D = (−log 0.5 − log 0.880797 − log 0.268941) / 3
    assert generator_loss(scores, "non_saturating").item() == pytest.approx((0.693147 + 0.126928 + 1.313262) / 3,
                                                                            abs=1e-5)
    # where D confidently rejects h'_S (s = −6), minimax's gradient −σ(s) all but vanishes, the other's does not
    rejected = torch.tensor([-6.0], requires_grad=True)
    generator_loss(rejected, "minimax").backward()
    assert rejected.grad.item() == pytest.approx(-0.0024726, abs=1e-6)
    rejected.grad = None
    generator_loss(rejected, "non_saturating").backward()
    assert rejected.grad.item() == pytest.approx(-0.9975274, abs=1e-6)


@pytest.mark.parametrize(("kind", "expected"), [("minimax", -2.126928), ("non_saturating", 0.126928)])
def test_the_distillers_mvg_term_follows_the_recipe_choice(kind, expected):
    distiller = build(mvg_prob=0.0, generator_loss=kind)
    last = distiller.discriminator.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 2.0)  # every token scores s = 2, D = 0.880797
    out = distiller(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert out.terms["mvg"].item() == pytest.approx(expected, abs=1e-5)


def test_the_default_generator_loss_is_the_papers_and_others_are_refused():
    assert CAPKDParams().generator_loss == "minimax"
    with pytest.raises(ValidationError):
        CAPKDParams(generator_loss="wasserstein")


# ------------------------------------------------------------------------------------------ the paper's schedule


@pytest.mark.parametrize("name", ["vit_to_mbv2", "vit_to_resnet18"])
def test_the_gpu_recipes_use_the_papers_cifar_schedule(name):
    recipe = load_recipe(bundled_recipes_dir() / f"{name}.yaml")
    o = recipe.optim
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (o.schedule, o.decay_milestones, o.decay_rate, o.warmup_epochs) == ("multistep", [100, 150], 0.1, 0)
    assert (o.epochs, o.batch_size) == (200, 64)
    assert recipe.distill.method == "capkd" and recipe.teachers[0].name == "vit_base_patch16_224"
