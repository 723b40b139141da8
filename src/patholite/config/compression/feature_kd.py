"""``compression.feature_kd``: label-free feature distillation of an encoder into a smaller one (the
``feature_kd`` stage): the student learns its teachers' embeddings on unlabelled tiles."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TileSourceConfig:
    """The unlabelled tiles a student learns from. ``dataset=`` stays the labelled data the encoder is
    judged on."""

    # dataset: the train split of dataset= with its labels ignored | images: every image file under `path`
    # (an image folder or a tile dataset's folder; class folders are ignored) | slides: tissue tiles of the
    # slides under `path`, cut at `mpp` by the slide tiler
    kind: str = "dataset"
    path: str | None = None  # images, slides: the folder
    mpp: float = 0.5  # slides: microns per pixel of the tiles
    tile_px: int = 224  # slides: the side of a tile at `mpp`, before the resize to the networks' inputs
    per_slide: int | None = 256  # slides: at most this many tissue tiles per slide (a seeded draw)
    max_tiles: int | None = None  # a seeded draw of at most this many tiles in all (None: every tile)
    val_fraction: float = 0.05  # held out (a seeded draw): the feature loss the best epoch is chosen by
    seed: int = 0


@dataclass
class FeatureAugmentConfig:
    """What the student sees: histology augmentations of the tile the teacher sees clean."""

    flips: bool = True
    rotate90: bool = True
    stain_sigma: float = 0.05  # HED stain jitter (Tellez et al.); 0: off


@dataclass
class FeatureKdConfig:
    """Label-free feature distillation (AM-RADIO / H0-mini; several teachers and nested embeddings as in
    Pathryoshka). The loss, per teacher and per nested size, between the student's projected embedding p and
    the teacher's t (standardised per dimension over the tile set): cosine_weight * (1 - cos(p, t)) +
    smooth_l1_weight * SmoothL1(p, t), on the class-token embedding, plus patch_weight times the same on the
    mean patch tokens."""

    # teachers: model options or trained run / artifact folders; empty: compression.teacher alone
    teachers: list[str] = field(default_factory=list)
    tiles: TileSourceConfig = field(default_factory=TileSourceConfig)
    augment: FeatureAugmentConfig = field(default_factory=FeatureAugmentConfig)
    projection: str = "mlp"  # linear | mlp (Linear-GELU-Linear): student width -> each teacher's width
    cosine_weight: float = 1.0
    smooth_l1_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    patch_weight: float = 0.0  # > 0: also distil the mean of the patch tokens
    nested: list[int] = field(default_factory=list)  # e.g. [64, 128, 192]: the loss at these prefixes too
    standardize: bool = True  # teacher embeddings standardised per dimension over the tile set
    epochs: int | None = None  # None: trainer.max_epochs
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    teacher_batch_size: int = 64  # tiles per teacher forward pass when its embeddings are cached


SCHEMA = FeatureKdConfig
