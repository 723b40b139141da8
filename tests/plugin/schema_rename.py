"""``compression.rename``: the test technique's block."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RenameConfig:
    copies: int = 1  # how many deep copies to make on the way (any >= 1 gives the same network)


SCHEMA = RenameConfig
