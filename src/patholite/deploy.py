"""Classify images with a deployed ONNX artifact, with no torch installed: onnxruntime, numpy and Pillow.

An artifact of kind ``onnx`` (the float export, ORT INT8, mixed INT4, LSQ QDQ) is a folder with
``model.onnx`` and ``artifact.json``; the sidecar gives the input size, the normalisation and the class
names, so the folder is all a deployment needs::

    python -m patholite.deploy <artifact folder> tile1.png tile2.jpg ... [--out predictions.csv]

or, from Python, ``OnnxClassifier(folder).predict(images)``. This module imports nothing of patholite
but ``errors`` and ``io`` (standard library only), and patholite's ``__init__`` is empty, so torch is never
imported on its way (``tests/test_lsq.py`` runs it where ``import torch`` fails).

Preprocessing is the evaluation transform's: RGB, resized to the artifact's square input when it differs
(Pillow's antialiased bilinear; torchvision's tensor resize can differ by one grey level), scaled to [0, 1],
normalised with the sidecar's mean and std.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patholite.errors import CheckpointError, DatasetError
from patholite.io import atomic_path

SIDECAR = "artifact.json"  # the same name as patholite.artifacts.sidecar.SIDECAR (that package needs torch)
KINDS = ("onnx",)


def read_onnx_sidecar(directory: str | Path) -> dict[str, Any]:
    """The sidecar of an ONNX artifact, checked for what classification needs."""
    directory = Path(directory)
    path = directory / SIDECAR
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a patholite artifact: {SIDECAR} is missing")
    meta = json.loads(path.read_text())
    if meta.get("kind") not in KINDS:
        raise CheckpointError(
            f"{directory} holds a {meta.get('kind')!r} artifact; the torch-free runtime runs ONNX artifacts "
            "only (export one with compression.export.onnx=true, or a ptq ORT method, or qat method=lsq)"
        )
    missing = [k for k in ("weights", "image_size", "mean", "std", "class_names") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it was not written by patholite")
    if not (directory / meta["weights"]).is_file():
        raise CheckpointError(f"ONNX artifact {directory} lacks its model file {meta['weights']}")
    return meta


class OnnxClassifier:
    """An ONNX artifact as an image classifier on ONNX Runtime's CPU provider."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.meta = read_onnx_sidecar(self.directory)
        self.image_size = int(self.meta["image_size"])
        self.class_names = [str(c) for c in self.meta["class_names"]]
        self.mean = np.asarray(self.meta["mean"], dtype=np.float32).reshape(1, 1, -1)
        self.std = np.asarray(self.meta["std"], dtype=np.float32).reshape(1, 1, -1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        path = self.directory / self.meta["weights"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own types for unreadable models
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.input = self.session.get_inputs()[0].name

    def preprocess(self, image: Any) -> np.ndarray:
        """One image (a path, a PIL image, or an H x W x 3 uint8 array) as the 3 x S x S float32 input."""
        from PIL import Image

        if isinstance(image, str | Path):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except (OSError, ValueError) as err:
                raise DatasetError(f"cannot read image {image}: {err}") from err
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise DatasetError(f"an image array must be H x W x 3 uint8, got {image.shape} {image.dtype}")
            image = Image.fromarray(image)
        else:
            image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        x = np.asarray(image, dtype=np.float32) / 255.0
        return np.ascontiguousarray(((x - self.mean) / self.std).transpose(2, 0, 1))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of an N x 3 x S x S float32 batch."""
        return self.session.run(None, {self.input: np.asarray(batch, dtype=np.float32)})[0]

    def predict(self, images: Iterable[Any], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per image: the top class (``label``, ``index``) and every class's probability (softmax)."""
        images = list(images)
        out: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(im) for im in images[start : start + batch_size]])
            z = self.logits(batch)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            for row in p:
                k = int(row.argmax())
                out.append(
                    {
                        "label": self.class_names[k],
                        "index": k,
                        "probabilities": dict(zip(self.class_names, map(float, row), strict=True)),
                    }
                )
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m patholite.deploy", description="Classify images with an ONNX artifact (no torch)."
    )
    parser.add_argument("artifact", help="the artifact folder (model.onnx + artifact.json)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", help="write the predictions as CSV here (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        model = OnnxClassifier(args.artifact, args.threads)
        rows = model.predict(args.images, args.batch_size)
    except (CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "label", *(f"p_{c}" for c in model.class_names)])
    for path, row in zip(args.images, rows, strict=True):
        writer.writerow([path, row["label"], *(f"{row['probabilities'][c]:.6f}" for c in model.class_names)])
    if args.out:
        with atomic_path(Path(args.out)) as tmp:
            Path(tmp).write_text(text.getvalue())
    else:
        sys.stdout.write(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
