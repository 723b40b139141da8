"""Checks of a composed config that need nothing but the config: one clear ConfigError, before any work.

Hydra already rejects unknown keys and wrong types on override; ``check_config`` re-validates every group
node against its schema (catching keys added with ``+``) and checks values and combinations.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from patholite.config.schema import (
    AcceleratorConfig,
    CompressionConfig,
    LoggerConfig,
    ModelConfig,
    QatConfig,
    TrainConfig,
)
from patholite.config.store import DATASET_SCHEMAS
from patholite.errors import ConfigError

# What the classifier logs each validation epoch; a checkpoint monitor must be one of them.
MONITORS = ("val/loss", "val/accuracy", "val/balanced_accuracy", "val/macro_f1", "val/auroc", "val/ece")

# Option schemas per group; later issues register subclasses here (e.g. compression options).
GROUP_SCHEMAS: dict[str, dict[str, type] | type] = {
    "dataset": DATASET_SCHEMAS,
    "model": ModelConfig,
    "compression": CompressionConfig,
    "accelerator": AcceleratorConfig,
    "logger": LoggerConfig,
}


def _schema_for(group: str, node: DictConfig) -> type:
    schemas = GROUP_SCHEMAS[group]
    if isinstance(schemas, dict):
        name = node.get("name")
        if name not in schemas:
            raise ConfigError(f"{group}.name={name!r} is not one of {sorted(schemas)}")
        return schemas[name]
    return schemas


def _merge_error(err: OmegaConfBaseException, prefix: str, schema: type) -> ConfigError:
    key = f"{prefix}{err.full_key}" if getattr(err, "full_key", None) else prefix.rstrip(".") or "config"
    return ConfigError(f"{key}: {str(err).splitlines()[0]} (schema {schema.__name__})")


def _check_against_schema(cfg: DictConfig) -> None:
    # The whole config onto TrainConfig (its group fields are typed Any), then each group onto its option's
    # schema: together they catch keys added with `+`, which Hydra lets past struct mode.
    whole = OmegaConf.to_container(cfg, resolve=False)
    whole.pop("hydra", None)  # present when composed with return_hydra_config (tests, tools)
    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), whole)
    except OmegaConfBaseException as err:
        raise _merge_error(err, "", TrainConfig) from err
    for group in GROUP_SCHEMAS:
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"no {group} chosen: add {group}=<option> (see conf/{group}/)")
        schema = _schema_for(group, node)
        try:
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=False))
        except OmegaConfBaseException as err:
            raise _merge_error(err, f"{group}.", schema) from err


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _require(value in allowed, f"{key}={value!r} must be one of {list(allowed)}")


STAGES = ("train", "start", "distill", "prune", "lowrank", "qat", "ptq")
# Stages that produce the run's first float model; every other stage transforms the current one.
FIRST_STAGES = ("train", "start", "distill")
PTQ_METHODS = ("dynamic", "dynamic_ort", "static_ort", "mixed")
KD_LEVELS = ("logits", "attention", "features")


def check_compression(c: DictConfig) -> None:
    """The ``compression`` option: stage order and every technique's values."""
    stages = list(c.stages)
    for stage in stages:
        _choice(stage, "compression.stages[]", STAGES)
    _require(
        bool(stages) and stages[0] in FIRST_STAGES and not any(s in FIRST_STAGES for s in stages[1:]),
        f"compression.stages={stages}: must start with one of {list(FIRST_STAGES)} (where the float model "
        "comes from) and use it once; then any of prune, lowrank, qat, ptq",
    )
    _require(len(set(stages)) == len(stages), f"compression.stages={stages} repeats a stage")
    _require(
        not ("prune" in stages and "lowrank" in stages) or stages.index("prune") < stages.index("lowrank"),
        f"compression.stages={stages}: prune must come before lowrank (pruning reshapes softmax attention)",
    )
    kd = c.kd
    _choice(kd.kind, "compression.kd.kind", ("soft", "hard", "token", "token_soft", "token_hard"))
    for level in kd.levels:
        _choice(level, "compression.kd.levels[]", KD_LEVELS)
    _require(0 <= kd.alpha <= 1, f"compression.kd.alpha={kd.alpha} must lie in [0, 1]")
    _require(kd.temperature > 0, f"compression.kd.temperature={kd.temperature} must be > 0")
    _require(
        kd.entropy_weight >= 0 and kd.lesion_weight >= 0,
        "compression.kd.entropy_weight and lesion_weight must be >= 0",
    )
    if c.ema.decay is not None:
        _require(
            0 < c.ema.decay < 1,
            f"compression.ema.decay={c.ema.decay} must lie in (0, 1), e.g. 0.999; null turns EMA off",
        )
    _require(c.ema.start_step >= 0, f"compression.ema.start_step={c.ema.start_step} must be >= 0")
    for method in c.ptq.methods:
        _choice(method, "compression.ptq.methods[]", PTQ_METHODS)
    _require(
        "ptq" not in stages or bool(c.ptq.methods),
        "compression.ptq.methods is empty: name at least one of dynamic, static_ort, mixed",
    )
    _require(
        "static_ort" not in c.ptq.methods or c.ptq.calibration_images >= 1,
        f"compression.ptq.calibration_images={c.ptq.calibration_images}: static INT8 needs at least one "
        "calibration image (a few hundred is typical)",
    )
    _choice(c.ptq.weight_type, "compression.ptq.weight_type", ("int8", "uint8"))
    _require(c.ptq.budget_pp >= 0, f"compression.ptq.budget_pp={c.ptq.budget_pp} must be >= 0")
    _require(
        "mixed" not in c.ptq.methods or c.ptq.sensitivity_images >= 1,
        "compression.ptq.sensitivity_images must be >= 1 for mixed precision",
    )
    _require(all(b >= 2 for b in c.ptq.bits), f"compression.ptq.bits={list(c.ptq.bits)} must all be >= 2")
    p = c.prune
    _require(
        (p.ratio is None) != (p.target_flops is None),
        "compression.prune: set exactly one of ratio (fraction removed) and target_flops",
    )
    _require(
        p.ratio is None or 0 < p.ratio < 1,
        f"compression.prune.ratio={p.ratio} must lie strictly between 0 and 1 (the fraction removed)",
    )
    _require(p.target_flops is None or p.target_flops > 0, "compression.prune.target_flops must be > 0")
    _choice(p.importance, "compression.prune.importance", ("magnitude", "taylor", "moving_average"))
    _choice(p.saliency, "compression.prune.saliency", ("taylor", "grad"))
    _require(0 <= p.beta < 1, f"compression.prune.beta={p.beta} must lie in [0, 1)")
    _require(p.round_to >= 1, f"compression.prune.round_to={p.round_to} must be >= 1")
    _require(p.heads or p.mlp, "compression.prune: heads and mlp are both false, nothing to prune")
    _require(
        p.importance == "magnitude" or p.scoring_batches >= 1,
        f"compression.prune.importance={p.importance} needs compression.prune.scoring_batches >= 1",
    )
    _require(c.lowrank.landmarks >= 1, f"compression.lowrank.landmarks={c.lowrank.landmarks} must be >= 1")
    for key in ("prune", "lowrank", "qat"):
        ft = c[key].finetune
        _require(ft.epochs >= 0, f"compression.{key}.finetune.epochs={ft.epochs} must be >= 0")
        _require(ft.lr > 0, f"compression.{key}.finetune.lr={ft.lr} must be > 0")
    _require(c.qat.finetune.epochs >= 1, "compression.qat.finetune.epochs must be >= 1 (QAT is a fine-tune)")
    if "qat" in c.stages:  # the engine is used only after training: a typo must not cost the training
        import torch

        engines = torch.backends.quantized.supported_engines
        _require(
            c.qat.engine in engines,
            f"compression.qat.engine={c.qat.engine!r} is not an INT8 engine of this torch; it has {engines}",
        )
    _require(c.export.opset >= 17, f"compression.export.opset={c.export.opset}: use 17 or later")


