"""Artifact files: a model saved so that it reloads without executing pickled code.

A float artifact is ``model.safetensors`` plus ``artifact.json`` (the architecture as the model config, class
names, input size and normalisation, and any structural surgery: pruning, low-rank attention). A
dynamic-INT8 artifact (torch.ao, Linear layers only, R2's PTQ; ``layers`` for mixed precision) is its
quantized state dict (``model_int8.pt``, read with ``weights_only=True``) plus the same sidecar with the
engine; loading rebuilds the float network, quantizes it the same way and loads the INT8 weights. A QAT
artifact reloads the same way through the FX preparation. ONNX artifacts (float or static INT8) are one
``.onnx`` file. An artifact's size is the bytes of all its files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from patholite.errors import CheckpointError
from patholite.measure.io import atomic_path, write_json

SIDECAR = "artifact.json"
WEIGHTS = "model.safetensors"
INT8_WEIGHTS = "model_int8.pt"
ONNX_FILE = "model.onnx"


def save_float_artifact(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> list[str]:
    """Write ``model``'s weights and sidecar into ``directory``; returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(directory / SIDECAR, {"kind": "torch_float", "weights": WEIGHTS, **meta})
    return [WEIGHTS, SIDECAR]


def read_sidecar(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a patholite artifact: {SIDECAR} is missing")
    return json.loads(path.read_text())


def load_float_artifact(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the sidecar (replaying its surgery); load its safetensors weights strictly."""
    meta = read_sidecar(directory)
    net = create_float_twin(meta)
    try:
        net.load_state_dict(load_file(str(Path(directory) / meta["weights"])), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"artifact {directory} does not match its own sidecar: {err}") from err
    return net.eval(), meta


def quantize_dynamic_int8(net: nn.Module, engine: str = "x86", layers: list[str] | None = None) -> nn.Module:
    """torch.ao dynamic INT8 of the Linear layers (``layers``: only these, by qualified name; mixed
    precision); LayerNorm and Softmax stay in float (R2's protocol). Returns a quantized copy."""
    torch.backends.quantized.engine = engine
    names = {name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(layers or ()) - names)
    if unknown:
        raise CheckpointError(f"dynamic INT8: {unknown} are not Linear layers of the network")
    spec: set = {nn.Linear} if layers is None else set(layers)
    with warnings.catch_warnings():
        # torch.ao.quantization and quantized tensors are deprecated; both still work in torch 2.14.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(net.eval(), spec, dtype=torch.qint8)


def save_int8_dynamic_artifact(
    qnet: nn.Module,
    directory: str | Path,
    meta: dict[str, Any],
    engine: str,
    layers: list[str] | None = None,
) -> list[str]:
    """``layers``: the Linear layers that were quantized (None: all of them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / INT8_WEIGHTS) as tmp:
        torch.save(qnet.state_dict(), tmp)
    write_json(
        directory / SIDECAR,
        {
            "kind": "torch_int8_dynamic",
            "weights": INT8_WEIGHTS,
            "engine": engine,
            "layers": layers,
            **meta,
        },
    )
    return [INT8_WEIGHTS, SIDECAR]


def create_float_twin(meta: dict[str, Any]) -> nn.Module:
    """The float network an artifact's sidecar describes, surgery replayed, with random weights."""
    from patholite.compress.surgery import apply_surgery
    from patholite.models.factory import create_network

    net = create_network(meta["model"], len(meta["class_names"]), meta["image_size"])
    return apply_surgery(net, meta.get("surgery")).eval()


def _load_quantized_state(directory: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors still go through TypedStorage
        return torch.load(Path(directory) / meta["weights"], map_location="cpu", weights_only=True)


def save_onnx_artifact(
    net: nn.Module, directory: str | Path, meta: dict[str, Any], opset: int = 17
) -> list[str]:
    """Export the float network to ONNX (batch axis dynamic) for ONNX Runtime; weights inside the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, meta["image_size"], meta["image_size"])
    with atomic_path(directory / ONNX_FILE) as tmp, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter is deprecated; the dynamo one splits weights out
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
    write_json(directory / SIDECAR, {"kind": "onnx", "weights": ONNX_FILE, "opset": opset, **meta})
    return [ONNX_FILE, SIDECAR]


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the nn.Module call the evaluators and timers use (CPU)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own types for unreadable models
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().numpy()})[0])


def load_artifact(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Any patholite artifact, by the kind its sidecar names."""
    meta = read_sidecar(directory)
    if meta["kind"] == "torch_float":
        net, meta = load_float_artifact(directory)
        if meta.get("runtime") == "torch_compile":  # same weights, run through inductor (bench variant)
            net = torch.compile(net)
        return net, meta
    if meta["kind"] == "torch_int8_dynamic":
        qnet = quantize_dynamic_int8(create_float_twin(meta), meta["engine"], meta.get("layers"))
        qnet.load_state_dict(_load_quantized_state(directory, meta))
        return qnet.eval(), meta
    if meta["kind"] == "torch_int8_qat":
        from patholite.compress.qat import load_qat_artifact

        return load_qat_artifact(directory, create_float_twin(meta), meta), meta
    if meta["kind"] == "onnx":
        return OrtModule(Path(directory) / meta["weights"]).eval(), meta
    raise CheckpointError(f"artifact {directory}: unknown kind {meta['kind']!r} in {SIDECAR}")
