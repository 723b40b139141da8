"""The ``compression`` group's schema: the shared keys (``base``) plus one block per technique.

Every other module of this package is a technique's block: ``compression.<module name>``, typed by the
module's ``SCHEMA`` dataclass. ``CompressionConfig`` is assembled from them, so a new technique brings its
schema as one new module here and touches no other schema file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import field, make_dataclass

from patholite.config.compression.base import CompressionBase


def technique_schemas() -> dict[str, type]:
    """``{key: schema}`` of every technique block, from this package's modules (sorted by key)."""
    blocks = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        blocks[info.name] = module.SCHEMA
    return blocks


TECHNIQUE_SCHEMAS = technique_schemas()

CompressionConfig = make_dataclass(
    "CompressionConfig",
    [(key, schema, field(default_factory=schema)) for key, schema in TECHNIQUE_SCHEMAS.items()],
    bases=(CompressionBase,),
)
CompressionConfig.__module__ = __name__
CompressionConfig.__doc__ = CompressionBase.__doc__

__all__ = ["TECHNIQUE_SCHEMAS", "CompressionConfig"]
