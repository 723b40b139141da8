"""The built-in synthetic histology tiles and their cached datamodule."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite.config.schema import SyntheticConfig
from patholite.data import build_datamodule
from patholite.data.synthetic import tiles as synthetic
from patholite.data.synthetic.tiles import (
    SYNTHETIC_CLASSES,
    SyntheticDataModule,
    generate_split,
    generate_tile,
)
from patholite.errors import ConfigError, DatasetError


def make_cfg(tmp_path, **overrides):
    fields = dict(
        cache_dir=str(tmp_path),
        tile_size=32,
        image_size=32,
        batch_size=8,
        train_per_class=4,
        val_per_class=2,
        test_per_class=2,
        seed=3,
    )
    fields.update(overrides)
    return OmegaConf.structured(SyntheticConfig(**fields))


def ready(cfg) -> SyntheticDataModule:
    dm = build_datamodule(cfg)
    dm.setup()
    return dm


def count_generations(monkeypatch) -> list[int]:
    """Spy on the generator: the returned list gets each call's tiles-per-class."""
    calls: list[int] = []
    real = synthetic.generate_split

    def spy(n_per_class, *args, **kwargs):
        calls.append(n_per_class)
        return real(n_per_class, *args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_split", spy)
    return calls


# ------------------------------------------------------------------------------------------ generator
def test_tiles_are_rgb_uint8_of_the_asked_size():
    rng = np.random.default_rng(0)
    for label in range(4):
        for size in (24, 40):
            tile = generate_tile(rng, label, size, 0.5)
            assert tile.shape == (size, size, 3) and tile.dtype == np.uint8
            assert tile.std() > 5  # not a blank image


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    a_images, a_labels = generate_split(3, 32, 0.5, seed=7)
    b_images, b_labels = generate_split(3, 32, 0.5, seed=7)
    c_images, _ = generate_split(3, 32, 0.5, seed=8)
    assert a_images.tobytes() == b_images.tobytes()
    np.testing.assert_array_equal(a_labels, b_labels)
    assert a_images.tobytes() != c_images.tobytes()


def test_split_is_class_balanced_and_shuffled():
    images, labels = generate_split(5, 24, 0.5, seed=1)
    assert images.shape == (20, 24, 24, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), [5, 5, 5, 5])
    assert not np.array_equal(labels, np.sort(labels))  # interleaved, not in class blocks


def nuclear_fraction(images: np.ndarray) -> np.ndarray:
    """Per image, the share of pixels dark and blue enough to be haematoxylin-stained nuclei."""
    rgb = images.astype(np.float32)
    return ((rgb.mean(-1) < 150) & (rgb[..., 2] > rgb[..., 0])).mean(axis=(1, 2))


def test_malignant_classes_have_more_nuclear_area_than_normal():
    images, labels = generate_split(16, 48, 0.5, seed=0)
    area = nuclear_fraction(images)
    normal = area[labels == SYNTHETIC_CLASSES.index("Normal")].mean()
    for name in ("InSitu", "Invasive"):
        assert area[labels == SYNTHETIC_CLASSES.index(name)].mean() > 1.5 * normal, name


def test_difficulty_zero_separates_classes_more_than_difficulty_one():
    def spread(difficulty: float) -> float:
        images, labels = generate_split(16, 48, difficulty, seed=0)
        area = nuclear_fraction(images)
        means = [area[labels == c].mean() for c in range(4)]
        within = np.mean([area[labels == c].std() for c in range(4)])
        return (max(means) - min(means)) / within

    assert spread(0.0) > spread(1.0)


# ---------------------------------------------------------------------------------------- datamodule
def test_datamodule_has_the_bach_classes_and_balanced_disjoint_splits(tmp_path):
    dm = ready(make_cfg(tmp_path))
    assert dm.class_names == ["Normal", "Benign", "InSitu", "Invasive"] and dm.num_classes == 4
    sizes = {"train": 4, "val": 2, "test": 2}
    seen: dict[bytes, str] = {}
    for split, per_class in sizes.items():
        data = dm.splits[split]
        np.testing.assert_array_equal(np.bincount(data.labels, minlength=4), [per_class] * 4)
        assert data.labels.min() >= 0 and data.labels.max() < 4
        for image in data.images:
            assert seen.setdefault(image.tobytes(), split) == split, "a tile appears in two splits"


def test_second_datamodule_reads_the_cache_without_generating(tmp_path, monkeypatch):
    first = ready(make_cfg(tmp_path))
    calls = count_generations(monkeypatch)
    second = ready(make_cfg(tmp_path))
    assert calls == []
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.splits[split].images, second.splits[split].images)
        np.testing.assert_array_equal(first.splits[split].labels, second.splits[split].labels)


def test_cache_is_keyed_by_what_determines_the_tiles(tmp_path, monkeypatch):
    ready(make_cfg(tmp_path))
    calls = count_generations(monkeypatch)
    ready(make_cfg(tmp_path, difficulty=0.7))
    ready(make_cfg(tmp_path, seed=4))
    assert len(calls) == 6  # three splits each
    assert len(list(tmp_path.glob("*.npz"))) == 9


def test_cache_writes_leave_no_temporary_files(tmp_path):
    ready(make_cfg(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.endswith(".npz")]) == 3
    assert all(n.endswith((".npz", ".lock")) for n in names), names


def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, caplog):
    before = ready(make_cfg(tmp_path))
    victim = next(tmp_path.glob("synthetic-train-*.npz"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="patholite.data.synthetic.tiles"):
        after = ready(make_cfg(tmp_path))
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(before.splits["train"].images, after.splits["train"].images)
    assert np.load(victim)["images"].shape == (16, 32, 32, 3)  # the file is whole again


def test_parallel_jobs_generate_once(tmp_path, monkeypatch):
    calls = count_generations(monkeypatch)
    results = []

    def job():
        results.append(synthetic.load_or_generate(tmp_path, "val", 2, 24, 0.5, seed=0))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [2] and len(results) == 3
    assert all(np.array_equal(r.images, results[0].images) for r in results)


def test_max_samples_generates_only_what_is_kept(tmp_path, monkeypatch):
    calls = count_generations(monkeypatch)
    dm = ready(
        make_cfg(tmp_path, train_per_class=5, val_per_class=3, test_per_class=3, max_samples_per_split=6)
    )
    assert calls == [2, 2, 2]  # ceil(6 / 4) per class, not the configured 5 and 3
    assert all(len(dm.splits[s]) == 6 for s in ("train", "val", "test"))


def test_loader_yields_normalised_float_batches(tmp_path):
    dm = ready(make_cfg(tmp_path, image_size=24))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and images.dtype == torch.float32
    assert images.min() < 0 < images.max()  # ImageNet-normalised, not [0, 1]
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 4)).all()
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 24, 24)
    assert abs(images.mean().item()) < 2.0


def test_each_split_has_its_own_seed():
    seeds = [synthetic.split_seed(3, split) for split in ("train", "val", "test")]
    assert len(set(seeds)) == 3
    assert seeds[0] == synthetic.split_seed(3, "train") != synthetic.split_seed(4, "train")


def test_impossible_settings_fail_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="dataset.difficulty"):
        ready(make_cfg(tmp_path, difficulty=1.5))
    with pytest.raises(ConfigError, match="dataset.tile_size"):
        ready(make_cfg(tmp_path, tile_size=8))


def test_unwritable_cache_dir_is_a_dataset_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="dataset.cache_dir"):
        ready(make_cfg(tmp_path, cache_dir=str(blocker / "cache")))
