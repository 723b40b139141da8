"""``resume=<run dir>`` and ``rerun=<run dir>``: rebuild a past run's command line from its saved overrides.

Hydra's ``--config-dir <run>/.hydra`` reloads the resolved config, which has no defaults list, so group
choices (``model=...``) could not change; replaying ``<run>/.hydra/overrides.yaml`` through normal
composition keeps them changeable.
"""

from __future__ import annotations

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
    """``old`` overrides, each replaced by a ``new`` one with the same key; new keys appended."""
    new_by_key = {override_key(o): o for o in new}
    merged = [new_by_key.pop(override_key(o), o) for o in old]
    return merged + list(new_by_key.values())


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
    rest = [a for a in argv if not a.startswith(f"{key}=")]
    flags = [a for a in rest if a.startswith("-")]
    overrides = [a for a in rest if not a.startswith("-")]
    old = saved_overrides(run_dir)
    if key == "resume":
        if overrides:
            raise ConfigError("resume= continues a run as it was; use rerun=<run dir> to change overrides")
        return [*flags, *old, f"resume={run_dir}", f"hydra.run.dir={run_dir}"]
    return [*flags, *merge_overrides(old, overrides), f"rerun={run_dir}"]
