"""Feature files: one slide's tile embeddings as an h5 file, and MIL trained on them.

``python -m patholite.slide mode=features`` writes ``<out>/<slide>/features.h5`` (``slides.extract``), the
layout CLAM / TRIDENT-style MIL tools read:

- dataset ``features``: N x D float32, one embedding per tissue tile;
- dataset ``coords``: N x 2 int64, the tile's level-0 top-left (x, y); the rows and order of the slide's
  ``tiles.csv``;
- attributes: ``slide`` (the slide file's stem), ``slide_path``, ``patch_size`` (level-0 side of a tile),
  ``patch_level`` (0: ``coords`` and ``patch_size`` are level-0 pixels), ``mpp`` (the tiles' microns per
  pixel; NaN when unknown), ``tile_px`` (the network's input side), ``embed_dim`` (D), ``artifact`` (the
  artifact folder), ``artifact_kind``, ``model`` (the model name), ``encoder`` (true: an encoder artifact;
  false: a tile classifier's pre-logits embedding), ``format_version`` (1).

``read_bag`` reads one file and checks it is such a file, of the expected slide and geometry;
``mil_on_features`` trains gated-attention MIL (``models.mil``) on bags of one geometry and scores others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from patholite.errors import ConfigError, SlideError
from patholite.io import atomic_path
from patholite.measure.stats import auroc, has_both_classes
from patholite.models.mil import predict_mil, train_mil

FEATURES_FILE = "features.h5"
FORMAT_VERSION = 1
ATTRIBUTES = ("slide", "slide_path", "patch_size", "patch_level", "mpp", "tile_px", "embed_dim", "artifact",
              "artifact_kind", "model", "encoder", "format_version")  # fmt: skip
# What must agree between the bags one MIL model sees: the same tiles, seen by the same network
GEOMETRY = ("patch_size", "mpp", "tile_px", "embed_dim", "artifact")


@dataclass
class FeatureBag:
    """One slide's feature file: its tiles' embeddings, their level-0 corners, its attributes."""

    path: Path
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    attrs: dict[str, Any]

    @property
    def geometry(self) -> dict[str, Any]:
        """The attributes every bag of one MIL model must share (``GEOMETRY``)."""
        return {k: self.attrs[k] for k in GEOMETRY}


def write_features(
    path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]
) -> Path:
    """Write a feature file atomically (a temporary file beside it, renamed when complete)."""
    path = Path(path)
    features = np.ascontiguousarray(features, dtype=np.float32)
    coords = np.ascontiguousarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(f"features {features.shape} and coords {coords.shape} must be (N, D) and (N, 2)")
    values = {**attrs, "embed_dim": int(features.shape[1]), "format_version": FORMAT_VERSION}
    missing = [k for k in ATTRIBUTES if k not in values]
    if missing:
        raise ValueError(f"feature file attributes {missing} are missing")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=coords)
        for key, value in values.items():
            f.attrs[key] = math.nan if value is None else value  # h5 attributes hold no None
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            a, b = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)
    return a == b


def read_bag(
    path: str | Path, slide: str | None = None, geometry: Mapping[str, Any] | None = None
) -> FeatureBag:
    """One feature file. ``slide``: the slide it must belong to (its name or path, as the file records
    them); ``geometry``: values of ``GEOMETRY`` keys it must have (another bag's ``geometry``). A file that
    is not a patholite feature file, or of another slide, is a ``SlideError``; another geometry a
    ``ConfigError`` naming the key."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            missing = [d for d in ("features", "coords") if not isinstance(f.get(d), h5py.Dataset)]
            missing += [a for a in ATTRIBUTES if a not in f.attrs]
            if missing:
                raise SlideError(
                    f"{path} is not a patholite feature file (python -m patholite.slide mode=features): it "
                    f"lacks {missing}"
                )
            features, coords = f["features"][()], f["coords"][()]
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as err:
        raise SlideError(f"{path} is not a readable h5 feature file: {err}") from err
    if attrs["format_version"] != FORMAT_VERSION:
        raise SlideError(f"{path} has feature format version {attrs['format_version']}; this patholite reads "
                         f"{FORMAT_VERSION}: extract the features again")  # fmt: skip
    n = features.shape[0] if features.ndim == 2 else -1
    if n < 0 or coords.shape != (n, 2) or features.shape[1] != attrs["embed_dim"]:
        raise SlideError(
            f"{path}: features {features.shape} and coords {coords.shape} do not fit its embed_dim "
            f"{attrs['embed_dim']}; the file is damaged, extract it again"
        )
    if slide is not None and str(slide) not in (attrs["slide"], attrs["slide_path"]):
        raise SlideError(
            f"{path} holds the features of slide {attrs['slide']} ({attrs['slide_path']}), not of {slide}"
        )
    for key, value in (geometry or {}).items():
        if key not in attrs or not _same(attrs[key], value):
            raise ConfigError(
                f"{path} has {key}={attrs.get(key)!r} where the other bags have {value!r}: bags of one MIL "
                "model must come from one artifact and tile geometry; extract them again with one setting"
            )
    return FeatureBag(
        path, features.astype(np.float32, copy=False), coords.astype(np.int64, copy=False), attrs
    )


def mil_on_features(
    train: Sequence[tuple[str | Path, int]],
    test: Sequence[tuple[str | Path, int]],
    epochs: int = 20,
    seed: int = 0,
    num_classes: int = 2,
    **mil: Any,
) -> dict[str, Any]:
    """Gated-attention MIL (``models.mil.train_mil``; ``mil``: its other arguments) trained on the ``train``
    feature files with their slide labels, then each ``test`` file scored (``predict_mil``). Every bag
    must share the first bag's geometry. Returns the test slides' ``slides`` rows (path, slide, label,
    probs, and with 2 classes the positive ``score``), ``auroc`` (2 classes, both in ``test``; else None)
    and the shared ``geometry``."""
    if not train or not test:
        raise ConfigError(f"mil_on_features: {len(train)} train and {len(test)} test bags; give both")
    reference: dict[str, Any] | None = None
    bags = []
    for path, label in [*train, *test]:
        bag = read_bag(path, geometry=reference)
        reference = reference or bag.geometry
        bags.append((bag, int(label)))
    fit, score = bags[: len(train)], bags[len(train) :]
    features, labels = [b.features for b, _ in fit], [y for _, y in fit]
    model = train_mil(features, labels, num_classes, epochs=epochs, seed=seed, **mil)
    rows = []
    for bag, label in score:
        probs = np.asarray(predict_mil(model, bag.features), np.float64)
        row = {"path": str(bag.path), "slide": bag.attrs["slide"], "label": label, "probs": probs.tolist()}
        if num_classes == 2:
            row["score"] = float(probs[1])
        rows.append(row)
    labels = [r["label"] for r in rows]
    area = None
    if num_classes == 2 and has_both_classes(labels):
        area = auroc([r["score"] for r in rows], labels)
    return {"slides": rows, "auroc": area, "geometry": reference, "n_train": len(fit), "n_test": len(score),
            "model": model}  # fmt: skip
