"""Schemas of whole-slide work: the slide engine's entry config and the slide-derived datasets.

The reading, tissue and tiling nodes are shared by ``python -m patholite.slide`` (top level) and by the slide
datasets (under ``dataset``), so a model trained on tiles of one geometry is applied with the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from patholite.config.schema import DatasetConfig, PathsConfig


@dataclass
class ReaderConfig:
    """How slides are opened. ``mpp`` overrides the level-0 microns per pixel of every slide read (for
    slides whose own value is missing or nonsensical, e.g. a plain TIFF's 352.8 from its print resolution)."""

    mpp: float | None = None
    backend: str = "auto"  # auto (OpenSlide, then tiffslide) | openslide | tiffslide


@dataclass
class TissueConfig:
    """Tissue detection on a low-resolution image of the slide (R1: closing(opening(Otsu)))."""

    method: str = "otsu_saturation"  # otsu_saturation | otsu_gray
    max_side: int = 2048  # long side of the low-resolution image the mask is computed on
    open_um: float = 4.0  # radius of the opening (removes specks), micrometres; 8 erases thin strands
    close_um: float = 16.0  # radius of the closing (fills gaps), micrometres
    min_object_um2: float = 10000.0  # smaller tissue islands are dropped
    min_hole_um2: float = 20000.0  # smaller holes in the tissue are filled
    exclude_pen: bool = True  # pen ink (blue, green, black) is not tissue


@dataclass
class TileConfig:
    """The tile grid. ``mpp`` / ``size`` None: what the artifact was trained on (its sidecar)."""

    size: int | None = None  # tile side in pixels at the target resolution
    mpp: float | None = None  # target microns per pixel
    magnification: float | None = None  # or a target objective magnification
    overlap: int = 0  # pixels shared by neighbouring tiles, at the target resolution
    theta: float = 0.5  # keep tiles whose tissue fraction exceeds this (R1's theta_t)


@dataclass
class EngineConfig:
    """The pipelined inference: loader workers read tiles, the main thread runs the model, a writer thread
    saves predictions (R1: throughput = N / max(T_load, T_process, T_save))."""

    batch_size: int = 32
    workers: int = 2  # tile-reading processes (0: read in the main thread, no overlap)
    threads: int | None = None  # model threads; None: the machine's cores minus the workers (at least 1)
    prefetch: int = 4  # batches each worker reads ahead
    device: str = "cpu"


@dataclass
class SlideReportConfig:
    """What a slide's call is: the most severe class whose share of the tissue is at least ``min_share``."""

    severity: list[str] | None = None  # class names, least to most severe; None: the artifact's class order
    min_share: float = 0.05
    thumbnail_px: int = 1024  # long side of the thumbnail the heatmap and figure are drawn at


@dataclass
class SmtWalkConfig:
    """Inference-time settings of the SMT walk; None keeps what the artifact was trained with."""

    top_k: int | None = None  # K: more regions per layer find small lesions more often (1 + K + K^2 reads)
    aggregate: str | None = None  # slide score from the last layer's images: mean | max | attention
    # adaptive reads and tissue-masked candidates (model.smt's keys of the same names)
    top_k_max: int | None = None
    adaptive: str | None = None
    spread: float | None = None
    margin: float | None = None
    tissue_min: float | None = None


# ------------------------------------------------------------------------------- per-slide limits
@dataclass
class LimitsConfig:
    """Per-slide limits (``slides.supervise``): with either set, slides run one at a time in a supervised
    worker process, and a slide that runs past a limit is a failed row (its worker killed, a fresh one for
    the next slide) instead of a lost run. None: no limit (slides run in the run's own process)."""

    slide_seconds: float | None = None  # wall seconds one slide may take (reading, model, outputs)
    slide_memory_gb: float | None = None  # GB (2**30 bytes) the worker and its loader processes may hold


@dataclass
class SlideRunConfig:
    """``python -m patholite.slide``: a trained or compressed classifier over whole slides."""

    slide: str | None = None  # one slide file
    # a folder of slides, a text file with one slide path per line, or a CSV manifest (header: slide, and
    # optionally mpp, label, group; see slides.manifest)
    slides: str | None = None
    # an artifact folder (artifact.json) or a run folder (its best artifact); not with merge=
    artifact: str | None = None
    artifact_name: str | None = None  # which artifact of a run folder; None: the run's last stage
    # auto: by the artifact's sidecar (an SMT slide model -> smt, an encoder -> features, a tile classifier ->
    # tiles); tiles: tile the tissue and classify every tile; smt: the SMT walk (1 + K + K^2 region reads per
    # slide); features: every tile's embedding (an encoder's, or a classifier's pre-logits) into
    # <slide>/features.h5 (slides.features describes the file)
    mode: str = "auto"
    # the cohort folder every slide's outputs go to (<out>/<slide>/, written atomically; complete slides are
    # skipped by a rerun); None: the run folder. Required with shards > 1: every shard writes to it
    out: str | None = None
    shard: int | None = None  # which share of the cohort this job runs (0-based), with shards
    shards: int | None = None  # how many shares the cohort is split into, balanced by file size
    merge: str | None = None  # a cohort folder: build its summary from its slides' reports, nothing else
    overwrite: bool = False  # redo a cohort folder's slides made with another artifact or other settings
    annotations: str | None = None  # a file (one slide) or a folder of <slide stem>.xml|.geojson|.json
    annotation_classes: dict[str, str] = field(default_factory=dict)  # XML group -> class name
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    report: SlideReportConfig = field(default_factory=SlideReportConfig)
    smt: SmtWalkConfig = field(default_factory=SmtWalkConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # per-slide time and memory
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: Any = MISSING
    task_name: str = "slide"
    seed: int = 0
    tags: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ slide datasets
@dataclass
class SlideDatasetConfig(DatasetConfig):
    """Tiles cut from whole slides through the tiler, labelled from annotations, split by slide."""

    reader: ReaderConfig = field(default_factory=ReaderConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tile: TileConfig = field(default_factory=lambda: TileConfig(size=224, mpp=0.5))
    label_min_fraction: float = 0.5  # a tile takes the class covering at least this share of it
    max_tiles_per_slide: int | None = 2000  # seeded, class-balanced cap per slide (None: every tile)
    cache_dir: str = "${paths.cache_dir}/slides"
    # slide-level models (model=smt, MIL): binary (the family's Normal vs the rest, PANDA: ISUP 0 vs > 0) or
    # classes (the family's slide classes: the most severe annotated class; PANDA: ISUP grades 0-5)
    slide_labels: str = "binary"


@dataclass
class SyntheticSlidesConfig(SlideDatasetConfig):
    """Synthetic whole slides written by patholite's generator (no download)."""

    name: str = "synthetic_slides"
    slides_per_split: list[int] = field(default_factory=lambda: [6, 2, 2])  # train, val, test
    width: int = 8192
    height: int = 8192
    difficulty: float = 0.5
    seed: int = 0
    root: str | None = "${paths.cache_dir}/synthetic_slides"  # written here once
    # None: each slide is lesion-free with the generator's chance (1/4); a share: exactly round(n * share)
    # lesion-free slides in each split, the others with lesions
    normal_share: float | None = None
    # None: the generator's lesions (5-12% of the slide's short side across); [min, max] micrometres:
    # lesions of that equivalent diameter, 1..lesion_count of each of 1-2 lesion classes per lesion slide
    lesion_diameter_um: list[float] | None = None
    lesion_count: int = 2


@dataclass
class SmtSyntheticConfig(SyntheticSlidesConfig):
    """Synthetic slides for slide-level models: half of them lesion-free, small lesions on the others
    (a few percent of the tissue, like CAMELYON16's micro- and macro-metastases)."""

    name: str = "smt_synthetic"
    slides_per_split: list[int] = field(default_factory=lambda: [8, 4, 4])
    width: int = 4096
    height: int = 4096
    normal_share: float | None = 0.5
    lesion_diameter_um: list[float] | None = field(default_factory=lambda: [60.0, 140.0])
    lesion_count: int = 2


@dataclass
class Camelyon16Config(SlideDatasetConfig):
    """CAMELYON16: normal/tumor training slides with ASAP lesion XML, the official test set."""

    name: str = "camelyon16"
    tile: TileConfig = field(default_factory=lambda: TileConfig(size=224, magnification=20.0))


@dataclass
class BachWsiConfig(SlideDatasetConfig):
    """BACH part B: A01.svs..A10.svs with Aperio ImageScope XML region annotations."""

    name: str = "bach_wsi"


@dataclass
class PandaConfig(SlideDatasetConfig):
    """PANDA prostate biopsies (train_images/*.tiff, train_label_masks/*_mask.tiff, train.csv): slide-level
    ISUP labels only (no tiles)."""

    name: str = "panda"


SLIDE_DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "synthetic_slides": SyntheticSlidesConfig,
    "smt_synthetic": SmtSyntheticConfig,
    "camelyon16": Camelyon16Config,
    "bach_wsi": BachWsiConfig,
    "panda": PandaConfig,
}
