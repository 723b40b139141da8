"""QuPath and ASAP in and out: GeoJSON a slide run writes beside tiles.csv (tiles as detections, class regions
and the tissue outline as annotations), class regions as ASAP XML, and QuPath-exported annotations read for
reports and training.

QuPath itself cannot run here, so the files are checked against the format: structure (FeatureCollection,
objectType, classification, measurements map), closed rings of numbers, valid geometries inside the slide,
and exact agreement with tiles.csv. The exports read here are written in QuPath 0.4+'s shape (and 0.2's).
"""

from __future__ import annotations

import json
import shutil
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from omegaconf import OmegaConf
from shapely.geometry import shape

from patholite import artifacts as art
from patholite.config.options import load_model_option
from patholite.config.slide_schema import BachWsiConfig, SlideRunConfig
from patholite.data import build_datamodule
from patholite.errors import SlideError
from patholite.models.factory import create_network
from patholite.slides.qupath import (
    hole_free,
    tissue_region,
    union_of_boxes,
    union_of_tiles,
    write_qupath_outputs,
)
from patholite.slides.report import SlideResult
from patholite.slides.run import run_slides
from patholite.wsi.annotations import (
    CAMELYON16_CLASS_MAP,
    find_annotation,
    rasterize,
    read_annotations,
    tile_labels,
)

from .helpers import csv_rows

CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]


# ------------------------------------------------------------------------------------------------ helpers
def square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


def qupath_feature(
    rings, class_name: str | None, kind: str = "Polygon", object_type: str = "annotation"
) -> dict:
    """A feature as QuPath 0.4+ exports it (File > Export objects as GeoJSON)."""
    properties: dict = {"objectType": object_type, "isLocked": False}
    if class_name is not None:
        properties["classification"] = {"name": class_name, "color": [200, 0, 0]}
    properties["measurements"] = {"Area µm^2": 1234.5}
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": kind, "coordinates": rings},
            "properties": properties}  # fmt: skip


def write_export(path: Path, features: list[dict], collection: bool = True) -> Path:
    data = {"type": "FeatureCollection", "features": features} if collection else features
    path.write_text(json.dumps(data, indent=2))
    return path


