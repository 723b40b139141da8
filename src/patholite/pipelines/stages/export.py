"""``export``: ONNX (run with ONNX Runtime) of the final float model, with its parity against PyTorch on the
test split. Added after the listed stages when ``compression.export.onnx`` is true."""

from __future__ import annotations

import logging
import shutil

from patholite.artifacts.onnx import ONNX_FILE
from patholite.artifacts.sidecar import SIDECAR
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.stages.ptq import float_onnx

log = logging.getLogger(__name__)


def run(run: StageRun) -> None:
    src = run.current
    directory = run.artifact_dir("onnx_fp32")
    directory.mkdir(parents=True, exist_ok=True)
    work = float_onnx(run, src).parent  # the export the ONNX Runtime quantizers made of it, if they ran
    files = [ONNX_FILE, SIDECAR]
    for name in files:
        shutil.copy2(work / name, directory / name)
    run.record_file_artifact("onnx_fp32", files, src)
    parity = run.records[-1].parity
    if "mean_cosine" in parity:  # an encoder: its embeddings, not logits
        if (parity["mean_cosine"] or 0.0) < 0.9999:
            log.warning("ONNX export of %s differs from PyTorch: mean embedding cosine %s", src.name, parity)
    elif parity["flip_rate"] > 0 or parity["max_abs_logit_diff"] > 1e-3:
        log.warning(
            "ONNX export of %s differs from PyTorch: flip rate %.4f, max |logit diff| %.2e "
            "(expected 0 and <= 1e-3)",
            src.name,
            parity["flip_rate"],
            parity["max_abs_logit_diff"],
        )


STAGE = Stage(
    name="export",
    run=run,
    key="export",
    tasks=("tiles", "encoders"),
    last=True,
    artifacts={"onnx_fp32": "float ONNX export run with ONNX Runtime"},
)
