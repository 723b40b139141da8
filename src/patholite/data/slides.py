"""Tile-level training sets cut from whole slides: tissue tiles labelled from annotations, split by slide.

Each slide goes through the steps the slide engine runs (``patholite.slides``): open, detect tissue, tile at
the target resolution (``dataset.tile``), then label every tile from the rasterised annotations. Unannotated
tissue is Normal; tiles in exclusion regions or without a clear majority class are dropped;
``max_tiles_per_slide`` keeps a seeded, class-balanced sample so rare lesion tiles survive. A slide's tiles
are cached (``cache_dir/labelled_tiles``), keyed by the slide and annotation files and every setting, so a
second setup opens no slide. Items are read lazily from the slides (``ImageSet.slide_read``); a slide's
tiles never straddle splits. Families: ``synthetic_slides``, ``camelyon16``, ``bach_wsi``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from patholite.data.base import SPLITS, HistologyDataModule, ImageSet
from patholite.data.images import shown
from patholite.data.splits import check_fractions, grouped_split
from patholite.data.synthetic.slides import generate_slides
from patholite.data.synthetic.spec import LESION_CLASSES, LesionSpec, SlideSpec
from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES
from patholite.errors import ConfigError, DatasetError
from patholite.io import atomic_path
from patholite.wsi.annotations import check_fits, rasterize, read_annotations, tile_labels
from patholite.wsi.cache import file_identity, slide_cache_dir, tissue_for
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import cached_tiles

log = logging.getLogger(__name__)

NORMAL = "Normal"  # the class of tissue no annotation covers
_CACHE_VERSION = 2  # bump when the labelling changes: it keys the per-slide tile cache (2: holes, unions)
_LABEL_MAP_PX = 16  # label-map pixels per tile side: tile fractions in steps of 1/256
_MAX_LABEL_MAP_SIDE = 16384  # bounds the label map of very large slides


# ------------------------------------------------------------------------------------------- slides
@dataclass
class SlideEntry:
    """One slide of a dataset: its file, annotation file, slide-level class and split."""

    slide: Path
    annotation: Path | None
    label: str
    split: str | None = None  # official or generated split; None: drawn by slide with the fractions
    tileable: bool = True  # False: its tiles cannot be labelled (a lesion slide without annotations)

    @property
    def group(self) -> str:
        return self.slide.stem


def cap_tiles(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``cap`` tiles, shared as evenly as the classes allow (a class with few tiles
    keeps them all; the rest go to the larger ones)."""
    if len(labels) <= cap:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota, left = {}, cap
    for rank, i in enumerate(np.argsort(counts, kind="stable")):
        quota[classes[i]] = min(int(counts[i]), left // (len(classes) - rank))
        left -= quota[classes[i]]
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in quota.items()]
    return np.sort(np.concatenate(picked))


