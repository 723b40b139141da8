"""Whole-slide annotations: read ASAP and Aperio ImageScope XML and QuPath GeoJSON, write ASAP XML,
rasterize, label tiles.

Coordinates are level-0 pixels (x, y). Three formats are read: GeoJSON by the file name (``.geojson``,
``.json``), the two XML dialects auto-detected from the root element:

- ASAP (CAMELYON16): ``<ASAP_Annotations>``; the class is the annotation's ``PartOfGroup``. In CAMELYON16 the
  groups ``_0`` and ``_1`` are tumour and ``_2`` is an exclusion region; groups named "Exclusion" are too.
- Aperio ImageScope (BACH WSI): ``<Annotations>``; the class is the Region ``Text`` (else the Annotation's
  ``Name``), and ``NegativeROA="1"`` marks an exclusion region. Rectangles and ellipses become polygons.
- QuPath GeoJSON (``wsi/geojson.py``): annotation objects' Polygons and MultiPolygons, holes kept; the class
  is the classification name; QuPath's "Ignore*" class (and "Exclusion") marks exclusion regions. Detections
  (cells, tiles) are not annotations and are skipped; an annotation without a class is an error.

Point marks carry no area and are skipped: ASAP Dot / PointSet, ImageScope arrows and rulers. An ASAP spline
is taken as the polygon through its control points.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from patholite.errors import SlideError
from patholite.io import atomic_path
from patholite.wsi.geojson import ANNOTATION, is_geojson, object_types, read_geojson

log = logging.getLogger(__name__)

# ASAP group names that mean "punch this out of the labels" (compared case-insensitively).
ASAP_EXCLUSION_GROUPS = ("_2", "exclusion", "exclude", "excluded")
# QuPath classes that mean the same: its built-in "Ignore*" class, and the words above.
GEOJSON_EXCLUSION_CLASSES = ("ignore*", "ignore", "exclusion", "exclude", "excluded")

_GROUP_COLORS = ("#F4FA58", "#64FE2E", "#FF0000", "#0000FF", "#FF00FF", "#00FFFF", "#FFA500", "#808080")


def is_asap_exclusion_group(group: str) -> bool:
    """True for ASAP group names that mark exclusion regions (CAMELYON16 ``_2``, "Exclusion", ...)."""
    return group.strip().lower() in ASAP_EXCLUSION_GROUPS


@dataclass
class Annotation:
    """One annotated region: a closed polygon in level-0 pixel coordinates, with holes (GeoJSON has them;
    ASAP and ImageScope XML do not)."""

    name: str
    group: str  # class / group name as written in the file (ASAP PartOfGroup; ImageScope Region Text)
    polygon: np.ndarray  # (N, 2) float, level-0 x, y: the exterior
    exclude: bool = False  # an exclusion region: punched out of the labels
    holes: list[np.ndarray] = field(default_factory=list)  # (M, 2) rings inside the exterior, not annotated

    def __post_init__(self) -> None:
        self.polygon = np.asarray(self.polygon, dtype=np.float64).reshape(-1, 2)
        self.holes = [np.asarray(h, dtype=np.float64).reshape(-1, 2) for h in self.holes]


def write_asap_xml(path: str | Path, annotations: list[Annotation]) -> None:
    """Write ``annotations`` as ASAP XML (CAMELYON16 layout, with AnnotationGroups), atomically.

    ASAP has no per-annotation exclusion flag, so an exclusion annotation must be in a group that readers
    treat as one (``_2`` or ``Exclusion``, see ``ASAP_EXCLUSION_GROUPS``); anything else raises ValueError.
    ASAP polygons have no holes: an annotation with holes raises ValueError (split it into hole-free pieces
    first, as ``slides/qupath.py`` does).
    """
    for ann in annotations:
        if ann.holes:
            raise ValueError(
                f"annotation {ann.name!r} has {len(ann.holes)} hole(s), which ASAP XML cannot hold; "
                "split it into hole-free polygons first"
            )
        if ann.exclude and not is_asap_exclusion_group(ann.group):
            raise ValueError(
                f"annotation {ann.name!r} is an exclusion but its group {ann.group!r} would read back as a "
                f"class; put exclusions in one of the groups {ASAP_EXCLUSION_GROUPS}"
            )
    root = ET.Element("ASAP_Annotations")
    annotations_el = ET.SubElement(root, "Annotations")
    groups: list[str] = []
    for ann in annotations:
        if ann.group not in groups:
            groups.append(ann.group)
    for ann in annotations:
        color = _GROUP_COLORS[groups.index(ann.group) % len(_GROUP_COLORS)]
        attrs = {"Name": ann.name, "Type": "Polygon", "PartOfGroup": ann.group, "Color": color}
        el = ET.SubElement(annotations_el, "Annotation", attrs)
        coords = ET.SubElement(el, "Coordinates")
        for order, (x, y) in enumerate(np.asarray(ann.polygon, dtype=np.float64).reshape(-1, 2)):
            ET.SubElement(coords, "Coordinate", Order=str(order), X=repr(float(x)), Y=repr(float(y)))
    groups_el = ET.SubElement(root, "AnnotationGroups")
    for i, group in enumerate(groups):
        g = ET.SubElement(
            groups_el, "Group", Name=group, PartOfGroup="None", Color=_GROUP_COLORS[i % len(_GROUP_COLORS)]
        )
        ET.SubElement(g, "Attributes")
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------------- reading
CAMELYON16_CLASS_MAP: dict[str, str] = {
    "_0": "Tumor",
    "_1": "Tumor",
    "Tumor": "Tumor",
    "Tumour": "Tumor",
    "metastases": "Tumor",
}
BACH_CLASS_MAP: dict[str, str] = {
    "Normal": "Normal",
    "Benign": "Benign",
    "Carcinoma in situ": "InSitu",
    "In situ carcinoma": "InSitu",
    "In situ": "InSitu",
    "InSitu": "InSitu",
    "Invasive carcinoma": "Invasive",
    "Invasive": "Invasive",
}
# A class_map value that turns a group into exclusion regions (compared case-insensitively).
EXCLUSION = "Exclusion"

# ImageScope Region Type codes: areas become polygons; arrows and rulers mark, they delineate nothing.
_IMAGESCOPE_AREA_TYPES = {"0": "polygon", "1": "rectangle", "2": "ellipse"}
_IMAGESCOPE_MARK_TYPES = {"3": "arrow", "4": "ruler"}
# ASAP types: these enclose an area (a spline is taken as the polygon through its control points);
# Dot and PointSet annotations mark points and carry no area.
_ASAP_AREA_TYPES = {"polygon", "spline", "rectangle"}
_ASAP_POINT_TYPES = {"dot", "pointset"}
_ELLIPSE_VERTICES = 64


def _parse_number(text: str | None, path: Path, where: str) -> float:
    """A coordinate; some CAMELYON16 files write commas as decimal separators ("1234,5")."""
    if text is None:
        raise SlideError(f"{path}: {where} lacks a coordinate; fix or delete that annotation in the file")
    cleaned = text.strip().replace(",", ".") if "." not in text else text.strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise SlideError(
            f"{path}: {where} has the coordinate {text!r}, which is not a number; "
            "fix or delete that annotation"
        ) from None
    if not np.isfinite(value):
        raise SlideError(f"{path}: {where} has the non-finite coordinate {text!r}; fix or delete it")
    return value


def _points(elements, path: Path, where: str) -> list[tuple[float, float]]:
    return [
        (_parse_number(e.get("X"), path, where), _parse_number(e.get("Y"), path, where)) for e in elements
    ]


def _require_polygon(points: list[tuple[float, float]], path: Path, where: str) -> np.ndarray:
    if len(points) < 3:
        raise SlideError(
            f"{path}: {where} has {len(points)} point(s); a region needs at least 3. "
            "Redraw it as a polygon or delete it from the file."
        )
    return np.asarray(points, dtype=np.float64)


def _read_asap(root: ET.Element, path: Path) -> list[Annotation]:
    out = []
    for i, el in enumerate(root.iter("Annotation")):
        name = el.get("Name") or f"Annotation {i}"
        group = el.get("PartOfGroup") or "None"
        kind = (el.get("Type") or "Polygon").strip().lower()
        where = f"annotation {name!r} (group {group!r})"
        if kind in _ASAP_POINT_TYPES:
            continue
        if kind not in _ASAP_AREA_TYPES:
            raise SlideError(
                f"{path}: {where} has Type={el.get('Type')!r}; supported area types are Polygon, Spline and "
                "Rectangle (Dot and PointSet are skipped). Convert it to a polygon in ASAP."
            )
        coords = sorted(el.iter("Coordinate"), key=lambda c: _parse_number(c.get("Order", "0"), path, where))
        polygon = _require_polygon(_points(coords, path, where), path, where)
        out.append(Annotation(name, group, polygon, exclude=is_asap_exclusion_group(group)))
    return out


def _ellipse(points: np.ndarray) -> np.ndarray:
    """ImageScope stores an ellipse as two corners of its bounding box."""
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    t = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _imagescope_polygon(kind: str, points: list[tuple[float, float]], path: Path, where: str) -> np.ndarray:
    if kind in ("rectangle", "ellipse") and len(points) >= 2:
        arr = np.asarray(points, dtype=np.float64)
        if kind == "ellipse":
            return _ellipse(arr)
        if len(points) == 2:  # two corners: expand to the four of the box
            (x0, y0), (x1, y1) = arr.min(axis=0), arr.max(axis=0)
            return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return _require_polygon(points, path, where)


def _read_imagescope(root: ET.Element, path: Path) -> list[Annotation]:
    out = []
    for a_index, ann_el in enumerate(root.iter("Annotation")):
        ann_name = (ann_el.get("Name") or "").strip()
        ann_id = ann_el.get("Id") or str(a_index + 1)
        for r_index, region in enumerate(ann_el.iter("Region")):
            region_id = region.get("Id") or str(r_index + 1)
            text = (region.get("Text") or "").strip()
            name = f"annotation {ann_id} region {region_id}"
            code = (region.get("Type") or "0").strip()
            exclude = (region.get("NegativeROA") or "0").strip() == "1"
            # The class is the region's text (BACH), else the annotation layer's name.
            group = text or ann_name or (EXCLUSION if exclude else "")
            where = f"{name} (text {group!r})"
            if code in _IMAGESCOPE_MARK_TYPES:
                continue
            if code not in _IMAGESCOPE_AREA_TYPES:
                raise SlideError(
                    f"{path}: {where} has Type={code!r}; supported region types are 0 (polygon), "
                    "1 (rectangle) and 2 (ellipse). Redraw it as a polygon in ImageScope."
                )
            if not group:
                raise SlideError(
                    f"{path}: {where} has no class: neither the region's Text nor the annotation's Name "
                    "is set. Type the class into the region's text in ImageScope."
                )
            points = _points(region.iter("Vertex"), path, where)
            polygon = _imagescope_polygon(_IMAGESCOPE_AREA_TYPES[code], points, path, where)
            out.append(Annotation(name, group, polygon, exclude=exclude))
    return out


def _read_geojson(path: Path) -> list[Annotation]:
    """QuPath's annotation objects as Annotations (see the module docstring)."""
    regions = read_geojson(path)
    kept = [r for r in regions if r.object_type.lower() == ANNOTATION]
    if not kept:
        kinds = sorted({r.object_type for r in regions})
        raise SlideError(
            f"annotation file {path} holds no annotation objects, only {kinds}; in QuPath, export the "
            "annotations (File > Export objects as GeoJSON, or "
            "exportObjectsToGeoJson(getAnnotationObjects(), path, 'FEATURE_COLLECTION'))"
        )
    unclassified = [r.name for r in kept if not r.classification]
    if unclassified:
        raise SlideError(
            f"annotation file {path}: {len(unclassified)} annotation(s) have no classification, e.g. "
            f"{unclassified[:5]}; the class is what a region means. Set a class on each in QuPath (or "
            "'Ignore*' for regions to leave out) and export again, or delete them"
        )
    return [
        Annotation(
            r.name,
            r.classification,
            r.shell,
            exclude=r.classification.strip().lower() in GEOJSON_EXCLUSION_CLASSES,
            holes=r.holes,
        )
        for r in kept
    ]


ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")  # what an annotation file beside a slide is called