SLIDE_LEVEL_DATASETS = ("smt_synthetic", "synthetic_slides", "camelyon16", "bach_wsi", "panda")
# start: SMT is trained in the run; distill: from a float SMT teacher (compression.teacher.model=smt...)
_SMT_AFTER = ([], ["ptq"], ["qat"], ["ptq", "qat"])
SMT_STAGES = tuple([first, *rest] for first in ("train", "start", "distill") for rest in _SMT_AFTER)


def check_smt(cfg: DictConfig) -> None:
    """An SMT run: slide-level data, its own geometry, and the compression it supports so far."""
    m, c = cfg.model, cfg.compression
    _require(
        m.family == "smt" and m.smt is not None,
        f"model={m.name}: family smt and a model.smt block go together (use model=smt or smt_micro)",
    )
    _require(
        cfg.dataset.name in SLIDE_LEVEL_DATASETS,
        f"model={m.name} diagnoses whole slides; dataset={cfg.dataset.name} has no slides. Use one of "
        f"{list(SLIDE_LEVEL_DATASETS)}",
    )
    s = m.smt
    _require(s.layers >= 2, f"model.smt.layers={s.layers} must be >= 2 (a thumbnail and a magnified layer)")
    _require(
        s.grid >= 2 and s.image_size % s.grid == 0,
        f"model.smt.image_size={s.image_size} must be a multiple of model.smt.grid={s.grid} (>= 2)",
    )
    _require(
        1 <= s.top_k <= s.grid**2,
        f"model.smt.top_k={s.top_k}: K must lie in 1..grid^2 = {s.grid**2} (patches per image)",
    )
    for key in ("start_epochs", "lrs"):
        _require(len(s[key]) == s.layers, f"model.smt.{key} needs {s.layers} values, one per layer")
    epochs = cfg.trainer.max_epochs
    _require(
        max(s.start_epochs) < epochs,
        f"model.smt.start_epochs={list(s.start_epochs)} but trainer.max_epochs={epochs}: a layer starting at "
        f"epoch {max(s.start_epochs)} would never train. R3 runs [0,20,50] of 100 epochs; scale them to your "
        "epochs, e.g. model.smt.start_epochs=[0,2,5] for 10",
    )
    _require(set(s.reform) <= {"ret", "emb"}, f"model.smt.reform={list(s.reform)}: a subset of [ret, emb]")
    _require(
        s.finetune_lr_scale > 0,
        f"model.smt.finetune_lr_scale={s.finetune_lr_scale} must be > 0 (QAT fine-tuning multiplies "
        "model.smt.lrs by it)",
    )
    if "qat" in c.stages:
        _require(
            c.qat.finetune.lr == QatConfig().finetune.lr,
            f"compression.qat.finetune.lr={c.qat.finetune.lr} is the tile classifiers' AdamW rate; SMT's "
            "QAT fine-tunes with SGD at model.smt.finetune_lr_scale x model.smt.lrs: set "
            "model.smt.finetune_lr_scale instead",
        )
    _choice(s.aggregate, "model.smt.aggregate", ("mean", "max"))
    _choice(s.too_small, "model.smt.too_small", ("upsample", "refuse"))
    _choice(s.class_weights, "model.smt.class_weights", ("auto", "none"))
    _choice(s.emb_reduction, "model.smt.emb_reduction", ("mean", "sum"))
    _require(
        list(c.stages) in [list(x) for x in SMT_STAGES] and list(c.ptq.methods) == ["dynamic"],
        f"compression={c.name} with model={m.name}: SMT supports compression=none, kd (from a float SMT "
        "teacher), ptq (dynamic INT8 of every encoder) and qat (fine-tuned for dynamic INT8); pruning and "
        "low-rank SMT are not built yet",
    )


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value or combination cannot work."""
    _check_against_schema(cfg)
    d, m = cfg.dataset, cfg.model
    _require(d.image_size >= 8, f"dataset.image_size={d.image_size} is too small; use at least 8")
    _require(d.batch_size >= 1, f"dataset.batch_size={d.batch_size} must be >= 1")
    _require(d.num_workers >= 0, f"dataset.num_workers={d.num_workers} must be >= 0")
    _require(
        d.eval_batch_size is None or d.eval_batch_size >= 1, "dataset.eval_batch_size must be >= 1 or null"
    )
    _require(
        d.max_samples_per_split is None or d.max_samples_per_split >= 1,
        f"dataset.max_samples_per_split={d.max_samples_per_split} must be >= 1, or null for no cap",
    )
    _require(
        0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
        f"dataset.val_fraction={d.val_fraction} and dataset.test_fraction={d.test_fraction} must each lie in "
        "[0, 1) and leave some data for training",
    )
    _require(
        len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
        "dataset.mean and dataset.std need 3 values (RGB), std > 0",
    )
    _require(
        not m.pretrained,
        f"model.pretrained=true would download weights; patholite runs offline: set model.pretrained=false "
        f"and model.checkpoint=<local weights file> for {m.name}",
    )
    _choice(m.family, "model.family", ("vit", "cnn", "smt"))
    if m.family == "smt" or m.smt is not None:
        check_smt(cfg)
    _require(m.num_classes is None or m.num_classes >= 2, f"model.num_classes={m.num_classes} must be >= 2")
    t = cfg.trainer
    _require(t.max_epochs >= 1, f"trainer.max_epochs={t.max_epochs} must be >= 1")
    _require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    _require(
        0 <= cfg.optim.label_smoothing < 1,
        f"optim.label_smoothing={cfg.optim.label_smoothing} must lie in [0, 1)",
    )
    check_compression(cfg.compression)
    _choice(cfg.callbacks.progress_bar, "callbacks.progress_bar", ("rich", "tqdm", "none"))
    _choice(cfg.callbacks.monitor_mode, "callbacks.monitor_mode", ("min", "max"))
    _choice(cfg.callbacks.monitor, "callbacks.monitor", MONITORS)
    if cfg.logger.wandb is not None:
        _choice(cfg.logger.wandb.mode, "logger.wandb.mode", ("offline", "online", "disabled"))
    _require(
        all(b >= 1 for b in cfg.bench.batch_sizes) and cfg.bench.batch_sizes,
        f"bench.batch_sizes={list(cfg.bench.batch_sizes)} must be positive integers",
    )
    _require(cfg.bench.iters >= 1 and cfg.bench.warmup >= 0, "bench.iters must be >= 1 and bench.warmup >= 0")
    _require(cfg.bench.threads is None or cfg.bench.threads >= 1, "bench.threads must be >= 1 or null")
    _choice(cfg.bench.isolation, "bench.isolation", ("child", "process"))
    _require(
        not (cfg.resume and cfg.rerun),
        "resume= and rerun= exclude each other: resume continues a run, "
        "rerun starts a new one from a past run's overrides",
    )
