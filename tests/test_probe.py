"""Encoder probes on tiny synthetic embeddings: separable clusters every probe must get right, labels that
carry no signal, and kNN votes, cosines and neighbour sets worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from patholite.measure.metrics import QualityMeter
from patholite.measure.probe import (
    apply_probe,
    balanced_accuracy,
    confusions,
    embed,
    knn_probe,
    linear_probe,
    mean_cosine,
    neighbour_overlap,
    probe_quality,
    subsample_labels,
)
from patholite.records import QUALITY_KEYS

THREE = ["stroma", "tumor", "immune"]
# AUROC of a class absent from the test labels warns (as QualityMeter does for any absent class)
absent_class_warning = pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")


def clusters(per_class: list[int], seed: int, spread: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit Gaussian clouds in 8-D, class c centred at spread * e_c: ten standard deviations apart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    centres = spread * torch.eye(8)[: len(per_class)]
    return centres[labels] + torch.randn(len(labels), 8, generator=g), labels


def test_probes_separate_far_apart_clusters():
    train, val, test = clusters([30, 30, 30], 0), clusters([10, 10, 10], 1), clusters([20, 20, 20], 2)
    linear = linear_probe(train, val, test, THREE)
    knn = knn_probe(train, test, THREE, k=5)
    for result in (linear, knn):
        assert result["quality"]["accuracy"] == 1.0 and result["quality"]["balanced_accuracy"] == 1.0
        assert result["quality"]["confusion_matrix"] == [[20, 0, 0], [0, 20, 0], [0, 0, 20]]
        assert result["probabilities"].shape == (60, 3)
        torch.testing.assert_close(result["probabilities"].sum(1), torch.ones(60))
    assert knn["k"] == 5
    assert linear["l2"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert set(linear["val_balanced_accuracy"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}


def test_knn_on_labels_unrelated_to_features_is_near_chance():
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    y_train, y_test = torch.randint(0, 3, (600,), generator=g), torch.randint(0, 3, (600,), generator=g)
    accuracy = knn_probe((x_train, y_train), (x_test, y_test), THREE)["quality"]["accuracy"]
    # chance is 1/3; 600 test items put its standard error at sqrt(1/3 * 2/3 / 600) = 0.019
    assert abs(accuracy - 1 / 3) < 0.08


@absent_class_warning
def test_knn_weighted_votes_by_hand():
    # train: 4 points on the unit circle at 0, 90, 180 and 270 degrees, classes 0, 0, 1, 1 (their radii
    # differ: cosine ignores length); test: one point at 30 degrees, radius 5, class 0.
    # cosines to the train points: cos 30 = 0.866, cos 60 = 0.5, cos 150 = -0.866, cos 240 = -0.5
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0]).deg2rad()
    radii = torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    x_train = radii * torch.stack([angles.cos(), angles.sin()], dim=1)
    y_train = torch.tensor([0, 0, 1, 1])
    x_test = 5 * torch.tensor([[math.cos(math.radians(30)), math.sin(math.radians(30))]])
    y_test = torch.tensor([0])
    t = 0.5
    c30, c60 = math.cos(math.radians(30)), 0.5
    # k=3: the neighbours at 0 and 90 degrees (class 0) and at 270 (class 1, cosine -0.5); 180 is left out
    votes = torch.tensor([[math.exp(c30 / t) + math.exp(c60 / t), math.exp(-0.5 / t)]])
    result = knn_probe((x_train, y_train), (x_test, y_test), ["a", "b"], k=3, temperature=t)
    torch.testing.assert_close(result["probabilities"], votes / votes.sum())
    # k=10 is capped at the 4 train items: 180 degrees (cosine -0.866) votes for class 1 too
    votes = torch.tensor([[math.exp(c30 / t) + math.exp(c60 / t), math.exp(-0.5 / t) + math.exp(-c30 / t)]])
    result = knn_probe((x_train, y_train), (x_test, y_test), ["a", "b"], k=10, temperature=t)
    assert result["k"] == 4
    torch.testing.assert_close(result["probabilities"], votes / votes.sum())


@absent_class_warning
def test_knn_small_temperature_does_not_overflow():
    # exp(1 / 0.005) = exp(200) is past float32's range; the votes are still the nearest item's alone
    x_train, y_train = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    test = (torch.tensor([[1.0, 0.2]]), torch.tensor([0]))
    result = knn_probe((x_train, y_train), test, ["a", "b"], k=2, temperature=0.005)
    torch.testing.assert_close(result["probabilities"], torch.tensor([[1.0, 0.0]]))


def test_linear_probe_chooses_l2_on_val_and_a_huge_l2_loses():
    # 90 vs 10 items: at l2 = 1e3 the weights shrink to nothing and the bias (the 9:1 prior) predicts the
    # majority class for everything: val balanced accuracy (1 + 0) / 2 = 0.5. Any small l2 separates the
    # clusters (1.0), and ties go to the largest such l2.
    train, val, test = clusters([90, 10], 0), clusters([90, 10], 1), clusters([90, 10], 2)
    grid = (1e-4, 1e-2, 1e3)
    result = linear_probe(train, val, test, ["a", "b"], l2_grid=grid)
    assert result["val_balanced_accuracy"] == {"0.0001": 1.0, "0.01": 1.0, "1000.0": 0.5}
    assert result["l2"] == 1e-2
    assert result["quality"]["balanced_accuracy"] == 1.0
    # the huge l2 alone: it is the only choice, and test sees its majority-class predictions
    alone = linear_probe(train, val, test, ["a", "b"], l2_grid=(1e3,))
    assert alone["l2"] == 1e3 and alone["quality"]["confusion_matrix"] == [[90, 0], [10, 0]]


def test_linear_probe_is_deterministic_and_standardises_on_train():
    train, val, test = clusters([20, 20, 20], 0), clusters([10, 10, 10], 1), clusters([10, 10, 10], 2)
    first = linear_probe(train, val, test, THREE, l2_grid=(1e-3,), max_iter=50)
    # shifting and scaling every split alike changes nothing: the train statistics undo it
    moved = [(1000 + 7 * x, y) for x, y in (train, val, test)]
    again = linear_probe(*moved, THREE, l2_grid=(1e-3,), max_iter=50)
    repeat = linear_probe(train, val, test, THREE, (1e-3,), 50)
    torch.testing.assert_close(repeat["probabilities"], first["probabilities"], rtol=0, atol=0)
    torch.testing.assert_close(again["probabilities"], first["probabilities"], rtol=1e-3, atol=1e-4)


def test_probe_quality_keys_and_balanced_interval():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]] * 5)
    labels = torch.tensor([0, 1, 1, 2] * 5)
    q = probe_quality(probs, labels, THREE)
    assert set(q) == set(QUALITY_KEYS) | {"balanced_accuracy_ci95"}
    # recalls: stroma 5/5, tumor 5/10, immune 5/5 -> (1 + 0.5 + 1) / 3
    assert q["balanced_accuracy"] == pytest.approx(2.5 / 3)
    low, high = q["balanced_accuracy_ci95"]
    assert low <= 2.5 / 3 <= high and low < high
    assert q == probe_quality(probs, labels, THREE)  # fixed seed: the same interval every time
    with pytest.raises(ValueError, match="probabilities"):
        probe_quality(probs[:, :2], labels, THREE)


@absent_class_warning
def test_balanced_accuracy_treats_absent_classes_as_quality_meter_does():
    # immune (2) never a label. Case 1: predicted once -> it counts with recall 0: (1/2 + 1/2 + 0) / 3.
    # Case 2: never predicted -> left out: (1/2 + 1) / 2
    labels = torch.tensor([0, 1, 0, 1])
    for predictions, expected in (([0, 1, 1, 2], 1 / 3), ([0, 1, 1, 1], 0.75)):
        probs = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float() * 0.7 + 0.1
        meter = QualityMeter(THREE)
        meter.update(probs, labels)
        assert meter.compute()["balanced_accuracy"] == pytest.approx(expected)
        ours = balanced_accuracy(confusions(labels, torch.tensor(predictions), 3))
        assert float(ours) == pytest.approx(expected)
        assert probe_quality(probs, labels, THREE)["balanced_accuracy"] == pytest.approx(expected)


def test_confusions_of_many_rows_at_once():
    labels = torch.tensor([[0, 1, 1], [1, 1, 0]])
    predictions = torch.tensor([[0, 0, 1], [1, 1, 1]])
    assert confusions(labels, predictions, 2).tolist() == [[[1, 0], [1, 1]], [[0, 1], [0, 2]]]


def test_mean_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    assert mean_cosine(a, b) == pytest.approx((0 + 1 - 1) / 3, abs=1e-6)  # orthogonal, parallel, opposite
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 3\)"):
        mean_cosine(a, torch.zeros(3, 3))


def test_neighbour_overlap_sees_rotations_not_coordinates():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert neighbour_overlap(a, 3 * a @ q, k=10) == pytest.approx(1.0)  # cosines unchanged
    # a wider copy: 16 orthonormal rows of a 32x32 rotation keep every inner product
    wide, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert neighbour_overlap(a, a @ wide[:16], k=10) == pytest.approx(1.0)
    # an unrelated embedding shares about k / (N - 1) = 10 / 199 = 0.05 of each neighbour set
    assert neighbour_overlap(a, torch.randn(200, 24, generator=g), k=10) < 0.15


def test_neighbour_overlap_by_hand_and_limits():
    # under a, two tight pairs pointing opposite ways: k=1 gives 0 -> 1, 1 -> 0, 2 -> 3, 3 -> 2.
    # b agrees on 0, 1 and 2 but moves 3 next to 0: overlap (1 + 1 + 1 + 0) / 4
    a = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, -0.1]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, -1.0], [1.0, -0.3]])
    # under b: 0's nearest is 1 (cos 0.98) then 3 (0.96); 1 -> 0; 2 -> 3 (cos 0.29); 3 -> 0 (0.96)
    assert neighbour_overlap(a, b, k=1) == pytest.approx(3 / 4)
    assert neighbour_overlap(a, b, k=50) == pytest.approx(1.0)  # k capped at N - 1 = 3: everyone else
    with pytest.raises(ValueError):
        neighbour_overlap(a[:1], b[:1])
    with pytest.raises(ValueError):
        neighbour_overlap(a, b[:3])


def test_subsample_labels_is_stratified_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 2)
    idx = subsample_labels(labels, 0.1, seed=3)
    # round(0.1 * 50) = 5, round(0.1 * 30) = 3, and class 2's round(0.2) = 0 is raised to 1
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 3, 1]
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert torch.equal(idx, subsample_labels(labels, 0.1, seed=3))
    assert not torch.equal(idx, subsample_labels(labels, 0.1, seed=4))
    assert torch.equal(subsample_labels(labels, 1.0, seed=3), torch.arange(82))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subsample_labels(labels, bad, seed=0)


class Halves(nn.Module):
    """An 'encoder' whose output keeps an extra dimension: (B, 4) images -> (B, 2, 2) features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (2 * x).reshape(len(x), 2, 2).double()


@absent_class_warning
def test_embed_flattens_in_loader_order_with_transform():
    images = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    net = Halves().train()
    features, y = embed(net, loader, transform=lambda x: x + 1)
    assert not net.training
    assert features.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(features, 2 * (images + 1))  # (x + 1) then the net's 2x, flattened
    assert y.tolist() == [3, 1, 4, 1, 5]
    # embeddings from inference_mode still fit a linear probe (autograd needs plain tensors)
    split = (features, y)
    result = linear_probe(split, split, split, [str(c) for c in range(6)], l2_grid=(1e-2,), max_iter=20)
    assert result["probabilities"].shape == (5, 6)


def test_a_probes_head_read_on_the_same_embeddings_gives_its_own_probabilities():
    torch.manual_seed(0)
    x = torch.randn(60, 5)
    y = (x[:, 0] > 0).long()
    split = (x, y)
    result = linear_probe(split, split, split, ["a", "b"], l2_grid=(1e-3,))
    torch.testing.assert_close(apply_probe(result["head"], x), result["probabilities"])
    with pytest.raises(ValueError, match="width"):
        apply_probe(result["head"], x[:, :3])
