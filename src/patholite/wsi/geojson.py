"""GeoJSON as QuPath reads and writes it: parse a file into classified polygons (with holes), build features.

QuPath's shape (0.4+; ``File > Export objects as GeoJSON``, or ``exportObjectsToGeoJson``): a
``FeatureCollection`` (or, exported without the FEATURE_COLLECTION option, a bare ``Feature`` or a JSON list
of features). Each feature has a ``geometry`` in level-0 image pixels (origin top-left, y down) and
``properties`` with ``objectType`` ("annotation", "detection", "tile", "cell", "tmaCore"; QuPath 0.2 put the
class name, e.g. "PathAnnotationObject", in the feature's ``id`` instead), ``classification``
(``{"name": "Tumor", "color": [r, g, b]}``; a derived class as ``"names": ["Tumor", "Positive"]``; 0.2 wrote
``colorRGB``), ``measurements`` (a name -> number map since 0.4, a list of ``{name, value}`` before),
``name`` and ``isLocked``. QuPath reads features without ``objectType`` as annotations.

Reading keeps the areas: Polygon and MultiPolygon (also inside a GeometryCollection), with their holes; Point,
MultiPoint, LineString and MultiLineString mark without an area and are skipped, as ASAP dots are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patholite.errors import SlideError

SUFFIXES = (".geojson", ".json")  # what a GeoJSON annotation file is called
ANNOTATION = "annotation"
DETECTION = "detection"
# QuPath 0.2's type ids, from the feature's "id"
_LEGACY_TYPES = {
    "PathAnnotationObject": ANNOTATION,
    "PathDetectionObject": DETECTION,
    "PathTileObject": "tile",
    "PathCellObject": "cell",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_AREA_TYPES = ("Polygon", "MultiPolygon")
_MARK_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")


@dataclass
class GeoRegion:
    """One polygon of a feature: its exterior ring and holes, level-0 (x, y), rings without the repeated
    closing vertex."""

    name: str  # the feature's name, else "feature <i>" (and the part, for a MultiPolygon)
    classification: str | None  # QuPath's class name; a derived class is its names joined with ": "
    object_type: str  # annotation, detection, tile, cell, ...
    shell: np.ndarray  # (N, 2) float
    holes: list[np.ndarray] = field(default_factory=list)


def is_geojson(path: str | Path) -> bool:
    """True for a file whose name says GeoJSON (``.geojson``, ``.json``)."""
    return Path(path).suffix.lower() in SUFFIXES


def _load(path: Path) -> Any:
    if not path.is_file():
        raise SlideError(f"annotation file {path} does not exist; check the annotation folder and file name")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise SlideError(
            f"annotation file {path} is not readable JSON ({err}); export it again from QuPath "
            "(File > Export objects as GeoJSON)"
        ) from None


def _features(data: Any, path: Path) -> list[dict]:
    """The features of a FeatureCollection, a list of features, or a single Feature."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise SlideError(
            f"annotation file {path} holds a GeoJSON {kind!r}, not a FeatureCollection, a Feature or a list "
            "of features; export the objects from QuPath (File > Export objects as GeoJSON)"
        )
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise SlideError(f"annotation file {path}: 'features' must be a list of GeoJSON Feature objects")
    return features