class SlideDataModule(HistologyDataModule):
    """Tiles of whole slides. A family lists its slides (``list_slides``) and maps annotation groups to
    classes (``class_map``); tiling, labelling, caching and the split by slide are shared."""

    def __init__(self, cfg, pin_memory: bool = False) -> None:
        super().__init__(cfg, pin_memory=pin_memory)
        self._entries: list[SlideEntry] | None = None
        self._target_mpps: list[float] = []  # of the slides tiled so far (NaN: unknown)

    # -- what a family implements
    def list_slides(self) -> list[SlideEntry]:
        raise NotImplementedError

    def class_map(self) -> dict[str, str]:
        return {c: c for c in self.default_class_names()}

    # -- listing and splitting: no slide is opened (synthetic slides are generated here, once)
    def slide_entries(self) -> list[SlideEntry]:
        """Every slide with its split; slides without an official split are split by slide, seeded,
        stratified by slide-level class."""
        if self._entries is None:
            self._check_config()
            entries = self.list_slides()
            free = [e for e in entries if e.split is None]
            if free:
                official = {e.split for e in entries} - {None}
                val = 0.0 if "val" in official else self.cfg.val_fraction
                test = 0.0 if "test" in official else self.cfg.test_fraction
                check_fractions(
                    val, test, f"dataset={self.cfg.name}", "val" not in official, "test" not in official
                )
                index = {c: i for i, c in enumerate(self.class_names)}
                drawn = grouped_split([index[e.label] for e in free], None, val, test, self.cfg.split_seed)
                for split, rows in drawn.items():
                    for i in rows:
                        free[i].split = split
            self._entries = entries
        return self._entries

    def slide_table(self) -> list[dict]:
        """One row per slide: ``slide`` path, ``annotation`` path or None, slide-level ``label``, split."""
        return [
            {"slide": str(e.slide), "annotation": None if e.annotation is None else str(e.annotation),
             "label": e.label, "split": e.split}
            for e in self.slide_entries()
        ]  # fmt: skip

    def _check_config(self) -> None:
        cfg, where = self.cfg, f"dataset={self.cfg.name}"
        if sorted(self.class_names) != sorted(self.default_class_names()):
            raise DatasetError(
                f"{where}: dataset.class_names={self.class_names} must name the classes "
                f"{self.default_class_names()} (the order sets label indices and which class wins where "
                "annotations overlap: least to most severe) or be left empty"
            )
        for bad, what in (
            ((cfg.tile.size or 0) < 8, f"dataset.tile.size={cfg.tile.size} must be 8 px or more"),
            ((cfg.tile.mpp is None) == (cfg.tile.magnification is None),
             "set exactly one of dataset.tile.mpp and dataset.tile.magnification"),
            (cfg.mpp is not None, "dataset.mpp is not used by slide datasets; set dataset.tile.mpp (the "
             "resolution tiles are read at) or dataset.reader.mpp (the slides' level-0 um/px)"),
            (not 0.0 < cfg.label_min_fraction <= 1.0,
             f"dataset.label_min_fraction={cfg.label_min_fraction} must lie in (0, 1]"),
            ((cfg.max_tiles_per_slide or 1) < 1, "dataset.max_tiles_per_slide must be >= 1, or null for all"),
        ):  # fmt: skip
            if bad:
                raise ConfigError(f"{where}: {what}")

    # -- tiles
    def read_splits(self) -> dict[str, ImageSet]:
        entries = self.slide_entries()
        skipped = [e.slide.name for e in entries if not e.tileable]
        if skipped:
            log.warning("dataset=%s: no annotations, so no tiles, for %s", self.cfg.name, shown(skipped))
        r = self.cfg.reader
        read = {"patch_size": int(self.cfg.tile.size), "mpp": r.mpp, "backend": r.backend}
        out = {}
        for split in SPLITS:
            parts = [(e, *self.slide_tiles(e)) for e in entries if e.split == split and e.tileable]
            out[split] = ImageSet(
                labels=np.concatenate([lab for _, _, lab, _ in parts] or [np.zeros(0, np.int64)]),
                paths=[str(e.slide) for e, xy, _, _ in parts for _ in xy],
                boxes=[(int(x), int(y), s, s) for _, xy, _, s in parts for x, y in xy],
                groups=[e.group for e, xy, _, _ in parts for _ in xy],
                slide_read=read,
            )
        return out

    def _cache_file(self, entry: SlideEntry) -> Path:
        cfg = self.cfg
        settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("reader", "tissue", "tile")}
        key = {
            "version": _CACHE_VERSION,
            "slide": file_identity(entry.slide),
            "annotation": file_identity(entry.annotation),
            "class_names": self.class_names,
            "class_map": self.class_map(),
            "min_fraction": cfg.label_min_fraction,
            "cap": cfg.max_tiles_per_slide,
            "seed": cfg.split_seed,
            **settings,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(cfg.cache_dir).expanduser() / "labelled_tiles" / f"{entry.slide.stem}-{digest}.npz"

    def slide_tiles(self, entry: SlideEntry) -> tuple[np.ndarray, np.ndarray, int]:
        """A slide's labelled tiles, cached: level-0 top-left ``coords`` (N, 2), ``labels``, tile side."""
        path = self._cache_file(entry)
        if path.is_file():
            try:
                with np.load(path) as z:
                    self._target_mpps.append(float(z["target_mpp"]))
                    return z["coords"], z["labels"], int(z["size0"])
            except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                log.warning("tile cache %s is unreadable (%s); tiling %s again", path, err, entry.slide)
        coords, labels, size0, target_mpp = self._tile_and_label(entry)
        keep = labels >= 0
        coords, labels = coords[keep], labels[keep]
        if self.cfg.max_tiles_per_slide is not None:
            rng = np.random.default_rng([self.cfg.split_seed, zlib.crc32(entry.group.encode())])
            pick = cap_tiles(labels, self.cfg.max_tiles_per_slide, rng)
            coords, labels = coords[pick], labels[pick]
        coords, labels = coords.astype(np.int64), labels.astype(np.int64)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz"
            np.savez(f, coords=coords, labels=labels, size0=size0, target_mpp=target_mpp)
        self._target_mpps.append(target_mpp)
        return coords, labels, size0

    def _tile_and_label(self, entry: SlideEntry) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Tile grid and tile labels (-1: no clear label) of one slide, its tile side and target mpp."""
        cfg, t, normal = self.cfg, self.cfg.tile, self.class_names.index(NORMAL)
        with open_slide(entry.slide, mpp=cfg.reader.mpp, backend=cfg.reader.backend) as slide:
            # the engine's cache layout and grid file name, so training and inference share a slide's tissue
            # mask and tile grid (cached_tiles checks the settings the name leaves out)
            cache = slide_cache_dir(Path(cfg.cache_dir).expanduser(), entry.slide, cfg)
            grid = cached_tiles(
                slide, cache / f"tiles-{t.size}-{t.mpp}-{t.magnification}.h5", patch_size=int(t.size),
                mpp=t.mpp, magnification=t.magnification, overlap=t.overlap,
                tissue=tissue_for(slide, cfg, cache), theta=t.theta,
            )  # fmt: skip
            coords, size0 = np.asarray(grid.coords).reshape(-1, 2), int(grid.size0)
            labels = np.full(len(coords), normal, dtype=np.int64)  # unannotated tissue
            if entry.annotation is not None:
                annotations = read_annotations(entry.annotation, self.class_map())
                check_fits(annotations, slide.dimensions, entry.annotation)
                ds = max(1.0, size0 / _LABEL_MAP_PX, max(slide.dimensions) / _MAX_LABEL_MAP_SIDE)
                label_map, excluded = rasterize(annotations, self.class_names, slide.dimensions, ds, normal)
                labels, _ = tile_labels(label_map, excluded, ds, coords, size0, cfg.label_min_fraction)
        log.info("%s: %d tissue tiles, %d labelled", entry.slide.name, len(coords), int((labels >= 0).sum()))
        return coords, labels, size0, np.nan if grid.mpp is None else float(grid.mpp)

    def tile_geometry(self) -> dict[str, float | int | None]:
        """The target mpp (``tile.mpp``, or what ``tile.magnification`` gives on the first slide) and size."""
        known = [m for m in self._target_mpps if np.isfinite(m)]
        mpp = self.cfg.tile.mpp or (known[0] if known else None)
        if mpp is None:
            first = self.slide_entries()[0].slide
            with open_slide(first, mpp=self.cfg.reader.mpp, backend=self.cfg.reader.backend) as slide:
                mpp = slide.require_mpp() * slide.downsample_for(magnification=self.cfg.tile.magnification)
        return {"mpp": float(mpp), "tile_size": int(self.cfg.tile.size)}

    def most_severe(self, annotation: Path) -> str:
        """The slide-level class of an annotated slide: its most severe annotated class (the last in
        ``class_names`` order), else Normal."""
        found = {a.group for a in read_annotations(annotation, self.class_map()) if not a.exclude}
        return max(found | {NORMAL}, key=self.class_names.index)


# ------------------------------------------------------------------------------------------ families
class SyntheticSlidesDataModule(SlideDataModule):
    """Slides drawn by patholite's generator into ``root/<settings>/<split>``, once; lesion polygons in ASAP
    XML whose groups are the class names. Checks the pipeline only, like the synthetic tiles."""

    def default_class_names(self) -> list[str]:
        return list(SYNTHETIC_CLASSES)

    def list_slides(self) -> list[SlideEntry]:
        cfg, counts = self.cfg, list(self.cfg.slides_per_split)
        if len(counts) != 3 or min(counts) < 1:
            raise ConfigError(f"dataset.slides_per_split={counts} needs three counts >= 1 (train, val, test)")
        lesions, tag = self._lesion_menu()
        spec = SlideSpec(width=cfg.width, height=cfg.height, difficulty=cfg.difficulty, lesions=lesions)
        # a folder per setting, so sweeps over them never rewrite each other's slides
        folder = self.root / f"{cfg.width}x{cfg.height}-d{cfg.difficulty:g}-s{cfg.seed}{tag}"
        share = cfg.get("normal_share")
        entries = []
        for i, (split, n) in enumerate(zip(SPLITS, counts, strict=True)):
            if share is None:
                # a seed per split (a bijection of seed and split): more training slides leave val and test
                # alone; each slide is lesion-free with the generator's chance
                drawn = generate_slides(folder / split, n, spec, seed=3 * cfg.seed + i, prefix=split)
            else:  # exactly round(n * share) lesion-free slides per split (at least one of each kind)
                normal = min(max(round(n * share), int(share > 0)), n - int(share < 1))
                drawn = [
                    *generate_slides(folder / split, normal, spec, seed=6 * cfg.seed + 2 * i,
                                     normal_share=1.0, prefix=f"{split}_normal"),
                    *generate_slides(folder / split, n - normal, spec, seed=6 * cfg.seed + 2 * i + 1,
                                     normal_share=0.0, prefix=f"{split}_tumor"),
                ]  # fmt: skip
            entries += [SlideEntry(s.path, s.xml_path, s.slide_class, split) for s in drawn]
        return entries

    def _lesion_menu(self) -> tuple[list, str]:
        """The lesions slides may hold (``lesion_diameter_um``, ``lesion_count``; none set: the generator's
        default menu) and the folder-name tag of the lesion and normal-share settings."""
        cfg, tag = self.cfg, ""
        if cfg.get("normal_share") is not None:
            if not 0.0 <= cfg.normal_share <= 1.0:
                raise ConfigError(f"dataset.normal_share={cfg.normal_share} must lie in [0, 1], or null")
            tag += f"-n{cfg.normal_share:g}"
        sizes = cfg.get("lesion_diameter_um")
        if sizes is None:
            return [], tag
        sizes, count = [float(v) for v in sizes], int(cfg.lesion_count)
        if len(sizes) != 2 or not 0 < sizes[0] <= sizes[1] or count < 1:
            raise ConfigError(
                f"dataset.lesion_diameter_um={sizes} must be [min, max] micrometres with 0 < min <= max and "
                f"dataset.lesion_count={count} at least 1"
            )
        lesions = [LesionSpec(c, count, (sizes[0], sizes[1])) for c in LESION_CLASSES]
        return lesions, f"{tag}-l{count}x{sizes[0]:g}-{sizes[1]:g}um"
