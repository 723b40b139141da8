"""grouped_split: seeded, groups whole, stratified, every split filled when possible."""

from __future__ import annotations

import numpy as np
import pytest

from patholite.data.splits import check_fractions, check_no_leak, grouped_split
from patholite.errors import DatasetError


def _lesions(n: int = 600, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    groups = [f"L{i // 3 + rng.integers(0, 2)}" for i in range(n)]  # lesions of 1-4 photos
    per_group = {g: rng.integers(0, classes) for g in sorted(set(groups))}
    return np.array([per_group[g] for g in groups]), groups


def test_partition_without_leaks_and_stratified():
    labels, groups = _lesions()
    split = grouped_split(labels, groups, 0.2, 0.1, seed=3)
    all_idx = np.concatenate(list(split.values()))
    assert sorted(all_idx.tolist()) == list(range(len(labels)))  # a partition
    assert not check_no_leak({s: [groups[i] for i in idx] for s, idx in split.items()})
    assert len(split["val"]) / len(labels) == pytest.approx(0.2, abs=0.03)
    assert len(split["test"]) / len(labels) == pytest.approx(0.1, abs=0.03)
    overall = np.bincount(labels, minlength=5) / len(labels)
    for idx in split.values():
        assert np.abs(np.bincount(labels[idx], minlength=5) / len(idx) - overall).max() < 0.06


def test_seeded_and_independent_of_listing_order():
    labels, groups = _lesions()
    a = grouped_split(labels, groups, 0.15, 0.15, seed=1)
    b = grouped_split(labels, groups, 0.15, 0.15, seed=1)
    c = grouped_split(labels, groups, 0.15, 0.15, seed=2)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["test"], c["test"])
    perm = np.random.default_rng(0).permutation(len(labels))
    d = grouped_split(labels[perm], [groups[i] for i in perm], 0.15, 0.15, seed=1)
    assert sorted(perm[d["test"]].tolist()) == a["test"].tolist()


def test_every_class_in_every_split_when_it_has_three_groups():
    labels = np.repeat(np.arange(4), 3)
    split = grouped_split(labels, None, 0.15, 0.15, seed=0)
    for idx in split.values():
        assert sorted(labels[idx].tolist()) == [0, 1, 2, 3]


def test_tiny_classes_still_fill_every_split():
    split = grouped_split([0, 0, 1, 1], None, 0.15, 0.15, seed=0)
    assert all(len(idx) for idx in split.values())
    split = grouped_split([0, 0, 0, 1, 1, 1], ["a", "a", "b", "c", "c", "c"], 0.2, 0.0, seed=0)
    assert len(split["test"]) == 0 and len(split["val"]) and len(split["train"])


def test_no_leak_reports_shared_groups():
    assert check_no_leak({"train": ["a", "b"], "val": ["c"], "test": ["b"]}) == {"b"}


@pytest.mark.parametrize(
    ("val", "test", "kw"), [(-0.1, 0.1, {}), (0.6, 0.5, {}), (0.0, 0.1, {"need_val": True})]
)
def test_bad_fractions(val, test, kw):
    with pytest.raises(DatasetError, match="fraction"):
        check_fractions(val, test, "here", **kw)


def test_stratified_subsample_keeps_every_class_and_the_cap():
    from patholite.data.base import stratified_subsample

    labels = np.array([0] * 50 + [1] * 49 + [2] * 1)
    picked = stratified_subsample(labels, 10, seed=0)
    assert len(picked) == 10 and set(labels[picked]) == {0, 1, 2}
    assert len(set(picked)) == 10
    assert np.array_equal(picked, stratified_subsample(labels, 10, seed=0))  # seeded
    assert len(stratified_subsample(labels, 500, seed=0)) == 100