def check_geojson_structure(data: dict, bounds: tuple[int, int]) -> list:
    """Structural checks of a FeatureCollection as QuPath reads it; returns the shapely geometries."""
    assert data["type"] == "FeatureCollection" and isinstance(data["features"], list)
    geometries = []
    for f in data["features"]:
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        assert isinstance(props["measurements"], dict)
        assert all(isinstance(v, int | float) for v in props["measurements"].values())
        geometry = f["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for rings in polygons:
            for ring in rings:
                assert len(ring) >= 4 and ring[0] == ring[-1]  # closed
                assert all(len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in ring)
        geom = shape(geometry)
        assert geom.is_valid, shapely.is_valid_reason(geom)
        assert all(shapely.is_ccw(p.exterior) for p in getattr(geom, "geoms", [geom]))  # one ring order
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= bounds[0] and y1 <= bounds[1]
        geometries.append(geom)
    return geometries


def tile_union(xy: np.ndarray, side: float):
    return shapely.unary_union([shapely.box(x, y, x + side, y + side) for x, y in xy])


# ----------------------------------------------------------------------------------------- reading QuPath
def test_a_qupath_export_reads_as_classified_polygons_with_holes(tmp_path):
    ring = [square(0, 0, 300)[::-1], square(100, 100, 100)]  # an exterior with a hole
    features = [
        qupath_feature(ring, "Tumor"),
        qupath_feature([[square(400, 0, 50)], [square(500, 0, 50)]], "Tumor", "MultiPolygon"),
        qupath_feature([square(0, 400, 60)], "Ignore*"),
        qupath_feature([10, 10], "Tumor", "Point"),  # a point annotation: no area, skipped
        qupath_feature([square(0, 0, 16)], "Tumor", object_type="detection"),  # a cell: not an annotation
    ]
    path = write_export(tmp_path / "slide.geojson", features)
    anns = read_annotations(path)
    assert [(a.group, a.exclude, len(a.holes)) for a in anns] == [
        ("Tumor", False, 1), ("Tumor", False, 0), ("Tumor", False, 0), ("Ignore*", True, 0),
    ]  # fmt: skip
    assert anns[0].polygon.shape == (4, 2)  # the closing position is dropped
    assert anns[1].name.endswith("part 1") and anns[2].name.endswith("part 2")
    # QuPath 0.2/0.3: a bare list of features, the type in "id", colorRGB, measurements as a list
    properties = {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False,
                  "measurements": [{"name": "Area", "value": 1.0}]}  # fmt: skip
    geometry = {"type": "Polygon", "coordinates": [square(5, 5, 40)]}
    old = {"type": "Feature", "id": "PathAnnotationObject", "geometry": geometry, "properties": properties}
    legacy = write_export(tmp_path / "old.json", [old], collection=False)
    assert [(a.group, a.polygon.tolist()) for a in read_annotations(legacy)] == [
        ("Tumor", [[5, 5], [45, 5], [45, 45], [5, 45]])
    ]
    # the class map works as for XML: CAMELYON16's groups, an unknown class named
    assert {a.group for a in read_annotations(path, CAMELYON16_CLASS_MAP) if not a.exclude} == {"Tumor"}
    with pytest.raises(SlideError, match="not in the class map"):
        read_annotations(path, {"Other": "Tumor"})


def test_holes_stay_unlabelled_and_overlapping_regions_of_a_class_are_their_union(tmp_path):
    features = [
        qupath_feature([square(0, 0, 192), square(64, 64, 64)], "Tumor"),  # a 64-px hole in the middle
        qupath_feature([square(256, 0, 128)], "Tumor"),
        qupath_feature([square(320, 64, 128)], "Tumor"),  # overlaps the one before
    ]
    anns = read_annotations(write_export(tmp_path / "a.geojson", features), CAMELYON16_CLASS_MAP)
    labels, excluded = rasterize(anns, ["Normal", "Tumor"], (512, 256), 4.0, background=0)
    coords = np.array([[0, 0], [64, 64], [128, 128], [320, 64], [384, 128]])
    tiles, _ = tile_labels(labels, excluded, 4.0, coords, 64)
    # the ring is Tumor, its hole Normal; the overlap of two Tumor squares stays Tumor (fillPoly's even-odd
    # rule left it unfilled when polygons were painted in one call)
    assert tiles.tolist() == [1, 0, 1, 1, 1]
    assert labels[64 // 4 + 4, 64 // 4 + 4] == 0 and labels[96 // 4, 336 // 4] == 1


@pytest.mark.parametrize(
    "content,words",
    [
        ({"type": "FeatureCollection", "features": []}, "holds no Polygon"),
        ([qupath_feature([3, 4], "Tumor", "Point")], "1 point or line feature"),
        ([qupath_feature([square(0, 0, 9)], None)], "no classification"),
        ([qupath_feature([square(0, 0, 9)], "Tumor", object_type="detection")], "only \\['detection'\\]"),
        ([qupath_feature([[[0, 0], [1, "a"], [2, 2], [0, 0]]], "Tumor")], "not a number"),
        ([qupath_feature([[[0, 0], [1, 1], [0, 0]]], "Tumor")], "at least 3"),
        ([qupath_feature([[0, 0], [5, 5]], "Tumor", "LinearRing")], "'LinearRing'"),
        ({"type": "Polygon", "coordinates": [square(0, 0, 5)]}, "not a FeatureCollection"),
        ("{not json", "not readable JSON"),
    ],
)
def test_bad_geojson_names_the_file_and_the_problem(tmp_path, content, words):
    path = tmp_path / "bad.geojson"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SlideError, match=words) as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_annotation_files_are_found_beside_slides_by_name(tmp_path, caplog):
    (tmp_path / "a.json").write_text('{"slide": "metadata, not annotations"}')
    assert find_annotation(tmp_path, "a") is None
    # QuPath names a cell-detection export after the image too: passed over, with a warning
    write_export(
        tmp_path / "a.geojson", [qupath_feature([square(0, 0, 9)], "Tumor", object_type="detection")]
    )
    assert find_annotation(tmp_path, "a") is None
    assert "detections only" in caplog.text
    write_export(tmp_path / "a.json", [qupath_feature([square(0, 0, 9)], "Tumor")])
    assert find_annotation(tmp_path, "a") == tmp_path / "a.json"
    write_export(tmp_path / "a.geojson", [qupath_feature([square(0, 0, 9)], "Tumor")])
    assert find_annotation(tmp_path, "a") == tmp_path / "a.geojson"
    (tmp_path / "a.xml").write_text("<ASAP_Annotations/>")
    assert find_annotation(tmp_path, "a") == tmp_path / "a.xml"  # the published XML first
    # a slide run finds them the same way: beside the slide, or in the folder annotations= names
    from patholite.slides.inference import annotation_path

    cfg = OmegaConf.structured(SlideRunConfig)
    folder = tmp_path / "qupath"
    folder.mkdir()
    assert annotation_path(cfg, tmp_path / "b.svs") is None
    write_export(folder / "b.geojson", [qupath_feature([square(0, 0, 9)], "Tumor")])
    cfg.annotations = str(folder)
    assert annotation_path(cfg, tmp_path / "b.svs") == folder / "b.geojson"


# ----------------------------------------------------------------------------------------------- geometry
def test_unions_are_exact_keep_holes_and_cut_into_hole_free_pieces():
    rng = np.random.default_rng(0)
    xy = np.array([(x, y) for x in range(12) for y in range(10)], float) * 32  # index = 10 x + y
    keep = rng.random(len(xy)) < 0.6
    keep[[0, 11]], keep[[1, 10]] = True, False  # (0, 0) and (32, 32) touch at a corner only
    truth = tile_union(xy[keep], 32)
    for unite in (union_of_boxes, union_of_tiles):  # two ways to the same union, vertices where it turns
        union = unite(xy[keep, 0], xy[keep, 1], xy[keep, 0] + 32, xy[keep, 1] + 32)
        assert union.is_valid and union.symmetric_difference(truth).area == 0
        assert shapely.get_num_coordinates(union) == shapely.get_num_coordinates(shapely.simplify(truth, 0))
    assert any(len(p.interiors) for p in getattr(union, "geoms", [union]))  # this draw has holes
    pieces = hole_free(union)
    assert all(not p.interiors and p.is_valid for p in pieces)
    assert shapely.unary_union(pieces).symmetric_difference(truth).area == 0
    assert sum(p.area for p in pieces) == pytest.approx(truth.area)  # pieces only meet along edges
    over = np.array([[0, 0], [24, 0], [48, 8]], float)  # overlapping tiles (a grid with overlap)
    for unite in (union_of_boxes, union_of_tiles):
        union = unite(over[:, 0], over[:, 1], over[:, 0] + 32, over[:, 1] + 32)
        assert union.is_valid and union.symmetric_difference(tile_union(over, 32)).area == 0


def test_the_tissue_outline_follows_the_mask_pixels_with_holes():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 5:45] = True
    mask[12:20, 15:25] = False  # a hole
    mask[35:38, 2:4] = True  # an island
    region = tissue_region(mask, 2.5, dimensions=(120, 90))  # the mask overhangs the slide: clipped
    assert region.is_valid and region.geom_type == "MultiPolygon"
    assert region.area == pytest.approx((mask[:36, :48].sum()) * 2.5**2)
    assert sum(len(p.interiors) for p in region.geoms) == 1
    assert region.bounds == (5.0, 12.5, 112.5, 90.0)


