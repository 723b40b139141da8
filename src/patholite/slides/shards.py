"""A cohort split into ``shards`` shares that finish together: ``shard=<i> shards=<n>`` runs share i.

Slides are weighed by their bytes on disk: a slide's work grows with its area, and its file size follows its
area closely enough while needing no slide to be opened (an unopenable file weighs what it weighs, or 0 when
it cannot even be stat'ed, and still gets a shard, where it becomes a failed row). The split is greedy
longest-processing-time: heaviest slide first (ties by path), each to the lightest shard so far (ties: the
one with fewest slides, then the lowest index), so it depends on the cohort, never on the order slides are
listed, and every slide is in exactly one share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def slide_bytes(path: str | Path) -> int:
    """A slide's bytes on disk: the file, a folder's files (DICOM), and a MIRAX slide's companion folder
    (``x.mrxs`` keeps its pixels in ``x/``); 0 when it cannot be read."""
    path = Path(path)
    try:
        total = path.stat().st_size if path.is_file() else 0
        folders = [path] if path.is_dir() else []
        if path.suffix.lower() == ".mrxs" and path.with_suffix("").is_dir():
            folders.append(path.with_suffix(""))
        for folder in folders:
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return total
    except OSError:
        return 0


def assign_shards(sizes: Sequence[int], keys: Sequence[str], shards: int) -> list[list[int]]:
    """The indices of the items in each of ``shards`` shares, balanced by ``sizes`` (greedy LPT; ``keys``,
    unique, break ties so the split does not depend on the items' order). Each share is in key order."""
    if shards < 1:
        raise ValueError(f"shards={shards} must be at least 1")
    if len(sizes) != len(keys) or len(set(keys)) != len(keys):
        raise ValueError("assign_shards needs one unique key per size")
    load = [0] * shards
    members: list[list[int]] = [[] for _ in range(shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), keys[i])):
        # the lightest share; among equals the one with fewest items, so weightless (missing) files spread
        target = min(range(shards), key=lambda s: (load[s], len(members[s]), s))
        load[target] += int(sizes[i])
        members[target].append(i)
    return [sorted(m, key=lambda i: keys[i]) for m in members]


def shard_of(
    items: Sequence[T],
    shard: int,
    shards: int,
    path: Callable[[T], Path],
    size: Callable[[Path], int] = slide_bytes,
) -> list[T]:
    """Share ``shard`` (0-based) of ``shards`` of ``items`` (slides, or entries naming one by ``path``)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard={shard} must be in [0, {shards})")
    paths = [path(item) for item in items]
    keys = [os.path.abspath(p) for p in paths]
    return [items[i] for i in assign_shards([size(p) for p in paths], keys, shards)[shard]]
