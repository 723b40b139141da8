"""``ptq``: post-training INT8 (and OpenVINO's FP32/bf16, torch's bf16 autocast) of the current float
model, by every method ``compression.ptq.methods`` lists. ``METHODS`` is the one list of them: each makes
one artifact, for the tasks it names.

The ``save_*`` functions make an INT8 artifact from a float network or ONNX file; the benchmark uses them
too, on random weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.int8_dynamic import save_int8_dynamic_artifact
from patholite.artifacts.onnx import (
    ONNX_FILE,
    OrtModule,
    save_onnx_artifact,
    write_mixed_onnx_sidecar,
    write_onnx_sidecar,
)
from patholite.artifacts.openvino import (
    PRECISION_CHOICES,
    check_precision,
    onnx_to_openvino,
    save_openvino_artifact,
    save_openvino_from_onnx,
)
from patholite.artifacts.torch_autocast import check_autocast, save_autocast_artifact
from patholite.compress.int4 import check_bits, check_block_size, linear_onnx_nodes, quantize_mixed_ort
from patholite.compress.nncf_ptq import import_nncf, import_openvino, quantize_nncf, quantize_nncf_accuracy
from patholite.compress.quantize import (
    mixed_precision_plan,
    quantize_dynamic_int8,
    quantize_dynamic_ort,
    quantize_static_ort,
)
from patholite.config.checks import choice, require
from patholite.io import write_json
from patholite.pipelines.stages.base import Current, Stage, StageRun
from patholite.pipelines.tasks import Task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- INT8 artifacts from models
def save_dynamic(
    net: nn.Module, directory: Path, meta: dict[str, Any], engine: str, layers: list[str] | None = None
) -> list[str]:
    """torch.ao dynamic INT8 of ``net``'s Linear layers (``layers``: only these), saved as an artifact."""
    qnet = quantize_dynamic_int8(net, engine, layers)  # a quantized copy
    return save_int8_dynamic_artifact(qnet, directory, meta, engine, layers)


def save_dynamic_ort(float_onnx: Path, directory: Path, meta: dict[str, Any]) -> list[str]:
    """ONNX Runtime dynamic INT8 (MatMul/Gemm) of a float ONNX file, saved as an artifact."""
    directory.mkdir(parents=True, exist_ok=True)
    quantize_dynamic_ort(float_onnx, directory / ONNX_FILE)
    return write_onnx_sidecar(directory, {**meta, "quantization": {"format": "dynamic"}})


def save_static_ort(
    float_onnx: Path,
    directory: Path,
    meta: dict[str, Any],
    calibration: list[torch.Tensor],
    quantization: dict[str, Any] | None = None,
    **settings: Any,
) -> list[str]:
    """ONNX Runtime static INT8 (QDQ) of a float ONNX file, calibrated on ``calibration`` batches
    (``settings``: per_channel, reduce_range, weight_type), saved as an artifact whose sidecar says how
    (``quantization``)."""
    directory.mkdir(parents=True, exist_ok=True)
    quantize_static_ort(float_onnx, directory / ONNX_FILE, calibration, **settings)
    how = quantization or {"format": "QDQ", **settings}
    return write_onnx_sidecar(directory, {**meta, "quantization": how})


def save_nncf(
    float_onnx: Path,
    directory: Path,
    meta: dict[str, Any],
    calibration: list[torch.Tensor],
    precision: str = "auto",
    quantization: dict[str, Any] | None = None,
) -> list[str]:
    """NNCF INT8 (transformer preset) of a float ONNX file converted to OpenVINO, calibrated on
    ``calibration`` batches, saved as an OpenVINO artifact whose float parts run in ``precision`` (``auto``:
    bf16 where the CPU has it natively, else f32)."""
    model = quantize_nncf(onnx_to_openvino(float_onnx), calibration)
    how = {"method": "nncf", "preset": "transformer", **(quantization or {})}
    how.setdefault("calibration_images", sum(len(b) for b in calibration))
    return save_openvino_artifact(model, directory, meta, precision, how)


