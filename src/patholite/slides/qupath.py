"""A slide run's predictions as QuPath objects (GeoJSON) and as ASAP XML, beside ``tiles.csv``.

- ``tiles.geojson``: one QuPath *detection* per row of ``tiles.csv``: the tile's level-0 square, classified as
  its predicted class, with its probabilities (``p_<class>``), tissue fraction and row (``tile``) as
  measurements.
- ``regions.geojson``: QuPath *annotations*: one per predicted class, the union of that class's tile squares
  (holes kept; a class predicted nowhere has none), and the tissue outline (class "Tissue") traced from the
  tissue mask the run computed. Measurements: tiles, area, share of the tissue tiles, mean probability.
- ``regions.xml``: the class regions as ASAP XML (group = class name), for CAMELYON-style tools. ASAP
  polygons have no holes, so a region with holes is cut by vertical lines through them into hole-free
  pieces that tile it exactly.

Both GeoJSON files are FeatureCollections in QuPath 0.4+'s shape (see ``wsi/geojson.py``); drag one onto an
open slide in QuPath (or File > Import objects from file). Coordinates are level-0 pixels. Colours are the
report's per-class colours. Unions are exact: tile squares through a coverage union of the lattice their
edges make (``union_of_tiles``), the tissue mask's pixels as rectangles (runs along a row, then runs of equal
rows) through ``unary_union`` (``union_of_boxes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from patholite.io import atomic_path
from patholite.slides.report import SlideResult, class_colors, validate_result
from patholite.wsi.annotations import Annotation, write_asap_xml
from patholite.wsi.geojson import (
    ANNOTATION,
    DETECTION,
    classification,
    feature,
    feature_collection,
    ring_coordinates,
)

FILES = {
    "tiles_geojson": "tiles.geojson",
    "regions_geojson": "regions.geojson",
    "regions_asap": "regions.xml",
}
TISSUE = "Tissue"  # the tissue outline's class (QuPath's own name for tissue detected by its thresholder)
TISSUE_RGB = (0, 160, 80)


# ---------------------------------------------------------------------------------------------- geometry
def polygons(geometry) -> list[Polygon]:
    """The polygons with an area in a shapely geometry (a Polygon, MultiPolygon or collection)."""
    if geometry is None or geometry.is_empty:
        return []
    if isinstance(geometry, Polygon):
        return [geometry] if geometry.area > 0 else []
    return [p for part in getattr(geometry, "geoms", []) for p in polygons(part)]


def _rectangles(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Rectangles covering exactly the union of the boxes, far fewer of them: boxes of one row that touch or
    overlap merge into runs, then equal runs of rows that abut stack. (K, 4) x0, y0, x1, y1."""
    runs = []
    order = np.lexsort((x0, y1, y0))
    start = 0
    while start < len(order):
        row_y0, row_y1 = y0[order[start]], y1[order[start]]
        end = start
        while end < len(order) and y0[order[end]] == row_y0 and y1[order[end]] == row_y1:
            end += 1
        cur_x0, cur_x1 = x0[order[start]], x1[order[start]]
        for i in order[start + 1 : end]:
            if x0[i] <= cur_x1:
                cur_x1 = max(cur_x1, x1[i])
            else:
                runs.append((cur_x0, row_y0, cur_x1, row_y1))
                cur_x0, cur_x1 = x0[i], x1[i]
        runs.append((cur_x0, row_y0, cur_x1, row_y1))
        start = end
    stacked: list[list] = []
    open_runs: dict[tuple, int] = {}  # (x0, x1) -> index in stacked of the rectangle that may grow down
    for rx0, ry0, rx1, ry1 in sorted(runs, key=lambda r: (r[1], r[0])):
        k = open_runs.get((rx0, rx1))
        if k is not None and stacked[k][3] == ry0:
            stacked[k][3] = ry1
        else:
            open_runs[(rx0, rx1)] = len(stacked)
            stacked.append([rx0, ry0, rx1, ry1])
    return np.asarray(stacked, dtype=np.float64).reshape(-1, 4)


def _turns(ring) -> np.ndarray:
    """A ring's vertices where it turns (closing vertex dropped): the vertices where cells or rectangles met
    along a straight edge are left out. numpy, not ``shapely.simplify(g, 0)``: that took seconds."""
    pts = np.asarray(ring.coords)[:-1]
    before, after = pts - np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0) - pts
    return pts[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0]