def _class_name(properties: dict, path: Path, where: str) -> str | None:
    value = properties.get("classification")
    if value is None:
        return None
    if isinstance(value, str):  # some tools write the bare name
        return value.strip() or None
    if not isinstance(value, dict):
        raise SlideError(f"{path}: {where} has the classification {value!r}; expected {{'name': ...}}")
    names = value.get("names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return ": ".join(n.strip() for n in names)
    name = value.get("name")
    return (name.strip() or None) if isinstance(name, str) else None


def object_types(path: str | Path) -> set[str]:
    """The QuPath object types (lower case) of the features in a GeoJSON file, without reading geometries."""
    path = Path(path)
    return {object_type(f).lower() for f in _features(_load(path), path)}


def object_type(feature: dict) -> str:
    """The QuPath object type of a feature; one that names none is an annotation (as QuPath reads it)."""
    properties = feature.get("properties") or {}
    for key in ("objectType", "object_type", "type"):
        if isinstance(properties.get(key), str):
            return properties[key]
    return _LEGACY_TYPES.get(str(feature.get("id")), ANNOTATION)


def _ring(ring: Any, path: Path, where: str) -> np.ndarray:
    """One linear ring as (N, 2) float without the closing vertex; the checks say what is wrong."""
    if not isinstance(ring, list) or not all(isinstance(p, list) and len(p) >= 2 for p in ring):
        raise SlideError(f"{path}: {where} has a ring that is not a list of [x, y] positions; fix the file")
    try:
        points = np.array([[float(p[0]), float(p[1])] for p in ring], dtype=np.float64)
    except (TypeError, ValueError):
        raise SlideError(f"{path}: {where} has a coordinate that is not a number; fix the file") from None
    if not np.isfinite(points).all():
        raise SlideError(f"{path}: {where} has a non-finite coordinate; fix the file")
    if len(points) > 1 and (points[0] == points[-1]).all():
        points = points[:-1]  # GeoJSON repeats the first position last
    if len(np.unique(points, axis=0)) < 3:
        raise SlideError(
            f"{path}: {where} has a ring of {len(points)} distinct point(s); a region needs at least 3. "
            "Redraw it in QuPath or delete it."
        )
    return points


def _polygons(geometry: Any, path: Path, where: str) -> list[list[np.ndarray]]:
    """Polygons (each [shell, *holes]) of a geometry; [] for marks without an area."""
    if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
        raise SlideError(f"{path}: {where} has no GeoJSON geometry (a dict with a 'type'); fix the file")
    kind, coords = geometry["type"], geometry.get("coordinates")
    if kind in _MARK_TYPES:
        return []
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise SlideError(f"{path}: {where} is a GeometryCollection without a 'geometries' list")
        return [p for part in parts for p in _polygons(part, path, where)]
    if kind not in _AREA_TYPES:
        raise SlideError(
            f"{path}: {where} has the geometry type {kind!r}; areas are Polygon or MultiPolygon "
            "(points and lines are skipped). Fix the file or export it again from QuPath."
        )
    polygons = [coords] if kind == "Polygon" else coords
    if not isinstance(polygons, list) or not all(isinstance(p, list) and p for p in polygons):
        raise SlideError(f"{path}: {where} has a {kind} without rings; fix the file")
    return [[_ring(r, path, where) for r in rings] for rings in polygons]


def read_geojson(path: str | Path) -> list[GeoRegion]:
    """Every polygon of a GeoJSON file (QuPath's export, see the module docstring), in file order.

    Raises SlideError naming the file when it is not GeoJSON, when a geometry is malformed, or when it holds
    no polygon at all."""
    path = Path(path)
    out: list[GeoRegion] = []
    skipped = 0
    for i, feature in enumerate(_features(_load(path), path)):
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise SlideError(f"{path}: feature {i} has 'properties' that are not an object; fix the file")
        name = properties.get("name") if isinstance(properties.get("name"), str) else None
        label = name or f"feature {i}"
        where = f"feature {i} ({label!r})"
        parts = _polygons(feature.get("geometry"), path, where)
        skipped += not parts
        kind, class_name = object_type(feature), _class_name(properties, path, where)
        for j, (shell, *holes) in enumerate(parts):
            part = label if len(parts) == 1 else f"{label} part {j + 1}"
            out.append(GeoRegion(part, class_name, kind, shell, list(holes)))
    if not out:
        raise SlideError(
            f"annotation file {path} holds no Polygon or MultiPolygon ({skipped} point or line feature(s) "
            "skipped); draw the regions as areas in QuPath and export them as GeoJSON"
        )
    return out


# ---------------------------------------------------------------------------------------------- writing
def _number(value: float) -> float | int:
    """Integers stay integers (tile corners), others keep 1/100 px."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 2)


def ring_coordinates(points: np.ndarray) -> list[list[float | int]]:
    """A ring as GeoJSON positions, closed (the first position repeated last)."""
    pts = [[_number(x), _number(y)] for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2)]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def classification(name: str, rgb) -> dict[str, Any]:
    """QuPath's classification object: the class name and its colour as [r, g, b]."""
    return {"name": name, "color": [int(v) for v in rgb]}


def feature(
    geometry: dict[str, Any],
    object_type: str,
    class_name: str | None = None,
    rgb=None,
    name: str | None = None,
    measurements: dict[str, float] | None = None,
    feature_id: str | None = None,
    locked: bool = False,
) -> dict[str, Any]:
    """One QuPath feature (properties in QuPath 0.4+'s shape: measurements as a map, isLocked only when
    set). Non-finite measurements are left out: JSON has no NaN."""
    properties: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if class_name is not None:
        properties["classification"] = classification(class_name, rgb if rgb is not None else (128, 128, 128))
    if locked:
        properties["isLocked"] = True
    if measurements:
        properties["measurements"] = {k: float(v) for k, v in measurements.items() if math.isfinite(v)}
    out: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        out["id"] = feature_id
    out["geometry"] = geometry
    out["properties"] = properties
    return out


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    """The FeatureCollection QuPath imports by drag and drop (File > Import objects from file)."""
    return {"type": "FeatureCollection", "features": features}