def save_mixed_int4(
    net: nn.Module,
    float_onnx: Path,
    directory: Path,
    meta: dict[str, Any],
    layer_bits: dict[str, int] | None = None,
    block_size: int = 32,
    symmetric: bool = False,
) -> list[str]:
    """ONNX Runtime INT4 (MatMulNBits) / dynamic INT8 / FP32 per Linear layer of ``net``'s ONNX export, by
    ``layer_bits`` (layer -> 4, 8 or 32; None: every layer ORT can rewrite at 4 bits, the rest float)."""
    nodes = linear_onnx_nodes(net, float_onnx)
    if layer_bits is None:
        layer_bits = {name: 4 if where.quantizable else 32 for name, where in nodes.items()}
    check_bits(layer_bits, "the plan")
    directory.mkdir(parents=True, exist_ok=True)
    written = quantize_mixed_ort(
        float_onnx, directory / ONNX_FILE, layer_bits, nodes, block_size=block_size, symmetric=symmetric
    )
    return write_mixed_onnx_sidecar(directory, meta, written, block_size, symmetric)


# ---------------------------------------------------------------------------------------- the methods
def float_onnx(run: StageRun, src: Current) -> Path:
    """The current float model exported to ONNX once (the input of the ONNX Runtime quantizers)."""
    work = run.ctx.run_dir / "stages" / f"onnx_{src.name}"
    if not (work / ONNX_FILE).is_file():
        save_onnx_artifact(src.net, work, run.meta(src.surgery), opset=run.c.export.opset)
    return work / ONNX_FILE


def _dynamic(run: StageRun, src: Current) -> None:
    engine = run.ctx.accelerator.int8_engine
    files = save_dynamic(src.net, run.artifact_dir("int8_dynamic"), run.meta(src.surgery), engine)
    run.record_file_artifact("int8_dynamic", files, src)


def _dynamic_ort(run: StageRun, src: Current) -> None:
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
    files = save_dynamic_ort(float_onnx(run, src), run.artifact_dir("int8_dynamic_ort"), meta)
    run.record_file_artifact("int8_dynamic_ort", files, src)


def _static_ort(run: StageRun, src: Current) -> None:
    p, ctx = run.c.ptq, run.ctx
    calibration = ctx.datamodule.calibration_images(p.calibration_images, seed=ctx.cfg.seed)
    settings = {"per_channel": p.per_channel, "reduce_range": p.reduce_range, "weight_type": p.weight_type}
    how = {"format": "QDQ", **settings, "calibration_images": sum(len(b) for b in calibration)}
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
    directory = run.artifact_dir("int8_static_ort")
    files = save_static_ort(float_onnx(run, src), directory, meta, calibration, how, **settings)
    run.record_file_artifact("int8_static_ort", files, src)


def _mixed(run: StageRun, src: Current) -> None:
    p, ctx = run.c.ptq, run.ctx
    batches = ctx.datamodule.labelled_batches(p.sensitivity_images, split="val", seed=ctx.cfg.seed)
    plan = mixed_precision_plan(src.net, batches, budget_pp=p.budget_pp, bits=tuple(p.bits))
    layers = list(plan["int8_layers"])
    directory = run.artifact_dir("int8_mixed")
    files = save_dynamic(src.net, directory, run.meta(src.surgery), ctx.accelerator.int8_engine, layers)
    write_json(directory / "plan.json", plan)
    log.info(
        "mixed precision: %d of %d Linear layers in INT8 (validation drop %.2f pp, budget %.2f pp)",
        len(layers),
        len(layers) + len(plan["float_layers"]),
        plan["accuracy_drop_pp"],
        p.budget_pp,
    )
    run.record_file_artifact("int8_mixed", [*files, "plan.json"], src)


def _openvino(precision: str) -> Callable[[StageRun, Current], None]:
    def method(run: StageRun, src: Current) -> None:
        name = f"ov_{'fp32' if precision == 'f32' else precision}"
        meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
        files = save_openvino_from_onnx(float_onnx(run, src), run.artifact_dir(name), meta, precision)
        run.record_file_artifact(name, files, src)

    return method


def _bf16(run: StageRun, src: Current) -> None:
    # the float weights as they are, run under torch's CPU bf16 autocast (artifacts/torch_autocast.py)
    files = save_autocast_artifact(src.net, run.artifact_dir("bf16"), run.meta(src.surgery), "bfloat16")
    run.record_file_artifact("bf16", files, src)


def _nncf(run: StageRun, src: Current) -> None:
    p, ctx = run.c.ptq, run.ctx
    calibration = ctx.datamodule.calibration_images(p.calibration_images, seed=ctx.cfg.seed)
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
    directory = run.artifact_dir("ov_int8_nncf")
    files = save_nncf(float_onnx(run, src), directory, meta, calibration, p.openvino_precision)
    run.record_file_artifact("ov_int8_nncf", files, src)


