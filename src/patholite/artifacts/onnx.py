"""Kind ``onnx``: one ``.onnx`` file (float export, or INT8 / mixed INT4 quantized by ONNX Runtime) run by
ONNX Runtime's CPU provider behind the ``nn.Module`` call the evaluators and timers use."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.artifacts.sidecar import SIDECAR, write_sidecar
from patholite.errors import CheckpointError
from patholite.io import atomic_path

KIND = "onnx"
ONNX_FILE = "model.onnx"


def save_onnx_artifact(
    net: nn.Module, directory: str | Path, meta: dict[str, Any], opset: int = 17
) -> list[str]:
    """Export the float network to ONNX (batch axis dynamic) for ONNX Runtime; weights inside the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, meta["image_size"], meta["image_size"])
    with atomic_path(directory / ONNX_FILE) as tmp, warnings.catch_warnings():
        # the TorchScript exporter is deprecated; the dynamo one splits the weights out of the file
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (x,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    write_sidecar(directory, KIND, ONNX_FILE, {"opset": opset, **meta})
    return [ONNX_FILE, SIDECAR]


def write_onnx_sidecar(directory: str | Path, meta: dict[str, Any]) -> list[str]:
    """The sidecar of an ``.onnx`` file written into ``directory`` by another tool (ONNX Runtime's
    quantizers); returns the artifact's file names."""
    write_sidecar(directory, KIND, ONNX_FILE, meta)
    return [ONNX_FILE, SIDECAR]


def write_mixed_onnx_sidecar(
    directory: str | Path, meta: dict[str, Any], layer_bits: dict[str, int], block_size: int, symmetric: bool
) -> list[str]:
    """The sidecar of a mixed INT4/INT8/FP32 ``.onnx`` (``compress/int4.py``): its plan (layer -> bits,
    read back from the written graph), the 4-bit block size and symmetry, and the file's size in bytes."""
    directory = Path(directory)
    counts = {f"{b}_bit": sum(v == b for v in layer_bits.values()) for b in (4, 8, 32)}
    how = {
        "format": "mixed_int4",
        "runtime": "onnxruntime (MatMulNBits, MatMulInteger)",
        "layer_bits": dict(layer_bits),
        "layers": counts,
        "block_size": int(block_size),
        "symmetric": bool(symmetric),
        "onnx_bytes": (directory / ONNX_FILE).stat().st_size,
    }
    return write_onnx_sidecar(directory, {**meta, "quantization": how})


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the nn.Module call the evaluators and timers use (CPU)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort  # heavy, and only for this kind

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own types for unreadable models
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    return OrtModule(Path(directory) / meta["weights"])
