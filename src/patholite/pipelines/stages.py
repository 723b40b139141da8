"""The stages a ``compression`` option lists, run in order, each handing its float model to the next.

A run starts with one of ``train`` (fit ``model=`` with the plain recipe), ``start`` (the trained plain model,
from ``model.checkpoint`` or the cache) or ``distill`` (fit ``model=`` from a teacher), then applies any of
``prune``, ``lowrank``, ``qat``, ``ptq``. Every model a stage produces is saved as an artifact, reloaded from
its files and recorded (quality on the test split, cost with the bench protocol, parity against its source),
so a sweep over ``compression=`` compares techniques on one table.

After each stage ``stages/state.json`` holds the records so far and where the current model is; a resumed
run skips finished stages and continues the interrupted one from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from patholite import artifacts as art
from patholite.artifacts.qat import save_qat_artifact
from patholite.compress.distill import Distiller
from patholite.compress.lowrank import apply_nystrom
from patholite.compress.prune import describe_structure, prune_vit
from patholite.compress.qat import convert_qat, prepare_qat
from patholite.compress.quantize import (
    mixed_precision_plan,
    quantize_dynamic_int8,
    quantize_dynamic_ort,
    quantize_static_ort,
)
from patholite.compress.surgery import apply_surgery
from patholite.config.options import load_model_option
from patholite.io import write_json
from patholite.measure.evaluate import artifact_record, predict, time_together
from patholite.models.factory import build_model
from patholite.pipelines.cache import publish, trained_plain
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import fit, make_module
from patholite.records import ArtifactRecord

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class Current:
    """The float model the next stage works on, as saved and reloaded, with its test logits."""

    name: str
    net: nn.Module
    directory: Path
    logits: torch.Tensor
    surgery: list[dict[str, Any]] = field(default_factory=list)


class StageRun:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.records: list[ArtifactRecord] = []
        self.current: Current | None = None
        self.done: list[str] = []
        self.test_loader = ctx.datamodule.test_dataloader()
        # On CPU every artifact runs on the same device: time them all together at the end, alternating.
        self.time_at_end = ctx.cfg.bench.isolation == "child" and ctx.accelerator.device.type == "cpu"

    @property
    def c(self) -> DictConfig:
        return self.ctx.cfg.compression

    @property
    def image_size(self) -> int:
        return int(self.ctx.cfg.dataset.image_size)

    def meta(self, surgery: list[dict[str, Any]] | None = None, model_cfg: DictConfig | None = None) -> dict:
        return {**self.ctx.artifact_meta(model_cfg), "surgery": list(surgery or [])}

    # --------------------------------------------------------------------------------------- recording
    def record(
        self,
        name: str,
        net: nn.Module,
        directory: Path,
        files: list[str],
        source: Current | None = None,
        cpu: bool = False,
    ) -> torch.Tensor:
        """Evaluate and cost a reloaded artifact; returns its test logits."""
        log.info("recording artifact %s (%s)", name, directory)
        device = "cpu" if cpu else self.ctx.accelerator.device
        record, logits = artifact_record(
            name,
            net,
            directory,
            files,
            self.test_loader,
            list(self.ctx.datamodule.class_names),
            self.image_size,
            self.ctx.cfg.bench,
            device,
            source=source.name if source else None,
            reference=source.logits if source else None,
            defer_timing=self.time_at_end,
        )
        self.records.append(record)
        return logits

    def record_float(
        self,
        name: str,
        net: nn.Module,
        surgery: list[dict[str, Any]] | None = None,
        source: Current | None = None,
        model_cfg: DictConfig | None = None,
    ) -> Current:
        directory = self.ctx.artifact_dir(name)
        files = art.save_float_artifact(net.cpu(), directory, self.meta(surgery, model_cfg))
        loaded, _ = art.load_float_artifact(directory)
        logits = self.record(name, loaded, directory, files, source)
        return Current(name, loaded.cpu().eval(), directory, logits, list(surgery or []))

    def record_file_artifact(self, name: str, files: list[str], source: Current, cpu: bool = True) -> None:
        directory = self.ctx.artifact_dir(name)
        loaded, _ = art.load_artifact(directory)
        self.record(name, loaded, directory, files, source, cpu=cpu)

    # ------------------------------------------------------------------------------------------ resume
    @property
    def state_path(self) -> Path:
        return self.ctx.run_dir / "stages" / STATE_FILE

    def save_state(self) -> None:
        cur = self.current
        write_json(
            self.state_path,
            {
                "done": self.done,
                "records": [asdict(r) for r in self.records],
                "current": None
                if cur is None
                else {"name": cur.name, "directory": str(cur.directory), "surgery": cur.surgery},
            },
        )

    def load_state(self) -> None:
        if not self.ctx.resuming or not self.state_path.is_file():
            return
        state = json.loads(self.state_path.read_text())
        self.done = list(state["done"])
        self.records = [ArtifactRecord(**r) for r in state["records"]]
        cur = state["current"]
        if cur is not None:
            net, _ = art.load_float_artifact(cur["directory"])
            logits, _ = predict(net, self.test_loader, "cpu")
            self.current = Current(cur["name"], net, Path(cur["directory"]), logits, cur["surgery"])
        log.info("resuming after the finished stages %s", self.done)


# ------------------------------------------------------------------------------------------------ stages
def stage_train(run: StageRun) -> None:
    """Fit ``model=`` with the plain recipe; the plain result is published to the cache."""
    ctx, ema = run.ctx, run.c.ema
    fitted = fit(ctx, make_module(ctx), "train", ema=ema)
    if fitted.ema_net is None:
        run.current = run.record_float("fp32", fitted.net)
        if not ctx.cfg.model.checkpoint:
            publish(ctx, run.current.net)
        return
    raw = run.record_float("fp32", fitted.net) if ema.keep_raw else None
    run.current = run.record_float("fp32_ema", fitted.ema_net, source=raw)


def _plain_network(run: StageRun, model_cfg: DictConfig, role: str) -> nn.Module:
    if model_cfg.checkpoint:
        return build_model(model_cfg, run.ctx.datamodule.num_classes, run.image_size).eval()
    net, _ = art.load_float_artifact(trained_plain(run.ctx, model_cfg, role))
    return net


def stage_start(run: StageRun) -> None:
    """The trained plain model: ``model.checkpoint``, or the cache (trained once when absent)."""
    net = _plain_network(run, run.ctx.cfg.model, "starting point")
    run.current = run.record_float("fp32", net)


def teacher_config(c: DictConfig) -> DictConfig:
    teacher = load_model_option(c.teacher.model)
    teacher.checkpoint = c.teacher.checkpoint
    return teacher


def _distiller(run: StageRun, student: nn.Module, teacher: nn.Module, kd: DictConfig | None = None):
    kd = kd if kd is not None else run.c.kd
    return Distiller(
        student,
        teacher,
        kind=kd.kind,
        alpha=kd.alpha,
        temperature=kd.temperature,
        levels=tuple(kd.levels),
        student_blocks=list(kd.student_blocks) if kd.student_blocks is not None else None,
        teacher_blocks=list(kd.teacher_blocks) if kd.teacher_blocks is not None else None,
        attention_weight=kd.attention_weight,
        feature_weight=kd.feature_weight,
        entropy_weight=kd.entropy_weight,
        lesion_weight=kd.lesion_weight,
        label_smoothing=run.ctx.cfg.optim.label_smoothing,
    )


def stage_distill(run: StageRun) -> None:
    """Train ``model=`` (the student) from the frozen teacher; the teacher is recorded too."""
    ctx, c = run.ctx, run.c
    # The student is initialised first, from the stage's seed: training a missing teacher uses the RNG too.
    student = build_model(ctx.cfg.model, ctx.datamodule.num_classes, run.image_size)
    teacher_cfg = teacher_config(c)
    teacher = run.record_float(
        "teacher_fp32", _plain_network(run, teacher_cfg, "teacher"), model_cfg=teacher_cfg
    )
    module = make_module(ctx, distiller=_distiller(run, student, copy.deepcopy(teacher.net)))
    fitted = fit(ctx, module, "distill", ema=c.ema)
    if fitted.ema_net is None:
        run.current = run.record_float("student_fp32", fitted.net, source=teacher)
        return
    raw = run.record_float("student_fp32", fitted.net, source=teacher) if c.ema.keep_raw else None
    run.current = run.record_float("student_fp32_ema", fitted.ema_net, source=raw or teacher)


def _finetune(run: StageRun, stage: str, net: nn.Module, ft: DictConfig, source: Current) -> nn.Module:
    """A stage's short fine-tune of ``net``; with ``ft.distill``, learning from the source model."""
    if ft.epochs <= 0:
        return net
    distiller = _distiller(run, net, copy.deepcopy(source.net)) if ft.distill else None
    module = make_module(
        run.ctx, net=None if distiller else net, distiller=distiller, lr=ft.lr, warmup_epochs=0.0
    )
    fitted = fit(run.ctx, module, stage, epochs=int(ft.epochs), ema=run.c.ema)
    return fitted.ema_net if fitted.ema_net is not None else fitted.net


