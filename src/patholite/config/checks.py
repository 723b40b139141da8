"""Checks of a composed config that need nothing but the config: one clear ConfigError, before any work.

Hydra already rejects unknown keys and wrong types on override; ``check_config`` re-validates every group
node against its schema (catching keys added with ``+``) and checks the values and combinations of the keys
every run has. What depends on the task (tile classifier or slide model) and on each compression stage is
checked by them, in ``pipelines.preflight``, which calls this first.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from patholite.config.compression import CompressionConfig
from patholite.config.schema import (
    AcceleratorConfig,
    LoggerConfig,
    ModelConfig,
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


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def choice(value: Any, key: str, allowed: tuple) -> None:
    require(value in allowed, f"{key}={value!r} must be one of {list(allowed)}")


def check_compression_base(c: DictConfig) -> None:
    """The keys every ``compression`` option has (EMA, export); each technique's block is checked by its
    stage (``patholite.pipelines.stages``), which also knows the stage names and their order."""
    require(bool(c.stages), f"compression.stages is empty: compression={c.name} must list its stages")
    if c.ema.decay is not None:
        require(
            0 < c.ema.decay < 1,
            f"compression.ema.decay={c.ema.decay} must lie in (0, 1), e.g. 0.999; null turns EMA off",
        )
    require(c.ema.start_step >= 0, f"compression.ema.start_step={c.ema.start_step} must be >= 0")
    require(c.export.opset >= 17, f"compression.export.opset={c.export.opset}: use 17 or later")


def check_finetune(ft: DictConfig, key: str) -> None:
    """A technique's ``finetune`` block (``key``: where it sits, e.g. ``compression.prune``)."""
    require(ft.epochs >= 0, f"{key}.finetune.epochs={ft.epochs} must be >= 0")
    require(ft.lr > 0, f"{key}.finetune.lr={ft.lr} must be > 0")


HUB_PREFIX = "hf-hub:"


def split_hub_name(hub: str, key: str = "model") -> tuple[str, str | None]:
    """``hf-hub:<org>/<repo>[@<revision>]`` as (repo id, revision or None); ConfigError naming ``key``.hub
    for anything else."""
    require(
        hub.startswith(HUB_PREFIX) and hub.count("/") == 1 and not hub.endswith("/"),
        f"{key}.hub={hub!r}: give a hub repo as hf-hub:<org>/<repo>, e.g. hf-hub:MahmoodLab/uni",
    )
    repo, _, revision = hub[len(HUB_PREFIX) :].partition("@")
    return repo, revision or None


def check_model_weights(m: DictConfig, key: str = "model") -> None:
    """Where the model's weights come from (``key``: where it is configured): one source at most, and the
    hub keys well formed. Whether the hub files are there is checked by preflight (models/hub.py)."""
    if m.hub is not None:
        split_hub_name(str(m.hub), key)
    require(
        not (m.pretrained and m.hub),
        f"{key}.pretrained=true and {key}.hub={m.hub} both name weights: keep {key}.hub (that repo's "
        f"weights) or {key}.pretrained (timm's for {m.timm_name})",
    )
    from_hub = bool(m.pretrained or m.hub)
    hub_key = f"{key}.hub" if m.hub else f"{key}.pretrained"
    require(
        not (from_hub and m.checkpoint),
        f"{key}.checkpoint={m.checkpoint} and {hub_key} both name weights; keep one "
        f"({key}.pretrained=false {key}.hub=null to start from the checkpoint)",
    )
    require(
        not (from_hub and m.family == "smt"),
        f"{key}={m.name}: SMT takes encoder weights from {key}.smt.encoder_checkpoint, not from the hub",
    )
    require(
        not m.download or from_hub,
        f"{key}.download=true fetches hub weights, but {key}={m.name} asks for none: set "
        f"{key}.hub=hf-hub:... or {key}.pretrained=true",
    )
    for name in ("mean", "std"):
        values = m.get(name)
        positive = ", each > 0" if name == "std" else ""
        require(
            values is None or (len(values) == 3 and (name == "mean" or all(v > 0 for v in values))),
            f"{key}.{name}={values and list(values)} needs 3 values (RGB){positive}, or null",
        )
    require(m.mpp is None or m.mpp > 0, f"{key}.mpp={m.mpp} must be > 0 (microns per pixel), or null")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value or combination cannot work."""
    _check_against_schema(cfg)
    d, m = cfg.dataset, cfg.model
    require(d.image_size >= 8, f"dataset.image_size={d.image_size} is too small; use at least 8")
    require(d.batch_size >= 1, f"dataset.batch_size={d.batch_size} must be >= 1")
    require(d.num_workers >= 0, f"dataset.num_workers={d.num_workers} must be >= 0")
    require(
        d.eval_batch_size is None or d.eval_batch_size >= 1, "dataset.eval_batch_size must be >= 1 or null"
    )
    require(
        d.max_samples_per_split is None or d.max_samples_per_split >= 1,
        f"dataset.max_samples_per_split={d.max_samples_per_split} must be >= 1, or null for no cap",
    )
    require(
        0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
        f"dataset.val_fraction={d.val_fraction} and dataset.test_fraction={d.test_fraction} must each lie in "
        "[0, 1) and leave some data for training",
    )
    require(
        len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
        "dataset.mean and dataset.std need 3 values (RGB), std > 0",
    )
    check_model_weights(m)
    choice(m.family, "model.family", ("vit", "cnn", "smt"))
    require(
        (m.family == "smt") == (m.smt is not None),
        f"model={m.name}: family smt and a model.smt block go together (use model=smt or smt_micro)",
    )
    require(m.num_classes is None or m.num_classes >= 2, f"model.num_classes={m.num_classes} must be >= 2")
    t = cfg.trainer
    require(t.max_epochs >= 1, f"trainer.max_epochs={t.max_epochs} must be >= 1")
    require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0")
    require(
        0 <= cfg.optim.label_smoothing < 1,
        f"optim.label_smoothing={cfg.optim.label_smoothing} must lie in [0, 1)",
    )
    check_compression_base(cfg.compression)
    choice(cfg.callbacks.progress_bar, "callbacks.progress_bar", ("rich", "tqdm", "none"))
    choice(cfg.callbacks.monitor_mode, "callbacks.monitor_mode", ("min", "max"))
    choice(cfg.callbacks.monitor, "callbacks.monitor", MONITORS)
    if cfg.logger.wandb is not None:
        choice(cfg.logger.wandb.mode, "logger.wandb.mode", ("offline", "online", "disabled"))
    require(
        all(b >= 1 for b in cfg.bench.batch_sizes) and cfg.bench.batch_sizes,
        f"bench.batch_sizes={list(cfg.bench.batch_sizes)} must be positive integers",
    )
    require(cfg.bench.iters >= 1 and cfg.bench.warmup >= 0, "bench.iters must be >= 1 and bench.warmup >= 0")
    require(cfg.bench.threads is None or cfg.bench.threads >= 1, "bench.threads must be >= 1 or null")
    choice(cfg.bench.isolation, "bench.isolation", ("child", "process"))
    require(
        not (cfg.resume and cfg.rerun),
        "resume= and rerun= exclude each other: resume continues a run, "
        "rerun starts a new one from a past run's overrides",
    )
