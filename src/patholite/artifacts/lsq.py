"""An LSQ-trained network (``compress/lsq.py``) saved as a QDQ ONNX artifact (kind ``onnx``): its learned
steps are the QuantizeLinear/DequantizeLinear scales, INT8 weights per channel or INT4 weights per block.
ONNX Runtime runs it (``artifacts/onnx.OrtModule``, so ``load_artifact`` needs nothing new); OpenVINO reads
the same file. The sidecar records the plan and a check of the file against the torch fake-quant model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.artifacts.onnx import ONNX_FILE, OrtModule, save_onnx_artifact, write_onnx_sidecar
from patholite.compress.int4 import linear_onnx_nodes
from patholite.compress.lsq import export_lsq_qdq, float_weights, lsq_layers
from patholite.errors import ConfigError
from patholite.io import atomic_path

LSQ_OPSET = 21  # INT4 tensors and blocked DequantizeLinear scales


@torch.no_grad()
def export_check(lsq_net: nn.Module, onnx_path: Path, images: list[torch.Tensor]) -> dict[str, Any]:
    """The written file against the torch fake-quant network on ``images``: largest logit difference and
    the share of images whose top class differs (ONNX Runtime with its default graph optimizations)."""
    session = OrtModule(onnx_path)
    lsq_net = lsq_net.cpu().eval()
    diff, flips, seen = 0.0, 0, 0
    for x in images:
        ref, got = lsq_net(x), session(x)
        diff = max(diff, float((ref - got).abs().max()))
        flips += int((ref.argmax(1) != got.argmax(1)).sum())
        seen += len(x)
    return {"images": seen, "max_abs_logit_diff": diff, "top1_flips": flips}


def save_lsq_artifact(
    lsq_net: nn.Module, directory: str | Path, meta: dict[str, Any], check_images: list[torch.Tensor]
) -> list[str]:
    """Export ``lsq_net`` (a ``prepare_lsq`` network, trained) as a QDQ ONNX artifact in ``directory``;
    ``meta`` is the run's sidecar (``image_size`` needed), ``check_images`` batches for the export check.
    Returns the artifact's file names."""
    import onnx

    if not lsq_layers(lsq_net):
        raise ConfigError("save_lsq_artifact needs a network from prepare_lsq (it has no LSQ layers)")
    settings = dict(getattr(lsq_net, "patholite_lsq", {}))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = float_weights(lsq_net)
    with tempfile.TemporaryDirectory() as tmp:
        save_onnx_artifact(plain, tmp, meta)  # the float graph (opset 17), found layer by layer below
        float_onnx = Path(tmp) / "float21.onnx"
        converted = onnx.version_converter.convert_version(onnx.load(str(Path(tmp) / ONNX_FILE)), LSQ_OPSET)
        with atomic_path(float_onnx) as part:
            onnx.save(converted, str(part))
        plan = export_lsq_qdq(
            lsq_net, float_onnx, directory / ONNX_FILE, linear_onnx_nodes(plain, float_onnx)
        )
    how = {
        "format": "QDQ",
        "method": "lsq",
        **settings,
        "runtime": "onnxruntime (MatMulIntegerToFloat at 8 bits; MatMulNBits for 4-bit weight-only)",
        "layers": plan,
        "onnx_bytes": (directory / ONNX_FILE).stat().st_size,
        "export_check": export_check(lsq_net, directory / ONNX_FILE, check_images),
    }
    return write_onnx_sidecar(directory, {**meta, "opset": LSQ_OPSET, "quantization": how})
