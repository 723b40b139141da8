"""Kind ``torch_int8_qat``: a model fine-tuned with fake quantization (torch.ao FX) and converted to INT8.

The INT8 state dict (``model_int8_qat.pt``, read with ``weights_only=True``) plus the sidecar; loading replays
prepare -> convert on the float twin and loads the weights, so no code is pickled."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.artifacts.sidecar import SIDECAR, read_sidecar, write_sidecar
from patholite.artifacts.torch_float import create_float_twin
from patholite.compress.qat import convert_qat, is_converted, prepare_qat, quiet_quantization
from patholite.errors import CheckpointError, ConfigError
from patholite.io import atomic_path

KIND = "torch_int8_qat"
QAT_WEIGHTS = "model_int8_qat.pt"


def save_qat_artifact(int8_net: nn.Module, directory: str | Path, meta: dict[str, Any]) -> list[str]:
    """Write the INT8 state dict and the sidecar into ``directory``, atomically.

    ``meta`` must hold ``image_size`` (the reload traces the float twin with an example of that size); it
    should also describe the model as the other artifacts' sidecars do. Returns the file names.
    """
    if "image_size" not in meta:
        raise ConfigError("save_qat_artifact: meta needs 'image_size' to rebuild the INT8 model on load")
    if not is_converted(int8_net):
        raise ConfigError("save_qat_artifact needs the converted INT8 model (convert_qat), not a QAT network")
    engine = meta.get("engine") or getattr(int8_net, "patholite_qat_engine", torch.backends.quantized.engine)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / QAT_WEIGHTS) as tmp:
        torch.save(int8_net.state_dict(), tmp)
    rest = {k: v for k, v in meta.items() if k != "engine"}
    write_sidecar(directory, KIND, QAT_WEIGHTS, {"engine": engine, **rest})
    return [QAT_WEIGHTS, SIDECAR]


def load_qat_artifact(
    directory: str | Path, float_twin: nn.Module | None = None, meta: dict[str, Any] | None = None
) -> nn.Module:
    """Rebuild a saved QAT INT8 model: prepare_qat(float_twin) -> convert_qat -> load the INT8 weights.

    ``float_twin`` is the float network the sidecar describes (its weights do not matter; default: built
    from the sidecar); ``meta`` defaults to the sidecar in ``directory``.
    """
    directory = Path(directory)
    meta = read_sidecar(directory) if meta is None else meta
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{directory} holds a {meta.get('kind')!r} artifact, not a QAT INT8 one")
    weights = directory / meta["weights"]
    if not weights.is_file():
        raise CheckpointError(f"QAT artifact {directory} lacks its weights file {meta['weights']}")
    float_twin = create_float_twin(meta) if float_twin is None else float_twin
    size = int(meta["image_size"])
    example = torch.zeros(1, int(meta.get("in_chans", 3)), size, size)
    # The twin's observers never saw data: their qparams are placeholders the loaded state dict replaces.
    with quiet_quantization("must run observer"):
        qnet = convert_qat(prepare_qat(float_twin, example, meta.get("engine", "x86")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors still go through TypedStorage
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle and zip errors for damaged files
            raise CheckpointError(f"cannot read {weights}: {err}") from err
    try:
        qnet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"QAT artifact {directory} does not fit the float twin it was given (the sidecar's model?): {err}"
        ) from err
    return qnet.eval()


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    return load_qat_artifact(directory, meta=meta)
