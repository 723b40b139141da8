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
