"""An artifact's identity: the sha256 of its folder's files (names and bytes), the same wherever it is copied.

The slide cohort seals reports with it; a sweep's retiming times each distinct artifact once by it (the
teacher two jobs recorded is one artifact)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def artifact_digest(directory: str | Path) -> str:
    """sha256 of an artifact folder's files (names and bytes): its identity wherever it is copied to."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
