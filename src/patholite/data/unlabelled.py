"""Unlabelled tiles for label-free feature distillation (``compression.feature_kd.tiles``).

Three sources: the labelled train split with its labels ignored (``kind=dataset``), every image file under a
folder (``kind=images``; class folders are just folders) and the tissue tiles of every slide under a folder
(``kind=slides``: tissue detected and tiles cut at ``mpp`` with the slide tiler, at most ``per_slide`` per
slide). ``max_tiles`` then keeps a seeded draw. Items are ``(image, index)``: a 3 x S x S uint8 tensor, not
normalised (teacher and student each normalise with their own mean and std), and the tile's index, which
keys the cached teacher embeddings (``pipelines/embeddings.py``).

``key()`` describes the tiles for that cache: the source, every setting that picks or shapes a tile, and a
sha256 of the files (path, size, modification time) and of the chosen tiles, so a changed file or setting
never reuses another tile set's embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from patholite.data.base import Box, ImageSet
from patholite.data.images import read_rgb, shown
from patholite.errors import ConfigError, DatasetError, SlideError
from patholite.wsi.reader import SLIDE_SUFFIXES, open_slide, read_slide_tile
from patholite.wsi.tiling import tile_grid
from patholite.wsi.tissue import TISSUE_VERSION, detect_tissue

log = logging.getLogger(__name__)

KINDS = ("dataset", "images", "slides")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
WHERE = "compression.feature_kd.tiles"
KEY_VERSION = 1  # bump when the same settings would give other tiles
_THETA = 0.5  # tissue fraction a slide tile needs (the slide datasets' default tile.theta)


@dataclass(frozen=True)
class _Source:
    """Where the tiles come from, as the key records it."""

    kind: str
    path: str | None
    files_sha256: str
    settings: dict


class UnlabelledTiles(Dataset):
    """Tiles without labels: ``(image, index)`` with image a 3 x ``image_size`` x ``image_size`` uint8
    tensor. Holds paths and boxes only (slides are opened lazily, once per loader worker), so it pickles."""

    def __init__(
        self,
        source: _Source,
        image_size: int,
        images: ImageSet | None = None,
        paths: list[str] | None = None,
        boxes: list[Box | None] | None = None,
        tile_px: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        self._source = source
        self.image_size = int(image_size)
        self.images = images  # kind=dataset: the labelled split, read through ImageSet.load
        self.paths = paths  # images: files; slides: one slide path per tile
        self.boxes = boxes  # slides: level-0 squares (x, y, size0, size0)
        self.tile_px = tile_px
        self._key = self._describe()

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.ascontiguousarray(self._load(index))).permute(2, 0, 1)
        size = [self.image_size, self.image_size]
        if list(image.shape[1:]) != size:
            image = TF.resize(image, size, antialias=True)
        return image, int(index)

    def _load(self, index: int) -> np.ndarray:
        if self.images is not None:
            return self.images.load(index)
        if self.boxes is not None:
            return read_slide_tile(self.paths[index], self.boxes[index], self.tile_px)
        return read_rgb(self.paths[index])

    def _describe(self) -> dict:
        # the chosen tiles themselves (which file, which box), so another draw is another key
        items = _set_items(self.images) if self.images is not None else _items(self.paths, self.boxes)
        src = self._source
        return {
            "version": KEY_VERSION,
            "kind": src.kind,
            "path": src.path,
            "files_sha256": src.files_sha256,
            **src.settings,
            "image_size": self.image_size,
            "tiles_sha256": _sha256(items),
            "count": len(self),
        }

    def key(self) -> dict:
        """What determines the tiles, JSON-able: another key means other tiles (or other pixels)."""
        return json.loads(json.dumps(self._key))

    def split(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Seeded (train, val) indices, each sorted; val is empty when ``val_fraction`` is 0."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
        n = len(self)
        n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _identity(path: str | Path) -> list:
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _set_items(images: ImageSet) -> list:
    if images.paths is None:
        return [int(len(images))]  # in memory: the pixels are hashed as the files
    return _items(images.paths, images.boxes)


def _items(paths: list[str], boxes: list[Box | None] | None) -> list:
    """(file, box) of each tile, JSON-able."""
    boxes = boxes if boxes is not None else [None] * len(paths)
    return [[p, None if b is None else [int(v) for v in b]] for p, b in zip(paths, boxes, strict=True)]


def _set_files_sha256(images: ImageSet) -> str:
    if images.paths is None:
        h = hashlib.sha256(np.ascontiguousarray(images.images).tobytes())
        h.update(repr(images.images.shape).encode())
        return h.hexdigest()
    return _sha256({"files": [_identity(p) for p in dict.fromkeys(images.paths)], "read": images.slide_read})


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Every non-hidden file under ``folder`` with one of ``suffixes``, sorted, recursively."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes
        ]
    return sorted(found)


def _draw(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``cap`` of ``n`` items (all of them when ``cap`` is None or not below n)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def check_tile_source(cfg, where: str = WHERE) -> None:
    """Every key of the tile source, before any file is read; one ConfigError naming the key."""
    kind = cfg.kind
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind={kind!r}: choose one of {list(KINDS)}")
    if kind == "dataset" and cfg.path is not None:
        raise ConfigError(
            f"{where}.path={cfg.path} is read only with {where}.kind=images or slides; set the kind, or "
            f"drop the path to learn from dataset='s train split"
        )
    if kind != "dataset" and not cfg.path:
        raise ConfigError(f"{where}.path={cfg.path}: {where}.kind={kind} needs the folder of the {kind}")
    if kind == "slides":
        if not (cfg.mpp is not None and cfg.mpp > 0):
            raise ConfigError(f"{where}.mpp={cfg.mpp} must be positive (microns per pixel of the tiles)")
        if not (cfg.tile_px is not None and int(cfg.tile_px) == cfg.tile_px and cfg.tile_px > 0):
            raise ConfigError(f"{where}.tile_px={cfg.tile_px} must be a positive whole number of pixels")
        if cfg.per_slide is not None and cfg.per_slide < 1:
            raise ConfigError(f"{where}.per_slide={cfg.per_slide} must be 1 or more, or null for every tile")
    if cfg.max_tiles is not None and cfg.max_tiles < 1:
        raise ConfigError(f"{where}.max_tiles={cfg.max_tiles} must be 1 or more, or null for every tile")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(
            f"{where}.val_fraction={cfg.val_fraction} must lie in [0, 1) (0: no held-out tiles)"
        )


def unlabelled_tiles(
    source_cfg, labelled: ImageSet | None, image_size: int, where: str = WHERE
) -> UnlabelledTiles:
    """The tiles ``source_cfg`` (a ``TileSourceConfig`` or its node) names, at ``image_size``; ``labelled``
    is the train split ``kind=dataset`` reads. ``where`` names the block in error messages."""
    cfg = source_cfg
    check_tile_source(cfg, where)
    rng = np.random.default_rng([int(cfg.seed), 1])  # the max_tiles draw; per-slide draws have their own
    common = {"max_tiles": cfg.max_tiles, "seed": int(cfg.seed)}
    if cfg.kind == "dataset":
        if labelled is None or len(labelled) == 0:
            raise ConfigError(
                f"{where}.kind=dataset reads the train split of dataset=, and it is empty here; set "
                f"{where}.kind=images or slides with {where}.path"
            )
        source = _Source("dataset", None, _set_files_sha256(labelled), common)
        keep = _draw(len(labelled), cfg.max_tiles, rng)
        return UnlabelledTiles(source, image_size, images=labelled.subset(keep))

    folder = Path(cfg.path).expanduser().resolve()
    if not folder.is_dir():
        found = " (it is a file)" if folder.exists() else ""
        raise DatasetError(f"{where}.path={cfg.path}: the folder {folder} does not exist{found}")
    if cfg.kind == "images":
        files = _walk(folder, IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(
                f"{where}.path={folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): an empty tile source"
            )
        source = _Source("images", str(folder), _sha256([_identity(f) for f in files]), common)
        keep = _draw(len(files), cfg.max_tiles, rng)
        return UnlabelledTiles(source, image_size, paths=[str(files[i]) for i in keep])
    return _slide_tiles(cfg, folder, image_size, rng, common, where)


def _slide_tiles(
    cfg, folder: Path, image_size: int, rng: np.random.Generator, common: dict, where: str
) -> UnlabelledTiles:
    """Tissue tiles of every slide under ``folder``: at most ``per_slide`` each, drawn with a seed of the
    slide's own (adding a slide leaves the others' draws alone)."""
    slides = _walk(folder, SLIDE_SUFFIXES)
    if not slides:
        raise DatasetError(
            f"{where}.path={folder} holds no slides ({', '.join(SLIDE_SUFFIXES)}): an empty tile source"
        )
    tile_px, paths, boxes, empty = int(cfg.tile_px), [], [], []
    for path in slides:
        with open_slide(path) as slide:
            slide.require_mpp()  # a slide without mpp is the user's to fix (a clear error), not to skip
            try:
                grid = tile_grid(
                    slide, tile_px, mpp=float(cfg.mpp), tissue=detect_tissue(slide), theta=_THETA
                )
            except SlideError as err:  # no tissue, or tiles larger than the slide: no tiles from it
                log.warning("%s: no tiles from %s (%s)", where, path.name, err)
                empty.append(path.name)
                continue
        name = str(path.relative_to(folder))
        pick = _draw(
            len(grid), cfg.per_slide, np.random.default_rng([int(cfg.seed), zlib.crc32(name.encode())])
        )
        paths += [str(path)] * len(pick)
        boxes += [(int(x), int(y), grid.size0, grid.size0) for x, y in grid.coords[pick]]
        log.info("%s: %d of %d tissue tiles from %s", where, len(pick), len(grid), name)
    if not paths:
        raise DatasetError(
            f"{where}.path={folder}: none of its {len(slides)} slides gave a tissue tile at "
            f"{where}.mpp={cfg.mpp}, tile_px={tile_px} ({shown(empty)}): an empty tile source. Check the "
            "slides hold tissue, or use a smaller tile_px or finer mpp"
        )
    settings = {
        "mpp": float(cfg.mpp), "tile_px": tile_px, "per_slide": cfg.per_slide, "theta": _THETA,
        "tissue_version": TISSUE_VERSION, **common,
    }  # fmt: skip
    source = _Source("slides", str(folder), _sha256([_identity(s) for s in slides]), settings)
    keep = _draw(len(paths), cfg.max_tiles, rng)
    return UnlabelledTiles(
        source, image_size, paths=[paths[i] for i in keep], boxes=[boxes[i] for i in keep], tile_px=tile_px
    )
