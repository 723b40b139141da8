"""Whole-slide images at the lowest level: reading (``reader``), tissue detection (``tissue``), the tile grid
(``tiling``), annotations (``annotations``), square regions and thumbnails of focused models (``region``) and
the per-slide cache (``cache``). Data (slide datasets), models (SMT) and the slide engines all build on it."""
