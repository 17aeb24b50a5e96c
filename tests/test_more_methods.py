"""CRD, SSKD, feature distillation and VLFKD: losses against hand-computed values, their state, and their errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet, tiny_recipe, write_recipe
from torch import nn

from kd2deploy.checkpoint import load_checkpoint
from kd2deploy.distill import TrainingData, get_method_class
from kd2deploy.distill.crd import ContrastMemory, CRDParams, contrast_scores, nce_loss, sample_contrast_indices
from kd2deploy.distill.feature import FeatureParams, Projector, feature_distance
from kd2deploy.distill.sskd import SSKDParams, kept_rows, rotation_labels, rotation_similarity, with_rotations
from kd2deploy.distill.vlfkd import VLFKDParams, decoupled, feature_kl, pixel_decoupled_loss
from kd2deploy.errors import UserError
from kd2deploy.models import create_model
from kd2deploy.recipe import load_recipe
from kd2deploy.train.engine import train


def training_data(targets, tmp_path, batches=()):
    return TrainingData(targets=torch.as_tensor(targets), epoch_batches=lambda epoch: list(batches),
                        fingerprint=lambda: {"images": "test", "seed": 0}, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ CRD
def test_nce_loss_matches_hand_computation():
    scores = torch.tensor([[0.5, 0.1, 0.3]])  # P of the positive, then of two negatives
    n = 10  # data set size: noise K·Pn = 2/10
    expected = -(math.log(0.5 / (0.5 + 0.2)) + math.log(0.2 / (0.1 + 0.2)) + math.log(0.2 / (0.3 + 0.2)))
    assert nce_loss(scores, n).item() == pytest.approx(expected, rel=1e-5)


def test_contrast_scores_read_the_memory_rows_named_by_the_index_either_way():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    anchors = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    index = torch.tensor([[2, 0], [1, 1]])
    expected = torch.tensor([[0.6 + 1.6, 1.0], [-1.0, -1.0]])
    assert torch.allclose(contrast_scores(memory, anchors, index), expected)  # whole-bank matmul (3 rows <= 4·2)
    big = torch.cat([memory, torch.randn(20, 2)])
    assert torch.allclose(contrast_scores(big, anchors, index), expected)  # gathered rows (23 rows > 4·2)


def test_memory_update_is_a_normalised_momentum_average():
    memory = ContrastMemory(feat_dim=2, num_data=3, temperature=0.07, momentum=0.5)
    memory.student.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    memory.teacher.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    before = memory.student.clone()
    memory.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([2]))
    s = 1 / math.sqrt(2)  # normalise(0.5·[1, 0] + 0.5·[0, 1])
    assert torch.allclose(memory.student[2], torch.tensor([s, s]))
    assert torch.allclose(memory.teacher[2], torch.tensor([s, s]))
    assert torch.equal(memory.student[:2], before[:2])  # other images untouched


def test_z_is_set_once_from_the_first_batch():
    memory = ContrastMemory(feat_dim=2, num_data=4, temperature=1.0, momentum=0.5)
    memory.student.copy_(torch.tensor([[1.0, 0.0]] * 4))
    memory.teacher.copy_(torch.tensor([[0.0, 1.0]] * 4))
    index = torch.tensor([[0, 1]])
    out_s, _ = memory(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]), index)
    assert memory.z[0].item() == pytest.approx(math.e * 4)  # mean(exp(1·1/1)) · N
    assert torch.allclose(out_s, torch.full((1, 2), 1 / 4))
    memory(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), index)
    assert memory.z[0].item() == pytest.approx(math.e * 4)  # kept


def test_negatives_come_from_other_classes_and_the_positive_first():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    anchors = torch.tensor([0, 4, 7])
    index = sample_contrast_indices(anchors, labels, len(labels), 50)
    assert index.shape == (3, 51)
    assert torch.equal(index[:, 0], anchors)
    assert (labels[index[:, 1:]] != labels[anchors][:, None]).all()
    uniform = sample_contrast_indices(anchors, None, len(labels), 200)
    assert (labels[uniform[:, 1:]] == labels[anchors][:, None]).any()  # uniform mode may draw the own class


def crd(student="test_resnet", teacher="test_resnet", **params):
    return get_method_class("crd")(create_model(student, 10), [create_model(teacher, 10)], CRDParams(**params), 10,
                                   img_size=32)


def test_crd_caps_negatives_by_the_data_and_its_loss_is_the_two_nce_terms(tmp_path):
    method = crd(feat_dim=8, nce_k=16384)
    labels = torch.arange(20) % 4  # 5 per class: 15 images of other classes
    method.prepare(training_data(labels, tmp_path))
    assert method.num_negatives == 15 and method.memory.student.shape == (20, 8)
    images, targets, indices = torch.randn(4, 3, 32, 32), labels[:4], torch.arange(4)
    torch.manual_seed(3)
    out = method(images, targets, indices)
    # the same step by hand: the same draws, the scores from the memories, Eq. 18 in both directions
    with torch.no_grad():
        method.teachers[0](images)
        v_t = method.embed_teacher(method.teacher_pool.features)
    method.student(images)
    v_s = method.embed_student(method.student_pool.features)
    torch.manual_seed(3)
    index = sample_contrast_indices(indices, labels, 20, 15)
    p_s = torch.exp(torch.einsum("bkd,bd->bk", method.memory.teacher[index], v_s) / 0.07) / method.memory.z[0]
    p_t = torch.exp(torch.einsum("bkd,bd->bk", method.memory.student[index], v_t) / 0.07) / method.memory.z[1]
    assert out.terms["crd"].item() == pytest.approx((nce_loss(p_s, 20) + nce_loss(p_t, 20)).item(), rel=1e-4)
    ce = F.cross_entropy(out.logits, targets)
    assert out.loss.item() == pytest.approx(ce.item() + 0.8 * out.terms["crd"].item(), rel=1e-4)


def test_crd_memory_changes_after_the_step_and_resumes_exactly(tmp_path):
    method = crd(feat_dim=8, nce_k=8)
    labels = torch.arange(16) % 4
    method.prepare(training_data(labels, tmp_path))
    before = method.memory.student.clone()
    output = method(torch.randn(4, 3, 32, 32), labels[4:8], torch.arange(4, 8))
    output.loss.backward()  # the memories are part of the graph until the step ends
    method.on_step_end(1, output)
    changed = (method.memory.student != before).any(dim=1)
    assert changed[4:8].all() and not changed[:4].any() and not changed[8:].any()

    fresh = crd(feat_dim=8, nce_k=8)
    fresh.prepare(training_data(labels, tmp_path))
    fresh.load_training_state(method.training_state())
    assert torch.equal(fresh.memory.student, method.memory.student)
    assert torch.equal(fresh.memory.teacher, method.memory.teacher)
    assert torch.equal(fresh.memory.z, method.memory.z)
    assert "memory.student" not in method.student.state_dict()  # training-only state stays out of student.pt


def test_crd_pools_a_vit_student_by_its_class_token():
    method = crd(student="test_vit", teacher="test_resnet")
    method.student.eval()
    tokens = method.student.forward_features(torch.randn(2, 3, 160, 160))
    method.student.forward_head(tokens)
    assert torch.allclose(method.student_pool.features, method.student.fc_norm(tokens[:, 0]))


# ------------------------------------------------------------------------------------------------ SSKD
def test_kept_rows_keep_every_correct_row_and_the_least_wrong_fraction():
    scores = torch.tensor([[3.0, 1.0, 0.0],   # label 0 ranked 1st: correct
                           [2.0, 1.0, 0.0],   # label 1 ranked 2nd
                           [2.0, 1.0, 0.0],   # label 2 ranked 3rd
                           [0.0, 0.0, 5.0],   # label 2: correct
                           [0.0, 4.0, 5.0]])  # label 1 ranked 2nd
    labels = torch.tensor([0, 1, 2, 2, 1])
    assert kept_rows(scores, labels, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert kept_rows(scores, labels, 0.0).tolist() == [0, 3]
    assert kept_rows(scores, labels, 0.7).tolist() == [0, 1, 3, 4]  # int(3 · 0.7) = 2 wrong: the two ranked 2nd


def test_rotations_and_their_similarity_matrix():
    image = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    views = with_rotations(image)
    assert views[1, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]  # 90° counter-clockwise
    assert views[2, 0].tolist() == [[3.0, 2.0], [1.0, 0.0]]
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0],            # originals of a batch of 2
                               [1.0, 1.0], [0.0, 2.0],            # their 90° views
                               [-1.0, 0.0], [3.0, 0.0],           # 180°
                               [0.0, -1.0], [1.0, 0.0]])          # 270°
    similarity = rotation_similarity(embeddings, 2)
    s = 1 / math.sqrt(2)
    assert torch.allclose(similarity, torch.tensor([[s, s], [0, 1], [-1, 0], [1, 0], [0, -1], [1, 0]]), atol=1e-6)
    assert rotation_labels(2, torch.device("cpu")).tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(UserError, match="square"):
        with_rotations(torch.zeros(1, 3, 4, 6))


def sskd(tmp_path, **params):
    torch.manual_seed(0)  # the same teacher weights every time
    return get_method_class("sskd")(create_model("test_resnet", 10), [create_model("test_resnet", 10)],
                                    SSKDParams(**params), 10, img_size=32)


def test_sskd_trains_its_teacher_head_once_and_caches_it(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), torch.arange(8))]
    first = sskd(tmp_path, head_epochs=3)
    untrained = {k: v.clone() for k, v in first.teacher_head.state_dict().items()}
    first.prepare(training_data(torch.zeros(8, dtype=torch.long), tmp_path, batches))
    assert any(not torch.equal(v, untrained[k]) for k, v in first.teacher_head.state_dict().items())
    assert not any(p.requires_grad for p in first.teacher_head.parameters())  # frozen for the student's training
    [cached] = tmp_path.glob("sskd-head-*.pt")

    second = sskd(tmp_path, head_epochs=3)
    second.prepare(training_data(torch.zeros(8, dtype=torch.long), tmp_path, batches=[]))  # no data: a cache hit
    for key, value in first.teacher_head.state_dict().items():
        assert torch.equal(second.teacher_head.state_dict()[key], value)
    other = sskd(tmp_path, head_epochs=2)  # other head settings: another key
    other.prepare(training_data(torch.zeros(8, dtype=torch.long), tmp_path, batches))
    assert len(list(tmp_path.glob("sskd-head-*.pt"))) == 2

    cached.write_bytes(cached.read_bytes()[:100])  # truncated: a cache miss, trained again and replaced
    third = sskd(tmp_path, head_epochs=3)
    third.prepare(training_data(torch.zeros(8, dtype=torch.long), tmp_path, batches))
    for key, value in torch.load(cached, weights_only=True)["state_dict"].items():
        assert torch.equal(third.teacher_head.state_dict()[key], value)


@pytest.mark.parametrize(("method", "params"), [("crd", {"feat_dim": 8, "nce_k": 16}), ("sskd", {"head_epochs": 1})])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, method, params):
    """Stopped after epoch 1 and resumed: the same student, heads and (CRD) memory banks as two epochs in one go."""
    def recipe(run_dir, epochs):
        return tiny_recipe(run_dir, teachers=[{"name": "vit_nano_patch4_32", "kwargs": {"depth": 1}}],
                           distill={"method": method, **params}, data={"train_subset": 64},
                           optim={"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "constant"},
                           teacher_cache={"dir": str(tmp_path / "cache")})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(load_recipe(write_recipe(tmp_path / "ref.yaml", recipe(reference, 2))), console=quiet())
    train(load_recipe(write_recipe(tmp_path / "a.yaml", recipe(resumed, 1))), console=quiet())
    train(load_recipe(write_recipe(tmp_path / "b.yaml", recipe(resumed, 2))), resume=True, console=quiet())

    expected, got = (load_checkpoint(r / "last.pt")["distiller"]["modules"] for r in (reference, resumed))
    assert set(got) == set(expected)
    trained_state = {"crd": "memory.student", "sskd": "student_head."}[method]
    assert any(k.startswith(trained_state) for k in expected)  # the method's own state is compared too
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sskd_loss_weights_its_four_terms_and_sees_the_rotations(tmp_path):
    method = sskd(tmp_path, head_epochs=0)
    method.prepare(training_data(torch.zeros(4, dtype=torch.long), tmp_path))
    seen = []
    method.student.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[0]))
    out = method(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert seen == [16] and out.logits.shape == (4, 10)  # the batch and its three rotations, one forward
    t = out.terms
    expected = 0.1 * t["ce"] + 0.9 * t["kd"] + 10.0 * t["ss"] + 2.7 * t["tf"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ feature
@pytest.mark.parametrize(("student_shape", "teacher_shape", "prefixes", "kind", "projected"), [
    ((2, 8, 4, 4), (2, 16, 4, 4), (0, 0), "conv1x1", (2, 16, 4, 4)),
    ((2, 8, 8, 8), (2, 16, 4, 4), (0, 0), "conv1x1 + resize", (2, 16, 4, 4)),
    ((2, 17, 8), (2, 17, 12), (1, 1), "linear", (2, 16, 12)),
    ((2, 8, 4, 4), (2, 18, 12), (0, 2), "map->tokens: reshape + linear", (2, 16, 12)),
    ((2, 65, 8), (2, 16, 2, 2), (1, 0), "tokens->map: reshape + conv1x1 + resize", (2, 16, 2, 2)),
])
def test_projector_follows_the_shapes(student_shape, teacher_shape, prefixes, kind, projected):
    projector = Projector(torch.Size(student_shape), torch.Size(teacher_shape), *prefixes, where="test")
    assert projector.kind == kind
    assert isinstance(projector.proj, nn.Conv2d if len(teacher_shape) == 4 else nn.Linear)
    assert projector(torch.randn(student_shape)).shape == projected
    assert projector.target(torch.randn(teacher_shape)).shape == projected


def test_tokens_are_laid_on_their_grid_in_row_major_order():
    projector = Projector(torch.Size((1, 5, 1)), torch.Size((1, 1, 2, 2)), 1, 0, where="test")
    with torch.no_grad():
        projector.proj.weight.fill_(1.0)
        projector.proj.bias.zero_()
    tokens = torch.tensor([[[9.0], [1.0], [2.0], [3.0], [4.0]]])  # a class token, then a 2x2 grid
    assert projector(tokens)[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_feature_distances_match_hand_computation():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (B=1, N=2, D=2)
    b = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    assert feature_distance(a, b, "mse", 2).item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert feature_distance(a, b, "cosine", 2).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0) / 2)


def test_feature_method_sums_its_weighted_pairs():
    params = FeatureParams(pairs=[["layer1", "layer1", 2.0], {"student": "layer2", "teacher": "layer2"}])
    method = get_method_class("feature")(create_model("test_resnet", 10), [create_model("test_resnet", 10)], params,
                                         10, img_size=32)
    out = method(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert set(out.terms) == {"ce", "feat0", "feat1"}
    expected = out.terms["ce"] + 2.0 * out.terms["feat0"] + out.terms["feat1"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_wrong_layer_name_lists_the_valid_ones():
    params = FeatureParams(pairs=[{"student": "layer9", "teacher": "layer1"}])
    with pytest.raises(UserError) as error:
        get_method_class("feature")(create_model("test_resnet", 10), [create_model("test_resnet", 10)], params, 10,
                                    img_size=32)
    message = str(error.value)
    assert "`layer9`" in message and "student" in message and "layer1, layer1.0" in message


# ------------------------------------------------------------------------------------------------ VLFKD
def test_decoupled_target_and_non_target_parts():
    logits = torch.tensor([[0.0, math.log(2), 0.0]])  # probabilities 1/4, 1/2, 1/4
    b, q = decoupled(logits, torch.tensor([1]))
    assert torch.allclose(b, torch.tensor([[0.5, 0.5]])) and torch.allclose(q, torch.tensor([[0.5, 0.5]]))


def test_pixel_decoupled_loss_matches_hand_computation():
    student = torch.tensor([[[0.0, math.log(2), 0.0]]])  # (B=1, P=1, K=3): b = [.5, .5], q = [.5, .5]
    teacher = torch.tensor([[[math.log(3), 0.0, 0.0]]])  # p = [.6, .2, .2]: b = [.2, .8], q = softmax([ln 3, 0])
    expected = ((0.5 - 0.2) ** 2 + (0.5 - 0.8) ** 2) / 2 + ((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2
    assert pixel_decoupled_loss(student, teacher, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-5)
    assert pixel_decoupled_loss(teacher, teacher, torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_kl_matches_hand_computation():
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert feature_kl(torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(
        expected, rel=1e-5)


def vlfkd(student, teacher):
    return get_method_class("vlfkd")(create_model(*student), [create_model(*teacher)], VLFKDParams(), 10, img_size=32)


def test_vlfkd_terms_and_its_refusals():
    method = vlfkd(("libkd_nano_patch4_32", 10, False, None, {"depth": 1}), ("resnet9_cifar", 10, False, None,
                                                                              {"width": 8}))
    assert method.teacher_grid == (4, 4) and method.grid == (8, 8)
    out = method(torch.randn(2, 3, 32, 32), torch.tensor([3, 4]))
    t = out.terms
    assert set(t) == {"ce", "global", "patch", "linguistic", "pixel"}
    assert out.loss.item() == pytest.approx(sum(v.item() for v in t.values()), rel=1e-5)  # all weights 1
    with pytest.raises(UserError, match="vision transformer"):
        vlfkd(("test_resnet", 10), ("test_resnet", 10))
    with pytest.raises(UserError, match="linear layer after global average pooling"):
        vlfkd(("libkd_nano_patch4_32", 10, False, None, {"depth": 1}), ("vit_nano_patch4_32", 10, False, None,
                                                                          {"depth": 1}))


def _update_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial banks on both processes, as the engine's seeding gives
    memory = ContrastMemory(feat_dim=2, num_data=4, temperature=0.07, momentum=0.5)
    v = torch.tensor([[0.0, 1.0]]) if rank == 0 else torch.tensor([[1.0, 0.0]])
    memory.update(v, v, torch.tensor([rank]))  # each process saw another image
    torch.save({"student": memory.student, "teacher": memory.teacher}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_crd_memory_banks_stay_identical_across_torchrun_processes(tmp_path):
    torch.multiprocessing.spawn(_update_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    banks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(banks[0]["student"], banks[1]["student"])
    torch.manual_seed(0)
    initial = ContrastMemory(feat_dim=2, num_data=4, temperature=0.07, momentum=0.5).student
    assert not torch.equal(banks[0]["student"][0], initial[0]) and not torch.equal(banks[0]["student"][1], initial[1])
    assert torch.equal(banks[0]["student"][2:], initial[2:])  # both processes' images updated, no other