def _nncf_accuracy(run: StageRun, src: Current) -> None:
    p, ctx = run.c.ptq, run.ctx
    calibration = ctx.datamodule.calibration_images(p.calibration_images, seed=ctx.cfg.seed)
    validation = ctx.datamodule.labelled_batches(p.sensitivity_images, split="val", seed=ctx.cfg.seed)
    model, report = quantize_nncf_accuracy(
        onnx_to_openvino(float_onnx(run, src)), calibration, validation, p.budget_pp
    )
    how = {
        "method": "nncf_accuracy_control",
        "preset": "transformer",
        "calibration_images": sum(len(b) for b in calibration),
        **report,
    }
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
    directory = run.artifact_dir("ov_int8_nncf_accuracy")
    files = save_openvino_artifact(model, directory, meta, p.openvino_precision, how)
    log.info("NNCF accuracy control: %d validations, budget %.2f pp", report["validations"], p.budget_pp)
    run.record_file_artifact("ov_int8_nncf_accuracy", files, src)


def _mixed_int4(run: StageRun, src: Current) -> None:
    p, ctx = run.c.ptq, run.ctx
    batches = ctx.datamodule.labelled_batches(p.sensitivity_images, split="val", seed=ctx.cfg.seed)
    onnx_file = float_onnx(run, src)
    quantizable = [n for n, where in linear_onnx_nodes(src.net, onnx_file).items() if where.quantizable]
    plan = mixed_precision_plan(
        src.net, batches, budget_pp=p.budget_pp, bits=tuple(p.bits), engine=ctx.accelerator.int8_engine,
        layers=quantizable, int4=True, block_size=p.block_size, symmetric=p.symmetric,
    )  # fmt: skip
    directory = run.artifact_dir("int4_mixed_ort")
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset}
    files = save_mixed_int4(
        src.net, onnx_file, directory, meta, plan["layer_bits"], p.block_size, p.symmetric
    )
    # the plan judged INT8 with torch.ao as a stand-in: record what the ORT artifact itself loses
    ort, correct = OrtModule(directory / ONNX_FILE), 0
    for x, y, *_ in batches:
        correct += int((ort(x).argmax(-1) == y.cpu()).sum())
    plan["artifact_accuracy_drop_pp"] = plan["float_accuracy"] - 100.0 * correct / plan["images"]
    write_json(directory / "plan.json", plan)
    log.info(
        "mixed INT4: %d Linear layers INT4, %d INT8, %d float (validation drop %.2f pp planned, %.2f pp in "
        "ONNX Runtime; budget %.2f pp)",
        len(plan["int4_layers"]), len(plan["int8_layers"]), len(plan["float_layers"]),
        plan["accuracy_drop_pp"], plan["artifact_accuracy_drop_pp"], p.budget_pp,
    )  # fmt: skip
    run.record_file_artifact("int4_mixed_ort", [*files, "plan.json"], src)


@dataclass(frozen=True)
class Method:
    artifact: str
    run: Callable[[StageRun, Current], None]
    tasks: tuple[str, ...] = ("tiles",)


METHODS = {
    "dynamic": Method("int8_dynamic", _dynamic, tasks=("tiles", "slides", "encoders")),
    "dynamic_ort": Method("int8_dynamic_ort", _dynamic_ort, tasks=("tiles", "encoders")),
    "static_ort": Method("int8_static_ort", _static_ort, tasks=("tiles", "encoders")),
    "mixed": Method("int8_mixed", _mixed),
    "nncf": Method("ov_int8_nncf", _nncf, tasks=("tiles", "encoders")),
    "nncf_accuracy": Method("ov_int8_nncf_accuracy", _nncf_accuracy),
    "ov_fp32": Method("ov_fp32", _openvino("f32"), tasks=("tiles", "encoders")),
    "ov_bf16": Method("ov_bf16", _openvino("bf16"), tasks=("tiles", "encoders")),
    "mixed_int4": Method("int4_mixed_ort", _mixed_int4),
    "bf16": Method("bf16", _bf16, tasks=("tiles", "encoders")),
}
# Methods that run OpenVINO (the ``openvino`` extra), and those that quantize with NNCF (the same extra).
OPENVINO_METHODS = {"nncf", "nncf_accuracy", "ov_fp32", "ov_bf16"}
NNCF_METHODS = {"nncf", "nncf_accuracy"}


