"""From what a user names to an artifact folder: an artifact folder (or one of its files), or a run folder,
whose record lists the artifacts it wrote."""

from __future__ import annotations

from pathlib import Path

from patholite.artifacts.sidecar import SIDECAR
from patholite.errors import CheckpointError, ConfigError
from patholite.records import RECORD_FILE, read_record


def is_run_folder(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return path.is_dir() and not (path / SIDECAR).is_file() and (path / RECORD_FILE).is_file()


def resolve_artifact(path: str | Path, name: str | None = None, key: str = "artifact") -> Path:
    """The artifact folder ``path`` names: an artifact folder or one of its files, or a run folder (its
    ``name`` artifact, else the last artifact its record lists that has a sidecar). ``key``: the setting
    that named ``path``, for the messages."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / SIDECAR).is_file():
        if name is not None:
            raise ConfigError(
                f"{key}={path} is an artifact folder; artifact_name={name} picks an artifact of a run "
                "folder: give the run folder, or leave artifact_name out"
            )
        return path
    if not path.is_dir():
        raise CheckpointError(f"{key}={path} does not exist; give an artifact folder or a run folder")
    if not (path / RECORD_FILE).is_file():
        raise CheckpointError(
            f"{key}={path} is neither an artifact ({SIDECAR} missing) nor a run folder ({RECORD_FILE} "
            "missing)"
        )
    artifacts = [a for a in read_record(path).get("artifacts", []) if (Path(a["path"]) / SIDECAR).is_file()]
    if name is not None:
        artifacts = [a for a in artifacts if a["name"] == name]
    if not artifacts:
        which = f"named {name!r} " if name else ""
        raise CheckpointError(f"run {path} has no artifact {which}on disk; see its metrics.json")
    return Path(artifacts[-1]["path"])