# -------------------------------------------------------------------------------------------- slide runs
def _result(coords: np.ndarray, size0: int, predicted: np.ndarray, n: int = 4) -> SlideResult:
    probs = np.full((len(coords), n), 0.1 / (n - 1), np.float32)
    probs[np.arange(len(coords)), predicted] = 0.9
    mask = np.zeros((64, 64), bool)
    mask[4:60, 4:60] = True
    return SlideResult(
        slide="s.svs", class_names=CLASSES[:n], coords=coords, size0=size0, probs=probs,
        thumbnail=np.zeros((64, 64, 3), np.uint8), thumb_downsample=16.0, tissue_mask=mask,
        mask_downsample=16.0, tissue_fraction=np.ones(len(coords), np.float32), dimensions=(1024, 1024),
    )  # fmt: skip


def test_region_outputs_agree_with_the_tiles_exactly(tmp_path):
    xy = np.array([(x, y) for y in range(1, 14) for x in range(1, 14)]) * 64
    predicted = np.zeros(len(xy), np.int64)
    ring = (np.abs(xy[:, 0] - 448) <= 192) & (np.abs(xy[:, 1] - 448) <= 192)
    predicted[ring] = 3  # Invasive: a square ring ...
    predicted[(np.abs(xy[:, 0] - 448) <= 64) & (np.abs(xy[:, 1] - 448) <= 64)] = 0  # ... with Normal inside
    predicted[:3] = 1  # a few Benign tiles; InSitu is predicted nowhere
    files = write_qupath_outputs(_result(xy, 64, predicted), tmp_path)
    assert files == {"tiles_geojson": "tiles.geojson", "regions_geojson": "regions.geojson",
                     "regions_asap": "regions.xml"}  # fmt: skip
    regions = json.loads((tmp_path / "regions.geojson").read_text())
    geoms = check_geojson_structure(regions, (1024, 1024))
    by_class = {
        f["properties"]["classification"]["name"]: g for f, g in zip(regions["features"], geoms, strict=True)
    }
    assert sorted(by_class) == ["Benign", "Invasive", "Normal", "Tissue"]
    for k, name in enumerate(CLASSES):
        if name in by_class:
            assert by_class[name].symmetric_difference(tile_union(xy[predicted == k], 64)).area == 0
    assert len(by_class["Invasive"].interiors) == 1  # the hole where Normal was predicted
    invasive = next(f for f in regions["features"] if f["properties"]["name"] == "predicted Invasive")
    assert invasive["properties"]["measurements"]["tiles"] == int((predicted == 3).sum())
    assert invasive["properties"]["measurements"]["mean_p"] == pytest.approx(0.9)
    assert by_class["Tissue"].area == 56 * 56 * 16**2
    # ASAP: hole-free polygons per class that read back as exactly the same areas
    root = ET.parse(tmp_path / "regions.xml").getroot()
    assert root.tag == "ASAP_Annotations"
    asap = read_annotations(tmp_path / "regions.xml")
    assert {a.group for a in asap} == {"Normal", "Benign", "Invasive"}
    for k, name in enumerate(CLASSES):
        pieces = [shapely.Polygon(a.polygon) for a in asap if a.group == name]
        if pieces:
            back = shapely.unary_union(pieces)
            assert back.symmetric_difference(tile_union(xy[predicted == k], 64)).area == 0
    tiles = json.loads((tmp_path / "tiles.geojson").read_text())
    assert len(check_geojson_structure(tiles, (1024, 1024))) == len(xy)


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory):
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    meta = {"model": {**model, "checkpoint": None}, "class_names": list(CLASSES), "image_size": 32,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "mpp": 2.0,
            "tile_size": 64}  # fmt: skip
    torch.manual_seed(0)
    net = create_network(load_model_option("vit_micro"), len(CLASSES), 32).eval()
    directory = tmp_path_factory.mktemp("artifact") / "fp32"
    art.save_float_artifact(net, directory, meta)
    return directory


