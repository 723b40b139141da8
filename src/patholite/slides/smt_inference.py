"""SMT over whole slides (R3): each slide diagnosed from 1 + K + K^2 region reads, not from its tiles.

Per slide: the tissue box (from the slide engine's cached tissue mask), the magnification-chain check
(``model.smt.too_small``), then ``models.smt.predict_slide`` reading the thumbnail and every focused region
through one ``RegionReader``, which counts the reads. Outputs per slide: ``report.json`` (the call, the
timings, and per layer the boxes read in level-0 px with their focusing scores and class probabilities, the
layer-3 image(s) that drove the call marked) and ``focus.png`` (R3 Figure 4: the thumbnail with the focused
boxes, the magnified crops below). ``run_smt_slides`` shares the tile engine's summary and failure policy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import OmegaConf

from patholite.artifacts.load import load_artifact
from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.artifacts.torch_float import save_float_artifact
from patholite.errors import CheckpointError, ConfigError, SlideError
from patholite.io import write_json
from patholite.models.factory import create_network
from patholite.models.smt import (
    READ_KEYS,
    ReadPolicy,
    SMTNet,
    check_top_k,
    predict_slide,
    read_policy,
    warm_up,
)
from patholite.models.smt_aggregate import AGGREGATES, ATTENTION, check_aggregate, fit_attention
from patholite.slides.cohort import Cohort, available_cores, check_slide_artifact, each_slide, model_threads
from patholite.slides.report import save_figure
from patholite.wsi.reader import open_slide
from patholite.wsi.region import (
    POLICIES,
    Box,
    RegionReader,
    chain_check,
    pixels_decoded,
    smt_tissue_box,
    smt_tissue_mask,
    tissue_box,
)

log = logging.getLogger(__name__)

FILES = {"focus": "focus.png", "json": "report.json"}
LAYER_COLORS = ("#1f77b4", "#ffbf00", "#00c0ff", "#ff00c8", "#40ff40")  # box of an image of layer l+1
DROVE_COLOR = "#e31a1c"  # frame of the image(s) that drove the call
MAX_COLUMNS = 8  # crops per figure row


@dataclass(frozen=True)
class SmtSettings:
    """What the walk needs from an SMT artifact's sidecar."""

    image_size: int
    grid: int
    top_k: int
    layers: int
    aggregate: str
    too_small: str
    negative: int  # index of the negative class
    mean: tuple[float, ...]
    std: tuple[float, ...]
    policy: ReadPolicy = ReadPolicy()  # adaptive K and tissue-masked candidates

    @property
    def expected_reads(self) -> int:
        """1 + K + ... + K^(layers-1): 1 + K + K^2 for three layers (a fixed K; the most with top_k_max)."""
        return sum(self.top_k**layer for layer in range(self.layers))

    @property
    def fixed(self) -> bool:
        """Whether every slide reads exactly ``expected_reads`` regions."""
        return self.policy.adaptive == "none" and self.policy.tissue_min == 0

    @property
    def max_reads(self) -> int:
        return self.policy.max_reads(self.layers)


WALK_KEYS = ("top_k", "aggregate", *READ_KEYS)  # the slide CLI's smt.* keys