def run(run: StageRun) -> None:
    for method in run.c.ptq.methods:
        METHODS[method].run(run, run.current)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    p = cfg.compression.ptq
    require(
        p.engine is None,
        f"compression.ptq.engine={p.engine}: the INT8 engine is the machine's, set once for every INT8 "
        f"artifact: use accelerator.int8_engine={p.engine}",
    )
    require(bool(p.methods), f"compression.ptq.methods is empty: name at least one of {list(METHODS)}")
    for method in p.methods:
        choice(method, "compression.ptq.methods[]", tuple(METHODS))
        require(
            task.name in METHODS[method].tasks,
            f"compression.ptq.methods={list(p.methods)}: {method} does not run on model={cfg.model.name} "
            f"({task.name}); use {[m for m, x in METHODS.items() if task.name in x.tasks]}",
        )
    calibrated = sorted({"static_ort", *NNCF_METHODS} & set(p.methods))
    require(
        not calibrated or p.calibration_images >= 1,
        f"compression.ptq.calibration_images={p.calibration_images}: {calibrated} need at least one "
        "calibration image (a few hundred is typical)",
    )
    openvino = sorted(OPENVINO_METHODS & set(p.methods))
    if openvino:  # the extra is checked before any work, and bf16 against this CPU
        what = f"compression.ptq.methods={openvino}"
        if NNCF_METHODS & set(p.methods):
            import_nncf(what)
        else:
            import_openvino(what)
        choice(p.openvino_precision, "compression.ptq.openvino_precision", PRECISION_CHOICES)
        if "ov_bf16" in p.methods:
            check_precision("bf16", "compression.ptq.methods=[ov_bf16]")
        if NNCF_METHODS & set(p.methods) and p.openvino_precision == "bf16":
            check_precision("bf16", "compression.ptq.openvino_precision=bf16")
    if "bf16" in p.methods:  # torch autocast: refused on a CPU that would emulate bf16
        check_autocast("bfloat16", "compression.ptq.methods=[bf16]")
    choice(p.weight_type, "compression.ptq.weight_type", ("int8", "uint8"))
    require(p.budget_pp >= 0, f"compression.ptq.budget_pp={p.budget_pp} must be >= 0")
    require(
        not {"mixed", "mixed_int4", "nncf_accuracy"} & set(p.methods) or p.sensitivity_images >= 1,
        "compression.ptq.sensitivity_images must be >= 1 for mixed precision, mixed_int4 and nncf_accuracy",
    )
    if "mixed_int4" in p.methods:  # ONNX Runtime runs 4- and 8-bit weights only
        check_bits(p.bits, "compression.ptq.bits")
        require({4, 8} <= set(p.bits), f"compression.ptq.bits={list(p.bits)}: mixed_int4 plans over [8, 4]")
        check_block_size(p.block_size)
    require(all(b >= 2 for b in p.bits), f"compression.ptq.bits={list(p.bits)} must all be >= 2")
    if accelerator.device.type != "cpu" and set(p.methods) & {"dynamic", "mixed"}:
        log.info("INT8 artifacts are evaluated and timed on the CPU; float ones on %s", accelerator.device)


STAGE = Stage(
    name="ptq",
    run=run,
    key="ptq",
    tasks=("tiles", "slides", "encoders"),
    check=check,
    artifacts={
        "int8_dynamic": "torch.ao dynamic INT8 of Linear layers (x86/fbgemm), LayerNorm/Softmax in float",
        "int8_dynamic_ort": "dynamic INT8 (MatMul/Gemm) through ONNX Runtime",
        "int8_static_ort": "static INT8 QDQ through ONNX Runtime",
        "int8_mixed": "per-layer mixed precision (INT8 where the task tolerates it)",
        "ov_int8_nncf": "INT8 by NNCF (transformer preset, calibrated) run by OpenVINO",
        "ov_int8_nncf_accuracy": "INT8 by NNCF with accuracy control (drop within budget_pp) on OpenVINO",
        "ov_fp32": "the float model on OpenVINO, precision hint f32",
        "ov_bf16": "the float model on OpenVINO, precision hint bf16 (CPUs with native bf16 only)",
        "int4_mixed_ort": "per-layer INT4 (MatMulNBits) / INT8 / FP32 through ONNX Runtime",
        "bf16": "the float weights run by torch under CPU bf16 autocast (CPUs with native bf16 only)",
    },
)