def test_a_real_slide_run_writes_qupath_and_asap_files_matching_tiles_csv(slides, float_artifact, tmp_path):
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.artifact, cfg.paths.cache_dir = str(float_artifact), str(tmp_path / "cache")
    cfg.engine.workers, cfg.engine.threads, cfg.report.thumbnail_px = 0, 1, 256
    cfg.tissue.max_side = 512  # a coarse mask is enough here, and quick
    slide = slides / "CMU-1-Small-Region.svs"
    [row] = run_slides([slide], cfg, tmp_path / "out")
    assert row["status"] == "ok"
    out = tmp_path / "out" / slide.stem
    report = json.loads((out / "report.json").read_text())
    for key, name in (("tiles_geojson", "tiles.geojson"), ("regions_geojson", "regions.geojson"),
                      ("regions_asap", "regions.xml")):  # fmt: skip
        assert report["files"][key] == name and (out / name).stat().st_size > 0
    bounds = tuple(report["extra"]["slide"]["dimensions"])
    rows = csv_rows(out / "tiles.csv")
    size0 = report["extra"]["tile"]["size0"]
    tiles = json.loads((out / "tiles.geojson").read_text())
    geoms = check_geojson_structure(tiles, bounds)
    assert len(tiles["features"]) == len(rows) == report["n_tiles"] > 10
    for f, g, r in zip(tiles["features"], geoms, rows, strict=True):  # the same tiles, in the same order
        props = f["properties"]
        assert props["objectType"] == "detection" and props["measurements"]["tile"] == int(r["tile"])
        assert g.bounds == (int(r["x"]), int(r["y"]), int(r["x"]) + size0, int(r["y"]) + size0)
        assert props["classification"]["name"] == r["label"]
        assert props["measurements"][f"p_{r['label']}"] == pytest.approx(
            float(r[f"p_{r['label']}"]), abs=1e-5
        )
    regions = json.loads((out / "regions.geojson").read_text())
    geoms = check_geojson_structure(regions, bounds)
    assert all(f["properties"]["objectType"] == "annotation" for f in regions["features"])
    names = [f["properties"]["classification"]["name"] for f in regions["features"]]
    assert names[0] == "Tissue" and sorted(names[1:]) == sorted({r["label"] for r in rows})
    xy = np.array([(int(r["x"]), int(r["y"])) for r in rows])
    labels = np.array([r["label"] for r in rows])
    for name, geom in zip(names[1:], geoms[1:], strict=True):  # each class covers exactly its tiles' area
        assert geom.symmetric_difference(tile_union(xy[labels == name], size0)).area == 0
    tissue = geoms[0]
    assert tissue.area > 0.5 * tile_union(xy, size0).area  # kept tiles are mostly tissue
    asap = read_annotations(out / "regions.xml")
    assert {a.group for a in asap} == set(labels)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def qupath_bach(tmp_path_factory) -> Path:
    """BACH's layout with each slide's regions redrawn in QuPath and exported as GeoJSON (no XML)."""
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import LesionSpec, SlideSpec

    base = tmp_path_factory.mktemp("qupath_bach")
    lesions = [LesionSpec(c, 1, (120.0, 160.0)) for c in ("Benign", "InSitu", "Invasive")]
    source = base / "source.svs"
    write_synthetic_slide(source, SlideSpec(width=2048, height=2048, seed=5, lesions=lesions))
    names = {"Benign": "Benign", "InSitu": "Carcinoma in situ", "Invasive": "Invasive carcinoma"}
    features = []
    for a in read_annotations(source.with_suffix(".xml")):
        ring = [*a.polygon.tolist(), a.polygon[0].tolist()]
        features.append(qupath_feature([ring], names[a.group]))
    root = base / "WSI"
    root.mkdir()
    for i in range(1, 5):
        shutil.copy(source, root / f"A{i:02d}.svs")
        write_export(root / f"A{i:02d}.geojson", features)
    return root