def smt_settings(net, meta: dict[str, Any], directory: str | Path, walk=None) -> SmtSettings:
    """The walk's settings from the sidecar, checked against the loaded network; ``walk`` (``smt`` of the
    slide config: ``top_k``, ``aggregate``, ``top_k_max``, ``adaptive``, ``spread``, ``margin``,
    ``tissue_min``) overrides what the artifact was trained with where set."""
    smt = dict((meta.get("model") or {}).get("smt") or {})
    walk = walk or {}
    if walk.get("aggregate") is not None:
        smt["aggregate"] = check_aggregate(walk["aggregate"], key="smt.aggregate")
        if walk["aggregate"] == ATTENTION and getattr(net, "aggregator", None) is None:
            raise ConfigError(
                f"smt.aggregate=attention: artifact {directory} has no trained attention head; use an "
                "artifact of a model.smt.aggregate=attention run or one written by scripts/smt_attention.py"
            )
    if walk.get("top_k") is not None:
        smt["top_k"] = check_top_k(walk["top_k"], net.grid, key="smt.top_k")
    for key in WALK_KEYS[2:]:
        if walk.get(key) is not None:
            smt[key] = walk[key]
    k = smt.get("top_k") if smt.get("top_k") is not None else net.top_k
    names = list(meta["class_names"])
    if len(names) != net.num_classes:
        raise CheckpointError(
            f"artifact {directory}: its network has {net.num_classes} classes but its sidecar names "
            f"{len(names)} {names}; the artifact is inconsistent, export it again"
        )
    negative = meta.get("negative_class", names[0])
    if negative not in names:
        raise CheckpointError(
            f"artifact {directory}: negative_class {negative!r} is not one of its classes {names}"
        )
    aggregate, too_small = str(smt.get("aggregate", "mean")), str(smt.get("too_small", "upsample"))
    if aggregate not in AGGREGATES or too_small not in POLICIES:
        raise CheckpointError(
            f"artifact {directory}: model.smt.aggregate={aggregate!r} / too_small={too_small!r} in its "
            f"sidecar; expected one of {list(AGGREGATES)} and one of {list(POLICIES)}"
        )
    if aggregate == ATTENTION and getattr(net, "aggregator", None) is None:
        raise CheckpointError(
            f"artifact {directory}: aggregate=attention in its sidecar but no attention head"
        )
    # a bad knob (override or sidecar) fails here, before any slide is read; keys named as the slide CLI's
    overridden = any(walk.get(key) is not None for key in WALK_KEYS)
    policy = read_policy(smt, 4 if k is None else k).check(
        net.grid, prefix="smt" if overridden else "model.smt"
    )
    return SmtSettings(
        image_size=int(net.image_size),
        grid=int(net.grid),
        top_k=check_top_k(4 if k is None else k, net.grid),
        layers=int(net.layers),
        aggregate=aggregate,
        too_small=too_small,
        negative=names.index(negative),
        mean=tuple(float(v) for v in meta.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(float(v) for v in meta.get("std") or (0.229, 0.224, 0.225)),
        policy=policy,
    )


def load_smt_model(directory: str | Path, device: str = "cpu"):
    """The SMT network of an artifact (float or dynamic INT8) and its sidecar (``_directory`` added)."""
    directory = Path(directory)
    sidecar = read_sidecar(directory)
    check_slide_artifact(directory, sidecar)
    if not is_smt_artifact(sidecar):
        raise CheckpointError(
            f"artifact {directory} is a tile classifier, not an SMT slide model; use mode=tiles or an "
            "artifact of a model=smt run"
        )
    net, meta = load_artifact(directory)
    if not isinstance(net, SMTNet):
        raise CheckpointError(
            f"artifact {directory} ({meta['kind']}) does not load as an SMT network; SMT runs from a "
            "torch float or dynamic-INT8 artifact"
        )
    if device != "cpu":
        if meta["kind"] != "torch_float":
            raise ConfigError(f"artifact {directory} ({meta['kind']}) runs on the CPU: use engine.device=cpu")
        net = net.to(device)
    meta["_directory"] = str(directory)
    smt_settings(net, meta, directory)  # an inconsistent sidecar fails before any slide is read
    return net.eval(), meta


class RecordingReader:
    """Passes reads to a ``RegionReader`` (which counts them) and keeps each image, for the figure."""

    def __init__(self, reader: RegionReader) -> None:
        self.reader = reader
        self.images: list[tuple[Box, np.ndarray]] = []

    def read(self, box: Box, size: int) -> np.ndarray:
        image = self.reader.read(box, size)
        self.images.append((box, image))
        return image


# ------------------------------------------------------------------------------------------ one slide
def _check_tissue_settings(cfg, meta: dict[str, Any]) -> None:
    """Warn (once per run) when this run finds tissue with other settings than the model was trained with:
    the tissue box, and with it the thumbnail layer 1 sees, may then differ."""
    trained = meta.get("tissue")
    if not trained or meta.get("_tissue_checked"):
        return
    meta["_tissue_checked"] = True
    here = {key: cfg.tissue[key] for key in cfg.tissue}
    changed = {k: (trained.get(k), v) for k, v in here.items() if trained.get(k) != v}
    if changed:
        log.warning(
            "tissue settings differ from the SMT artifact's training data (setting: trained, now): %s; "
            "set tissue.<key>= to the trained values to see the thumbnails the model was trained on",
            changed,
        )


def process_smt_slide(
    path: Path, cfg, net, meta: dict[str, Any], out_dir: Path, settings: SmtSettings | None = None
) -> dict[str, Any]:
    """Diagnose one slide with the SMT walk; write report.json and focus.png into ``out_dir``; return the
    report (a summary row: call, confidence, reads, pixels_read, seconds). ``settings``: the walk's, from
    ``smt_settings`` (None: worked out here)."""
    start = time.perf_counter()
    path = Path(path)
    if settings is None:
        settings = smt_settings(net, meta, meta.get("_directory", "?"), cfg.get("smt"))
    class_names = list(meta["class_names"])
    reader = RegionReader(path, cfg.reader.mpp, cfg.reader.backend)
    slide = reader.slide  # opened once for the process (open_cached), shared with the reads
    _check_tissue_settings(cfg, meta)
    t0 = time.perf_counter()
    # the box as the model's thumbnails were framed: found on a tissue_px image, or on the tiler's mask
    tissue_px = (meta["model"].get("smt") or {}).get("tissue_px")
    cache = Path(cfg.paths.cache_dir) / "slides"
    mask = None
    if settings.policy.tissue_min > 0:  # the box's own mask: its tissue fractions mask the candidates
        mask = smt_tissue_mask(slide, cfg, cache, tissue_px)
        box = tissue_box(mask, slide.dimensions)
    else:
        box = smt_tissue_box(slide, cfg, cache, tissue_px)
    t1 = time.perf_counter()
    chain_check(box, settings.image_size, settings.grid, settings.layers - 1, settings.too_small,
                source=f"slide {path.name}")  # fmt: skip
    recorder = RecordingReader(reader)
    result = predict_slide(net, recorder, box, settings.top_k, settings.mean, settings.std,
                           aggregate=settings.aggregate, negative_class=settings.negative,
                           policy=settings.policy, tissue=mask)  # fmt: skip
    t2 = time.perf_counter()
    check_reads(reader.reads, result["reads"], len(recorder.images), settings, path.name)
    layers = layer_records(result["layers"], settings, class_names, result.get("attention"))
    probs = result["probs"]
    label = int(result["label"])
    side = box.side / settings.grid ** (settings.layers - 1)
    report: dict[str, Any] = {
        "slide": str(path),
        "status": "ok",
        "mode": "smt",
        "call": {
            "label": class_names[label],
            "confidence": float(probs[label]),
            "share": None,
            "by": (
                f"positive score >= {result['threshold']:.4f} (attention threshold, set on validation)"
                if result.get("threshold") is not None
                else f"argmax of the slide probabilities ({settings.aggregate} over layer {settings.layers})"
            ),
            "driven_by": [r["index"] for r in layers[-1]["regions"] if r["drove_call"]],
        },
        "probs": dict(zip(class_names, map(float, probs), strict=True)),
        "class_names": class_names,
        "negative_class": class_names[settings.negative],
        "reads": reader.reads,
        "expected_reads": settings.expected_reads if settings.fixed else None,
        "max_reads": settings.max_reads,
        "reads_per_layer": [len(layer["regions"]) for layer in layers],
        # pixels decoded from the file (each at the level read_scaled picks); the level-0 area covered
        "pixels_read": pixels_decoded(slide, [b.side for b, _ in recorder.images], settings.image_size),
        "area_level0": round(sum(b.side**2 for b, _ in recorder.images)),
        "tissue_box": box.as_list(),
        "layers": layers,
        "smt": {
            "image_size": settings.image_size,
            "grid": settings.grid,
            "top_k": settings.top_k,
            "layers": settings.layers,
            "aggregate": settings.aggregate,
            "threshold": result.get("threshold"),
            "top_k_max": settings.policy.top_k_max,
            "adaptive": settings.policy.adaptive,
            "spread": settings.policy.spread,
            "margin": settings.policy.margin,
            "tissue_min": settings.policy.tissue_min,
            "too_small": settings.too_small,
            "last_layer_level0_per_px": side / settings.image_size,
            "upsampled": side < settings.image_size,
        },
        "timings": {
            "open_s": t0 - start,
            "tissue_s": t1 - t0,
            "read_s": float(result["read_seconds"]),
            "model_s": float(result["model_seconds"]),
            "total_s": t2 - start,
        },
        "extra": {
            "artifact": meta.get("_directory"),
            "artifact_kind": meta.get("kind"),
            "slide": slide.describe(),
        },  # fmt: skip
        "out_dir": str(out_dir),
        "files": {"focus": FILES["focus"]},
    }
    report["seconds"] = report["timings"]["total_s"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _images_by_layer(recorder.images, layers)

    save_figure(focus_figure(report, images), out_dir / FILES["focus"])
    report["timings"]["report_s"] = time.perf_counter() - t2
    write_json(out_dir / FILES["json"], report)
    return report


def check_reads(reads: int, walked: int, recorded: int, settings: SmtSettings, name: str) -> None:
    """The reader's count, the walk's and the images kept agree, and lie within the policy's bounds (a fixed
    K: exactly 1 + K + K^2); anything else is a bug."""
    low = settings.expected_reads if settings.fixed else 1
    if not (reads == walked == recorded and low <= reads <= settings.max_reads):
        raise SlideError(
            f"slide {name}: the SMT walk read {reads} regions (walk: {walked}, kept: {recorded}), expected "
            f"{low}..{settings.max_reads} (K={settings.top_k}..{settings.policy.k_max}); this is a bug, "
            "please report it"
        )


def layer_records(
    walk: Sequence[dict[str, Any]],
    settings: SmtSettings,
    class_names: list[str],
    attention: Sequence[float] | None = None,
) -> list[dict]:
    """report.json's ``layers``: per layer its regions (box, parent image and patch, focusing score, class
    probabilities, positive probability, and on the last layer the attention head's weight when it scored
    the slide); the last layer's most positive image(s) (most attended, with attention) marked
    ``drove_call``."""
    grid, negative = settings.grid, settings.negative
    out = []
    for layer, rec in enumerate(walk):
        regions = []
        for j, (box, score, p) in enumerate(zip(rec["boxes"], rec["scores"], rec["probs"], strict=True)):
            region: dict[str, Any] = {"index": j, "box": [float(v) for v in box]}
            if layer:
                up = int(rec["parents"][j])
                parent = walk[layer - 1]["boxes"][up]
                col = round((box[0] - parent[0]) / box[2])
                row = round((box[1] - parent[1]) / box[2])
                region.update(parent=up, patch=int(row * grid + col))
            region.update(
                score=None if score is None else float(score),
                probs=dict(zip(class_names, map(float, p), strict=True)),
                positive=1.0 - float(p[negative]),
                drove_call=False,
            )
            regions.append(region)
        side = float(rec["boxes"][0][2])
        out.append({"layer": layer + 1, "level0_px_per_image_px": side / settings.image_size,
                    "regions": regions})  # fmt: skip
    last = out[-1]["regions"]
    if attention is not None:
        for r, a in zip(last, attention, strict=True):
            r["attention"] = float(a)
    key = "attention" if attention is not None else "positive"
    top = max(r[key] for r in last)
    for r in last:
        r["drove_call"] = bool(r[key] >= top - 1e-9)
    return out


def _images_by_layer(read: list[tuple[Box, np.ndarray]], layers: list[dict]) -> list[list[np.ndarray]]:
    """The images read, in walk order, split by layer (checked against the boxes the report records)."""
    out, i = [], 0
    for layer in layers:
        n = len(layer["regions"])
        chunk = read[i : i + n]
        if [b.as_list() for b, _ in chunk] != [r["box"] for r in layer["regions"]]:
            raise SlideError(
                "the regions read do not match the walk's boxes; this is a bug, please report it"
            )
        out.append([image for _, image in chunk])
        i += n
    return out


# ------------------------------------------------------------------------------------------ the figure
def _frame(ax, box: Sequence[float], color: str, width: float = 1.5) -> None:
    x, y, side = box
    ax.add_patch(Rectangle((x, y), side, side, fill=False, edgecolor=color, linewidth=width))


def _show(ax, image: np.ndarray, box: Sequence[float], title: str) -> None:
    """``image`` drawn over its level-0 box (so boxes of the next layer can be drawn in slide coordinates)."""
    x, y, side = box
    ax.imshow(image, extent=(x, x + side, y + side, y), interpolation="nearest")
    ax.set(xlim=(x, x + side), ylim=(y + side, y), xticks=[], yticks=[])
    ax.set_title(title, fontsize=7)


def focus_figure(report: dict[str, Any], images: list[list[np.ndarray]]) -> Figure:
    """R3 Figure 4: the thumbnail with layer 1's top-K boxes (and layer 2's inside them, another colour),
    then a row per deeper layer of its magnified crops with their focusing score and positive probability;
    the crop(s) that drove the call framed in red."""
    layers = report["layers"]
    negative = report["negative_class"]
    deeper = [len(layer["regions"]) for layer in layers[1:]]
    cols = max(1, min(MAX_COLUMNS, max(deeper, default=1)))
    crop_rows = [math.ceil(n / cols) for n in deeper]
    cell = 1.6
    width = max(7.0, cols * cell)
    thumb_h = min(width, 5.0)
    heights = [thumb_h] + [cell + 0.35] * sum(crop_rows)
    fig = Figure(figsize=(width, sum(heights) + 0.9), layout="constrained")
    grid = fig.add_gridspec(1 + sum(crop_rows), cols, height_ratios=heights)
    ax = fig.add_subplot(grid[0, :])
    _show(
        ax,
        images[0][0],
        layers[0]["regions"][0]["box"],
        f"layer 1: tissue box at {report['smt']['image_size']} px",
    )
    for depth, layer in enumerate(layers[1:3], start=1):  # layer 2's regions, then layer 3's inside them
        for region in layer["regions"]:
            _frame(ax, region["box"], LAYER_COLORS[depth % len(LAYER_COLORS)], 2.0 if depth == 1 else 1.0)
    row = 1
    for depth, layer in enumerate(layers[1:], start=1):
        children = layers[depth + 1]["regions"] if depth + 1 < len(layers) else []
        for j, region in enumerate(layer["regions"]):
            sub = fig.add_subplot(grid[row + j // cols, j % cols])
            score = "" if region["score"] is None else f"f={region['score']:.2f} "
            _show(
                sub, images[depth][j], region["box"], f"L{depth + 1} #{j} {score}p+={region['positive']:.2f}"
            )
            for child in children:
                if child["parent"] == j:
                    _frame(sub, child["box"], LAYER_COLORS[(depth + 1) % len(LAYER_COLORS)])
            edge = LAYER_COLORS[depth % len(LAYER_COLORS)]
            for spine in sub.spines.values():
                spine.set(edgecolor=DROVE_COLOR if region["drove_call"] else edge,
                          linewidth=3.0 if region["drove_call"] else 1.5)  # fmt: skip
        row += math.ceil(len(layer["regions"]) / cols)
    call = report["call"]
    fig.suptitle(
        f"{Path(report['slide']).name}: {call['label']} (confidence {call['confidence']:.2f}), "
        f"{report['reads']} regions read\nf = focusing score, p+ = 1 - p({negative}); red: drove the call",
        fontsize=9,
    )
    return fig


# ------------------------------------------------------------------------------------------ many slides
def smt_threads(cfg) -> int:
    """The model's threads in SMT mode: ``engine.threads``, else every core (the walk has no loaders)."""
    return cfg.engine.threads or available_cores()


def prepare_smt_slides(
    cfg, directory: str | Path | None = None, net=None, meta: dict[str, Any] | None = None
) -> Callable[[Path, Path], dict[str, Any]]:
    """SMT mode's set-up: the network (``net``/``meta``, else loaded from ``directory``, else from
    ``cfg.artifact``) and the walk's settings checked, and the model warmed up, once, before any slide is
    read. Returns one slide's ``process(path, out) -> report``, run in this process or in a supervised
    worker (``slides.supervise``)."""
    if net is None or meta is None:
        directory = directory or resolve_artifact(cfg.artifact, cfg.artifact_name)
        net, meta = load_smt_model(directory, cfg.engine.device)
    settings = smt_settings(net, meta, directory or "?", cfg.get("smt"))  # bad overrides fail here
    # the first slide's model_s would otherwise hold the device's start-up (CUDA context, kernels)
    warm_up(net, settings.top_k, settings.mean, settings.std)
    return lambda path, out: process_smt_slide(path, cfg, net, meta, out, settings)


def run_smt_slides(
    paths: list[Path], cfg, out_dir: Path, net=None, meta: dict[str, Any] | None = None,
    directory: str | Path | None = None, *, cohort: Cohort | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every slide through one SMT network (``net``/``meta``, else loaded from ``directory``, else from
    ``cfg.artifact``), with the tile engine's summary and failure policy (``slides.cohort.each_slide``)."""
    with model_threads(smt_threads(cfg)):
        process = prepare_smt_slides(cfg, directory, net, meta)
        return each_slide(paths, cfg, out_dir, process, cohort=cohort)


# ------------------------------------------------------------------------------- the attention head
def slide_bag(net, meta: dict[str, Any], path: Path, mpp: float | None = None) -> torch.Tensor:
    """The last layer's embeddings (N x d) of one walk of the slide at ``path``, framed and read as the
    artifact's sidecar says (tissue settings, ``tissue_px``, read policy): an attention head's bag."""
    s = meta["model"]["smt"]
    node = OmegaConf.create({"tissue": meta.get("tissue") or {}})
    with open_slide(path, mpp=mpp) as slide:
        mask = smt_tissue_mask(slide, node, tissue_px=int(s.get("tissue_px") or 512))
        box = tissue_box(mask, slide.dimensions)
    policy = read_policy(s)
    names = list(meta["class_names"])
    negative = names.index(meta.get("negative_class") or names[0])
    out = predict_slide(net, RegionReader(path, mpp=mpp), box, policy.top_k, meta["mean"], meta["std"],
                        aggregate="max", negative_class=negative, policy=policy,
                        tissue=mask if policy.tissue_min > 0 else None)  # fmt: skip
    return out["embeddings"]


def with_attention_head(
    net: SMTNet,
    meta: dict[str, Any],
    train: Sequence[tuple[Path, int]],
    val: Sequence[tuple[Path, int]],
    out_dir: str | Path,
    mpp: float | None = None,
    epochs: int = 40,
    seed: int = 0,
) -> tuple[SMTNet, dict[str, Any]]:
    """A trained float SMT (``net``, ``meta``) with an attention head fitted on its own walks of the
    ``train`` slides ((path, class index) pairs) and its threshold set on the ``val`` slides, saved as a
    float artifact in ``out_dir`` (sidecar ``model.smt.aggregate: attention``, ``smt_attention``: what the
    fit did); SMT's own weights are unchanged. Returns the network and sidecar, as ``load_smt_model``."""
    if meta.get("kind") != "torch_float":
        raise ConfigError(
            f"the attention head is fitted on a float SMT artifact, not {meta.get('kind')!r}: fit it on the "
            "run's smt_fp32 and quantize that"
        )
    smt = {**meta["model"]["smt"], "aggregate": ATTENTION}
    model = {**meta["model"], "smt": smt}
    torch.manual_seed(seed)
    headed = create_network(model, net.num_classes, net.image_size)
    missing, unexpected = headed.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("aggregator.") for k in missing):
        raise CheckpointError(f"SMT weights do not fit an SMT with a head: {missing} {unexpected}")
    headed.eval()
    names = list(meta["class_names"])
    negative = names.index(meta.get("negative_class") or names[0])
    sidecar = {**meta, "model": model}

    def bags(cases):
        return [slide_bag(headed, sidecar, Path(p), mpp) for p, _ in cases], [int(y) for _, y in cases]

    train_bags, train_labels = bags(train)
    val_bags, val_labels = bags(val)
    info = fit_attention(headed.aggregator, train_bags, train_labels, negative, val_bags, val_labels,
                         epochs=epochs, seed=seed)  # fmt: skip
    info["source"] = meta.get("_directory")
    sidecar = {k: v for k, v in sidecar.items() if not k.startswith("_")}
    sidecar["smt_attention"] = info
    save_float_artifact(headed, out_dir, sidecar)
    return load_smt_model(out_dir)
