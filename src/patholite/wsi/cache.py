"""Where a slide's tissue mask and tile coordinates are kept, shared by the slide engine and the slide
datasets, so a slide is analysed once per setting whoever reads it first."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from patholite.wsi.tissue import TISSUE_VERSION, TissueMask, detect_tissue

log = logging.getLogger(__name__)


def file_identity(path: Path | None) -> list | None:
    """What identifies a file's content for a cache key without reading it: path, size, modification time."""
    if path is None:
        return None
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def slide_cache_dir(cache_root: Path, path: Path, cfg) -> Path:
    """Where a slide's tissue mask and tile coordinates are kept: keyed by the file (path, size, mtime)
    and by every setting that changes them, so a slide is tiled once per geometry."""
    key = {
        "slide": file_identity(path),
        "tissue_version": TISSUE_VERSION,  # a changed detector never reuses old masks
        "mpp": cfg.reader.mpp,
        "tissue": {k: cfg.tissue[k] for k in cfg.tissue},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root / f"{path.stem}-{digest}"


def tissue_for(slide, cfg, cache: Path):
    """The slide's tissue mask, detected once and cached."""
    mask_path = cache / "tissue.npz"
    if mask_path.is_file():
        try:
            return TissueMask.load(mask_path)
        except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log.warning("tissue mask cache %s is unreadable (%s); detecting again", mask_path, err)
    # the tissue node's keys are detect_tissue's options (config/slide_schema.TissueConfig)
    mask = detect_tissue(slide, **{key: cfg.tissue[key] for key in cfg.tissue})
    mask.save(mask_path)
    return mask