def _without_straight_vertices(geometry):
    parts = [Polygon(_turns(p.exterior), [_turns(h) for h in p.interiors]) for p in polygons(geometry)]
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def union_of_boxes(x0, y0, x1, y1):
    """The exact union of axis-aligned boxes (coherent ones: a tissue mask's pixel runs) as a shapely Polygon
    or MultiPolygon (empty when none): merged into rectangles first, then shapely's ``unary_union``."""
    x0, y0, x1, y1 = (np.asarray(v, dtype=np.float64).ravel() for v in (x0, y0, x1, y1))
    if len(x0) == 0:
        return Polygon()
    rects = _rectangles(x0, y0, x1, y1)
    merged = shapely.unary_union(shapely.box(rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3]))
    return _without_straight_vertices(merged)


def union_of_tiles(x0, y0, x1, y1):
    """The exact union of axis-aligned boxes (tile squares, overlapping or not) as a Polygon or MultiPolygon.

    The boxes' edges cut the plane into a lattice of cells; the covered cells form a coverage (neighbours
    share whole edges, vertex for vertex), which ``coverage_union_all`` merges exactly and several times
    faster than ``unary_union`` merges scattered tiles (a class predicted in a salt-and-pepper pattern)."""
    x0, y0, x1, y1 = (np.asarray(v, dtype=np.float64).ravel() for v in (x0, y0, x1, y1))
    if len(x0) == 0:
        return Polygon()
    xs, ys = np.unique(np.concatenate([x0, x1])), np.unique(np.concatenate([y0, y1]))
    i0, i1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
    j0, j1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    count = np.zeros((len(ys), len(xs)), np.int32)  # +1/-1 at box corners, summed: boxes over each cell
    for rows, cols, sign in ((j0, i0, 1), (j0, i1, -1), (j1, i0, -1), (j1, i1, 1)):
        np.add.at(count, (rows, cols), sign)
    jj, ii = np.nonzero(count.cumsum(0).cumsum(1)[:-1, :-1] > 0)
    cells = shapely.box(xs[ii], ys[jj], xs[ii + 1], ys[jj + 1])
    return _without_straight_vertices(shapely.coverage_union_all(cells))


def class_regions(coords: np.ndarray, size0: int, predicted: np.ndarray, n_classes: int) -> list:
    """Per class index, the union of the level-0 squares of the tiles predicted as it."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    out = []
    for k in range(n_classes):
        sel = xy[np.asarray(predicted) == k]
        out.append(union_of_tiles(sel[:, 0], sel[:, 1], sel[:, 0] + size0, sel[:, 1] + size0))
    return out


def tissue_region(mask: np.ndarray, downsample: float, dimensions: tuple[int, int] | None = None):
    """The tissue mask's outline in level-0 pixels (mask pixel j covers [j * ds, (j + 1) * ds)), holes kept,
    clipped to the slide's ``dimensions`` (w, h) when given."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    rows, starts = np.nonzero(np.diff(padded, axis=1) == 1)
    _, ends = np.nonzero(np.diff(padded, axis=1) == -1)  # same row-major order as the starts
    ds = float(downsample)
    region = union_of_boxes(starts * ds, rows * ds, ends * ds, (rows + 1) * ds)
    if dimensions is not None:
        region = region.intersection(shapely.box(0, 0, *dimensions))
    return region


def hole_free(geometry) -> list[Polygon]:
    """Polygons without holes whose union is ``geometry`` and which meet only along edges: a polygon with a
    hole is cut by the vertical line through the middle of that hole's x-extent (which crosses the hole, so
    neither side keeps it), until no piece has one."""
    out, stack = [], polygons(geometry)
    while stack:
        poly = stack.pop()
        if not poly.interiors:
            out.append(poly)
            continue
        hx0, _, hx1, _ = Polygon(poly.interiors[0]).bounds
        cut = (hx0 + hx1) / 2
        minx, miny, maxx, maxy = poly.bounds
        for half in (
            shapely.box(minx - 1, miny - 1, cut, maxy + 1),
            shapely.box(cut, miny - 1, maxx + 1, maxy + 1),
        ):
            stack.extend(polygons(poly.intersection(half)))
    return out


def geometry_json(geometry) -> dict[str, Any]:
    """A Polygon or MultiPolygon as GeoJSON (exteriors counter-clockwise, holes clockwise, as RFC 7946
    orders them; rings closed)."""
    parts = [orient(p, 1.0) for p in polygons(geometry)]
    if not parts:
        raise ValueError("an empty geometry has no GeoJSON polygon")
    rings = [
        [
            ring_coordinates(np.asarray(p.exterior.coords)),
            *(ring_coordinates(np.asarray(h.coords)) for h in p.interiors),
        ]
        for p in parts
    ]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings[0]}
    return {"type": "MultiPolygon", "coordinates": rings}


