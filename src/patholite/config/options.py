"""Options of a config group read by name outside Hydra's defaults list (e.g. the teacher's ``model``),
and the model a teacher run or artifact folder describes."""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from patholite.config.schema import ModelConfig
from patholite.errors import ConfigError


def _conf_dir() -> Path:
    """The folder Hydra composes from: the checkout's ``conf/`` or the installed package ``patholite.conf``.

    ``conf/`` lives at the top of the repository and is shipped as ``patholite.conf`` (pyproject.toml maps the
    package onto the folder). A source tree run with ``PYTHONPATH=src`` or installed editable reads its own
    ``conf/`` (so a copy of the tree reads its copy, never another checkout's); a wheel reads the package.
    """
    src = Path(__file__).resolve().parents[2]
    checkout = src.parent
    if src.name == "src" and (checkout / "conf" / "train.yaml").is_file():  # <checkout>/src/patholite
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


_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def config_dir_argument(argv: list[str]) -> str | None:
    """The value of Hydra's ``--config-dir``/``-cd`` flag in ``argv`` (``--config-dir=x`` too), if given."""
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in _CONFIG_DIR_FLAGS:
            if eq:
                return value
            return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def _schema_of(path: Path, group: str, node: DictConfig) -> DictConfig | None:
    """The schema an option file composes onto: the ``/schema/<group>/<name>`` its defaults list names, else
    its group's only schema (``model``: ``timm``; ``dataset`` has one per family, so none)."""
    store = ConfigStore.instance()
    for entry in node.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/schema/"):
            name = entry.removeprefix("/").split("@", 1)[0]
            try:
                return ConfigStore.instance().load(f"{name}.yaml").node
            except ConfigLoadError as err:
                known = (
                    sorted(store.list(f"schema/{group}"))
                    if store.get_type(f"schema/{group}") == ObjectType.GROUP
                    else []
                )
                raise ConfigError(
                    f"{path}: its defaults list names {entry!r}, which is not a schema; for group {group!r} "
                    f"name one of {[f'/schema/{group}/' + k.removesuffix('.yaml') for k in known]}"
                ) from err
    if OmegaConf.select(node, "defaults") is None and store.get_type(f"schema/{group}") == ObjectType.GROUP:
        only = store.list(f"schema/{group}")
        if len(only) == 1:
            return store.load(f"schema/{group}/{only[0]}").node
    return None


def check_config_dir(argv: list[str]) -> None:
    """``--config-dir`` names a folder, and every option file in it that names a schema fits that schema.

    Hydra would say ``Additional config directory '/x' not found``, or ``Key 'kwarg' not in 'ModelConfig'``
    naming the group, not the file; this says which file and which key, before any work.
    """
    given = config_dir_argument(argv)
    if given is None:
        return
    directory = Path(given).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"--config-dir {given}: no such folder. Give the folder that holds your own options as "
            f"<group>/<name>.yaml (e.g. {directory / 'model' / 'my_vit.yaml'}, used as model=my_vit), or "
            "leave the flag out"
        )
    for path in sorted(directory.rglob("*.yaml")):
        group = path.parent.relative_to(directory).as_posix()
        try:
            node = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - YAML and OmegaConf syntax errors have many types
            raise ConfigError(f"{path}: not a readable YAML config ({type(err).__name__}: {err})") from err
        packaged = path.read_text().lstrip().startswith("# @package")  # placed elsewhere (e.g. _global_)
        if group == "." or packaged or not isinstance(node, DictConfig):
            continue
        schema = _schema_of(path, group, node)
        if schema is None:  # no schema named: Hydra and preflight check it in context
            continue
        node = node.copy()
        node.pop("defaults", None)
        try:
            OmegaConf.merge(schema, node)
        except OmegaConfBaseException as err:
            key = f"{group.replace('/', '.')}.{err.full_key}" if err.full_key else group
            hint = ""
            if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(err.object_type):
                keys = [f.name for f in dataclasses.fields(err.object_type)]
                hint = f"; {err.object_type.__name__} has {keys}"
            raise ConfigError(
                f"{path}: {key}: {str(err.msg).splitlines()[0]}{hint}. Fix it in that file"
            ) from err