def stage_prune(run: StageRun) -> None:
    """Remove attention heads and MLP channels, fine-tune, record the really smaller network."""

    src, p = run.current, run.c.prune
    structure_file = run.ctx.run_dir / "stages" / "prune_structure.json"
    resumable = run.ctx.resuming and structure_file.is_file()
    if resumable:  # the fine-tune's checkpoint holds the weights; rebuild the pruned shape to load them
        op = json.loads(structure_file.read_text())
        net = apply_surgery(copy.deepcopy(src.net), [op])
    else:
        scoring = (
            run.ctx.datamodule.labelled_batches(
                p.scoring_batches * run.ctx.cfg.dataset.batch_size, split="train", seed=run.ctx.cfg.seed
            )
            if p.importance != "magnitude"
            else None
        )
        net = prune_vit(
            copy.deepcopy(src.net),
            ratio=p.ratio,
            target_flops=p.target_flops,
            importance=p.importance,
            scoring_batches=scoring,
            beta=p.beta,
            saliency=p.saliency,
            round_to=p.round_to,
            heads=p.heads,
            mlp=p.mlp,
            image_size=run.image_size,
        )
        op = {"op": "prune", "structure": describe_structure(net)}
        write_json(structure_file, op)
    net = _finetune(run, "prune", net, p.finetune, src)
    run.current = run.record_float("pruned", net, surgery=[*src.surgery, op], source=src)