def _looks_like_geojson(path: Path) -> bool:
    """A ``.json`` beside a slide may be anything (the synthetic slides' metadata is one): GeoJSON names its
    features near the start."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return '"Feature' in f.read(65536)
    except OSError:
        return False


def _only_detections(path: Path) -> bool:
    """A GeoJSON file of QuPath objects with no annotation among them (a cell or tile detection export,
    which QuPath names after the image as it names annotation exports)."""
    try:
        return ANNOTATION not in object_types(path)
    except SlideError:
        return False  # malformed: reading it as the annotations names what is wrong


def find_annotation(folder: str | Path, stem: str) -> Path | None:
    """The annotation file ``<stem>.xml``, ``<stem>.geojson`` or ``<stem>.json`` (a GeoJSON one) in
    ``folder``: the first of these that exists, or None. A GeoJSON file holding detections only is passed
    over with a warning."""
    for suffix in ANNOTATION_SUFFIXES:
        candidate = Path(folder) / f"{stem}{suffix}"
        if not candidate.is_file() or (suffix == ".json" and not _looks_like_geojson(candidate)):
            continue
        if suffix != ".xml" and _only_detections(candidate):
            log.warning("%s holds QuPath detections only, no annotations: not read as annotations", candidate)
            continue
        return candidate
    return None


def _parse_xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise SlideError(f"annotation file {path} does not exist; check the annotation folder and file name")
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, UnicodeDecodeError, OSError) as err:
        raise SlideError(
            f"annotation file {path} is not readable XML ({err}); re-export it from ASAP or ImageScope"
        ) from None


def _apply_class_map(annotations: list[Annotation], class_map: dict[str, str], path: Path) -> None:
    lookup = {key.strip().lower(): value for key, value in class_map.items()}
    unknown = set()
    for ann in annotations:
        if ann.exclude:
            continue
        value = lookup.get(ann.group.strip().lower())
        if value is None:
            unknown.add(ann.group)
        elif value.strip().lower() == EXCLUSION.lower():
            ann.exclude = True
        else:
            ann.group = value
    if unknown:
        found = sorted({a.group for a in annotations if not a.exclude} | unknown)
        raise SlideError(
            f"{path}: annotation group(s) {sorted(unknown)} are not in the class map "
            f"(keys {sorted(class_map)}). Groups in this file: {found}. "
            "Add each to the class map as '<group>: <class>' "
            f"(or '<group>: {EXCLUSION}' for regions to ignore)."
        )


def read_annotations(path: str | Path, class_map: dict[str, str] | None = None) -> list[Annotation]:
    """Read a QuPath GeoJSON (``.geojson``, ``.json``), ASAP or Aperio ImageScope annotation file (the XML
    dialect detected from the root element).

    With ``class_map`` (file group -> class name, keys matched case-insensitively), each region's ``group``
    is replaced by its class; a group mapped to ``EXCLUSION`` becomes an exclusion region, and a group missing
    from the map raises SlideError. Exclusion regions keep their file group. Without it, groups stay as
    written.
    """
    path = Path(path)
    if is_geojson(path):
        annotations = _read_geojson(path)
        if class_map is not None:
            _apply_class_map(annotations, class_map, path)
        return annotations
    root = _parse_xml(path)
    if root.tag == "ASAP_Annotations":
        annotations = _read_asap(root, path)
    elif root.tag == "Annotations" and (root.find("Annotation") is not None or len(root) == 0):
        annotations = _read_imagescope(root, path)
    else:
        raise SlideError(
            f"annotation file {path} has the root element <{root.tag}>, which is neither ASAP "
            "(<ASAP_Annotations>) nor Aperio ImageScope (<Annotations><Annotation>); "
            "export it in one of those"
        )
    if class_map is not None:
        _apply_class_map(annotations, class_map, path)
    return annotations


def check_fits(
    annotations: list[Annotation], dimensions: tuple[int, int], path: str | Path, tolerance: float = 0.01
) -> None:
    """Raise SlideError when any polygon reaches beyond the slide's level-0 ``dimensions`` (w, h).

    ``tolerance`` is the allowed overshoot as a fraction of each side (at least 2 px), since drawing tools let
    vertices stray a little past the edge.
    """
    w, h = dimensions
    tol = np.array([max(2.0, tolerance * w), max(2.0, tolerance * h)])
    size = np.array([w, h], dtype=np.float64)
    bad = [
        a.name
        for a in annotations
        if a.polygon.size and ((a.polygon.min(0) < -tol).any() or (a.polygon.max(0) > size + tol).any())
    ]
    if bad:
        first = next(a for a in annotations if a.name == bad[0])
        lo, hi = first.polygon.min(axis=0), first.polygon.max(axis=0)
        raise SlideError(
            f"{path}: {len(bad)} annotation(s) fall outside the {w}x{h} slide, e.g. {bad[0]!r} spans x "
            f"{lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} (first: {bad[:5]}). Check that the file "
            "belongs to this slide and that its coordinates are level-0 pixels."
        )


# ---------------------------------------------------------------------------------------------- rasterizing
UNLABELLED = 255
_SHIFT = 8  # cv2.fillPoly fractional bits: vertices keep 1/256-pixel precision at the map's scale


def _to_map_points(polygon: np.ndarray, downsample: float) -> np.ndarray:
    # Map pixel j covers level-0 [j*ds, (j+1)*ds), so its centre sits at (j + 0.5) * ds.
    scaled = polygon / downsample - 0.5
    return np.round(scaled * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _fill(mask: np.ndarray, annotations: list[Annotation], downsample: float, value: int) -> None:
    """Paint the union of the annotations (each its exterior minus its holes) with ``value``.

    One fillPoly call per exterior: given several polygons at once, fillPoly leaves their overlaps unfilled
    (an even-odd rule), which would punch holes where two regions of a class overlap."""
    h, w = mask.shape
    for ann in annotations:
        shell = _to_map_points(ann.polygon, downsample)
        if not ann.holes:
            cv2.fillPoly(mask, [shell], value, lineType=cv2.LINE_8, shift=_SHIFT)
            continue
        # exterior minus holes on a patch of the exterior's box, then copied where set: the holes show what
        # lies under the region, not a value of their own
        lo = np.maximum((shell.min(axis=(0, 1)) >> _SHIFT) - 1, 0)
        hi = np.minimum((shell.max(axis=(0, 1)) >> _SHIFT) + 2, (w, h))
        if (hi <= lo).any():
            continue
        offset = (lo << _SHIFT).astype(np.int32)
        patch = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), np.uint8)
        cv2.fillPoly(patch, [shell - offset], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        holes = [_to_map_points(hole, downsample) - offset for hole in ann.holes]
        cv2.fillPoly(patch, holes, 0, lineType=cv2.LINE_8, shift=_SHIFT)
        mask[lo[1] : hi[1], lo[0] : hi[0]][patch.astype(bool)] = value


def rasterize(
    annotations: list[Annotation],
    class_names: list[str],
    dimensions: tuple[int, int],
    downsample: float,
    background: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the annotations into a label map at ``downsample`` (level-0 px per map px).

    Returns ``(labels, excluded)``, both shaped (ceil(h / ds), ceil(w / ds)): ``labels`` (uint8) holds the
    index of each pixel's class in ``class_names``; pixels no region covers get ``background`` (a class index,
    e.g. 0 for "Normal"), or 255 (``UNLABELLED``) when ``background`` is None. Rules:

    - Overlap: classes are painted in ``class_names`` order, so where regions overlap the class with the
      higher index wins; list classes from least to most severe (e.g. Normal, Benign, InSitu, Invasive).
    - Exclusion regions are a separate mask and punch holes: there ``labels`` is the background value and
      ``excluded`` is True.
    - A region's holes are not part of it: they show what other regions (or the background) put there.
      Overlapping regions of one class are their union.
    - Pixels follow cv2.fillPoly's rule: every map pixel that a polygon reaches into is filled, boundary
      included, so regions over-cover by up to half a pixel per edge (an 80 px level-0 square spans 21x21
      pixels at downsample 4). Pick a downsample well below the tile side. Holes are erased by the same
      rule, so they over-cover by as much.

    A non-exclusion annotation whose group is not in ``class_names`` raises SlideError (map groups to classes
    with ``read_annotations(..., class_map=...)``).
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    if len(class_names) >= UNLABELLED:
        raise ValueError(f"at most {UNLABELLED - 1} classes fit a uint8 label map, got {len(class_names)}")
    if background is not None and not 0 <= background < len(class_names):
        raise ValueError(f"background must index class_names {class_names} or be None, got {background}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({a.group for a in annotations if not a.exclude and a.group not in index})
    if unknown:
        raise SlideError(
            f"annotation classes {unknown} are not among the class names {class_names}; "
            "map the file's groups to these classes with a class_map, or add the classes"
        )
    w, h = dimensions
    shape = (int(np.ceil(h / downsample)), int(np.ceil(w / downsample)))
    fill = UNLABELLED if background is None else background
    labels = np.full(shape, fill, dtype=np.uint8)
    for i, name in enumerate(class_names):  # later classes overwrite earlier ones
        _fill(labels, [a for a in annotations if not a.exclude and a.group == name], downsample, i)
    excluded = np.zeros(shape, dtype=np.uint8)
    _fill(excluded, [a for a in annotations if a.exclude], downsample, 1)
    excluded = excluded.astype(bool)
    labels[excluded] = fill
    return labels, excluded


def _box_sums(integral: np.ndarray, y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray):
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def tile_labels(
    label_map: np.ndarray,
    excluded: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    size0: float,
    min_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Label tiles from a label map: ``(labels int64, fraction float)``, one per row of ``coords``.

    A tile's footprint is the map pixels whose centres fall inside its level-0 square ``coords[i]`` (top-left)
    to ``coords[i] + size0`` (at least one pixel; clipped to the map). Its label is the majority class among
    its non-excluded pixels; ``fraction`` is that class's share of the non-excluded pixels (unlabelled
    pixels, 255, count in the denominator but never win). The label is -1 when the excluded share exceeds
    ``1 - min_fraction``, when the majority share is below ``min_fraction``, or when the footprint lies
    outside the map. Ties go to the higher class index, as overlaps do in ``rasterize``.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if label_map.shape != excluded.shape:
        raise ValueError(f"label_map {label_map.shape} and excluded {excluded.shape} differ in shape")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    h, w = label_map.shape
    lo = np.ceil(coords / downsample - 0.5).astype(np.int64)
    hi = np.maximum(np.ceil((coords + size0) / downsample - 0.5).astype(np.int64), lo + 1)
    x0, x1 = np.clip(lo[:, 0], 0, w), np.clip(hi[:, 0], 0, w)
    y0, y1 = np.clip(lo[:, 1], 0, h), np.clip(hi[:, 1], 0, h)
    area = (x1 - x0) * (y1 - y0)
    n_excluded = _box_sums(cv2.integral(excluded.astype(np.uint8), sdepth=cv2.CV_32S), y0, x0, y1, x1)
    kept = area - n_excluded
    best = np.full(len(coords), -1, dtype=np.int64)
    best_count = np.zeros(len(coords), dtype=np.int64)
    present = np.flatnonzero(np.bincount(label_map.ravel(), minlength=256)[:UNLABELLED])
    for k in present:  # one integral image at a time keeps memory to one int32 map
        mask = (label_map == k) & ~excluded
        counts = _box_sums(cv2.integral(mask.view(np.uint8), sdepth=cv2.CV_32S), y0, x0, y1, x1)
        better = counts >= best_count  # classes rise in index, so ">=" hands ties to the higher one
        better &= counts > 0
        best[better], best_count[better] = k, counts[better]
    fraction = np.divide(best_count, kept, out=np.zeros(len(coords)), where=kept > 0)
    too_excluded = n_excluded > (1.0 - min_fraction) * area
    labels = np.where((area == 0) | too_excluded | (fraction < min_fraction), -1, best)
    return labels.astype(np.int64), fraction
