"""Options of a config group read by name outside Hydra's defaults list (e.g. the teacher's ``model``),
and the model a teacher run or artifact folder describes."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patholite.config.schema import ModelConfig
from patholite.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_model_option(name: str, key: str = "compression.teacher.model") -> DictConfig:
    """``conf/model/<name>.yaml`` merged onto the model schema, as Hydra would compose ``model=<name>``."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}={name!r} is not a model option; choose one of {option_names('model')}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def teacher_artifact(checkpoint: str | None) -> Path | None:
    """The float SMT artifact ``compression.teacher.checkpoint`` names when it is an artifact folder or a
    ``model=smt`` run folder (its ``smt_fp32``, else ``student_fp32``); None for a weights file or None."""
    if not checkpoint or not Path(checkpoint).expanduser().is_dir():
        return None
    from patholite.errors import CheckpointError
    from patholite.measure.artifacts import SIDECAR, read_sidecar
    from patholite.slides.inference import resolve_artifact

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
    from patholite.measure.artifacts import read_sidecar

    directory = teacher_artifact(c.teacher.checkpoint)
    if directory is None:
        return load_model_option(c.teacher.model), f"compression.teacher.model={c.teacher.model}"
    model = read_sidecar(directory).get("model") or {}
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    node.checkpoint = None  # the weights come from the artifact, not from where its training started
    node.smt.encoder_checkpoint = None
    return node, f"compression.teacher.checkpoint={c.teacher.checkpoint} (model {node.name})"
