"""``resume=<run dir>`` and ``rerun=<run dir>``: rebuild a past run's command line from its saved overrides.

Hydra's ``--config-dir <run>/.hydra`` reloads the resolved config, which has no defaults list, so group
choices (``model=...``) could not change; replaying ``<run>/.hydra/overrides.yaml`` through normal
composition keeps them changeable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from patholite.errors import ConfigError

_RUN_KEYS = ("resume", "rerun")


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``; ``~a`` -> ``a``; ``model=x`` -> ``model``."""
    return override.split("=", 1)[0].lstrip("+~")


def saved_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a patholite run directory: {path} is missing")
    return [o for o in yaml.safe_load(path.read_text()) or [] if override_key(o) not in _RUN_KEYS]


def merge_overrides(old: list[str], new: list[str]) -> list[str]:
    """``old`` overrides, each replaced by a ``new`` one with the same key; new keys appended.

    A key the old run added (``+a=1``) is still absent from the config, so its replacement keeps the ``+``.
    """
    new_by_key = {override_key(o): o for o in new}
    merged = []
    for o in old:
        replacement = new_by_key.pop(override_key(o), None)
        if replacement is None:
            merged.append(o)
        elif o.startswith("+") and not replacement.startswith(("+", "~")):
            merged.append("+" + replacement)
        else:
            merged.append(replacement)
    return merged + list(new_by_key.values())


# Hydra flags that take a value as the next argument (everything else is a lone flag or an override).
_VALUED_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--info", "-i"}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra flags (with their values) apart from overrides."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUED_FLAGS and "=" not in arg and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def quote(value: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters Hydra's grammar reads."""
    if any(c in value for c in " ,=[]{}()'\"\\:*?$"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def expand_run_references(argv: list[str]) -> list[str]:
    refs = {k: a.split("=", 1)[1] for a in argv for k in _RUN_KEYS if a.startswith(f"{k}=")}
    if not refs:
        return argv
    if len(refs) > 1:
        raise ConfigError("resume= and rerun= exclude each other")
    key, value = next(iter(refs.items()))
    run_dir = Path(value).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"{key}={value}: no such run directory")
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError(f"{key}= takes one run directory; it cannot be combined with -m")
    flags, overrides = split_flags([a for a in argv if not a.startswith(f"{key}=")])
    old = saved_overrides(run_dir)
    if key == "resume":
        if overrides:
            raise ConfigError("resume= continues a run as it was; use rerun=<run dir> to change overrides")
        return [*flags, *old, f"resume={quote(str(run_dir))}", f"hydra.run.dir={quote(str(run_dir))}"]
    return [*flags, *merge_overrides(old, overrides), f"rerun={quote(str(run_dir))}"]


_SUBMITIT_LAUNCHERS = ("slurm", "submitit_slurm", "submitit_local")


def check_launcher(argv: list[str]) -> None:
    """``hydra/launcher=slurm`` (or submitit_*) needs the ``slurm`` extra: say so before Hydra fails to find
    the launcher's config."""
    asked = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra/launcher=")]
    if not any(name in _SUBMITIT_LAUNCHERS for name in asked):
        return

    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise ConfigError(
            f"hydra/launcher={asked[-1]} runs sweep jobs through submitit, which is not installed: "
            "pip install 'patholite[slurm]' (hydra-submitit-launcher)"
        )
