"""A cohort: the slides one ``slides=`` names, each with what a manifest says about it.

``slides=`` is a slide file, a folder, a plain list (one path per line) or a CSV manifest: a header row naming
a ``slide`` (or ``path``) column, and optionally ``mpp`` (this slide's level-0 microns per pixel, for real
archives whose files carry a wrong or missing one: it overrides ``reader.mpp`` for that slide only),
``label`` and ``group`` (carried into the slide's report.json and the summary). Relative paths are read from
the manifest's folder. A slide listed twice is refused: its two outputs would share a folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from patholite.errors import ConfigError
from patholite.wsi.reader import MANIFEST_PATH_COLUMNS, find_slides, manifest_header

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("mpp", "label", "group")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort and what its manifest row says (None: not given)."""

    path: Path
    mpp: float | None = None  # overrides reader.mpp for this slide
    label: str | None = None
    group: str | None = None


def read_cohort(source: str | Path) -> list[SlideEntry]:
    """The slides ``source`` names (``find_slides``), with a manifest's per-slide columns."""
    source = Path(source).expanduser()
    header = manifest_header(source)
    if header is None:
        entries = [SlideEntry(p) for p in find_slides(source)]
    else:
        entries = _read_manifest(source, header)
    _check_unique(entries, source)
    return entries


def _read_manifest(source: Path, header: list[str]) -> list[SlideEntry]:
    path_column = next(c for c in header if c in MANIFEST_PATH_COLUMNS)
    known = {path_column, *MANIFEST_COLUMNS}
    ignored = [c for c in header if c not in known]
    if ignored:  # a LIMS export carries more columns; say which are not read (a typo of mpp shows here)
        log.warning("manifest %s: columns %s are not read (patholite reads %s)", source, ignored,
                    [path_column, *MANIFEST_COLUMNS])  # fmt: skip
    entries = []
    # (line number, text) of every line that is not a comment, the header first
    lines = [
        (n, t) for n, t in enumerate(source.read_text().splitlines(), 1) if not t.lstrip().startswith("#")
    ]
    rows = csv.reader(t for _, t in lines)
    next(rows)  # the header
    for (line, _), row in zip(lines[1:], rows, strict=False):
        if not any(cell.strip() for cell in row):
            continue
        cells = {c: v.strip() for c, v in zip(header, row, strict=False)}
        where = f"manifest {source}, line {line}"
        name = cells.get(path_column, "")
        if not name:
            raise ConfigError(f"{where}: the {path_column} column is empty; give the slide's path")
        path = Path(name).expanduser()
        path = path if path.is_absolute() else source.parent / path
        entries.append(
            SlideEntry(
                path,
                _mpp(cells.get("mpp", ""), where),
                cells.get("label") or None,
                cells.get("group") or None,
            )  # fmt: skip
        )
    if not entries:
        raise ConfigError(
            f"slides={source}: the manifest names no slides (one row per slide under its header)"
        )
    return entries


def _mpp(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{where}: mpp={text!r} is not a positive number of microns per pixel (e.g. 0.25 at 40x, 0.5 at "
            "20x); leave the cell empty to use the slide's own"
        )
    return value


def _check_unique(entries: list[SlideEntry], source: Path) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        key = os.path.abspath(entry.path)
        if key in seen:
            raise ConfigError(
                f"slides={source} names {entry.path} twice (entries {seen[key] + 1} and {i + 1}); list each "
                "slide once"
            )
        seen[key] = i
