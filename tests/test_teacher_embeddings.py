"""The teacher-embedding cache: a sweep over students pays a teacher once per tile set; a stale, truncated,
corrupt or half-written entry is rebuilt with a warning, never reused."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from patholite.io import current_umask
from patholite.pipelines.embeddings import FOLDER, KEY_FILE, cached_embeddings, entry_name

LOGGER = "patholite.pipelines.embeddings"


class Tiles(Dataset):
    """``n`` tiles whose pixels all equal the tile's index: embeddings show the order they were made in."""

    def __init__(self, n: int = 10, side: int = 4) -> None:
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, self.side, self.side), i, dtype=torch.uint8), i


class Teacher:
    """Counts its calls; ``cls`` (B, 3) and ``patch`` (B, 2) derived from each tile's pixel value."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.ndim == 4
        with self.lock:
            self.calls += 1
        v = images[:, 0, 0, 0].double()  # float64 on purpose: the cache stores float32
        return {"cls": torch.stack([v, v * 2, v + 0.5], 1), "patch": torch.stack([-v, v / 3], 1)}


def expected(n: int) -> dict[str, np.ndarray]:
    v = np.arange(n, dtype=np.float64)
    return {
        "cls": np.stack([v, v * 2, v + 0.5], 1).astype(np.float32),
        "patch": np.stack([-v, v / 3], 1).astype(np.float32),
    }


KEY = {"teacher": "vit_large", "tiles": {"kind": "images", "files_sha256": "abc", "count": 10}}


def entry(root: Path, key: dict = KEY) -> Path:
    return root / FOLDER / entry_name(key)


def embed(root: Path, teacher: Teacher, key: dict = KEY, n: int = 10, **kw) -> dict[str, np.ndarray]:
    return cached_embeddings(root, key, Tiles(n), teacher, batch_size=kw.pop("batch_size", 3), **kw)


def test_values_in_tile_order_float32_read_only(tmp_path):
    out = embed(tmp_path, Teacher())
    want = expected(10)
    assert set(out) == {"cls", "patch"}
    for name, array in out.items():
        assert isinstance(array, np.memmap) and not array.flags.writeable
        assert array.dtype == np.float32 and array.shape == want[name].shape
        np.testing.assert_array_equal(array, want[name])
    with pytest.raises(ValueError):
        out["cls"][0, 0] = 1.0


def test_computed_once_per_key(tmp_path):
    teacher = Teacher()
    first = embed(tmp_path, teacher)
    calls = teacher.calls
    assert calls == 4  # 10 tiles in batches of 3
    second = embed(tmp_path, teacher)
    assert teacher.calls == calls
    np.testing.assert_array_equal(first["cls"], second["cls"])
    other = {**KEY, "teacher": "vit_huge"}
    embed(tmp_path, teacher, other)
    assert teacher.calls == 2 * calls and entry(tmp_path, other).is_dir()
    embed(tmp_path, teacher, other)
    assert teacher.calls == 2 * calls


def test_entry_layout_key_json_and_umask_modes(tmp_path):
    embed(tmp_path, Teacher())
    folder = entry(tmp_path)
    assert len(folder.name) == 16
    assert sorted(p.name for p in folder.iterdir()) == ["cls.npy", KEY_FILE, "patch.npy"]
    meta = json.loads((folder / KEY_FILE).read_text())
    assert meta["key"] == KEY and meta["arrays"]["cls"]["shape"] == [10, 3]
    assert meta["arrays"]["patch"]["dtype"] == "float32" and len(meta["arrays"]["patch"]["sha256"]) == 64
    umask = current_umask()
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folder stays behind


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the last value: the header still parses
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "rb+") as f:
        f.truncate(path.stat().st_size - 8)


def drop_key(path: Path) -> None:
    (path.parent / KEY_FILE).unlink()


def other_key(path: Path) -> None:
    key_file = path.parent / KEY_FILE
    meta = json.loads(key_file.read_text())
    meta["key"] = {**KEY, "teacher": "someone else"}
    key_file.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, why",
    [
        (flip_bytes, "does not match its recorded sha256"),
        (truncate, "cls.npy is unreadable"),
        (drop_key, f"no {KEY_FILE}"),
        (other_key, "another key"),
    ],
)
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage, why):
    teacher = Teacher()
    embed(tmp_path, teacher)
    calls = teacher.calls
    damage(entry(tmp_path) / "cls.npy")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = embed(tmp_path, teacher)
    assert teacher.calls == 2 * calls
    assert why in caplog.text and "computing them again" in caplog.text
    np.testing.assert_array_equal(out["cls"], expected(10)["cls"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embed(tmp_path, teacher)  # the rebuilt entry is good
    assert teacher.calls == 2 * calls and not caplog.text


def test_missing_array_and_wrong_row_count_are_rebuilt(tmp_path, caplog):
    teacher = Teacher()
    embed(tmp_path, teacher)
    (entry(tmp_path) / "patch.npy").unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embed(tmp_path, teacher)
    assert "patch.npy is missing" in caplog.text and teacher.calls == 8
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = embed(tmp_path, teacher, n=7)  # same key, fewer tiles: the key was wrong, the rows tell
    assert "7 tiles" in caplog.text and out["cls"].shape == (7, 3)


def test_parallel_jobs_compute_once(tmp_path):
    teacher, results, errors = Teacher(), [], []

    def job() -> None:
        try:
            results.append(embed(tmp_path, teacher, batch_size=2))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and teacher.calls == 5
    for out in results:
        np.testing.assert_array_equal(out["patch"], expected(10)["patch"])


def test_loader_workers_and_plain_image_datasets(tmp_path):
    class Plain(Tiles):
        def __getitem__(self, i: int) -> torch.Tensor:
            return super().__getitem__(i)[0]

    out = cached_embeddings(tmp_path, KEY, Plain(10), Teacher(), batch_size=4, num_workers=1)
    np.testing.assert_array_equal(out["cls"], expected(10)["cls"])
    # a Subset's items keep their parent's indices; its rows are in its own order
    picked = cached_embeddings(tmp_path, {"subset": [7, 2, 5]}, Subset(Tiles(10), [7, 2, 5]), Teacher(), 2)
    np.testing.assert_array_equal(picked["cls"], expected(10)["cls"][[7, 2, 5]])


def test_a_failed_build_leaves_no_entry(tmp_path):
    def broken(images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images[0, 0, 0, 0] > 0:
            raise RuntimeError("out of memory")
        return {"cls": images.float().mean((2, 3))}

    with pytest.raises(RuntimeError, match="out of memory"):
        cached_embeddings(tmp_path, KEY, Tiles(6), broken, batch_size=2)
    assert not entry(tmp_path).exists()
    assert [p for p in (tmp_path / FOLDER).iterdir() if not p.name.endswith(".lock")] == []
    teacher = Teacher()
    embed(tmp_path, teacher)
    assert teacher.calls == 4 and os.path.isfile(entry(tmp_path) / KEY_FILE)
