"""Per-slide outputs of the whole-slide engine (heatmap, overlay, report page, JSON) and the slides summary.

The engine runs inference and hands a :class:`SlideResult` here; nothing in this module reads a slide.
Colours are fixed per class *index* (matplotlib's tab10, then tab20's light shades for classes 10-19,
cycling after 20), so class k has the same colour on every slide of one artifact.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from patholite.errors import ConfigError
from patholite.io import atomic_path, write_json

UNLABELLED = 255  # annotation-map value of pixels no annotation covers
OVERLAY_ALPHA = 0.5  # weight of the class colour over the thumbnail in overlay.png
# summary columns of rows that have them (SMT: reads; features: embed_dim)
OPTIONAL_COLUMNS = ("reads", "pixels_read", "embed_dim")
# a manifest's columns, after the slide's, in rows that have them
MANIFEST_COLUMNS = ("label", "group")
FILES = {"heatmap": "heatmap.png", "overlay": "overlay.png", "report": "report.png", "json": "report.json"}


@dataclass
class SlideResult:
    """What the engine knows about one slide after inference. Coordinates are level-0 pixels."""

    slide: str  # slide path
    class_names: list[str]
    coords: np.ndarray  # (N, 2) int: level-0 (x, y) top-left of each tissue tile
    size0: int  # level-0 side of one tile
    probs: np.ndarray  # (N, C) softmax probabilities
    thumbnail: np.ndarray  # H x W x 3 uint8 image of the whole slide
    thumb_downsample: float  # level-0 px per thumbnail px
    tissue_fraction: np.ndarray | None = None  # (N,) share of each tile that is tissue
    tissue_mask: np.ndarray | None = None  # bool mask at mask_downsample
    mask_downsample: float | None = None
    annotation_map: np.ndarray | None = None  # uint8 class index per pixel, 255 = unlabelled
    annotation_downsample: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage seconds; "total" feeds seconds, tiles/s
    dimensions: tuple[int, int] | None = None  # the slide's level-0 (width, height): bounds of the outlines
    extra: dict[str, Any] = field(default_factory=dict)  # copied into report.json as is


@dataclass
class CallRule:
    """The slide-level call: the most severe class whose tissue share is at least ``min_share``."""

    severity: list[str] | None = None  # every class once, least to most severe; None: class order
    min_share: float = 0.05


def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colour of class index 0..n-1 (tab10, then tab20's light shades, then repeating)."""
    tab20 = matplotlib.colormaps["tab20"].colors
    palette = list(matplotlib.colormaps["tab10"].colors) + [tab20[i] for i in range(1, 20, 2)]
    rgb = np.array([palette[i % len(palette)] for i in range(n)], np.float64).reshape(n, 3)
    return np.rint(rgb * 255).astype(np.uint8)


def _hex(rgb: np.ndarray) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def validate_result(result: SlideResult) -> None:
    """Raise ValueError when the engine handed inconsistent arrays (a bug, not a user mistake)."""
    names, n = list(result.class_names), len(result.probs)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be non-empty and unique, got {names}")
    if result.probs.ndim != 2 or result.probs.shape[1] != len(names):
        raise ValueError(f"probs shape {result.probs.shape} does not match {len(names)} class names {names}")
    if not np.isfinite(result.probs).all():
        raise ValueError("probs hold NaN or infinite values")
    if result.coords.shape != (n, 2):
        raise ValueError(f"coords shape {result.coords.shape} does not match {n} tiles: expected ({n}, 2)")
    if result.size0 <= 0 or result.thumb_downsample <= 0:
        raise ValueError(f"size0 {result.size0} and thumb_downsample {result.thumb_downsample} must be > 0")
    tf = result.tissue_fraction
    if tf is not None and (tf.shape != (n,) or (tf < 0).any() or (tf > 1).any()):
        raise ValueError(f"tissue_fraction must be ({n},) values in [0, 1], got shape {tf.shape}")
    thumb = result.thumbnail
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8 or min(thumb.shape[:2]) < 1:
        raise ValueError(f"thumbnail must be a non-empty HxWx3 uint8 image, got {thumb.shape} {thumb.dtype}")
    for image, ds, what in (
        (result.tissue_mask, result.mask_downsample, "tissue_mask"),
        (result.annotation_map, result.annotation_downsample, "annotation_map"),
    ):
        if (image is None) != (ds is None) or (image is not None and (image.ndim != 2 or ds <= 0)):
            raise ValueError(f"{what} must be a 2-D array given together with a downsample > 0")
    amap = result.annotation_map
    if amap is not None and ((amap >= len(names)) & (amap != UNLABELLED)).any():
        raise ValueError(f"annotation_map holds values other than 0..{len(names) - 1} and {UNLABELLED}")


