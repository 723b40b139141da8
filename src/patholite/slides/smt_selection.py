"""The SMT benchmark's measurement side (issue 19): settings chosen on validation slides without peeking at
the test set, triage of uncertain slides to full tiling, lesion-size sensitivity in CAMELYON's categories,
and localisation (hit rate at the lesion, an FROC-style curve).

Protocol. ``validation_rows`` walks every validation slide once per K of the walk list and tiles it once;
``select`` turns those rows alone into a frozen ``Selection``: the walk (K, aggregation) with the best
validation AUROC, each method's threshold (the best balanced accuracy), and the triage band. Only then does
``select_then_test`` ask for the test rows, handing the selection over: nothing about the test slides can
reach a choice. Slides whose SMT score falls in the band ``[low, high]`` (around SMT's threshold) go to full
tiling; their composite score is tiling's, mapped monotonically into the band so that the composite called
at SMT's threshold is exactly tiling's call at its own threshold, and the composite's AUROC ranks confident
SMT negatives below every triaged slide and confident SMT positives above. The band chosen is the narrowest
(fewest validation slides triaged) whose validation AUROC comes within ``gap`` of full tiling's, at most
``max_share`` of the slides; if none does, the best AUROC within ``max_share``.

Localisation is measured against each lesion's polygon (the synthetic truth): SMT *sees* a lesion when a
last-layer region overlaps it, and *detects* it when such a region's positive probability reaches SMT's
threshold; tiling detects it when a tile at or above tiling's threshold overlaps it. A lesion's size is its
greatest diameter (the longest distance between two outline vertices), CAMELYON's measure, bucketed by
``data.synthetic.spec.SIZE_CATEGORIES``; a slide's category is that of its largest lesion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch

from patholite.data.synthetic.scene import build_scene
from patholite.data.synthetic.slides import Truth, generate_slides, read_truth
from patholite.data.synthetic.spec import SIZE_CATEGORIES, SlideSpec, lesions_of_size, size_category
from patholite.errors import ConfigError
from patholite.measure.stats import auroc, binary_quality, bootstrap, paired_bootstrap
from patholite.models.smt import aggregate_slides
from patholite.models.smt_aggregate import ATTENTION
from patholite.slides.comparison import pp_interval
from patholite.slides.comparison_runs import SlideCase, has_truth, tile_slide, walk_smt, warm_smt

log = logging.getLogger(__name__)

SIZE_SET_CLASSES = ("Invasive",)  # the lesion-size set's one lesion per slide: the two-mm ones fit one only
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per slide of the FROC score (CAMELYON16's)


# ------------------------------------------------------------------------------------------------ knobs
@dataclass(frozen=True)
class Knobs:
    """What the selection may choose from and how: the walks (``top_ks`` x ``aggregates``), the triage
    target (within ``gap`` of tiling's validation AUROC, at most ``max_share`` of the slides triaged), and
    the smallest validation set accepted (``min_val_slides``, half of them at least of each class)."""

    top_ks: tuple[int, ...]
    aggregates: tuple[str, ...] = ("mean", "max")
    gap: float = 0.03
    max_share: float = 0.5
    min_val_slides: int = 48

    def walks(self) -> list[tuple[int, str]]:
        return [(k, a) for k in self.top_ks for a in self.aggregates]


def check_knobs(knobs: Knobs, grid: int, aggregates_known: Sequence[str] = ("mean", "max")) -> Knobs:
    """``knobs`` checked before any slide is read: one error naming the knob and what to give."""
    if not knobs.top_ks:
        raise ConfigError("--top-k: give at least one K for the selection to choose from")
    for k in knobs.top_ks:
        if not 1 <= int(k) <= grid * grid:
            raise ConfigError(
                f"--top-k {k}: the SMT network's images have {grid}x{grid} patches; use 1..{grid**2}"
            )
    unknown = [a for a in knobs.aggregates if a not in aggregates_known]
    if not knobs.aggregates or unknown:
        raise ConfigError(f"--aggregate {list(knobs.aggregates)}: give some of {list(aggregates_known)}")
    if not 0.0 <= knobs.gap < 1.0:
        raise ConfigError(f"--triage-gap {knobs.gap}: an AUROC margin in [0, 1), e.g. 0.03 (3 pp)")
    if not 0.0 <= knobs.max_share <= 1.0:
        raise ConfigError(f"--triage-max-share {knobs.max_share}: a share of slides in [0, 1]")
    if knobs.min_val_slides < 2:
        raise ConfigError(f"--min-val-slides {knobs.min_val_slides}: at least 2 (one of each class)")
    return knobs


def check_validation_set(labels: Sequence[int], minimum: int) -> None:
    """Refuse a validation set too small to rank settings by: fewer than ``minimum`` slides, or fewer than
    ``minimum / 2`` of either class."""
    y = np.asarray(labels)
    n, pos = len(y), int((y == 1).sum())
    if n < minimum or min(pos, n - pos) < minimum / 2:
        raise ConfigError(
            f"the validation set has {n} slides ({pos} with lesions); selection needs at least {minimum}, "
            f"half of each class: draw a larger one, e.g. --val-set dataset.seed=2 "
            f"'dataset.slides_per_split=[2,{max(minimum, 2)},2]' (or lower --min-val-slides, and say so)"
        )


# ---------------------------------------------------------------------------------- validation rows
def aggregate_scores(
    last_probs: Sequence[Sequence[float]], aggregates: Sequence[str], negative: int
) -> dict[str, float]:
    """A walk's positive slide score, ``1 - p(negative)``, under each aggregation of its last layer."""
    probs = torch.as_tensor(np.asarray(last_probs, dtype=np.float64))
    owners = [0] * len(probs)
    return {a: 1.0 - float(aggregate_slides(probs, owners, 1, a, negative)[0][negative]) for a in aggregates}


def walk_name(k: int, aggregate: str) -> str:
    return f"K={k},{aggregate}"


def validation_rows(
    cases: Sequence[SlideCase], smt: tuple, tile: tuple, mpp: float | None, knobs: Knobs
) -> list[dict[str, Any]]:
    """Every validation slide walked once per K (each aggregation scored from the same walk) and tiled once:
    per slide its ``label``, ``smt`` (walk name: positive score), ``reads`` (per K) and ``tiling_max``."""
    net, meta = smt
    negative = meta["class_names"].index(meta.get("negative_class") or meta["class_names"][0])
    trained = meta["model"]["smt"].get("tissue_px") or 2048
    # with attention among the candidates the walk scores by the head (its slide score); mean and max come
    # from the same walk's last-layer probabilities
    how = ATTENTION if ATTENTION in knobs.aggregates else meta["model"]["smt"].get("aggregate", "mean")
    metas = {}
    for k in knobs.top_ks:
        metas[k] = {
            **meta,
            "model": {**meta["model"], "smt": {**meta["model"]["smt"], "top_k": k, "aggregate": how}},
        }
    for k in knobs.top_ks:
        warm_smt(net, metas[k])
    rows = []
    for case in cases:
        row: dict[str, Any] = {"slide": case.path.name, "label": case.label, "smt": {}, "reads": {}}
        for k in knobs.top_ks:
            walk = walk_smt(net, metas[k], case.path, mpp, tissue_side=trained)
            scores = aggregate_scores(
                walk["last_probs"], [a for a in knobs.aggregates if a != ATTENTION], negative
            )
            if ATTENTION in knobs.aggregates:
                scores[ATTENTION] = walk["positive"]
            row["smt"].update({walk_name(k, a): v for a, v in scores.items()})
            row["reads"][k] = walk["reads"]
        row["tiling_max"] = tile_slide(*tile, case.path, mpp)["max"]
        rows.append(row)
        log.info("validation %s: %s", case.path.name, row["smt"])
    return rows


# ------------------------------------------------------------------------------------------- choices
def fast_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC as ``measure.stats.auroc`` (ties count half), by ranks in numpy: the band search calls it
    thousands of times."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    below = np.searchsorted(np.sort(neg), pos, side="left")
    ties = np.searchsorted(np.sort(neg), pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def balanced_accuracy(scores: Sequence[float], labels: Sequence[int], threshold: float) -> float:
    return float(binary_quality(scores, labels, threshold)["balanced_accuracy"])


def choose_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold (called positive at or above) with the best balanced accuracy on these slides: the
    midpoints between neighbouring scores and the two ends are tried; among equals, the middle one."""
    u = np.unique(np.asarray(scores, np.float64))
    candidates = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])
    values = np.array([balanced_accuracy(scores, labels, t) for t in candidates])
    best = np.flatnonzero(values >= values.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


def composite_scores(
    smt: Sequence[float], tiling: Sequence[float], band: tuple[float, float] | None, smt_thr: float,
    tiling_thr: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Triage: (composite scores, triaged mask). Outside ``band`` a slide keeps SMT's score; inside, tiling's
    score mapped piecewise linearly onto the band, tiling's threshold onto SMT's, so the composite called at
    ``smt_thr`` is tiling's call at ``tiling_thr`` there (the band must hold ``low < smt_thr <= high``)."""
    s, t = np.asarray(smt, np.float64), np.asarray(tiling, np.float64)
    if band is None:
        return s.copy(), np.zeros(len(s), bool)
    low, high = band
    if not low < smt_thr <= high:
        raise ValueError(f"triage band {band} must hold SMT's threshold {smt_thr} (low < threshold <= high)")
    inside = (s >= low) & (s <= high)
    below = low + (smt_thr - low) * np.clip(t / max(tiling_thr, 1e-12), 0.0, 1.0)
    above = smt_thr + (high - smt_thr) * np.clip((t - tiling_thr) / max(1.0 - tiling_thr, 1e-12), 0.0, 1.0)
    mapped = np.where(t >= tiling_thr, above, below)
    return np.where(inside, mapped, s), inside


def choose_band(
    smt: Sequence[float], tiling: Sequence[float], labels: Sequence[int], smt_thr: float, tiling_thr: float,
    gap: float, max_share: float,
) -> tuple[tuple[float, float] | None, dict[str, Any]]:  # fmt: skip
    """The triage band from these (validation) slides, and what the search saw: the narrowest band (fewest
    slides triaged, then the best AUROC) whose composite AUROC is within ``gap`` of tiling's, triaging at
    most ``max_share``; else the band of the best AUROC within ``max_share``. None: no triage."""
    s, y = np.asarray(smt, np.float64), np.asarray(labels)
    target = fast_auroc(np.asarray(tiling), y) - gap
    lows = sorted({*s[s < smt_thr].tolist(), float(np.nextafter(smt_thr, -np.inf))})
    highs = sorted({*s[s >= smt_thr].tolist(), float(smt_thr)})
    options: list[tuple[tuple[float, float] | None, float, float]] = [(None, 0.0, fast_auroc(s, y))]
    for low in lows:
        for high in highs:
            scores, inside = composite_scores(s, tiling, (low, high), smt_thr, tiling_thr)
            options.append(((low, high), float(inside.mean()), fast_auroc(scores, y)))
    allowed = [o for o in options if o[1] <= max_share + 1e-12]
    reaching = [o for o in allowed if o[2] >= target - 1e-12]
    if reaching:
        band, share, value = min(reaching, key=lambda o: (o[1], -o[2]))
        how = f"the fewest slides triaged with AUROC >= tiling's - {gap:g}"
    else:
        band, share, value = max(allowed, key=lambda o: (o[2], -o[1]))
        how = f"no band within {max_share:g} of the slides reaches tiling's AUROC - {gap:g}: the best AUROC"
    return band, {"val_share": share, "val_auroc": value, "target_auroc": target, "how": how,
                  "bands_tried": len(options)}  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """Everything chosen on the validation slides, frozen before any test slide is read."""

    top_k: int
    aggregate: str
    smt_threshold: float
    tiling_threshold: float
    band: tuple[float, float] | None
    validation: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select(rows: Sequence[dict[str, Any]], knobs: Knobs) -> Selection:
    """The settings from validation rows only (``validation_rows``): the walk of the best AUROC (ties: the
    fewer reads, then the order given), each method's threshold, the triage band."""
    labels = [r["label"] for r in rows]
    check_validation_set(labels, knobs.min_val_slides)
    per_walk = {}
    for k, a in knobs.walks():
        scores = [r["smt"][walk_name(k, a)] for r in rows]
        per_walk[walk_name(k, a)] = {"auroc": auroc(scores, labels),
                                     "reads": float(np.mean([r["reads"][k] for r in rows]))}  # fmt: skip
    order = {name: i for i, name in enumerate(per_walk)}
    best = max(per_walk, key=lambda n: (round(per_walk[n]["auroc"], 12), -per_walk[n]["reads"], -order[n]))
    k, aggregate = next((k, a) for k, a in knobs.walks() if walk_name(k, a) == best)
    smt = [r["smt"][best] for r in rows]
    tiling = [r["tiling_max"] for r in rows]
    smt_thr, tiling_thr = choose_threshold(smt, labels), choose_threshold(tiling, labels)
    band, search = choose_band(smt, tiling, labels, smt_thr, tiling_thr, knobs.gap, knobs.max_share)
    validation = {
        "n_slides": len(rows), "n_positive": int(sum(labels)), "walks": per_walk, "chosen_walk": best,
        "tiling_max_auroc": auroc(tiling, labels),
        "smt_balanced_accuracy": balanced_accuracy(smt, labels, smt_thr),
        "tiling_balanced_accuracy": balanced_accuracy(tiling, labels, tiling_thr),
        "triage": search, "knobs": asdict(knobs),
    }  # fmt: skip
    return Selection(k, aggregate, smt_thr, tiling_thr, band, validation)


def select_then_test(
    val_rows: Sequence[dict[str, Any]], knobs: Knobs, test_rows: Callable[[Selection], list[dict[str, Any]]]
) -> tuple[Selection, list[dict[str, Any]]]:
    """Choose on ``val_rows``, then (and only then) get the test rows for that frozen selection."""
    selection = select(val_rows, knobs)
    log.info("chosen on %d validation slides: %s", len(val_rows), selection)
    return selection, test_rows(selection)


# -------------------------------------------------------------------------------------------- triage
def paired_balanced_accuracy(
    a: Sequence[float], b: Sequence[float], labels: Sequence[int], thr_a: float, thr_b: float,
    n: int = 2000, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Balanced accuracy of scores ``a`` at ``thr_a`` minus that of ``b`` at ``thr_b`` on the same slides,
    paired percentile bootstrap (``measure.stats.bootstrap``: the resamples ``paired_bootstrap`` draws with
    the same seed); a resample of one class has none."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    right_a = ((torch.as_tensor(a, dtype=torch.float64) >= thr_a).long() == y).double()
    right_b = ((torch.as_tensor(b, dtype=torch.float64) >= thr_b).long() == y).double()
    pos = (y == 1).double()

    def statistic(idx: torch.Tensor) -> torch.Tensor:
        p, q = pos[idx], 1 - pos[idx]
        out = []
        for right in (right_a, right_b):
            r = right[idx]
            out.append(((r * p).sum(1) / p.sum(1) + (r * q).sum(1) / q.sum(1)) / 2)
        diff = out[0] - out[1]
        return torch.where((p.sum(1) > 0) & (q.sum(1) > 0), diff, torch.full_like(diff, float("nan")))

    result = bootstrap(statistic, len(y), resamples=n, seed=seed)
    return {"difference": result["value"], "ci95": result["ci"], "draws": result["draws"]}


def per_slide_cost(run: Mapping[str, Any]) -> tuple[float, float]:
    return float(run["wall_s"]), float(run["file_pixels"])


def triage_results(rows: Sequence[dict[str, Any]], selection: Selection, resamples: int = 2000) -> dict:
    """On the test rows (``compare_slides``, walked with the chosen K): SMT alone, triage and full tiling
    (max pooling) at the validation thresholds; the share triaged; AUROC and balanced-accuracy differences
    against tiling (paired bootstrap); mean and max cost per slide (wall, pixels decoded)."""
    labels = [r["label"] for r in rows]
    smt = [r["smt"]["positive"] for r in rows]  # walked with the chosen K and aggregation
    tiling = [r["tiling"]["max"] for r in rows]
    composite, triaged = composite_scores(
        smt, tiling, selection.band, selection.smt_threshold, selection.tiling_threshold
    )
    thr_s, thr_t = selection.smt_threshold, selection.tiling_threshold
    costs = {
        "smt": [per_slide_cost(r["smt"]) for r in rows],
        "tiling": [per_slide_cost(r["tiling"]) for r in rows],
    }
    costs["triage"] = [
        (s[0] + t[0] * bool(x), s[1] + t[1] * bool(x))
        for s, t, x in zip(costs["smt"], costs["tiling"], triaged, strict=True)
    ]
    methods = {"smt": (smt, thr_s), "triage": (composite.tolist(), thr_s), "tiling_max": (tiling, thr_t)}
    out: dict[str, Any] = {"band": selection.band, "share_triaged": float(np.mean(triaged)),
                           "n_triaged": int(triaged.sum()), "methods": {}}  # fmt: skip
    for name, (scores, thr) in methods.items():
        cost = costs["tiling" if name == "tiling_max" else name]
        walls, pixels = [c[0] for c in cost], [c[1] for c in cost]
        out["methods"][name] = {
            **binary_quality(scores, labels, thr), "threshold": thr,
            "wall_s_mean": float(np.mean(walls)), "wall_s_max": float(np.max(walls)),
            "file_pixels_mean": float(np.mean(pixels)), "file_pixels_max": float(np.max(pixels)),
        }  # fmt: skip
        if name != "tiling_max":
            out["methods"][name]["minus_tiling_max"] = {
                "auroc": paired_bootstrap(scores, tiling, labels, n=resamples)["auroc"],
                "balanced_accuracy": paired_balanced_accuracy(scores, tiling, labels, thr, thr_t, resamples),
            }
    tiling_m = out["methods"]["tiling_max"]
    for name in ("smt", "triage"):
        m = out["methods"][name]
        m["wall_ratio_of_means"] = tiling_m["wall_s_mean"] / m["wall_s_mean"]
        m["file_pixels_ratio_of_means"] = tiling_m["file_pixels_mean"] / m["file_pixels_mean"]
    return out


# -------------------------------------------------------------------------------------- localisation
def lesion_shapes(truth: Truth) -> list[shapely.Polygon]:
    """Each lesion of a synthetic slide's truth as a shapely polygon (level-0 px)."""
    return [shapely.make_valid(shapely.Polygon(les.polygon)) for les in truth.lesions]


def greatest_diameter_um(polygon: np.ndarray, mpp: float) -> float:
    """CAMELYON's lesion size: the longest distance between two points of its outline, in um."""
    p = np.asarray(polygon, np.float64)
    return float(np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max() * mpp)


def boxes_hitting(boxes: Sequence[Sequence[float]], shapes: Sequence[shapely.Polygon]) -> np.ndarray:
    """(boxes x lesions) bool: which level-0 squares ``[x, y, side]`` overlap which lesion (a shared edge
    or corner only is no overlap)."""
    if not len(boxes) or not len(shapes):
        return np.zeros((len(boxes), len(shapes)), bool)
    b = np.asarray(boxes, np.float64)
    squares = shapely.box(b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 2])
    out = np.zeros((len(boxes), len(shapes)), bool)
    for j, shape in enumerate(shapes):
        near = np.flatnonzero(shapely.intersects(squares, shape))  # cheap; then an area, not a touch
        out[near, j] = shapely.area(shapely.intersection(squares[near], shape)) > 0
    return out


def slide_detections(row: Mapping[str, Any], shapes: Sequence[shapely.Polygon]) -> dict[str, Any]:
    """One slide's candidate detections, each with its score and the lesions it overlaps: SMT's last-layer
    regions (score: positive probability) and tiling's tiles (score: tile positive probability)."""
    smt, tiling = row["smt"], row["tiling"]
    negative = smt["negative"]
    regions = smt["layers"][-1]["boxes"]
    region_scores = 1.0 - np.asarray(smt["last_probs"], np.float64)[:, negative]
    coords = np.asarray(tiling["coords"], np.float64).reshape(-1, 2)
    tiles = np.column_stack([coords, np.full(len(coords), float(tiling["size0"]))])
    return {
        "smt": (region_scores, boxes_hitting(regions, shapes)),
        "tiling": (np.asarray(tiling["tile_positive"], np.float64), boxes_hitting(tiles, shapes)),
    }


def lesion_records(
    rows: Sequence[dict[str, Any]], truths: Sequence[Truth | None], selection: Selection
) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Per lesion of the rows' slides (``truths``: each row's, None without one): its category, whether SMT
    saw it (a last-layer region over it), detected it (such a region at or above SMT's threshold), whether
    tiling detected it (a tile at or above its threshold over it), and both slide calls; and every slide's
    detections for the FROC."""
    lesions, detections = [], {"smt": [], "tiling": []}
    for row, truth in zip(rows, truths, strict=True):
        shapes = [] if truth is None else lesion_shapes(truth)
        found = slide_detections(row, shapes)
        for method, (scores, hits) in found.items():
            detections[method].append((scores, hits))
        if truth is None:
            continue
        smt_scores, smt_hits = found["smt"]
        tile_scores, tile_hits = found["tiling"]
        smt_call = row["smt"]["positive"] >= selection.smt_threshold
        tiling_call = row["tiling"]["max"] >= selection.tiling_threshold
        sizes = [greatest_diameter_um(les.polygon, truth.mpp) for les in truth.lesions]
        for j, (les, size) in enumerate(zip(truth.lesions, sizes, strict=True)):
            lesions.append({
                "slide": row["slide"], "cls": les.cls, "diameter_um": size, "category": size_category(size),
                "slide_category": size_category(max(sizes)),
                "smt_seen": bool(smt_hits[:, j].any()),
                "smt_detected": bool((smt_hits[:, j] & (smt_scores >= selection.smt_threshold)).any()),
                "tiling_detected": bool(
                    (tile_hits[:, j] & (tile_scores >= selection.tiling_threshold)).any()
                ),
                "smt_slide_call": bool(smt_call), "tiling_slide_call": bool(tiling_call),
            })  # fmt: skip
    return lesions, detections


def size_table(lesions: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per CAMELYON category: lesions, SMT seen / detected and tiling detected rates (per lesion), and the
    slide-call sensitivities of the slides whose largest lesion is of that category."""
    out = {}
    for cat in SIZE_CATEGORIES:
        mine = [x for x in lesions if x["category"] == cat]
        slides = {x["slide"]: x for x in lesions if x["slide_category"] == cat}
        rate = lambda xs, key: float(np.mean([x[key] for x in xs])) if xs else None  # noqa: E731
        out[cat] = {
            "lesions": len(mine), "slides": len(slides),
            "smt_seen": rate(mine, "smt_seen"), "smt_detected": rate(mine, "smt_detected"),
            "tiling_detected": rate(mine, "tiling_detected"),
            "smt_slide_call": rate(list(slides.values()), "smt_slide_call"),
            "tiling_slide_call": rate(list(slides.values()), "tiling_slide_call"),
        }  # fmt: skip
    return out


def froc(detections: Sequence[tuple[np.ndarray, np.ndarray]], rates: Sequence[float] = FP_RATES) -> dict:
    """FROC of one method over slides (each: detection scores, detections x lesions overlaps): lesion
    sensitivity against mean false positives per slide (detections over no lesion) as the score threshold
    falls; the sensitivity at each rate of ``rates`` (the best with at most that many) and their mean."""
    n_slides = len(detections)
    fp = np.sort(np.concatenate([s[~h.any(1)] for s, h in detections] or [np.zeros(0)]))
    best = np.concatenate(
        [np.where(h.any(0), np.where(h, s[:, None], -np.inf).max(0), -np.inf) for s, h in detections
         if h.shape[1]] or [np.zeros(0)]
    )  # fmt: skip
    if not len(best):
        return {"lesions": 0, "sensitivity_at": {}, "score": None, "curve": []}
    thresholds = np.unique(np.concatenate([best[np.isfinite(best)], fp, [np.inf]]))[::-1]
    fps = (len(fp) - np.searchsorted(fp, thresholds, side="left")) / max(n_slides, 1)
    sens = (best[None, :] >= thresholds[:, None]).mean(1)
    at = {}
    for rate in rates:
        ok = fps <= rate
        at[str(rate)] = float(sens[ok].max()) if ok.any() else 0.0
    keep = np.unique(np.linspace(0, len(thresholds) - 1, min(len(thresholds), 50)).astype(int))
    return {
        "lesions": len(best), "sensitivity_at": at, "score": float(np.mean(list(at.values()))),
        "curve": [[float(fps[i]), float(sens[i])] for i in keep],
    }  # fmt: skip


def localisation(
    rows: Sequence[dict[str, Any]], cases: Sequence[SlideCase], selection: Selection
) -> dict[str, Any]:
    """Hit rates at the lesions and the FROC of SMT's last-layer regions and of tiling's tiles, over the
    rows of ``cases`` (lesion-free slides give false positives only), and the size table of their lesions."""
    truths = [read_truth(c.path) if c.label == 1 and has_truth(c.path) else None for c in cases]
    lesions, detections = lesion_records(rows, truths, selection)
    rate = lambda key: float(np.mean([x[key] for x in lesions])) if lesions else None  # noqa: E731
    return {
        "lesions": len(lesions),
        "hit_rate": {"smt_seen": rate("smt_seen"), "smt_detected": rate("smt_detected"),
                     "tiling_detected": rate("tiling_detected")},
        "froc": {method: froc(d) for method, d in detections.items()},
        "size_table": size_table(lesions),
        "per_lesion": lesions,
    }  # fmt: skip


# -------------------------------------------------------------------------------------- lesion sizes
def size_set_spec(dataset, categories: Sequence[str], tries: int = 10) -> SlideSpec:
    """The lesion-size set's slide template (the run's slide size and difficulty), checked before any slide
    is read: each category known, and a lesion of its largest size fitting the tissue of such a slide (the
    generator's own check) on one of ``tries`` seeds."""
    for key in ("width", "height", "difficulty"):
        if dataset.get(key) is None:
            raise ConfigError(
                f"--size-set needs a synthetic slide dataset (dataset.{key}); dataset={dataset.get('name')} "
                "has none: leave --size-set out"
            )
    spec = SlideSpec(
        width=int(dataset.width), height=int(dataset.height), difficulty=float(dataset.difficulty)
    )
    for cat in categories:
        lesions = lesions_of_size(cat, 1, SIZE_SET_CLASSES)
        biggest = [replace(les, diameter_um=(les.diameter_um[1],) * 2) for les in lesions]
        if not any(_fits(replace(spec, seed=seed, lesions=biggest)) for seed in range(tries)):
            raise ConfigError(
                f"--size-set {cat}: a {lesions[0].diameter_um[1]:g}-um lesion fits the tissue of none of "
                f"{tries} {spec.width} x {spec.height}-px slides; use larger slides or leave {cat} out"
            )
    return spec


def _fits(spec: SlideSpec) -> bool:
    try:
        build_scene(spec)
    except ConfigError:
        return False
    return True


def size_set_cases(
    folder: Path, spec: SlideSpec, categories: Sequence[str], n: int, seed: int = 11, tries: int = 20
) -> list[SlideCase]:
    """``n`` lesion slides per category under ``folder/<category>``, one lesion of that category each (a
    slide's call then answers for that size alone), apart from every set the AUROC is measured on. A draw
    whose lesion does not fit its tissue (a 2-mm lesion on a 10-mm slide, now and then) is drawn again, up
    to ``tries`` times; the generator refuses it before writing anything."""
    cases = []
    for c, cat in enumerate(categories):
        template = replace(spec, lesions=lesions_of_size(cat, 1, SIZE_SET_CLASSES))
        for i in range(n):
            for attempt in range(tries):
                try:
                    slide = generate_slides(
                        folder / cat, 1, template, seed=(seed * 100 + c) * 10_000 + i * tries + attempt,
                        normal_share=0.0, prefix=f"size_{cat}_{i:03d}",
                    )[0]  # fmt: skip
                    break
                except ConfigError:
                    continue
            else:
                raise ConfigError(
                    f"--size-set {cat}: no lesion of {template.lesions[0].diameter_um} um fitted the tissue "
                    f"in {tries} draws; use larger slides or leave {cat} out"
                )
            cases.append(SlideCase(slide.path, 1))
    return cases


# ------------------------------------------------------------------------------------------ markdown
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def selection_markdown(results: Mapping[str, Any]) -> str:
    """The report's sections on the selection, triage, localisation and lesion sizes."""
    sel, tri = results["selection"], results["triage"]
    val = sel["validation"]
    band = "none" if sel["band"] is None else f"[{sel['band'][0]:.3f}, {sel['band'][1]:.3f}]"
    lines = [
        "", "## Chosen on validation slides only", "",
        f"{val['n_slides']} validation slides ({val['n_positive']} with lesions; dataset seed "
        f"{results['held_out']['val_seed']}), test slides from dataset seed "
        f"{results['held_out']['test_seed']}, read only after the choice.", "",
        "| walk | validation AUROC | reads |", "| --- | --- | --- |",
        *[f"| {name} | {v['auroc']:.3f} | {v['reads']:.0f} |" for name, v in val["walks"].items()],
        "", f"Chosen: K = {sel['top_k']}, {sel['aggregate']}; thresholds SMT {sel['smt_threshold']:.3f}, "
        f"tiling {sel['tiling_threshold']:.3f}; triage band {band} ({val['triage']['how']}; validation share "
        f"{_pct(val['triage']['val_share'])}, AUROC {val['triage']['val_auroc']:.3f}).", "",
        f"## Triage on the test slides ({_pct(tri['share_triaged'])} triaged)", "",
        "| method | AUROC | balanced acc. | minus tiling: AUROC [95% CI] | minus tiling: balanced acc. | "
        "mean wall s | max wall s | mean pixels (M) | max pixels (M) | "
        "tiling / method: wall, pixels (means) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, m in tri["methods"].items():
        versus = m.get("minus_tiling_max")
        lines.append(
            f"| {name} | {m['auroc']:.3f} | {m['balanced_accuracy']:.3f} | "
            f"{pp_interval(versus['auroc']) if versus else ''} | "
            f"{pp_interval(versus['balanced_accuracy']) if versus else ''} | "
            f"{m['wall_s_mean']:.2f} | {m['wall_s_max']:.2f} | {m['file_pixels_mean'] / 1e6:.2f} | "
            f"{m['file_pixels_max'] / 1e6:.2f} | "
            + (
                f"{m['wall_ratio_of_means']:.1f}x, {m['file_pixels_ratio_of_means']:.1f}x |"
                if versus
                else " |"
            )
        )
    for title, key in (
        ("Localisation on the test slides", "localisation"),
        ("Lesion-size set", "lesion_size"),
    ):
        loc = results.get(key)
        if not loc:
            continue
        hit, fr = loc["hit_rate"], loc["froc"]
        lines += [
            "", f"## {title} ({loc['lesions']} lesions)", "",
            f"Hit rate: SMT saw {_pct(hit['smt_seen'])}, detected {_pct(hit['smt_detected'])}; "
            f"tiling detected {_pct(hit['tiling_detected'])}. FROC score (mean sensitivity at "
            f"{list(FP_RATES)} FP/slide): SMT "
            f"{fr['smt']['score'] or 0:.3f}, tiling {fr['tiling']['score'] or 0:.3f}.", "",
            "| category (greatest diameter) | lesions | slides | SMT saw | SMT detected | tiling detected | "
            "SMT slide call | tiling slide call |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {cat} | {v['lesions']} | {v['slides']} | {_pct(v['smt_seen'])} | "
              f"{_pct(v['smt_detected'])} | "
              f"{_pct(v['tiling_detected'])} | {_pct(v['smt_slide_call'])} | {_pct(v['tiling_slide_call'])} |"
              for cat, v in loc["size_table"].items()],
        ]  # fmt: skip
    return "\n".join(lines) + "\n"
