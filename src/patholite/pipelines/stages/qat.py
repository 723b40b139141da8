"""``qat``: quantization-aware fine-tuning of the current float model, converted to a real INT8 artifact
(R2's QAT-lite for tile classifiers; dynamic-INT8 QAT for SMT: the task's ``qat``). CPU only."""

from __future__ import annotations

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.config.checks import check_finetune, require
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import Task


def run(run: StageRun) -> None:
    src = run.current
    directory = run.artifact_dir("int8_qat")
    files = run.task.qat(run.ctx, src.net, src.state, directory, run.meta(src.surgery))
    run.record_file_artifact("int8_qat", files, src)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    q, c = cfg.compression.qat, cfg.compression
    require(
        q.engine is None,
        f"compression.qat.engine={q.engine}: the INT8 engine is the machine's, set once for every INT8 "
        f"artifact: use accelerator.int8_engine={q.engine}",
    )
    check_finetune(q.finetune, "compression.qat")
    require(q.finetune.epochs >= 1, "compression.qat.finetune.epochs must be >= 1 (QAT is a fine-tune)")
    require(
        accelerator.world_size == 1,
        f"compression={c.name} with {accelerator.world_size} training processes: QAT fine-tunes in one "
        "process (torch.ao's prepared model holds closures that cannot be sent to DDP ranks); use "
        "accelerator.devices=1 and accelerator.num_nodes=1",
    )
    require(
        accelerator.device.type == "cpu",
        f"compression={c.name}: QAT converts to torch.ao INT8 kernels, which run on CPU only; use "
        "accelerator=cpu for this option",
    )


STAGE = Stage(
    name="qat",
    run=run,
    key="qat",
    tasks=("tiles", "slides", "encoders"),
    check=check,
    artifacts={"int8_qat": "quantization-aware trained, converted to INT8"},
)