def stage_lowrank(run: StageRun) -> None:
    """Nystrom attention in place of softmax attention, optionally fine-tuned."""

    src, lr = run.current, run.c.lowrank
    blocks = list(lr.blocks) if lr.blocks is not None else None
    op = {"op": "nystrom", "landmarks": int(lr.landmarks), "blocks": blocks, "pinv_iters": int(lr.pinv_iters)}
    net = apply_nystrom(copy.deepcopy(src.net), op["landmarks"], blocks, op["pinv_iters"])
    net = _finetune(run, "lowrank", net, lr.finetune, src)
    run.current = run.record_float("lowrank", net, surgery=[*src.surgery, op], source=src)


def stage_qat(run: StageRun) -> None:
    """R2's QAT-lite: fake-quantized fine-tune of the current model, converted to a real INT8 artifact."""

    src, q = run.current, run.c.qat
    example = torch.zeros(1, 3, run.image_size, run.image_size)
    prepared = prepare_qat(copy.deepcopy(src.net).train(), example, engine=q.engine)
    module = make_module(run.ctx, net=prepared, lr=q.finetune.lr, warmup_epochs=0.0)
    fitted = fit(run.ctx, module, "qat", epochs=int(q.finetune.epochs))  # EMA of observers is not meaningful
    int8 = convert_qat(fitted.net.cpu())
    files = save_qat_artifact(
        int8, run.ctx.artifact_dir("int8_qat"), {**run.meta(src.surgery), "engine": q.engine}
    )
    run.record_file_artifact("int8_qat", files, src)


def _ptq_dynamic(run: StageRun, src: Current) -> None:
    engine = run.ctx.cfg.compression.ptq.engine
    qnet = quantize_dynamic_int8(src.net, engine)  # a quantized copy
    files = art.save_int8_dynamic_artifact(
        qnet, run.ctx.artifact_dir("int8_dynamic"), run.meta(src.surgery), engine
    )
    run.record_file_artifact("int8_dynamic", files, src)


def _float_onnx(run: StageRun, src: Current) -> Path:
    """The current float model exported to ONNX once (the input of the ONNX Runtime quantizers)."""
    work = run.ctx.run_dir / "stages" / f"onnx_{src.name}"
    if not (work / art.ONNX_FILE).is_file():
        art.save_onnx_artifact(src.net, work, run.meta(src.surgery), opset=run.c.export.opset)
    return work / art.ONNX_FILE


def _ptq_dynamic_ort(run: StageRun, src: Current) -> None:
    directory = run.ctx.artifact_dir("int8_dynamic_ort")
    directory.mkdir(parents=True, exist_ok=True)
    quantize_dynamic_ort(_float_onnx(run, src), directory / art.ONNX_FILE)
    meta = {**run.meta(src.surgery), "opset": run.c.export.opset, "quantization": {"format": "dynamic"}}
    write_json(directory / art.SIDECAR, {"kind": "onnx", "weights": art.ONNX_FILE, **meta})
    run.record_file_artifact("int8_dynamic_ort", [art.ONNX_FILE, art.SIDECAR], src)


