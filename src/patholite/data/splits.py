"""Seeded train/val/test splits that keep groups (photo, lesion, patient) whole and classes balanced.

A group's items share a split, or tiles of one photo and images of one lesion would sit on both sides of the
evaluation and inflate it. Within each class, groups are dealt to the split furthest below its share of the
class's items, so the class proportions of every split follow the data's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from patholite.errors import DatasetError

_ORDER = ("test", "val", "train")  # the small splits are served first, so they get a group when possible


def check_fractions(
    val_fraction: float, test_fraction: float, where: str, need_val: bool = False, need_test: bool = False
) -> None:
    """DatasetError unless both fractions lie in [0, 1), leave training data, and are positive where the
    split must come from them (no official split)."""
    for name, f, needed in (
        ("val_fraction", val_fraction, need_val),
        ("test_fraction", test_fraction, need_test),
    ):
        if not 0.0 <= f < 1.0 or (needed and f <= 0.0):
            bound = "(0, 1): the split is drawn from the training data" if needed else "[0, 1)"
            raise DatasetError(f"{where}: dataset.{name}={f} must lie in {bound}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"{where}: dataset.val_fraction + dataset.test_fraction = {val_fraction + test_fraction} "
            "leaves nothing to train on; keep their sum below 1"
        )


def _group_table(labels: np.ndarray, groups: Sequence) -> tuple[list, np.ndarray, dict]:
    """Sorted group names, the (majority) label of each, and the item indices of each."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = sorted(members, key=str)  # sorted: the split depends on the data, not the listing order
    group_labels = np.array([_majority(labels[members[g]]) for g in names], dtype=np.int64)
    return names, group_labels, members


def _majority(labels: np.ndarray) -> int:
    """The most common label (the smallest on ties): a group's stratum."""
    if len(labels) == 1:  # the common case (no grouping): skip np.unique
        return int(labels[0])
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])


def grouped_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Sorted item indices per "train", "val", "test": seeded, group-whole, stratified by label.

    ``groups`` names each item's group (None: every item is its own group). Each class gets at least one
    group in every split with a positive fraction when it has enough groups, and every such split gets at
    least one group overall when there are enough groups.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if groups is None:
        groups = list(range(len(labels)))
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    check_fractions(val_fraction, test_fraction, "grouped_split")
    fractions = {"test": test_fraction, "val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
    names, group_labels, members = _group_table(labels, groups)
    sizes = np.array([len(members[g]) for g in names])
    rng = np.random.default_rng(seed)
    assigned: dict[str, list[int]] = {s: [] for s in _ORDER}  # group indices per split

    for c in np.unique(group_labels):
        gidx = rng.permutation(np.flatnonzero(group_labels == c))
        total = sizes[gidx].sum()
        target = {s: fractions[s] * total for s in _ORDER}
        count = dict.fromkeys(_ORDER, 0)
        wanted = [s for s in _ORDER if fractions[s] > 0]
        # One group to each wanted split first (train keeps at least one), then each group to the split
        # furthest below its target counting half the group (rounding to nearest); ties in a seeded order.
        seeded = wanted if len(gidx) >= len(wanted) else ["train"]
        for s, g in zip(seeded, gidx, strict=False):
            assigned[s].append(int(g))
            count[s] += sizes[g]
        tie_order = [wanted[i] for i in rng.permutation(len(wanted))]
        for g in gidx[len(seeded) :]:
            s = max(tie_order, key=lambda s: target[s] - count[s] - sizes[g] / 2)
            assigned[s].append(int(g))
            count[s] += sizes[g]

    # Classes too small to share still leave a split empty: lend it a group from the largest split.
    for s in _ORDER:
        if fractions[s] > 0 and not assigned[s]:
            donor = max(_ORDER, key=lambda d: len(assigned[d]))
            if len(assigned[donor]) > 1:
                pick = int(rng.integers(len(assigned[donor])))
                assigned[s].append(assigned[donor].pop(pick))

    return {
        s: np.sort(np.array([i for g in assigned[s] for i in members[names[g]]], dtype=np.int64))
        for s in ("train", "val", "test")
    }


def check_no_leak(splits_groups: Mapping[str, Sequence]) -> set:
    """The groups that occur in more than one split (empty: no leak)."""
    seen: dict = {}
    leaked = set()
    for split, groups in splits_groups.items():
        for g in set(groups):
            if g in seen and seen[g] != split:
                leaked.add(g)
            seen.setdefault(g, split)
    return leaked
