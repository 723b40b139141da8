"""``model=smt``: train R3's focusing transformer on slide labels, then record each artifact on the test
slides the way SMT is used: one walk per slide (1 + K + K^2 regions read from the slide file), slide-level
quality, and per-slide cost (regions and level-0 pixels read, reading and model seconds).

``compression=ptq`` adds dynamic INT8 of every encoder (torch.ao, Linear layers), recorded beside the float
model with its parity; ``compression=qat`` fine-tunes the trained SMT with fake-quantized Linear weights first
and converts that to dynamic INT8.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from patholite import artifacts as art
from patholite.compress.qat import convert_dynamic_qat, prepare_dynamic_qat
from patholite.compress.quantize import quantize_dynamic_int8
from patholite.measure.cost import files_size, peak_rss_mb
from patholite.measure.evaluate import bootstrap_accuracy_ci, count_architecture, parity
from patholite.measure.metrics import QualityMeter
from patholite.models.factory import build_model
from patholite.models.smt import predict_slide
from patholite.models.smt_focus import class_weights_from_counts
from patholite.modules.smt import SMTModule
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import fit
from patholite.pipelines.stages import teacher_config
from patholite.pipelines.teacher import smt_teacher_model, teacher_artifact
from patholite.records import ArtifactRecord
from patholite.wsi.region import Box, RegionReader, pixels_decoded

log = logging.getLogger(__name__)


def smt_meta(ctx: RunContext, model_cfg: DictConfig | None = None) -> dict[str, Any]:
    """The sidecar of an SMT artifact: a slide model (the tile engine refuses it) with its geometry."""
    dm = ctx.datamodule
    model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
    return {
        **ctx.artifact_meta(model_cfg),
        "image_size": int(model_cfg.smt.image_size),
        "slide_model": True,
        "negative_class": dm.negative_class,
        # how the training thumbnails were found: inference compares its own settings with these
        "tissue": OmegaConf.to_container(ctx.cfg.dataset.tissue, resolve=True),
        "reader_backend": ctx.cfg.dataset.reader.backend,
    }


def class_weights(ctx: RunContext) -> list[float] | None:
    """Inverse class frequency over the training slides (``model.smt.class_weights=auto``)."""
    if ctx.cfg.model.smt.class_weights == "none":
        return None

    labels = ctx.datamodule.datasets["train"].labels
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=ctx.datamodule.num_classes)
    return [float(w) for w in class_weights_from_counts(counts.tolist())]


def train_smt(
    ctx: RunContext,
    model_cfg: DictConfig | None = None,
    stage: str = "train",
    teacher: nn.Module | None = None,
    net: nn.Module | None = None,
    epochs: int | None = None,
    memory: dict[str, Any] | None = None,
):
    """Fit an SMT (``model_cfg``: another option than ``model=``, e.g. the teacher) on slide labels, with
    distillation from ``teacher`` when given; returns the module, its ``net`` the best weights. ``net``:
    fine-tune this trained SMT instead (e.g. fake-quantized for QAT) for ``epochs``: every layer trains from
    the first epoch, at ``model.smt.finetune_lr_scale`` times the per-layer learning rates, and the focusing
    memory continues from ``memory`` (the trained module's ``memory.state_dict()``)."""

    model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
    dm, s = ctx.datamodule, model_cfg.smt
    kd = ctx.cfg.compression.kd
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    if net is not None:  # the layers are trained already: no staged start, no ramp
        scale = float(s.finetune_lr_scale)
        spec["smt"] = {**spec["smt"], "start_epochs": [0] * int(s.layers), "ramp_epochs": 0,
                       "lrs": [scale * float(lr) for lr in s.lrs]}  # fmt: skip
    module = SMTModule(
        model=spec,
        class_names=list(dm.class_names),
        mean=list(ctx.cfg.dataset.mean),
        std=list(ctx.cfg.dataset.std),
        class_weights=class_weights(ctx),
        negative_class=dm.class_names.index(dm.negative_class),
        eval_depth=s.eval_depth,
        gradient_clip_val=ctx.cfg.trainer.gradient_clip_val,
        teacher=teacher,
        kd={"alpha": kd.alpha, "temperature": kd.temperature, "kind": kd.kind}
        if teacher is not None
        else None,
        net=net,
        memory=memory,
    )
    fit(ctx, module, stage, epochs=epochs)  # leaves the best epoch's weights in module.net
    return module


def walk_test_slides(net: nn.Module, ctx: RunContext, split: str = "test") -> dict[str, Any]:
    """One fresh walk per slide of ``split``, reading every region from the slide file (thumbnail
    included): slide probabilities and what each slide cost."""

    dm, s = ctx.datamodule, ctx.cfg.model.smt
    dataset = dm.datasets[split]
    negative = dm.class_names.index(dm.negative_class)
    probs, per_slide = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        slide = int(item["slide"])
        r = ctx.cfg.dataset.reader
        reader = RegionReader(dm.slide_paths[slide], mpp=r.mpp, backend=r.backend)
        box = _box(item["box"])
        start = time.perf_counter()
        out = predict_slide(
            net, reader, box, int(s.top_k), ctx.cfg.dataset.mean, ctx.cfg.dataset.std,
            aggregate=s.aggregate, negative_class=negative,
        )  # fmt: skip
        wall = time.perf_counter() - start
        probs.append(torch.as_tensor(np.asarray(out["probs"], dtype=np.float32)))
        sides = [b[2] for layer in out["layers"] for b in layer["boxes"]]
        decoded = pixels_decoded(reader.slide, sides, int(s.image_size))
        per_slide.append(
            {
                "slide": Path(dm.slide_paths[slide]).name,
                "wall_s": wall,
                "read_s": out["read_seconds"],
                "model_s": out["model_seconds"],
                "reads": out["reads"],
                "pixels_read": float(decoded),  # decoded from the file, at the levels read
                "area_level0": float(sum(side * side for side in sides)),  # level-0 area the reads cover
            }
        )
    labels = torch.as_tensor(np.asarray(dataset.labels, dtype=np.int64))
    return {"probs": torch.stack(probs), "labels": labels, "slides": per_slide}


def _box(values: Any):
    x, y, side = (float(v) for v in values)
    return Box(x, y, side)


def _per_slide_cost(slides: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(s[key] for s in slides))

    walls = sorted(s["wall_s"] for s in slides)
    return {
        "n_slides": len(slides),
        "wall_s_median": med("wall_s"),
        "wall_s_p90": float(walls[min(len(walls) - 1, int(0.9 * len(walls)))]),
        "read_s_median": med("read_s"),
        "model_s_median": med("model_s"),
        "reads_per_slide": med("reads"),
        "pixels_read_median": med("pixels_read"),
        "area_level0_median": med("area_level0"),
        "slides": slides,
    }


def smt_record(
    name: str,
    net: nn.Module,
    directory: Path,
    files: list[str],
    ctx: RunContext,
    source: str | None = None,
    reference: torch.Tensor | None = None,
    model_name: str | None = None,
) -> tuple[ArtifactRecord, torch.Tensor]:
    """Slide-level quality and per-slide cost of a reloaded SMT artifact; returns its log-probabilities."""
    dm = ctx.datamodule
    walked = walk_test_slides(net, ctx)
    probs, labels = walked["probs"], walked["labels"]
    meter = QualityMeter(list(dm.class_names))
    meter.update(probs, labels)
    quality = meter.compute()
    quality["accuracy_ci95"] = bootstrap_accuracy_ci(probs.argmax(1) == labels)
    logits = torch.log(probs.clamp_min(1e-12))
    per_slide = _per_slide_cost(walked["slides"])
    wall = per_slide["wall_s_median"]
    # one encoder pass on an S x S image, times the images a slide's walk sees (encoders share a shape)
    counted = count_architecture(net, int(ctx.cfg.model.smt.image_size), "cpu", directory)
    images = per_slide["reads_per_slide"]
    cost = {
        "params": counted["params"],
        "flops": int(counted["flops"] * images),
        "flops_fused_uncounted": int(counted["flops_fused_uncounted"] * images),
        "size_bytes": files_size(directory, files),
        # per slide, not per batch of images: "slide" is the unit SMT is timed in
        "latency_ms": {"slide": {"p50": 1000 * wall, "p90": 1000 * per_slide["wall_s_p90"]}},
        "throughput_ips": {"slide": 1.0 / wall if wall > 0 else None},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "memory": {"method": "process", "note": "the job's peak so far, training included"},
        "timing": {"method": "process", "unit": "slide", "note": "one walk per test slide, regions read "
                   "from the slide file (thumbnail included), tissue box from the cached mask"},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "protocol": {"per_slide": per_slide},
    }  # fmt: skip
    record = ArtifactRecord(
        name=name,
        path=str(directory),
        files=files,
        quality=quality,
        cost=cost,
        source=source,
        parity=parity(logits, reference, source) if reference is not None and source else None,
        model=model_name or ctx.cfg.model.name,
    )
    return record, logits


def _save_and_record(
    ctx: RunContext, name: str, net: nn.Module, model_cfg: DictConfig, source: tuple[str, torch.Tensor] | None
) -> tuple[nn.Module, ArtifactRecord, torch.Tensor]:
    """Save ``net`` as a float SMT artifact, reload it from its files and record it."""
    directory = ctx.artifact_dir(name)
    files = art.save_float_artifact(net.cpu().eval(), directory, smt_meta(ctx, model_cfg))
    loaded, _ = art.load_float_artifact(directory)
    src, reference = source if source else (None, None)
    record, logits = smt_record(name, loaded, directory, files, ctx, src, reference, model_cfg.name)
    return loaded, record, logits


def teacher_smt(ctx: RunContext, records: list[ArtifactRecord]) -> tuple[nn.Module, torch.Tensor]:
    """The float SMT a student distils from: ``compression.teacher.checkpoint`` (a ``model=smt`` run, a
    float artifact, or a weights file for ``compression.teacher.model``), or trained in this run."""

    directory = teacher_artifact(ctx.cfg.compression.teacher.checkpoint)
    if directory is not None:  # a model=smt run or float artifact: its own architecture and weights
        teacher_cfg, _ = smt_teacher_model(ctx.cfg.compression)
        net, _ = art.load_artifact(directory)
    else:  # compression.teacher.model, from its weights file or trained here
        teacher_cfg = teacher_config(ctx.cfg.compression)
        if teacher_cfg.checkpoint:
            net = build_model(teacher_cfg, ctx.datamodule.num_classes, int(teacher_cfg.smt.image_size))
        else:
            log.info("training the SMT teacher %s first (give compression.teacher.checkpoint to reuse one)",
                     teacher_cfg.name)  # fmt: skip
            net = train_smt(ctx, teacher_cfg, stage="teacher").net
    teacher, record, logits = _save_and_record(ctx, "teacher_fp32", net, teacher_cfg, None)
    records.append(record)
    return teacher, logits


def run_smt(ctx: RunContext) -> list[ArtifactRecord]:
    """Train SMT (``[train]``; ``[distill]``: from a float SMT teacher), record it, and with ``ptq`` its
    dynamic INT8 twin, with ``qat`` its dynamic INT8 after fake-quantized fine-tuning."""
    records: list[ArtifactRecord] = []
    stages = list(ctx.cfg.compression.stages)
    if stages[0] == "distill":
        teacher, teacher_logits = teacher_smt(ctx, records)
        trained = train_smt(ctx, stage="distill", teacher=teacher)
        name, source = "student_fp32", ("teacher_fp32", teacher_logits)
    else:
        trained, name, source = train_smt(ctx), "smt_fp32", None
    net, record, logits = _save_and_record(ctx, name, trained.net, ctx.cfg.model, source)
    records.append(record)
    if "ptq" in stages:
        engine = ctx.accelerator.int8_engine
        qnet = quantize_dynamic_int8(copy.deepcopy(net), engine)
        records.append(_save_int8_and_record(ctx, "smt_int8_dynamic", qnet, engine, (name, logits)))
    if "qat" in stages:
        records.append(qat_smt(ctx, net, name, logits, trained.memory.state_dict()))
    return records


def _save_int8_and_record(
    ctx: RunContext, name: str, qnet: nn.Module, engine: str, source: tuple[str, torch.Tensor], **meta: Any
) -> ArtifactRecord:
    """Save a dynamic INT8 SMT as an artifact, reload it from its files and record it against ``source``."""
    directory = ctx.artifact_dir(name)
    files = art.save_int8_dynamic_artifact(qnet, directory, {**smt_meta(ctx), **meta}, engine)
    loaded, _ = art.load_artifact(directory)
    record, _ = smt_record(name, loaded, directory, files, ctx, *source)
    return record


def qat_smt(
    ctx: RunContext,
    net: nn.Module,
    source: str,
    reference: torch.Tensor,
    memory: dict[str, Any] | None = None,
) -> ArtifactRecord:
    """Dynamic-INT8 QAT of every encoder: fine-tune with fake-quantized Linear weights (eager mode, so the
    attention hook of the focusing score still works), the focusing memory continuing from the float
    training's, then convert to dynamic INT8 and record it."""

    q = ctx.cfg.compression.qat
    prepared = prepare_dynamic_qat(net, q.engine)
    tuned = train_smt(ctx, stage="qat", net=prepared, epochs=int(q.finetune.epochs), memory=memory).net
    return _save_int8_and_record(
        ctx, "smt_int8_qat", convert_dynamic_qat(tuned), q.engine, (source, reference), qat=True
    )