def _ptq_static_ort(run: StageRun, src: Current) -> None:
    p = run.c.ptq
    directory = run.ctx.artifact_dir("int8_static_ort")
    float_onnx = _float_onnx(run, src)
    calibration = run.ctx.datamodule.calibration_images(p.calibration_images, seed=run.ctx.cfg.seed)
    directory.mkdir(parents=True, exist_ok=True)
    quantize_static_ort(
        float_onnx,
        directory / art.ONNX_FILE,
        calibration,
        per_channel=p.per_channel,
        reduce_range=p.reduce_range,
        weight_type=p.weight_type,
    )
    meta = {
        **run.meta(src.surgery),
        "opset": run.c.export.opset,
        "quantization": {
            "format": "QDQ",
            "per_channel": p.per_channel,
            "reduce_range": p.reduce_range,
            "weight_type": p.weight_type,
            "calibration_images": sum(len(b) for b in calibration),
        },
    }
    write_json(directory / art.SIDECAR, {"kind": "onnx", "weights": art.ONNX_FILE, **meta})
    run.record_file_artifact("int8_static_ort", [art.ONNX_FILE, art.SIDECAR], src)


def _ptq_mixed(run: StageRun, src: Current) -> None:
    p = run.c.ptq
    batches = run.ctx.datamodule.labelled_batches(p.sensitivity_images, split="val", seed=run.ctx.cfg.seed)
    plan = mixed_precision_plan(src.net, batches, budget_pp=p.budget_pp, bits=tuple(p.bits))
    layers = list(plan["int8_layers"])
    qnet = quantize_dynamic_int8(src.net, p.engine, layers)
    directory = run.ctx.artifact_dir("int8_mixed")
    files = art.save_int8_dynamic_artifact(qnet, directory, run.meta(src.surgery), p.engine, layers)
    write_json(directory / "plan.json", plan)
    log.info(
        "mixed precision: %d of %d Linear layers in INT8 (validation drop %.2f pp, budget %.2f pp)",
        len(layers),
        len(layers) + len(plan["float_layers"]),
        plan["accuracy_drop_pp"],
        p.budget_pp,
    )
    run.record_file_artifact("int8_mixed", [*files, "plan.json"], src)


PTQ = {
    "dynamic": _ptq_dynamic,
    "dynamic_ort": _ptq_dynamic_ort,
    "static_ort": _ptq_static_ort,
    "mixed": _ptq_mixed,
}


def stage_ptq(run: StageRun) -> None:
    """Post-training INT8 of the current float model, by every method listed."""
    for method in run.c.ptq.methods:
        PTQ[method](run, run.current)


def export_onnx(run: StageRun) -> None:
    """ONNX (ONNX Runtime) of the final float model, with parity against it on the test split."""
    src = run.current
    directory = run.ctx.artifact_dir("onnx_fp32")
    directory.mkdir(parents=True, exist_ok=True)
    work = _float_onnx(run, src).parent  # the export the ONNX Runtime quantizers made of it, if they ran
    files = [art.ONNX_FILE, art.SIDECAR]
    for name in files:
        shutil.copy2(work / name, directory / name)
    run.record_file_artifact("onnx_fp32", files, src)
    parity = run.records[-1].parity
    if parity["flip_rate"] > 0 or parity["max_abs_logit_diff"] > 1e-3:
        log.warning(
            "ONNX export of %s differs from PyTorch: flip rate %.4f, max |logit diff| %.2e "
            "(expected 0 and <= 1e-3)",
            src.name,
            parity["flip_rate"],
            parity["max_abs_logit_diff"],
        )


STAGES = {
    "train": stage_train,
    "start": stage_start,
    "distill": stage_distill,
    "prune": stage_prune,
    "lowrank": stage_lowrank,
    "qat": stage_qat,
    "ptq": stage_ptq,
}


def run_stages(ctx: RunContext) -> list[ArtifactRecord]:
    run = StageRun(ctx)
    run.load_state()
    for stage in ctx.cfg.compression.stages:
        if stage in run.done:
            continue
        log.info("stage %s", stage)
        # Every stage starts from the run's seed (network init included), so its result does not depend on
        # what ran before it in this process, e.g. whether the teacher came from the cache or was trained.
        L.seed_everything(int(ctx.cfg.seed), workers=True, verbose=False)
        STAGES[stage](run)
        run.done.append(stage)
        run.save_state()
    if ctx.cfg.compression.export.onnx and "export" not in run.done:
        export_onnx(run)
        run.done.append("export")
        run.save_state()
    if run.time_at_end:
        log.info("timing %d artifacts together, alternating", len(run.records))
        time_together(run.records, run.image_size, ctx.cfg.bench, "cpu")
    return run.records
