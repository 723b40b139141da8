"""Slide datasets: tiles cut from whole slides through the tiler, labelled from annotations, split by slide.

Every slide here is a small synthetic one (2048 px square, 0.5 um/px) from patholite's generator; the
CAMELYON16 and BACH layouts are rebuilt from them in tmp_path with annotation files written in each dialect.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from patholite.config.slide_schema import BachWsiConfig, Camelyon16Config, SyntheticSlidesConfig
from patholite.data import build_datamodule
from patholite.data.slides import cap_tiles
from patholite.data.splits import check_no_leak
from patholite.errors import ConfigError, DatasetError
from patholite.wsi.annotations import Annotation, read_annotations, write_asap_xml

SIDE = 2048
TILE = {"size": 64, "mpp": 0.5, "magnification": None}  # level 0: 64 px tiles; small lesions fill some


def slide_cfg(schema, root: Path, cache: Path, **extra):
    """A dataset node as the train config holds it (schema defaults, struct mode), small."""
    cfg = OmegaConf.structured(schema)
    cfg.merge_with({"root": str(root), "cache_dir": str(cache), "tile": TILE, "max_tiles_per_slide": 60,
                    "tissue": {"max_side": 512}, "batch_size": 8, "image_size": 32, **extra})  # fmt: skip
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_slides")


@pytest.fixture(scope="session")
def synthetic_dm(synthetic_root, tmp_path_factory):
    """A synthetic_slides datamodule, set up once: 3 train, 2 val, 2 test slides."""
    cfg = slide_cfg(
        SyntheticSlidesConfig, synthetic_root, tmp_path_factory.mktemp("tiles"),
        width=SIDE, height=SIDE, slides_per_split=[3, 2, 2], seed=0,
    )  # fmt: skip
    dm = build_datamodule(cfg)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def source_slides(synthetic_dm) -> list[dict]:
    """The synthetic slides with lesions, material for the other layouts: slide path, lesion polygons."""
    rows = [r for r in synthetic_dm.slide_table() if r["label"] != "Normal"]
    return [{"slide": Path(r["slide"]), "lesions": read_annotations(r["annotation"])} for r in rows]


def test_synthetic_slides_split_by_slide_with_lesion_tiles(synthetic_dm):
    dm = synthetic_dm
    assert dm.class_names == ["Normal", "Benign", "InSitu", "Invasive"]
    groups = {split: set(images.groups) for split, images in dm.splits.items()}
    assert [len(groups[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    assert not check_no_leak(groups)
    table = dm.slide_table()
    assert {(Path(r["slide"]).stem, r["split"]) for r in table} == {
        (g, s) for s, gs in groups.items() for g in gs
    }
    assert all(Path(r["annotation"]).suffix == ".xml" and r["label"] in dm.class_names for r in table)
    labels = np.concatenate([images.labels for images in dm.splits.values()])
    assert {0} < set(labels.tolist()) <= {0, 1, 2, 3}  # Normal and at least one lesion class
    for images in dm.splits.values():
        counts = {g: images.groups.count(g) for g in set(images.groups)}
        assert max(counts.values()) <= 60  # max_tiles_per_slide
        assert all(box[2] == box[3] == 64 for box in images.boxes)  # level-0 side at 0.5 um/px
    assert dm.tile_geometry() == {"mpp": 0.5, "tile_size": 64}


def test_the_tile_cap_shares_tiles_evenly_so_rare_classes_survive(synthetic_dm):
    labels = np.array([0] * 500 + [1] * 5 + [2] * 30)
    kept = cap_tiles(labels, 60, np.random.default_rng(0))
    assert len(set(kept.tolist())) == 60 and np.all(np.diff(kept) > 0)
    assert np.bincount(labels[kept]).tolist() == [28, 5, 27]  # 5 of 5, then the rest shared evenly
    capped = 0
    for entry in synthetic_dm.slide_entries():  # on the slides: a capped slide keeps its rare lesion tiles
        coords, labels, _ = synthetic_dm.slide_tiles(entry)
        every = synthetic_dm._tile_and_label(entry)[1]
        every = every[every >= 0]
        if len(every) > 60:
            capped += 1
            classes, counts = np.unique(every, return_counts=True)
            assert len(labels) == 60 and set(labels.tolist()) == set(classes.tolist())
            for c, n in zip(classes, counts, strict=True):
                assert (labels == c).sum() in (n, *range(60 // len(classes), 61))
    assert capped


def test_tiles_load_as_rgb_of_the_tile_size_also_in_workers(synthetic_dm):
    images = synthetic_dm.splits["val"]
    first = images.load(0)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8 and first.std() > 0
    x, y, size0, _ = images.boxes[0]
    from patholite.wsi.reader import open_slide

    with open_slide(images.paths[0]) as slide:
        assert np.array_equal(first, slide.read_region((x, y), 0, (size0, size0)))
    sub = images.subset([0, 1, 2])
    assert sub.slide_read == images.slide_read and np.array_equal(sub.load(0), first)
    dataset = synthetic_dm.datasets["val"]  # evaluation transform: deterministic
    main = torch.stack([dataset[i][0] for i in range(8)])
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    workers = torch.cat([b[0] for b in batches])[:8]
    assert workers.shape == (8, 3, 32, 32) and torch.equal(workers, main)


def test_a_second_setup_reads_the_tile_cache_without_opening_slides(synthetic_dm, monkeypatch):
    import patholite.wsi.reader as reader

    def refuse(*args, **kwargs):
        raise AssertionError("a cached setup opened a slide")

    monkeypatch.setattr(reader, "open_slide", refuse)
    again = build_datamodule(synthetic_dm.cfg)
    again.setup()
    for split, images in synthetic_dm.splits.items():
        assert np.array_equal(again.splits[split].labels, images.labels)
        assert again.splits[split].boxes == images.boxes


def test_a_target_magnification_gives_the_mpp_the_artifact_records(synthetic_dm):
    cfg = synthetic_dm.cfg.copy()
    cfg.merge_with({"tile": {"mpp": None, "magnification": 10.0}})  # the slides are 20x at 0.5 um/px
    dm = build_datamodule(cfg)
    assert dm.tile_geometry() == {"mpp": 1.0, "tile_size": 64}  # before setup: from the first slide
    dm.setup()
    assert dm.tile_geometry() == {"mpp": 1.0, "tile_size": 64}
    assert {box[2] for images in dm.splits.values() for box in images.boxes} == {128}


def test_slide_dataset_settings_are_checked(synthetic_dm):
    for change, words in (
        ({"tile": {"size": 64, "mpp": 0.5, "magnification": 20.0}}, "exactly one"),
        ({"mpp": 0.5}, "dataset.tile.mpp"),
        ({"label_min_fraction": 0.0}, "label_min_fraction"),
    ):
        cfg = synthetic_dm.cfg.copy()
        cfg.merge_with(change)
        with pytest.raises(ConfigError, match=words):
            build_datamodule(cfg).setup()


# ------------------------------------------------------------------------------------------ CAMELYON16
def camelyon_layout(root: Path, sources: list[dict]) -> tuple[float, float, float, float]:
    """training/ with 2 normal and 2 tumour slides; testing/ with an annotated tumour slide, a normal slide
    and a tumour slide without annotations. tumor_001 gets an exclusion region (_2) of 600 px around its
    first lesion; returns that box (x0, y0, x1, y1)."""
    for folder in ("training/normal", "training/tumor", "training/lesion_annotations", "testing/images",
                   "testing/lesion_annotations"):  # fmt: skip
        (root / folder).mkdir(parents=True)
    plan = [("training/normal/normal_001.tif", None), ("training/normal/normal_002.tif", None),
            ("training/tumor/tumor_001.tif", "training/lesion_annotations"),
            ("training/tumor/tumor_002.tif", "training/lesion_annotations"),
            ("testing/images/test_001.tif", "testing/lesion_annotations"),
            ("testing/images/test_002.tif", None), ("testing/images/test_003.tif", None)]  # fmt: skip
    box = None
    for i, (target, xml_dir) in enumerate(plan):
        source = sources[i % len(sources)]
        shutil.copy(source["slide"], root / target)
        if xml_dir is None:
            continue
        tumour = [Annotation(f"a{j}", f"_{j % 2}", a.polygon) for j, a in enumerate(source["lesions"])]
        if target.endswith("tumor_001.tif"):
            cx, cy = tumour[0].polygon.mean(0)
            box = (max(0, cx - 300), max(0, cy - 300), min(SIDE, cx + 300), min(SIDE, cy + 300))
            square = [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]
            tumour.append(Annotation("excluded", "_2", np.array(square), exclude=True))
        write_asap_xml(root / xml_dir / f"{Path(target).stem}.xml", tumour)
    (root / "testing/reference.csv").write_text(
        "Test_001,Tumor,Macro,Primary\ntest_002,Normal\ntest_003,Tumor,Micro\n"
    )
    return box


def test_camelyon16_layout_uses_the_official_test_split(tmp_path, source_slides):
    box = camelyon_layout(tmp_path / "c16", source_slides)
    cfg = slide_cfg(
        Camelyon16Config, tmp_path / "c16", tmp_path / "cache", val_fraction=0.3, max_tiles_per_slide=None
    )
    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.class_names == ["Normal", "Tumor"]
    table = {Path(r["slide"]).stem: r for r in dm.slide_table()}
    tests = {k: (r["label"], r["split"], r["annotation"] is None) for k, r in table.items() if "test" in k}
    assert tests == {
        "test_001": ("Tumor", "test", False), "test_002": ("Normal", "test", True),
        "test_003": ("Tumor", "test", True),  # its slide-level row stays; without annotations it has no tiles
    }  # fmt: skip
    assert {table[k]["split"] for k in ("normal_001", "normal_002", "tumor_001", "tumor_002")} == {
        "train",
        "val",
    }
    assert table["normal_001"]["annotation"] is None and table["tumor_001"]["annotation"].endswith(".xml")
    groups = {split: set(images.groups) for split, images in dm.splits.items()}
    assert groups["test"] == {"test_001", "test_002"} and not check_no_leak(groups)
    for images in dm.splits.values():  # tumour tiles come from tumour slides only
        tumour_groups = {g for g, lab in zip(images.groups, images.labels, strict=True) if lab == 1}
        assert all(table[g]["label"] == "Tumor" for g in tumour_groups)
    assert (dm.splits["test"].labels == 1).any()
    # tiles of tumor_001 mostly inside its exclusion region (_2) are dropped; those around it stay
    images = dm.splits[table["tumor_001"]["split"]]
    shares = [
        max(0, min(x + s, box[2]) - max(x, box[0])) * max(0, min(y + s, box[3]) - max(y, box[1])) / s**2
        for g, (x, y, s, _) in zip(images.groups, images.boxes, strict=True) if g == "tumor_001"
    ]  # fmt: skip
    assert max(shares) <= 0.5 and sum(share == 0 for share in shares) > 20


@pytest.mark.parametrize(
    "broken,words",
    [
        (lambda r: (r / "testing/reference.csv").unlink(), "reference.csv"),
        (lambda r: (r / "testing/reference.csv").write_text("image,type\ntest_001,Tumor\n"), "line 1"),
        (lambda r: (r / "testing/reference.csv").write_text("test_001,Tumor\ntest_002\n"), "line 2"),
        (lambda r: (r / "testing/reference.csv").write_text("test_001,Tumor\ntest_002,Normal\n"), "test_003"),
        (lambda r: (r / "testing/images/test_002.tif").unlink(), "rows without a slide: test_002"),
        (lambda r: (r / "training/lesion_annotations/tumor_002.xml").unlink(), "tumor_002.xml"),
        (lambda r: shutil.rmtree(r / "training/normal"), "training/normal"),
    ],
)
def test_camelyon16_broken_layouts_name_the_problem(tmp_path, source_slides, broken, words):
    root = tmp_path / "c16"
    camelyon_layout(root, source_slides)
    broken(root)
    dm = build_datamodule(slide_cfg(Camelyon16Config, root, tmp_path / "cache"))
    with pytest.raises(DatasetError, match=words) as err:
        dm.setup()
    assert "training/tumor/tumor_NNN.tif" in str(err.value) or "header" in str(err.value)


# ------------------------------------------------------------------------------------------ BACH WSI
def write_imagescope_xml(path: Path, regions: list[tuple[str, np.ndarray, bool]]) -> None:
    """Aperio ImageScope XML: one annotation layer, a Region per (text, polygon, negative)."""
    root = ET.Element("Annotations", MicronsPerPixel="0.5")
    regions_el = ET.SubElement(ET.SubElement(root, "Annotation", Id="1", Name="", Type="4"), "Regions")
    for i, (text, polygon, negative) in enumerate(regions, start=1):
        region = ET.SubElement(
            regions_el, "Region", Id=str(i), Type="0", Text=text, NegativeROA=str(int(negative))
        )
        vertices = ET.SubElement(region, "Vertices")
        for x, y in polygon:
            ET.SubElement(vertices, "Vertex", X=f"{x:.1f}", Y=f"{y:.1f}", Z="0")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


_BACH_TEXT = {"Benign": "Benign", "InSitu": "Carcinoma in situ", "Invasive": "Invasive carcinoma"}


def bach_layout(root: Path, sources: list[dict], n: int = 4) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        source = sources[i % len(sources)]
        shutil.copy(source["slide"], root / f"A{i + 1:02d}.svs")
        regions = [(_BACH_TEXT[a.group], a.polygon, False) for a in source["lesions"]]
        write_imagescope_xml(root / f"A{i + 1:02d}.xml", regions)


def test_bach_wsi_layout_splits_by_slide(tmp_path, source_slides):
    bach_layout(tmp_path / "WSI", source_slides)
    cfg = slide_cfg(
        BachWsiConfig, tmp_path / "WSI", tmp_path / "cache", val_fraction=0.25, test_fraction=0.25
    )
    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.class_names == ["Normal", "Benign", "InSitu", "Invasive"]
    groups = {split: set(images.groups) for split, images in dm.splits.items()}
    assert sorted(g for gs in groups.values() for g in gs) == ["A01", "A02", "A03", "A04"]
    assert not check_no_leak(groups) and all(groups.values())
    table = dm.slide_table()
    assert all(r["label"] != "Normal" and r["annotation"].endswith(".xml") for r in table)
    labels = np.concatenate([images.labels for images in dm.splits.values()])
    assert 0 in labels and (labels > 0).any()


def test_bach_wsi_broken_layouts_name_the_problem(tmp_path, source_slides):
    bach_layout(tmp_path / "ICIAR2018_BACH_Challenge" / "WSI", source_slides)
    parent = tmp_path / "ICIAR2018_BACH_Challenge"
    with pytest.raises(DatasetError, match="dataset.root=.*WSI"):
        build_datamodule(slide_cfg(BachWsiConfig, parent, tmp_path / "cache")).setup()
    (parent / "WSI" / "A02.xml").unlink()
    with pytest.raises(DatasetError, match="A02.xml"):
        build_datamodule(slide_cfg(BachWsiConfig, parent / "WSI", tmp_path / "cache")).setup()


# ------------------------------------------------------------------------------------------ a training run
def test_train_on_synthetic_slides_records_the_tile_geometry(make_cfg, tmp_path):
    from patholite.records import read_record
    from patholite.train import run_job

    cfg = make_cfg(
        "dataset=synthetic_slides", f"dataset.width={SIDE}", f"dataset.height={SIDE}",
        "dataset.slides_per_split=[2,1,1]", "dataset.tile.size=64", "dataset.tile.mpp=1.0",
        "dataset.max_tiles_per_slide=40", "dataset.tissue.max_side=512",
    )  # fmt: skip
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    assert record["status"] == "ok"
    [artifact] = record["artifacts"]
    meta = json.loads((Path(artifact["path"]) / "artifact.json").read_text())
    assert meta["mpp"] == 1.0 and meta["tile_size"] == 64 and meta["dataset"] == "synthetic_slides"
    assert meta["class_names"] == ["Normal", "Benign", "InSitu", "Invasive"]