# ---------------------------------------------------------------------------------------------- features
def tile_features(result: SlideResult) -> list[dict[str, Any]]:
    """One detection per tile, in tile order (the ``tile`` column of tiles.csv); probabilities rounded as
    tiles.csv rounds them. Built as plain dicts: a slide has up to ~10^5 tiles."""
    names, colors = list(result.class_names), class_colors(len(result.class_names))
    classes = [classification(name, rgb) for name, rgb in zip(names, colors, strict=True)]
    keys = [f"p_{c}" for c in names]
    predicted = result.probs.argmax(1).tolist() if len(result.probs) else []
    probs = np.round(result.probs.astype(np.float64), 5).tolist()
    fractions = None
    if result.tissue_fraction is not None:
        fractions = np.round(np.asarray(result.tissue_fraction, np.float64), 4).tolist()
    s = int(result.size0)
    out = []
    for i, ((x, y), k, p) in enumerate(
        zip(np.asarray(result.coords).tolist(), predicted, probs, strict=True)
    ):
        measurements = {"tile": i, **dict(zip(keys, p, strict=True))}
        if fractions is not None:
            measurements["tissue_fraction"] = fractions[i]
        # the exterior's order as geometry_json gives the regions' (RFC 7946: positive shoelace area)
        square = [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]
        properties = {"objectType": DETECTION, "name": f"tile {i}", "classification": classes[k],
                      "measurements": measurements}  # fmt: skip
        out.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
                    "properties": properties})  # fmt: skip
    return out


def region_features(result: SlideResult, regions: list, tissue) -> list[dict[str, Any]]:
    """The tissue outline, then one annotation per predicted class (classes predicted nowhere have none)."""
    names, colors = list(result.class_names), class_colors(len(result.class_names))
    predicted = result.probs.argmax(1) if len(result.probs) else np.zeros(0, np.int64)
    out = []
    if tissue is not None and polygons(tissue):
        measurements = {"area_px": tissue.area, "tiles": len(predicted)}
        tissue_class = TISSUE if TISSUE not in names else f"{TISSUE} (mask)"
        out.append(
            feature(
                geometry_json(tissue),
                ANNOTATION,
                tissue_class,
                TISSUE_RGB,
                "tissue",
                measurements,
                locked=True,
            )
        )
    for k, (name, region) in enumerate(zip(names, regions, strict=True)):
        if not polygons(region):
            continue
        mine = predicted == k
        measurements = {
            "tiles": int(mine.sum()),
            "area_px": region.area,
            "tile_share": float(mine.mean()),
            "mean_p": float(result.probs[mine, k].mean()),
        }
        geometry = geometry_json(region)
        out.append(
            feature(geometry, ANNOTATION, name, colors[k], f"predicted {name}", measurements, locked=True)
        )
    return out


def _write_geojson(path: Path, features: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        # compact: a slide has tens of thousands of tiles
        tmp.write_text(json.dumps(feature_collection(features), separators=(",", ":"), allow_nan=False))


def write_qupath_outputs(result: SlideResult, out_dir: str | Path) -> dict[str, str]:
    """Write tiles.geojson, regions.geojson and regions.xml into ``out_dir``; return their names by key."""
    validate_result(result)
    out_dir = Path(out_dir)
    predicted = result.probs.argmax(1) if len(result.probs) else np.zeros(0, np.int64)
    regions = class_regions(result.coords, int(result.size0), predicted, len(result.class_names))
    tissue = None
    if result.tissue_mask is not None and result.mask_downsample is not None:
        tissue = tissue_region(result.tissue_mask, result.mask_downsample, result.dimensions)
    _write_geojson(out_dir / FILES["tiles_geojson"], tile_features(result))
    _write_geojson(out_dir / FILES["regions_geojson"], region_features(result, regions, tissue))
    asap = [
        Annotation(f"{name} {j + 1}", name, np.asarray(piece.exterior.coords)[:-1])
        for name, region in zip(result.class_names, regions, strict=True)
        for j, piece in enumerate(sorted(hole_free(region), key=lambda p: p.bounds))
    ]
    write_asap_xml(out_dir / FILES["regions_asap"], asap)
    return dict(FILES)
