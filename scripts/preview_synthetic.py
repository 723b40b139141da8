"""Write a PNG grid of synthetic tiles: one row per class, a few examples each.

python scripts/preview_synthetic.py --out outputs/synthetic_preview.png --difficulty 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES, generate_tile

_LABEL_WIDTH = 110


def preview_grid(per_class: int, size: int, difficulty: float, seed: int, zoom: int) -> np.ndarray:
    """An RGB uint8 grid: rows are classes (name on the left), columns are examples."""
    rng = np.random.default_rng(seed)
    pad = 4
    cell = size * zoom
    rows = []
    for label, name in enumerate(SYNTHETIC_CLASSES):
        row = np.full((cell + pad, _LABEL_WIDTH + per_class * (cell + pad), 3), 255, np.uint8)
        cv2.putText(row, name, (6, cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(per_class):
            tile = generate_tile(rng, label, size, difficulty)
            tile = cv2.resize(tile, (cell, cell), interpolation=cv2.INTER_NEAREST)
            x = _LABEL_WIDTH + j * (cell + pad)
            row[:cell, x : x + cell] = tile
        rows.append(row)
    return np.concatenate(rows, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/synthetic_preview.png"))
    parser.add_argument("--per-class", type=int, default=6, help="examples per class (columns)")
    parser.add_argument("--size", type=int, default=96, help="tile size in pixels")
    parser.add_argument("--difficulty", type=float, default=0.5, help="0: classes far apart, 1: overlapping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=2, help="integer upscaling of each tile for viewing")
    args = parser.parse_args()
    grid = preview_grid(args.per_class, args.size, args.difficulty, args.seed, args.zoom)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise SystemExit(f"could not write {args.out}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
