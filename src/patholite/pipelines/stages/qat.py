"""``qat``: quantization-aware fine-tuning of the current float model. ``compression.qat.method``:
``lite`` (default): R2's QAT-lite, converted to a real torch.ao INT8 artifact (tile classifiers; dynamic-INT8
QAT for SMT: the task's ``qat``), CPU only. ``lsq``: LSQ's learned step sizes (``compress/lsq.py``) for tile
classifiers, fine-tuned through the task's ``finetune`` and exported as a QDQ ONNX artifact
(``artifacts/lsq.py``) named by its weight width: ``lsq_int8`` or ``lsq_int4``."""

from __future__ import annotations

import copy

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.lsq import save_lsq_artifact
from patholite.compress.int4 import check_block_size
from patholite.compress.lsq import calibrate_lsq, check_lsq_bits, prepare_lsq
from patholite.config.checks import check_finetune, choice, require
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import Task

METHODS = ("lite", "lsq")
EXPORT_CHECK_BATCHES = 2  # calibration batches the LSQ export is checked on against the torch model


def lsq_artifact_name(weight_bits: int) -> str:
    return f"lsq_int{int(weight_bits)}"


def run(run: StageRun) -> None:
    if run.c.qat.method == "lsq":
        run_lsq(run)
        return
    src = run.current
    directory = run.artifact_dir("int8_qat")
    files = run.task.qat(run.ctx, src.net, src.state, directory, run.meta(src.surgery))
    run.record_file_artifact("int8_qat", files, src)


def run_lsq(run: StageRun) -> None:
    """LSQ: wrap, calibrate the activation steps, fine-tune (steps in the optimizer), export, record."""
    src, ctx, q = run.current, run.ctx, run.c.qat
    per_batch = int(ctx.cfg.dataset.eval_batch_size or ctx.cfg.dataset.batch_size)
    calibration = ctx.datamodule.calibration_images(q.calibration_batches * per_batch, seed=ctx.cfg.seed)
    net = prepare_lsq(copy.deepcopy(src.net).cpu(), q.weight_bits, q.act_bits, q.block_size)
    calibrate_lsq(net, calibration)
    tuned = run.task.finetune(ctx, "qat", net, q.finetune, src.net)
    name = lsq_artifact_name(q.weight_bits)
    directory = run.artifact_dir(name)
    files = save_lsq_artifact(tuned, directory, run.meta(src.surgery), calibration[:EXPORT_CHECK_BATCHES])
    run.record_file_artifact(name, files, src)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    q, c = cfg.compression.qat, cfg.compression
    require(
        q.engine is None,
        f"compression.qat.engine={q.engine}: the INT8 engine is the machine's, set once for every INT8 "
        f"artifact: use accelerator.int8_engine={q.engine}",
    )
    choice(q.method, "compression.qat.method", METHODS)
    check_finetune(q.finetune, "compression.qat")
    require(q.finetune.epochs >= 1, "compression.qat.finetune.epochs must be >= 1 (QAT is a fine-tune)")
    require(
        accelerator.world_size == 1,
        f"compression={c.name} with {accelerator.world_size} training processes: QAT fine-tunes in one "
        "process (torch.ao's prepared model holds closures that cannot be sent to DDP ranks; LSQ is not "
        "tested under DDP); use accelerator.devices=1 and accelerator.num_nodes=1",
    )
    if q.method == "lsq":
        check_lsq(cfg, task)
        return
    require(
        accelerator.device.type == "cpu",
        f"compression={c.name}: QAT converts to torch.ao INT8 kernels, which run on CPU only; use "
        "accelerator=cpu for this option",
    )


def check_lsq(cfg: DictConfig, task: Task) -> None:
    q = cfg.compression.qat
    check_lsq_bits(q.weight_bits, q.act_bits)
    if q.weight_bits == 4:
        check_block_size(q.block_size)
    require(
        not isinstance(q.calibration_batches, bool) and q.calibration_batches >= 1,
        f"compression.qat.calibration_batches={q.calibration_batches}: LSQ initialises its activation "
        "steps from calibration batches; use at least 1 (8 is the default)",
    )
    require(
        task.name == "tiles" and cfg.model.family == "vit",
        f"compression.qat.method=lsq quantizes the Linear layers of a ViT tile classifier and exports ONNX; "
        f"model={cfg.model.name} (family {cfg.model.family}, task {task.name}) is not one: use "
        "compression.qat.method=lite",
    )


STAGE = Stage(
    name="qat",
    run=run,
    key="qat",
    tasks=("tiles", "slides", "encoders"),
    check=check,
    artifacts={
        "int8_qat": "quantization-aware trained, converted to INT8",
        lsq_artifact_name(8): "LSQ-trained, QDQ ONNX with the learned steps: INT8 weights per channel",
        lsq_artifact_name(4): "LSQ-trained, QDQ ONNX with the learned steps: INT4 weights per block",
    },
)
