"""SMT against full tiling on the same slides (R3's comparison): quality per slide of SMT and of its
baselines, the paired bootstrap of SMT minus each baseline over slides, focusing precision, the per-slide
costs, the run records ``python -m patholite.compare`` reads, and a markdown report.

The rows come from ``slides.comparison_runs`` (one slide through each method, cold, in a rotating order).
``compare_artifacts`` and ``artifacts_markdown`` do the same for several SMT artifacts of one run (float
against INT8, a teacher against its student): quality, agreement with the first, and time per slide.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from patholite.accelerators.machine import describe_machine
from patholite.errors import ConfigError
from patholite.measure.stats import binary_quality, paired_bootstrap
from patholite.models.smt import READ_KEYS
from patholite.records import ArtifactRecord, RunRecord
from patholite.slides.comparison_runs import METHODS

# The names the comparison records its slide-level methods under (the artifact names of its run records).
SMT_NAME = "smt_fp32"
BASELINES = {
    "tiling_max": "full tiling of the tissue with the patch classifier, max pooling of tile scores (R3)",
    "tiling_mean": "full tiling of the tissue with the patch classifier, mean pooling of tile scores",
    "mil_gated": "gated-attention MIL (CLAM-SB-like) over the patch classifier's tile embeddings",
}
RECORDED = {SMT_NAME: "R3's SMT in float: thumbnail plus 1 + K + K^2 focused regions per slide", **BASELINES}
# the method (a row's key) whose per-slide costs each recorded name carries
COST_OF = {SMT_NAME: "smt", "tiling_max": "tiling", "tiling_mean": "tiling", "mil_gated": "tiling"}
# quality variants of SMT, reported beside the recorded names: row method and score key
SMT_VARIANTS = {
    f"{SMT_NAME} (max over layer-3 images)": ("smt", "positive_max"),
    f"{SMT_NAME} (box from the tiler's mask)": ("smt_tiler_mask", "positive"),
}
PIXELS = (
    ("file_pixels", "pixels decoded from the file"),
    ("model_pixels", "pixels fed to the model"),
    ("area_level0", "level-0 area the reads cover"),
)


def with_dataset_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A copy of a run's config with ``dataset.<key>=<value>`` overrides (values parsed as YAML): other test
    slides of the same kind, e.g. ``dataset.seed=1``."""
    pairs = [item.partition("=") for item in overrides]
    for key, sep, _ in pairs:
        if not sep or not key.startswith("dataset."):
            raise ConfigError(f"test-set override {key}{sep}...: give dataset.<key>=<value>")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, _, value in pairs:
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def check_held_out(val_cfg: DictConfig, test_cfg: DictConfig) -> dict[str, Any]:
    """The test slides must come from another generator seed than the validation slides that choose the
    settings (``dataset.seed``; the training slides' split seeds differ from both already)."""
    val_seed, test_seed = val_cfg.dataset.get("seed"), test_cfg.dataset.get("seed")
    if val_seed is not None and val_seed == test_seed:
        raise ConfigError(
            f"validation and test slides share dataset.seed={val_seed}: draw the held-out test slides from "
            f"another seed, e.g. --test-set dataset.seed={int(val_seed) + 1}"
        )
    return {"val_seed": val_seed, "test_seed": test_seed}


def check_disjoint(val: Sequence[Any], test: Sequence[Any]) -> None:
    """No slide file may be both a validation and a test slide (cases with a ``path``)."""
    shared = sorted({str(c.path) for c in val} & {str(c.path) for c in test})
    if shared:
        raise ConfigError(f"{len(shared)} slides are both validation and test slides (e.g. {shared[0]})")


