"""Options of a config group read by name outside Hydra's defaults list (e.g. the teacher's ``model``),
and the model a teacher run or artifact folder describes."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patholite.config.schema import ModelConfig
from patholite.errors import ConfigError


def _conf_dir() -> Path:
    """The folder Hydra composes from: the checkout's ``conf/`` or the installed package ``patholite.conf``.

    ``conf/`` lives at the top of the repository and is shipped as ``patholite.conf`` (pyproject.toml maps the
    package onto the folder). A source tree run with ``PYTHONPATH=src`` or installed editable reads its own
    ``conf/`` (so a copy of the tree reads its copy, never another checkout's); a wheel reads the package.
    """
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "train.yaml").is_file():
        return checkout / "conf"
    try:
        installed = Path(str(importlib.resources.files("patholite.conf")))
    except ModuleNotFoundError:
        installed = None
    if installed is None or not (installed / "train.yaml").is_file():
        raise ConfigError(
            f"patholite's configs are missing: neither {checkout / 'conf'} nor the package patholite.conf "
            "holds train.yaml; reinstall patholite (pip install .) or run from a checkout with PYTHONPATH=src"
        )
    return installed


CONF_DIR = _conf_dir()


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