def check_rule(rule: CallRule, class_names: Sequence[str]) -> list[str]:
    """The severity order (least to most severe) the rule means for these classes; ConfigError if impossible.

    The engine can call this as soon as the artifact is loaded, before any slide is read.
    """
    names = list(class_names)
    if not 0 < rule.min_share <= 1:
        raise ConfigError(
            f"call rule min_share={rule.min_share} must be in (0, 1], e.g. 0.05 for 5% of tissue"
        )
    if rule.severity is None:
        return names
    order = list(rule.severity)
    unknown = [c for c in order if c not in names]
    if unknown:
        raise ConfigError(
            f"call rule severity names {unknown}, which the artifact does not have; its classes are {names}"
        )
    missing = [c for c in names if c not in order]
    if missing or len(order) != len(names):
        raise ConfigError(
            f"call rule severity must list each of the artifact's classes {names} exactly once, "
            f"least to most severe; got {order}"
        )
    return order


def class_heatmap(result: SlideResult, downsample: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class probability maps (C, H, W) float32 and the argmax map (H, W) int16, -1 where no tile.

    The maps cover the thumbnail's extent at ``downsample`` level-0 px per pixel (default: the thumbnail's,
    giving exactly its size). Each tile paints its footprint; where tiles overlap, their probabilities are
    averaged. Footprint edges are rounded to the nearest pixel so that abutting tiles neither overlap nor
    leave gaps; a tile smaller than a pixel still paints one.
    """
    validate_result(result)
    h_t, w_t = result.thumbnail.shape[:2]
    ds = float(downsample or result.thumb_downsample)
    if ds <= 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    scale = result.thumb_downsample / ds
    h, w = max(1, round(h_t * scale)), max(1, round(w_t * scale))
    n_classes = result.probs.shape[1]
    probs = np.zeros((n_classes, h, w), np.float32)
    if len(result.coords) == 0:
        return probs, np.full((h, w), -1, np.int16)
    xy = np.asarray(result.coords, np.float64)
    lo = np.rint(xy / ds).astype(np.int64)
    hi = np.maximum(lo + 1, np.rint((xy + result.size0) / ds).astype(np.int64))
    if (lo[:, 0] >= w).any() or (lo[:, 1] >= h).any() or (hi <= 0).any():
        raise ValueError(f"tile coordinates fall outside the thumbnail's extent ({w_t}x{h_t} at {ds:g})")
    x0, y0 = np.clip(lo[:, 0], 0, w), np.clip(lo[:, 1], 0, h)
    x1, y1 = np.clip(hi[:, 0], 0, w), np.clip(hi[:, 1], 0, h)

    def paint(values: np.ndarray) -> np.ndarray:
        # Summed-area trick: +v at two corners, -v at the other two, then 2-D cumulative sums.
        diff = np.zeros((h + 1, w + 1), values.dtype)
        for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
            np.add.at(diff, (ys, xs), sign * values)
        return diff.cumsum(0).cumsum(1)[:h, :w]

    counts = paint(np.ones(len(x0), np.int64))
    covered = counts > 0
    for k in range(n_classes):
        total = paint(result.probs[:, k].astype(np.float64))
        probs[k][covered] = total[covered] / counts[covered]
    argmax = np.where(covered, probs.argmax(0), -1).astype(np.int16)
    return probs, argmax


def area_fractions(result: SlideResult) -> dict[str, float]:
    """Share of the tissue predicted as each class, in class order; all 0.0 when there are no tiles.

    Each tile counts as its tissue_fraction (1 when absent) towards its argmax class; overlapping tiles
    are counted as separate samples of the tissue.
    """
    validate_result(result)
    tf = result.tissue_fraction
    weights = np.ones(len(result.probs)) if tf is None else np.asarray(tf, np.float64)
    pred = result.probs.argmax(1) if len(result.probs) else np.zeros(0, int)
    per_class = np.bincount(pred, weights=weights, minlength=len(result.class_names))
    total = per_class.sum()
    shares = per_class / total if total > 0 else np.zeros_like(per_class)
    return {name: float(s) for name, s in zip(result.class_names, shares, strict=True)}


def slide_call(
    fractions: Mapping[str, float], probs: np.ndarray, rule: CallRule | None = None
) -> dict[str, Any]:
    """The slide call from class shares (keys in the order of ``probs``' columns) and tile probabilities.

    label: the most severe class with share >= min_share; if none reaches it, the class with the largest
    share (``by`` says which). confidence: the mean predicted probability of the called class over the tiles
    predicted as it. With no tissue at all, label and confidence are None.
    """
    rule = rule or CallRule()
    names = list(fractions)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probs shape {probs.shape} does not match {len(names)} classes {names}")
    order = check_rule(rule, names)
    text = f"most severe class with >= {rule.min_share:.0%} of tissue; severity: {' < '.join(order)}"
    call: dict[str, Any] = {"label": None, "confidence": None, "share": 0.0, "by": "no tissue", "rule": text}
    if not any(v > 0 for v in fractions.values()):
        return call
    reaching = [c for c in order if fractions[c] >= rule.min_share]
    label = reaching[-1] if reaching else max(names, key=lambda c: fractions[c])
    k = names.index(label)
    # A positive share implies tiles predicted as the class, so the mean below is over at least one tile.
    confidence = float(probs[probs.argmax(1) == k, k].mean())
    by = "severity" if reaching else "largest share (no class reached min_share)"
    call.update(label=label, confidence=confidence, share=float(fractions[label]), by=by)
    return call


def colorize(labels: np.ndarray, n_classes: int, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """RGB image of a class-index map; pixels outside 0..n_classes-1 (-1, 255) get ``background``."""
    lut = np.tile(np.asarray(background, np.uint8), (256, 1))
    lut[:n_classes] = class_colors(n_classes)
    return lut[np.asarray(labels).astype(np.int64) % 256]  # -1 -> 255: background


def overlay(
    thumbnail: np.ndarray, argmax: np.ndarray, n_classes: int, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """The thumbnail with class colours blended where tiles were predicted; elsewhere the thumbnail as is."""
    colours = colorize(argmax, n_classes).astype(np.float32)
    blended = (1 - alpha) * thumbnail.astype(np.float32) + alpha * colours
    return np.where((argmax >= 0)[..., None], np.rint(blended), thumbnail).astype(np.uint8)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def _plain(value: Any) -> Any:
    """JSON form of numpy scalars and arrays (what the engine's timings and extra may hold); else str."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


def write_slide_outputs(
    result: SlideResult,
    out_dir: str | Path,
    rule: CallRule | None = None,
    more_files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write heatmap.png, overlay.png, report.png and report.json into ``out_dir``; return the report dict.

    ``more_files`` (key -> file name) are outputs written beside them already (the QuPath and ASAP files),
    listed in the report's ``files``."""
    rule = rule or CallRule()
    validate_result(result)
    check_rule(rule, result.class_names)
    out_dir = Path(out_dir)
    n_classes = len(result.class_names)
    _, argmax = class_heatmap(result)
    fractions = area_fractions(result)
    call = slide_call(fractions, result.probs, rule)
    total, n_tiles, (height, width) = result.timings.get("total"), len(result.probs), argmax.shape
    report = {
        "slide": str(result.slide),
        "status": "ok",
        "call": call,
        "fractions": fractions,
        "class_names": list(result.class_names),
        "colors": {c: _hex(rgb) for c, rgb in zip(result.class_names, class_colors(n_classes), strict=True)},
        "n_tiles": n_tiles,
        "tile_size0": int(result.size0),
        "tissue_weighted": result.tissue_fraction is not None,
        "thumbnail": {"width": width, "height": height, "downsample": result.thumb_downsample},
        "seconds": total,
        "tiles_per_s": n_tiles / total if total else None,
        "timings": dict(result.timings),
        "extra": dict(result.extra),
        "out_dir": str(out_dir),
        "files": {**{k: v for k, v in FILES.items() if k != "json"}, **dict(more_files or {})},
    }
    report = json.loads(json.dumps(report, default=_plain))  # what report.json will hold, exactly
    _write_png(out_dir / FILES["heatmap"], colorize(argmax, n_classes))
    _write_png(out_dir / FILES["overlay"], overlay(result.thumbnail, argmax, n_classes))
    save_figure(report_figure(result, argmax, fractions, call, rule), out_dir / FILES["report"])
    write_json(out_dir / FILES["json"], report)
    return report


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure (no pyplot: Agg) as PNG, atomically."""
    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def _layout(aspect: float, n_classes: int) -> tuple[tuple[float, float], int, int, list[float], list[float]]:
    """Figure size, grid shape and ratios: wide slides stack vertically, tall ones side by side."""
    bar_h = 0.35 * n_classes + 1.2
    if aspect > 1.6:  # wide: three image rows, then the bar chart
        row = min(4.0, max(0.8, 11 / aspect))
        return (12, 3 * row + bar_h + 1.5), 4, 1, [1.0], [row, row, row, bar_h]
    if aspect < 0.6:  # tall: three image columns (wide enough for their titles), then the bar chart
        col = min(4.0, max(1.8, 9 * aspect))
        return (3 * col + 4.5, 10), 1, 4, [col, col, col, 4.5], [1.0]
    return (11, 11), 2, 2, [1.0, 1.0], [1.0, 1.0]


def report_figure(
    result: SlideResult,
    argmax: np.ndarray,
    fractions: Mapping[str, float],
    call: Mapping[str, Any],
    rule: CallRule,
) -> Figure:
    """One page: thumbnail, annotations (else tissue mask), predicted classes, class shares; call as title."""
    h, w = result.thumbnail.shape[:2]
    names, n_classes = list(fractions), len(fractions)
    size, rows, cols, widths, heights = _layout(w / h, n_classes)
    fig = Figure(figsize=size, layout="constrained")
    grid = fig.add_gridspec(rows, cols, width_ratios=widths, height_ratios=heights)
    axes = [fig.add_subplot(grid[i // cols, i % cols]) for i in range(4)]
    # Every image is drawn in level-0 coordinates so the panels line up whatever their downsample.
    extent = (0, w * result.thumb_downsample, h * result.thumb_downsample, 0)
    panels = [("slide", result.thumbnail, result.thumb_downsample, None)]
    if result.annotation_map is not None:
        panels.append(
            ("annotations", colorize(result.annotation_map, n_classes), result.annotation_downsample, None)
        )
    elif result.tissue_mask is not None:
        panels.append(("tissue mask", result.tissue_mask.astype(np.uint8), result.mask_downsample, "gray"))
    else:
        panels.append(("no annotations or tissue mask", np.full((1, 1, 3), 255, np.uint8), None, None))
    panels.append(("predicted classes", colorize(argmax, n_classes), result.thumb_downsample, None))
    for ax, (title, image, ds, cmap) in zip(axes[:3], panels, strict=True):
        ih, iw = image.shape[:2]
        box = (0, iw * ds, ih * ds, 0) if ds else extent
        scale = {"cmap": cmap, "vmin": 0, "vmax": 1} if cmap else {}
        ax.imshow(image, extent=box, interpolation="nearest", **scale)
        ax.set(title=title, xlim=extent[:2], ylim=extent[2:], xticks=[], yticks=[])
    _bar_chart(axes[3], fractions, rule, call.get("label"))
    colours = class_colors(n_classes) / 255
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(n_classes, 4), fontsize=9)
    verdict = "no tissue tiles"
    if call["label"] is not None:
        verdict = f"{call['label']} ({call['share']:.0%} of tissue, confidence {call['confidence']:.2f})"
    fig.suptitle(f"{Path(result.slide).name}: {verdict}", fontsize=13)
    return fig


def _bar_chart(ax: Any, fractions: Mapping[str, float], rule: CallRule, label: str | None) -> None:
    names = list(fractions)
    shares = [100 * fractions[c] for c in names]
    ax.barh(range(len(names)), shares, color=class_colors(len(names)) / 255)
    ax.set_yticks(range(len(names)), names)
    for tick, name in zip(ax.get_yticklabels(), names, strict=True):
        tick.set_fontweight("bold" if name == label else "normal")
    ax.invert_yaxis()
    for i, s in enumerate(shares):
        ax.text(s + 1, i, f"{s:.1f}%", va="center", fontsize=9)
    ax.axvline(100 * rule.min_share, color="k", ls="--", lw=1, label=f"call threshold {rule.min_share:.0%}")
    ax.set(xlim=(0, max(shares + [10.0]) * 1.2), xlabel="share of tissue (%)", title="class distribution")
    ax.legend(loc="lower right", fontsize=8)


def failed_row(slide: str | Path, error: BaseException | str, seconds: float | None = None) -> dict[str, Any]:
    """A summary row for a slide that could not be processed."""
    message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return {"slide": str(slide), "status": "failed", "error": message, "seconds": seconds}


def summary_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per slide: report dicts (status ok) and failed_row dicts; frac_<class> for every class seen;
    a manifest's label and group when a row has them. Returns the columns and the rows (None where a row
    has no value).

    tiles_per_s is the row's own, else n_tiles / seconds.
    """
    classes: list[str] = []
    manifest = [c for c in MANIFEST_COLUMNS if any(row.get(c) is not None for row in rows)]
    for row in rows:
        classes += [c for c in row.get("fractions", {}) if c not in classes]
    table = []
    for row in rows:
        if row.get("status") not in ("ok", "failed"):
            raise ValueError(f"summary row for {row.get('slide')} needs status 'ok' or 'failed': {dict(row)}")
        call, fractions = row.get("call") or {}, row.get("fractions") or {}
        n_tiles, seconds, rate = row.get("n_tiles"), row.get("seconds"), row.get("tiles_per_s")
        if rate is None and n_tiles and seconds:  # a row whose seconds the engine measured itself
            rate = n_tiles / seconds
        table.append(
            {
                "slide": row.get("slide"),
                **{c: row.get(c) for c in manifest},
                "status": row["status"],
                "error": row.get("error", ""),
                "call": call.get("label"),
                "confidence": call.get("confidence"),
                "call_share": call.get("share"),
                **{f"frac_{c}": fractions.get(c) for c in classes},
                "n_tiles": n_tiles,
                "tiles_per_s": rate,
                "seconds": seconds,
            }
        )
    columns = ["slide", *manifest, "status", "error", "call", "confidence", "call_share"]
    columns += [f"frac_{c}" for c in classes] + ["n_tiles", "tiles_per_s", "seconds"]
    # focused slide models (SMT) read regions, not tiles: their columns appear when a row has them
    optional = [c for c in OPTIONAL_COLUMNS if any(row.get(c) is not None for row in rows)]
    for entry, row in zip(table, rows, strict=True):
        entry.update({c: row.get(c) for c in optional})
    for entry in table:
        for column in ["n_tiles", *optional]:  # integers, blank for failed slides
            entry[column] = None if entry[column] is None else int(entry[column])
    return columns + optional, table


def _md_cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column.startswith("frac_") or column == "call_share":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3f}" if column == "confidence" else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_summary(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Write summary.csv and summary.md (one row per slide, failed ones with their error); return the CSV."""
    out_dir = Path(out_dir)
    columns, table = summary_table(rows)
    csv_path = out_dir / "summary.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)  # None is written as an empty cell
        writer.writeheader()
        writer.writerows(table)
    failed = sum(1 for entry in table if entry["status"] == "failed")
    lines = [
        "# Slide summary",
        "",
        f"{len(table)} slides: {len(table) - failed} ok, {failed} failed.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for entry in table:
        lines.append("| " + " | ".join(_md_cell(c, entry[c]) for c in columns) + " |")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return csv_path