def test_qupath_annotations_label_slide_tiles(qupath_bach, tmp_path):
    cfg = OmegaConf.structured(BachWsiConfig)
    tile = {"size": 64, "mpp": 0.5, "magnification": None}
    cfg.merge_with({"root": str(qupath_bach), "cache_dir": str(tmp_path / "cache"), "tile": tile,
                    "tissue": {"max_side": 512}, "max_tiles_per_slide": 80, "batch_size": 8, "image_size": 32,
                    "val_fraction": 0.25, "test_fraction": 0.25})  # fmt: skip
    dm = build_datamodule(cfg)
    dm.setup()
    table = dm.slide_table()
    assert all(r["annotation"].endswith(".geojson") and r["label"] == "Invasive" for r in table)
    labels = np.concatenate([images.labels for images in dm.splits.values()])
    assert {0, 1, 2, 3} <= set(labels.tolist())  # Normal tissue and every QuPath class


@pytest.mark.slow  # a training run: about 15 s here, plus the shared model's training when it runs first
def test_a_qupath_exported_annotation_file_trains_a_tile_classifier(qupath_bach, make_cfg, tmp_path):
    from patholite.records import read_record
    from patholite.train import run_job

    cfg = make_cfg(
        "dataset=bach_wsi", f"dataset.root={qupath_bach}", "dataset.tile.size=64", "dataset.tile.mpp=1.0",
        "dataset.max_tiles_per_slide=40", "dataset.tissue.max_side=512", "dataset.val_fraction=0.25",
        "dataset.test_fraction=0.25",
    )  # fmt: skip
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    assert record["status"] == "ok"
    [artifact] = record["artifacts"]
    meta = json.loads((Path(artifact["path"]) / "artifact.json").read_text())
    assert meta["dataset"] == "bach_wsi" and meta["class_names"] == CLASSES
