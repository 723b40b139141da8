"""The teacher a student distils from: a model option, its weights file, or a trained run or artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import SIDECAR, read_sidecar
from patholite.config.options import load_model_option
from patholite.config.schema import ModelConfig
from patholite.errors import CheckpointError, ConfigError


def teacher_artifact(checkpoint: str | None) -> Path | None:
    """The float SMT artifact ``compression.teacher.checkpoint`` names when it is an artifact folder or a
    ``model=smt`` run folder (its ``smt_fp32``, else ``student_fp32``); None for a weights file or None."""
    if not checkpoint or not Path(checkpoint).expanduser().is_dir():
        return None
    path = Path(checkpoint).expanduser()
    if (path / SIDECAR).is_file():
        kind = read_sidecar(path).get("kind")
        if kind != "torch_float":
            raise CheckpointError(
                f"compression.teacher.checkpoint={checkpoint} is a {kind} artifact; distil from a float SMT"
            )
        return path
    for name in ("smt_fp32", "student_fp32"):
        try:
            return resolve_artifact(path, name)
        except CheckpointError:
            continue
    raise CheckpointError(
        f"compression.teacher.checkpoint={checkpoint}: the run has no float SMT artifact (smt_fp32 or "
        "student_fp32); give a model=smt run, a float SMT artifact folder, or a weights file"
    )


def smt_teacher_model(c: DictConfig) -> tuple[DictConfig, str]:
    """The SMT teacher's model config and how the user named it: the sidecar's when
    ``compression.teacher.checkpoint`` is a run or artifact folder (its own architecture), else the
    ``compression.teacher.model`` option's."""
    directory = teacher_artifact(c.teacher.checkpoint)
    if directory is None:
        return load_model_option(c.teacher.model), f"compression.teacher.model={c.teacher.model}"
    model = read_sidecar(directory).get("model") or {}
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    node.checkpoint = None  # the weights come from the artifact, not from where its training started
    node.smt.encoder_checkpoint = None
    return node, f"compression.teacher.checkpoint={c.teacher.checkpoint} (model {node.name})"


def check_smt_teacher(cfg: DictConfig) -> None:
    """An SMT student learns from a float SMT teacher of the same geometry, at logit level."""
    c, m, s = cfg.compression, cfg.model, cfg.model.smt
    t, named = smt_teacher_model(c)
    if not (t.family == "smt" and t.smt is not None):
        raise ConfigError(
            f"{named}: an SMT student learns from a float SMT teacher; use e.g. "
            "compression.teacher.model=smt, or compression.teacher.checkpoint=<a model=smt run>"
        )
    if not all(t.smt[key] == s[key] for key in ("image_size", "grid", "layers")):
        raise ConfigError(
            f"{named} and model={m.name} must share model.smt.image_size, grid and layers: the teacher "
            "scores the images the student focuses on"
        )
    if not (c.kd.kind in ("soft", "hard") and list(c.kd.levels) == ["logits"]):
        raise ConfigError(
            "SMT distillation is logit-level: compression.kd.kind=soft|hard and "
            "compression.kd.levels=[logits]"
        )