# ------------------------------------------------------------------------------------------ quality
def slide_scores(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Positive scores per recorded name that the rows hold (MIL's are added by ``mil_scores``)."""
    return {
        SMT_NAME: [r["smt"]["positive"] for r in rows],
        "tiling_max": [r["tiling"]["max"] for r in rows],
        "tiling_mean": [r["tiling"]["mean"] for r in rows],
    }


def quality_and_differences(
    rows: Sequence[dict[str, Any]], scores: Mapping[str, Sequence[float]], resamples: int = 2000
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Binary quality of SMT, its variants and each baseline; and SMT minus each baseline, paired bootstrap
    over slides."""
    unknown = sorted(set(scores) - set(RECORDED))
    if unknown or SMT_NAME not in scores:
        raise ConfigError(
            f"comparison scores {sorted(scores)}: give {SMT_NAME} and names of {sorted(RECORDED)}"
        )
    labels = [r["label"] for r in rows]
    quality = {
        SMT_NAME: binary_quality(scores[SMT_NAME], labels),
        **{name: binary_quality([r[m][k] for r in rows], labels) for name, (m, k) in SMT_VARIANTS.items()},
        **{name: binary_quality(v, labels) for name, v in scores.items() if name != SMT_NAME},
    }
    versus = {
        name: paired_bootstrap(scores[SMT_NAME], v, labels, n=resamples)
        for name, v in scores.items()
        if name != SMT_NAME
    }
    return quality, versus


def focus_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """Mean focusing precision and chance per layer over the rows that hold one (positive slides with a
    truth); None when none does."""
    focus = [r["focus"] for r in rows if r.get("focus")]
    if not focus:
        return None
    return {
        layer: {
            "precision": float(np.mean([f[layer]["precision"] for f in focus])),
            "chance": float(np.mean([f[layer]["chance"] for f in focus])),
            "n_slides": len(focus),
        }
        for layer in focus[0]
    }


# -------------------------------------------------------------------------------------------- costs
def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def warm_seconds(run: Mapping[str, Any]) -> float:
    """Wall time without tissue detection and tiling (what precomputed masks and thumbnails leave)."""
    return run["wall_s"] - run["tissue_s"]


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Medians over slides of each method's wall time (cold, and without tissue detection), and of the
    per-slide ratios tiling / method: wall time and pixels (decoded from the file, fed to the model, and the
    level-0 area the reads cover)."""

    def med(fn: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(fn(r) for r in rows))

    out: dict[str, Any] = {
        "n_slides": len(rows),
        "tiles": med(lambda r: r["tiling"]["tiles"]),
        "smt_reads": med(lambda r: r["smt"]["reads"]),
        # adaptive reads: the average cost and the worst case (issue 19's budget is the average)
        "smt_reads_mean": float(np.mean([r["smt"]["reads"] for r in rows])),
        "smt_reads_max": int(max(r["smt"]["reads"] for r in rows)),
        "smt_layer3_level0_px_per_px": med(lambda r: r["smt"]["layer3_level0_px_per_px"]),
        "tiling_level0_px_per_px": med(lambda r: r["tiling"]["level0_px_per_px"]),
    }
    pixels = [what for what, _ in PIXELS]
    for m in methods:
        out[f"{m}_wall_s"] = med(lambda r, m=m: r[m]["wall_s"])
        out[f"{m}_tissue_s"] = med(lambda r, m=m: r[m]["tissue_s"])
        out[f"{m}_wall_s_tissue_excluded"] = med(lambda r, m=m: warm_seconds(r[m]))
        for what in pixels:
            out[f"{m}_{what}"] = med(lambda r, m=m, w=what: r[m][w])
        if m == "tiling":
            continue
        out[f"{m}_wall_ratio"] = med(lambda r, m=m: ratio(r["tiling"]["wall_s"], r[m]["wall_s"]))
        out[f"{m}_wall_ratio_tissue_excluded"] = med(
            lambda r, m=m: ratio(warm_seconds(r["tiling"]), warm_seconds(r[m]))
        )
        for what in pixels:
            out[f"{m}_{what}_ratio"] = med(lambda r, m=m, w=what: ratio(r["tiling"][w], r[m][w]))
    return out


def box_shift(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How far the box found as in training is from the tiler's mask's box, in units of the box side."""
    shifts = [
        max(abs(a - b) for a, b in zip(r["smt"]["box"], r["smt_tiler_mask"]["box"], strict=True))
        / r["smt"]["box"][2]
        for r in rows
    ]
    return {"median": float(np.median(shifts)), "max": float(np.max(shifts))}


PER_TILE = ("embeddings", "coords", "tile_positive")  # a tiling's per-tile arrays, not kept in results


def without_embeddings(row: dict[str, Any]) -> dict[str, Any]:
    """A row as results keep it: the tiling's per-tile arrays (embeddings, coordinates, scores) left out."""
    return {
        k: ({x: y for x, y in v.items() if x not in PER_TILE} if k == "tiling" else v) for k, v in row.items()
    }


# ------------------------------------------------------------------------------------------ results
def comparison_results(
    rows: Sequence[dict[str, Any]],
    scores: Mapping[str, Sequence[float]],
    smt_meta: Mapping[str, Any],
    tile_meta: Mapping[str, Any],
    slide_side: int | None,
    resamples: int = 2000,
) -> dict[str, Any]:
    """The comparison's results (``results.json``) from the test rows of ``compare_slides`` and the
    positive scores per recorded name (``slide_scores``, plus ``mil_gated`` where MIL ran)."""
    quality, versus = quality_and_differences(rows, scores, resamples)
    smt = smt_meta["model"]["smt"]
    return {
        "slide_side": slide_side,
        "tile_mpp": tile_meta.get("mpp"),
        "smt": {k: smt.get(k) for k in ("image_size", "grid", "top_k", "layers", "aggregate", *READ_KEYS)},
        "quality": quality,
        "smt_minus_baseline": versus,
        "summary": summarise(rows),
        "focus": focus_summary(rows),
        "slides": [without_embeddings(r) for r in rows],
        "box_shift": box_shift(rows),
    }


def scaling_results(rows: Sequence[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """The cost summary per slide side of ``scaling_rows``'s rows, and the rows."""
    return {
        "scaling": {size: summarise([r for r in rows if r["size"] == size]) for size in sizes},
        "scaling_slides": list(rows),
    }


def write_records(
    out: Path,
    cfg: DictConfig,
    quality: Mapping[str, Any],
    rows: Sequence[dict[str, Any]],
    walk: Mapping[str, Any] | None = None,
) -> list[Path]:
    """One run record per recorded method under ``out/records/<name>``, in the record schema, for
    ``patholite.compare``; ``cfg``: the SMT run's config; ``walk``: the SMT walk's ``top_k`` /
    ``aggregate`` where they were changed at inference. Names missing from ``quality`` (MIL left out) are
    skipped."""
    base = OmegaConf.to_container(cfg, resolve=True)
    trained = base["model"]["smt"]
    changed = {k: v for k, v in (walk or {}).items() if v is not None and v != trained.get(k)}
    written = []
    for name, method in COST_OF.items():
        if name not in quality:
            continue
        q = quality[name]
        walls = sorted(r[method]["wall_s"] for r in rows)
        p50, p90 = statistics.median(walls), walls[min(len(walls) - 1, int(0.9 * len(walls)))]
        label = f"bench:{name}"
        config = {**base, "compression": {"name": label, "description": RECORDED[name]}}
        if method == "smt" and changed:  # the walk run, not the one trained: say so in the record
            config["model"] = {**base["model"], "smt": {**trained, **changed}}
            config["compression"]["name"] = (
                label + " (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"
            )
        record = RunRecord(
            run_dir=str(out / "records" / name), config=config, entry="bench", device=describe_machine()
        )
        record.artifacts = [
            ArtifactRecord(
                name=name, path=str(out), files=[],
                model=cfg.model.name if method == "smt" else "tile classifier",
                quality={"accuracy": q["accuracy"], "balanced_accuracy": q["balanced_accuracy"],
                         "macro_f1": None, "auroc": q["auroc"], "ece": None, "n_samples": q["n_slides"]},
                cost={
                    "latency_ms": {"slide": {"p50": 1000 * p50, "p90": 1000 * p90}},
                    "throughput_ips": {"slide": ratio(1, p50)},
                    "file_pixels_median": statistics.median(r[method]["file_pixels"] for r in rows),
                    "timing": {"method": "bench_smt", "unit": "slide",
                               "note": "cold: tissue detection included"},
                },
            )
        ]  # fmt: skip
        written.append(record.finish("ok"))
    return written


# ----------------------------------------------------------------------------------------- markdown
def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def pp_interval(d: Mapping[str, Any]) -> str:
    """A difference with its 95% interval (``difference``, ``ci95``, fractions) in percentage points."""
    low, high = d["ci95"]
    return f"{100 * d['difference']:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(results: Mapping[str, Any]) -> str:
    """The comparison's report (``results.md``) from ``comparison_results`` (and ``scaling_results``)."""
    s, q = results["summary"], results["quality"]
    lines = [
        "# SMT against full tiling", "",
        f"{s['n_slides']} test slides ({results['slide_side']} px), same weights for every timing. SMT walk: "
        f"K = {results['smt']['top_k']}, slide score = {results['smt'].get('aggregate') or 'mean'} over the "
        "last layer's images.", "",
        "| method | accuracy | balanced acc. | AUROC |", "| --- | --- | --- | --- |",
        *[f"| {k} | {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {_num(v['auroc'])} |"
          for k, v in q.items()],
        "", "| SMT minus (same slides, paired bootstrap) | accuracy [95% CI] | AUROC [95% CI] |",
        "| --- | --- | --- |",
        *[f"| {k} | {pp_interval(v['accuracy'])} | {pp_interval(v['auroc'])} |"
          for k, v in results["smt_minus_baseline"].items()],
        "", "| per slide (median) | SMT | SMT, box from the tiler's mask | full tiling |",
        "| --- | --- | --- | --- |",
        "| wall s, cold (tissue detection included) | "
        + " | ".join(f"{s[f'{m}_wall_s']:.2f}" for m in METHODS) + " |",
        "| of which tissue detection (and tiling) s | "
        + " | ".join(f"{s[f'{m}_tissue_s']:.2f}" for m in METHODS) + " |",
        "| wall s, tissue excluded | "
        + " | ".join(f"{s[f'{m}_wall_s_tissue_excluded']:.2f}" for m in METHODS) + " |",
        "| tiling / method: wall, cold | " + " | ".join(f"{s[f'{m}_wall_ratio']:.1f}x" for m in METHODS[:2])
        + " | |",
        "| tiling / method: wall, tissue excluded | "
        + " | ".join(f"{s[f'{m}_wall_ratio_tissue_excluded']:.1f}x" for m in METHODS[:2]) + " | |",
        f"| regions / tiles read | {s['smt_reads']:.0f} | {s['smt_reads']:.0f} | {s['tiles']:.0f} |",
        *[f"| {label} (M) | " + " | ".join(f"{s[f'{m}_{what}'] / 1e6:.2f}" for m in METHODS) + " |"
          for what, label in PIXELS],
        *[f"| tiling / method: {label} | " + " | ".join(f"{s[f'{m}_{what}_ratio']:.1f}x" for m in METHODS[:2])
          + " | |" for what, label in PIXELS],
        f"| level-0 px per image px (SMT layer 3 / tiles) | {s['smt_layer3_level0_px_per_px']:.2f} | | "
        f"{s['tiling_level0_px_per_px']:.2f} |",
    ]  # fmt: skip
    if results.get("focus"):
        lines += ["", "| focusing (positive slides) | precision | chance |", "| --- | --- | --- |"]
        lines += [
            f"| {k} top-K over a lesion | {v['precision']:.3f} | {v['chance']:.3f} |"
            for k, v in results["focus"].items()
        ]
    if results.get("scaling"):
        lines += ["", "| slide side | tiles | SMT s | tiling s | wall ratio | tissue-excluded ratio | "
                  "file-pixel ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for size, v in results["scaling"].items():
            lines.append(f"| {size} | {v['tiles']:.0f} | {v['smt_wall_s']:.2f} | {v['tiling_wall_s']:.2f} | "
                         f"{v['smt_wall_ratio']:.1f}x | {v['smt_wall_ratio_tissue_excluded']:.1f}x | "
                         f"{v['smt_file_pixels_ratio']:.1f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- SMT artifacts of one run
def compare_artifacts(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per artifact of ``walk_artifacts``'s rows: binary quality, the share of slides called as the first
    artifact calls them, and medians over slides of model seconds, walk seconds (tissue excluded) and the
    per-slide speed-ups over the first artifact."""
    labels, first = [r["label"] for r in rows], names[0]

    def med(fn: Callable[[dict[str, Any]], float]) -> float:
        return float(statistics.median(fn(r) for r in rows))

    out = {}
    for name in names:
        scores = [r[name]["positive"] for r in rows]
        out[name] = {
            **binary_quality(scores, labels),
            "same_call_as_" + first: float(
                sum((r[name]["positive"] >= 0.5) == (r[first]["positive"] >= 0.5) for r in rows) / len(rows)
            ),
            "model_s": med(lambda r, m=name: r[m]["model_s"]),
            "walk_s": med(lambda r, m=name: warm_seconds(r[m])),
            "model_speedup": med(lambda r, m=name: ratio(r[first]["model_s"], r[m]["model_s"])),
            "walk_speedup": med(lambda r, m=name: ratio(warm_seconds(r[first]), warm_seconds(r[m]))),
        }
    return out


def artifacts_markdown(summary: Mapping[str, Any], n: int) -> str:
    """The report of ``compare_artifacts`` on ``n`` slides."""
    first = next(iter(summary))
    lines = [
        f"# Float and INT8 SMT on {n} test slides", "",
        f"| artifact | accuracy | AUROC | same call as {first} | model s | walk s | model speed-up | "
        "walk speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['accuracy']:.3f} | {_num(s['auroc'])} | {s['same_call_as_' + first]:.3f} | "
            f"{s['model_s']:.3f} | {s['walk_s']:.3f} | {s['model_speedup']:.2f}x | {s['walk_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
