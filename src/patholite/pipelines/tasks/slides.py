"""Slide-level models (``model.family: smt``, R3's focusing transformer): trained on slide labels with
``SMTModule`` over the slide-level datamodule, judged the way SMT is used: one walk per test slide
(1 + K + K^2 regions read from the slide file), slide-level quality, and per-slide cost (regions and pixels
read, reading and model seconds). INT8 is dynamic (every encoder's Linear layers); QAT fine-tunes with
fake-quantized Linear weights in eager mode, so the attention hook of the focusing score keeps working."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from patholite.artifacts.int8_dynamic import save_int8_dynamic_artifact
from patholite.artifacts.resolve import is_run_folder, resolve_artifact
from patholite.artifacts.sidecar import read_sidecar
from patholite.artifacts.torch_float import WEIGHTS
from patholite.compress.qat import convert_dynamic_qat, prepare_dynamic_qat
from patholite.config.checks import choice, require
from patholite.config.compression.qat import QatConfig
from patholite.data import HistologyDataModule, SlideLevelDataModule
from patholite.errors import ConfigError
from patholite.io import write_json
from patholite.measure.cost import files_size, peak_rss_mb
from patholite.measure.evaluate import bootstrap_accuracy_ci, count_architecture, parity
from patholite.measure.metrics import QualityMeter
from patholite.models.factory import create_network
from patholite.models.smt import ReadPolicy, predict_slide, read_policy
from patholite.models.smt_aggregate import AGGREGATES, fit_attention
from patholite.models.smt_focus import class_weights_from_counts
from patholite.modules.smt import SMTModule
from patholite.pipelines.cache import complete_entries
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import Fitted, fit
from patholite.pipelines.lightning import latest_checkpoint
from patholite.pipelines.tasks.base import Task
from patholite.records import ArtifactRecord
from patholite.wsi.region import Box, RegionReader, pixels_decoded, smt_tissue_mask

log = logging.getLogger(__name__)

SLIDE_LEVEL_DATASETS = ("smt_synthetic", "synthetic_slides", "camelyon16", "bach_wsi", "panda")
MEMORY = "memory"  # Fitted.state key: the focusing memory a fine-tune continues


def slide_meta(ctx: RunContext, model_cfg: DictConfig | None = None) -> dict[str, Any]:
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
    finetune: bool = False,
) -> SMTModule:
    """Fit an SMT (``model_cfg``: another option than ``model=``, e.g. the teacher) on slide labels, with
    distillation from ``teacher`` when given; returns the module, its ``net`` the best weights. ``net``:
    train this network (default: built from ``model_cfg``). ``finetune``: ``net`` is trained already (e.g.
    fake-quantized for QAT): for ``epochs``, every layer trains from the first epoch, at
    ``model.smt.finetune_lr_scale`` times the per-layer learning rates, and the focusing memory continues from
    ``memory`` (the trained module's ``memory.state_dict()``)."""
    model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
    dm, s = ctx.datamodule, model_cfg.smt
    kd = ctx.cfg.compression.kd
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    if finetune:  # the layers are trained already: no staged start, no ramp
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
    if ctx.accelerator.spawns:
        restore_spawned_memory(module, ctx.checkpoint_dir / stage)
    return module


def restore_spawned_memory(module: SMTModule, checkpoint_dir: Path) -> None:
    """Under ddp_spawn the ranks trained in child processes and only the weights came back: the focusing
    memory (identical on every rank, synchronised each step) and the trained depth come from the stage's
    last checkpoint, as one process would hold them after its last epoch."""
    last = latest_checkpoint(checkpoint_dir)
    if last is None:
        log.warning("no checkpoint in %s: the spawned ranks' SMT focusing memory is lost", checkpoint_dir)
        return
    module.on_load_checkpoint(torch.load(last, map_location="cpu", weights_only=True))


def walk_test_slides(
    net: nn.Module, ctx: RunContext, split: str = "test", aggregate: str | None = None
) -> dict[str, Any]:
    """One fresh walk per slide of ``split``, reading every region from the slide file (thumbnail
    included), under ``model.smt``'s read policy: slide probabilities, calls, what each slide cost, and the
    last layer's embeddings (``bags``). ``aggregate``: instead of ``model.smt.aggregate``."""
    dm, s = ctx.datamodule, ctx.cfg.model.smt
    dataset = dm.datasets[split]
    negative = dm.class_names.index(dm.negative_class)
    policy = read_policy(s)
    aggregate = aggregate or s.aggregate
    probs, calls, bags, per_slide = [], [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        slide = int(item["slide"])
        r = ctx.cfg.dataset.reader
        reader = RegionReader(dm.slide_paths[slide], mpp=r.mpp, backend=r.backend)
        box = _box(item["box"])
        start = time.perf_counter()
        mask = _tissue_mask(ctx, reader, policy)
        out = predict_slide(
            net, reader, box, int(s.top_k), ctx.cfg.dataset.mean, ctx.cfg.dataset.std,
            aggregate=aggregate, negative_class=negative, policy=policy, tissue=mask,
        )  # fmt: skip
        wall = time.perf_counter() - start
        probs.append(torch.as_tensor(np.asarray(out["probs"], dtype=np.float32)))
        calls.append(int(out["label"]))
        bags.append(out["embeddings"])
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
    return {"probs": torch.stack(probs), "labels": labels, "calls": calls, "bags": bags, "slides": per_slide}


def _tissue_mask(ctx: RunContext, reader: RegionReader, policy: ReadPolicy):
    """The slide's low-resolution tissue mask when candidates are tissue-masked (as the box was found)."""
    if policy.tissue_min <= 0:
        return None
    d = ctx.cfg.dataset
    node = OmegaConf.create(
        {"tissue": OmegaConf.to_container(d.tissue), "reader": OmegaConf.to_container(d.reader)}
    )
    cache = Path(str(d.cache_dir)).expanduser()
    return smt_tissue_mask(reader.slide, node, cache, ctx.cfg.model.smt.get("tissue_px"))


def fit_attention_head(ctx: RunContext, net: nn.Module) -> dict[str, Any] | None:
    """With ``model.smt.aggregate=attention``: the head (``net.aggregator``) trained on the training
    slides' walks (their last-layer embeddings and slide labels) and its threshold set on the validation
    slides' (never the test slides); what it did goes to ``<run>/smt_attention.json``. None otherwise."""
    if getattr(net, "aggregator", None) is None:
        return None
    dm, s = ctx.datamodule, ctx.cfg.model.smt
    negative = dm.class_names.index(dm.negative_class)
    train = walk_test_slides(net, ctx, "train", aggregate="max")
    val = walk_test_slides(net, ctx, "val", aggregate="max") if "val" in dm.datasets else None
    info = fit_attention(
        net.aggregator, train["bags"], train["labels"].tolist(), negative,
        val["bags"] if val else (), val["labels"].tolist() if val else (),
        epochs=int(s.attention_epochs), seed=int(ctx.cfg.get("seed") or 0),
    )  # fmt: skip
    write_json(ctx.run_dir / "smt_attention.json", info)
    return info


def _box(values: Any):
    x, y, side = (float(v) for v in values)
    return Box(x, y, side)


def _per_slide_cost(slides: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(s[key] for s in slides))

    reads = [s["reads"] for s in slides]

    walls = sorted(s["wall_s"] for s in slides)
    return {
        "n_slides": len(slides),
        "wall_s_median": med("wall_s"),
        "wall_s_p90": float(walls[min(len(walls) - 1, int(0.9 * len(walls)))]),
        "read_s_median": med("read_s"),
        "model_s_median": med("model_s"),
        "reads_per_slide": med("reads"),
        "reads_mean": float(np.mean(reads)),  # adaptive reads: the average cost, and the worst case
        "reads_max": int(max(reads)),
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
) -> tuple[ArtifactRecord, torch.Tensor]:
    """Slide-level quality and per-slide cost of a reloaded SMT artifact; returns its log-probabilities."""
    dm = ctx.datamodule
    walked = walk_test_slides(net, ctx)
    probs, labels = walked["probs"], walked["labels"]
    meter = QualityMeter(list(dm.class_names))
    meter.update(probs, labels)
    quality = meter.compute()
    quality["accuracy_ci95"] = bootstrap_accuracy_ci(probs.argmax(1) == labels)
    calls = torch.as_tensor(walked["calls"])
    if not torch.equal(calls, probs.argmax(1)):  # a calibrated threshold (attention) makes its own calls
        quality["accuracy_at_threshold"] = float((calls == labels).float().mean())
    logits = torch.log(probs.clamp_min(1e-12))
    per_slide = _per_slide_cost(walked["slides"])
    wall = per_slide["wall_s_median"]
    # one encoder pass on an S x S image, times the images a slide's walk sees (encoders share a shape)
    counted = count_architecture(net, int(ctx.cfg.model.smt.image_size), directory)
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
        model=(read_sidecar(directory).get("model") or {}).get("name"),
    )
    return record, logits


AUTO = "auto"  # model.smt.encoder_checkpoint: a fitting patch classifier from the trained-model cache
# the dataset keys that decide which slides (and split) a patch classifier learned from, and how its inputs
# were normalised; loader, tile and augmentation settings are not compared (keys a dataset lacks are skipped)
SLIDE_IDENTITY = (
    "name", "root", "split_seed", "seed", "width", "height", "difficulty", "normal_share",
    "lesion_diameter_um", "lesion_count", "mean", "std",
)  # fmt: skip


def _encoder_shapes(model_cfg: DictConfig) -> dict[str, tuple[int, ...]]:
    """The tensor shapes one SMT encoder loads from a patch classifier (its head and position embedding,
    resampled on loading, left out); built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        spec = OmegaConf.to_container(model_cfg, resolve=True)
        net = create_network(spec, 2, int(model_cfg.smt.image_size))
    state = net.encoders[0].state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("head") and k != "pos_embed"}


def _weights_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the header only: no tensor is read
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)


def auto_encoder_checkpoint(cfg: DictConfig) -> Path:
    """``model.smt.encoder_checkpoint=auto``: the newest complete entry of the trained-model cache
    (``pipelines.cache``) holding a patch classifier of these slides (``SLIDE_IDENTITY`` equal) whose weights
    fit SMT's encoders, one trained at ``model.smt.image_size`` first. None there: a ConfigError naming the
    command that puts one there."""
    d, s = cfg.dataset, cfg.model.smt
    wanted = {k: OmegaConf.to_container(d, resolve=True).get(k) for k in SLIDE_IDENTITY if k in d}
    shapes = _encoder_shapes(cfg.model)
    entries = complete_entries(cfg.paths.cache_dir)
    fitting = []
    for entry, inputs in entries:
        data, model = inputs.get("dataset") or {}, inputs.get("model") or {}
        if model.get("family") == "smt" or any(data.get(k) != v for k, v in wanted.items()):
            continue
        weights = _weights_shapes(entry / WEIGHTS)
        weights = {k: v for k, v in weights.items() if not k.startswith("head") and k != "pos_embed"}
        if weights == shapes:  # the same tensors: a deeper or wider classifier does not load
            fitting.append((data.get("image_size") != int(s.image_size), entry))  # stable: newest first
    if not fitting:
        raise ConfigError(
            f"model.smt.encoder_checkpoint=auto: none of the {len(entries)} trained models in "
            f"{Path(cfg.paths.cache_dir) / 'trained'} is a patch classifier of these slides (dataset="
            f"{d.name}, same generator settings and normalisation) with {cfg.model.name}'s encoder "
            f"architecture. Train one first (compression=none publishes it to the cache), e.g. "
            f"python -m patholite.train model=deit_tiny dataset={d.name} dataset.image_size={s.image_size} "
            "compression=none  (deit_tiny is model=smt's encoder), or name one: "
            "model.smt.encoder_checkpoint=<tile classifier run folder or float artifact>"
        )
    chosen = sorted(fitting, key=lambda f: f[0])[0][1]
    log.info("model.smt.encoder_checkpoint=auto: the patch classifier %s (trained-model cache)", chosen)
    return chosen


def encoder_weights(source: str) -> str:
    """``model.smt.encoder_checkpoint`` as models load it: a tile classifier's run folder becomes its ``fp32``
    artifact (resolved here, once, so models never see run folders); other paths stay as they are."""
    if is_run_folder(source):
        return str(resolve_artifact(source, "fp32", "model.smt.encoder_checkpoint"))
    return source


class SlideTask(Task):
    name = "slides"
    artifact_names = {"fp32": "smt_fp32", "int8_dynamic": "smt_int8_dynamic", "int8_qat": "smt_int8_qat"}

    def check(self, cfg: DictConfig) -> None:
        """Slide-level data, SMT's own geometry, and the compression settings SMT has."""
        m, c, s = cfg.model, cfg.compression, cfg.model.smt
        require(
            cfg.dataset.name in SLIDE_LEVEL_DATASETS,
            f"model={m.name} diagnoses whole slides; dataset={cfg.dataset.name} has no slides. Use one of "
            f"{list(SLIDE_LEVEL_DATASETS)}",
        )
        require(
            s.layers >= 2, f"model.smt.layers={s.layers} must be >= 2 (a thumbnail and a magnified layer)"
        )
        require(
            s.grid >= 2 and s.image_size % s.grid == 0,
            f"model.smt.image_size={s.image_size} must be a multiple of model.smt.grid={s.grid} (>= 2)",
        )
        require(
            1 <= s.top_k <= s.grid**2,
            f"model.smt.top_k={s.top_k}: K must lie in 1..grid^2 = {s.grid**2} (patches per image)",
        )
        for key in ("start_epochs", "lrs"):
            require(len(s[key]) == s.layers, f"model.smt.{key} needs {s.layers} values, one per layer")
        epochs = cfg.trainer.max_epochs
        require(
            max(s.start_epochs) < epochs,
            f"model.smt.start_epochs={list(s.start_epochs)} but trainer.max_epochs={epochs}: a layer "
            f"starting at epoch {max(s.start_epochs)} would never train. R3 runs [0,20,50] of 100 epochs; "
            "scale them to your epochs, e.g. model.smt.start_epochs=[0,2,5] for 10",
        )
        require(set(s.reform) <= {"ret", "emb"}, f"model.smt.reform={list(s.reform)}: a subset of [ret, emb]")
        require(
            s.finetune_lr_scale > 0,
            f"model.smt.finetune_lr_scale={s.finetune_lr_scale} must be > 0 (QAT fine-tuning multiplies "
            "model.smt.lrs by it)",
        )
        choice(s.aggregate, "model.smt.aggregate", AGGREGATES)
        require(s.attention_epochs >= 1, f"model.smt.attention_epochs={s.attention_epochs} must be >= 1")
        read_policy(s).check(s.grid)  # adaptive K bounds and thresholds: one message each, before any work
        choice(s.too_small, "model.smt.too_small", ("upsample", "refuse"))
        choice(s.class_weights, "model.smt.class_weights", ("auto", "none"))
        choice(s.emb_reduction, "model.smt.emb_reduction", ("mean", "sum"))
        if "qat" in c.stages:
            require(
                c.qat.finetune.lr == QatConfig().finetune.lr,
                f"compression.qat.finetune.lr={c.qat.finetune.lr} is the tile classifiers' AdamW rate; SMT's "
                "QAT fine-tunes with SGD at model.smt.finetune_lr_scale x model.smt.lrs: set "
                "model.smt.finetune_lr_scale instead",
            )
        require(
            c.ema.decay is None,
            f"compression.ema.decay={c.ema.decay}: EMA of SMT's weights is not built; SMT keeps a temporal "
            "ensemble of its focusing scores instead (model.smt.eps). Set compression.ema.decay=null",
        )
        require(
            not c.export.onnx,
            "compression.export.onnx=true exports tile classifiers; an SMT walk reads regions between its "
            "encoders and has no single ONNX graph. Set compression.export.onnx=false",
        )
        if s.encoder_checkpoint == AUTO:  # the entry used replaces "auto": the run record's config names it
            s.encoder_checkpoint = str(auto_encoder_checkpoint(cfg))
        elif s.encoder_checkpoint:
            s.encoder_checkpoint = encoder_weights(s.encoder_checkpoint)
        # Under DDP: layers join at model.smt.start_epochs, so until then their parameters get no gradient by
        # design and DDP must look for them (a no-op with one process)
        cfg.accelerator.find_unused_parameters = True

    def check_teacher(self, cfg: DictConfig, teacher_model: DictConfig, named: str) -> None:
        """An SMT student learns from a float SMT teacher of the same geometry, at logit level."""
        c, m, s = cfg.compression, cfg.model, cfg.model.smt
        require(
            teacher_model.family == "smt" and teacher_model.smt is not None,
            f"{named}: an SMT student learns from a float SMT teacher; use e.g. "
            "compression.teacher.model=smt, or compression.teacher.checkpoint=<a model=smt run>",
        )
        require(
            all(teacher_model.smt[key] == s[key] for key in ("image_size", "grid", "layers")),
            f"{named} and model={m.name} must share model.smt.image_size, grid and layers: the teacher "
            "scores the images the student focuses on",
        )
        require(
            c.kd.kind in ("soft", "hard") and list(c.kd.levels) == ["logits"],
            "SMT distillation is logit-level: compression.kd.kind=soft|hard and "
            "compression.kd.levels=[logits]",
        )

    def input_size(self, model_cfg: DictConfig, cfg: DictConfig) -> int:
        return int(model_cfg.smt.image_size)

    def datamodule(self, cfg: DictConfig, pin_memory: bool) -> HistologyDataModule:
        s = cfg.model.smt
        return SlideLevelDataModule(
            cfg.dataset, pin_memory=pin_memory, image_size=s.image_size, grid=s.grid, too_small=s.too_small,
            hops=s.layers - 1, tissue_px=s.get("tissue_px"),
        )  # fmt: skip

    def meta(self, ctx: RunContext, model_cfg: DictConfig | None = None) -> dict[str, Any]:
        return slide_meta(ctx, model_cfg)

    def train(self, ctx: RunContext, stage: str, ema: DictConfig | None = None) -> Fitted:
        module = train_smt(ctx, stage=stage)
        fit_attention_head(ctx, module.net)
        return _fitted(module)

    def plain_network(self, ctx: RunContext, model_cfg: DictConfig, role: str) -> nn.Module:
        if model_cfg.checkpoint:
            net = self.new_network(ctx, model_cfg).eval()
            if getattr(net, "aggregator", None) is not None and not net.aggregator.calibrated:
                fit_attention_head(ctx, net)  # SMT weights without a fitted head: fit it on them
            return net
        stage = "teacher" if role == "teacher" else "train"  # SMT is not cached: trained in this run
        net = train_smt(ctx, model_cfg, stage=stage).net
        fit_attention_head(ctx, net)
        return net

    def distill(
        self, ctx: RunContext, student: nn.Module, teacher: nn.Module, ema: DictConfig | None = None
    ) -> Fitted:
        module = train_smt(ctx, stage="distill", teacher=teacher, net=student)
        fit_attention_head(ctx, module.net)
        return _fitted(module)

    def qat(
        self, ctx: RunContext, net: nn.Module, state: dict[str, Any], directory: Path, meta: dict[str, Any]
    ) -> list[str]:
        """Dynamic-INT8 QAT of every encoder: fine-tune with fake-quantized Linear weights (every layer from
        the first epoch, the focusing memory continuing from the float training's), then dynamic INT8."""
        engine = ctx.accelerator.int8_engine
        prepared = prepare_dynamic_qat(net, engine)
        epochs = int(ctx.cfg.compression.qat.finetune.epochs)
        memory = state.get(MEMORY)
        tuned = train_smt(ctx, stage="qat", net=prepared, epochs=epochs, memory=memory, finetune=True).net
        fit_attention_head(ctx, tuned)  # the fine-tuned encoders' embeddings moved: refit the head on them
        return save_int8_dynamic_artifact(
            convert_dynamic_qat(tuned), directory, {**meta, "qat": True}, engine
        )

    def evaluate(
        self,
        ctx: RunContext,
        name: str,
        net: nn.Module,
        directory: Path,
        files: list[str],
        source: str | None = None,
        reference: torch.Tensor | None = None,
        cpu: bool = False,
        defer_timing: bool = False,
    ) -> tuple[ArtifactRecord, torch.Tensor]:
        return smt_record(name, net, directory, files, ctx, source, reference)

    def outputs(self, ctx: RunContext, net: nn.Module) -> torch.Tensor:
        return torch.log(walk_test_slides(net, ctx)["probs"].clamp_min(1e-12))


def _fitted(module: SMTModule) -> Fitted:
    return Fitted(module.net, state={MEMORY: module.memory.state_dict()})
