"""What a synthetic slide looks like (``SlideSpec``, its lesions), and the check that it can be made."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES
from patholite.errors import ConfigError

LESION_CLASSES = SYNTHETIC_CLASSES[1:]  # Normal is the background tissue, never a lesion

# CAMELYON's lesion-size categories by the lesion's greatest diameter (um): isolated tumour cells under
# 0.2 mm, micro-metastases 0.2-2 mm, macro-metastases over 2 mm.
SIZE_CATEGORIES = {"itc": (0.0, 200.0), "micro": (200.0, 2000.0), "macro": (2000.0, float("inf"))}
# The equivalent-circle diameters the generator draws for each category. A shape's greatest diameter is at
# least its equivalent circle's, and the generator's outlines are at most about 1.5x longer (elongation
# 1-1.35 plus wobble), so each range sits inside its category; the benchmark still buckets each lesion by
# its measured greatest diameter, not by this draw.
LESION_SIZES_UM = {"itc": (60.0, 120.0), "micro": (300.0, 1300.0), "macro": (2000.0, 2400.0)}


@dataclass(frozen=True)
class LesionSpec:
    """``count`` lesions of class ``cls`` with equivalent-circle diameters drawn from ``diameter_um``."""

    cls: str
    count: int
    diameter_um: tuple[float, float]


@dataclass
class SlideSpec:
    """What one synthetic slide looks like. Sizes in level-0 pixels unless named ``_um``."""

    width: int
    height: int
    mpp: float = 0.5
    magnification: float = 20.0
    tile: int = 256
    quality: int = 85  # JPEG
    level_downsample: int = 4  # between pyramid levels
    min_level_side: int = 1000  # add levels until the long side is below this
    seed: int = 0
    difficulty: float = 0.5  # of the synthetic tissue, as in generate_tile
    texture_px: int = 256  # level-0 size of one synthetic tissue tile
    bank_size: int = 4  # texture tiles per class
    lesions: list[LesionSpec] = field(default_factory=list)
    tissue_fraction: float = 0.35  # target share of the slide covered by tissue
    tissue_pieces: int = 3
    truth_downsample: int = 16
    pen_marks: bool = True
    folds: bool = True
    bubbles: bool = True
    faint_fat: bool = True  # very pale fat: tissue in the truth
    gradient: bool = True
    noise: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideSpec:
        """A spec from plain containers (a config or the JSON sidecar); lesions may be dicts."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown slide spec field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        lesions = []
        for i, item in enumerate(data.get("lesions") or []):
            if isinstance(item, LesionSpec):
                lesions.append(item)
                continue
            try:
                lesions.append(LesionSpec(str(item["cls"]), int(item["count"]), tuple(item["diameter_um"])))
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(
                    f"lesions[{i}]={item!r} must have cls, count and diameter_um: [min, max] ({err})"
                ) from err
        data["lesions"] = lesions
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready containers (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def size_category(diameter_um: float) -> str:
    """The CAMELYON category (``SIZE_CATEGORIES``) of a lesion whose greatest diameter is ``diameter_um``."""
    for name, (low, high) in SIZE_CATEGORIES.items():
        if low <= diameter_um < high:
            return name
    raise ValueError(f"size_category: diameter {diameter_um} um is not a positive length")


def lesions_of_size(
    category: str, count: int = 1, classes: tuple[str, ...] = LESION_CLASSES
) -> list[LesionSpec]:
    """A lesion menu of one size category (``LESION_SIZES_UM``): ``count`` lesions of each of ``classes``
    with diameters drawn in that category's range, for ``generate_slides``."""
    if category not in LESION_SIZES_UM:
        raise ConfigError(
            f"lesion size category {category!r} is unknown; use some of {list(LESION_SIZES_UM)} "
            "(isolated tumour cells < 0.2 mm, micro-metastases 0.2-2 mm, macro-metastases > 2 mm)"
        )
    if count < 1:
        raise ConfigError(f"lesions of size {category}: count={count} must be at least 1")
    return [LesionSpec(cls, count, LESION_SIZES_UM[category]) for cls in classes]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"synthetic slide: {message}")


def validate_spec(spec: SlideSpec) -> None:
    """Raise ConfigError naming the field when ``spec`` cannot make a slide."""
    t = spec.tile
    _check(t >= 16 and t % 16 == 0, f"tile={t} must be a multiple of 16 (TIFF tiles), e.g. 256")
    for name in ("width", "height"):
        v = getattr(spec, name)
        _check(isinstance(v, int | np.integer), f"{name}={v!r} must be a whole number of level-0 pixels")
        _check(v >= t, f"{name}={v} is smaller than one tile ({t} px); use at least {t}")
    _check(spec.mpp > 0, f"mpp={spec.mpp} must be positive (micrometres per level-0 pixel)")
    _check(spec.magnification > 0, f"magnification={spec.magnification} must be positive")
    _check(1 <= spec.quality <= 100, f"quality={spec.quality} must lie in 1..100")
    _check(spec.level_downsample in (2, 4, 8), f"level_downsample={spec.level_downsample} must be 2, 4 or 8")
    _check(spec.min_level_side >= 16, f"min_level_side={spec.min_level_side} must be at least 16")
    _check(0.0 <= spec.difficulty <= 1.0, f"difficulty={spec.difficulty} must lie in [0, 1]")
    tp = spec.texture_px
    _check(32 <= tp <= 2048 and tp & (tp - 1) == 0, f"texture_px={tp} must be a power of two in 32..2048")
    _check(spec.bank_size >= 1, f"bank_size={spec.bank_size} must be at least 1")
    _check(spec.truth_downsample >= 1, f"truth_downsample={spec.truth_downsample} must be at least 1")
    _check(spec.tissue_pieces >= 1, f"tissue_pieces={spec.tissue_pieces} must be at least 1")
    _check(0 < spec.tissue_fraction <= 0.6, f"tissue_fraction={spec.tissue_fraction} must lie in (0, 0.6]")
    for i, les in enumerate(spec.lesions):
        _check(
            les.cls in LESION_CLASSES,
            f"lesions[{i}].cls={les.cls!r} is not a lesion class; use one of {LESION_CLASSES} "
            "(Normal is the background tissue)",
        )
        _check(les.count >= 0, f"lesions[{i}].count={les.count} must be 0 or more")
        lo_hi = tuple(les.diameter_um)
        _check(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
            f"lesions[{i}].diameter_um={lo_hi} must be (min, max) micrometres with 0 < min <= max",
        )
