"""The teacher a student distils from, resolved once per run (in preflight) from ``compression.teacher``.

A teacher is a ``model=`` option (``compression.teacher.model``) with a weights file
(``compression.teacher.checkpoint=<file>``) or, with none, trained once with the plain recipe and cached; or
a trained model on disk (``compression.teacher.checkpoint=<run folder or float artifact folder>``), whose
sidecar gives its architecture. Preflight resolves it and checks it fits the data; the distill stage loads
or trains its network (``tasks.base.Task.plain_network``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patholite.artifacts.resolve import is_run_folder
from patholite.artifacts.sidecar import SIDECAR, read_sidecar
from patholite.config.options import load_model_option
from patholite.config.schema import ModelConfig
from patholite.errors import CheckpointError, ConfigError
from patholite.models.fits import check_model_fits
from patholite.records import read_record

# Artifacts of a run that are not its own trained model.
_NOT_THE_RUNS = ("teacher_fp32",)


@dataclass(frozen=True)
class Teacher:
    """``model``: the teacher's architecture (its option's config, or its artifact's own); ``named``: how the
    user named it, for messages; ``artifact``: the float artifact holding its weights, or None (then
    ``model.checkpoint`` is its weights file, or None: trained with the plain recipe)."""

    model: DictConfig
    named: str
    artifact: Path | None = None


def run_float_artifact(run: Path, key: str) -> Path:
    """A run folder's own final float model: the last float artifact its record lists, not its teacher."""
    for entry in reversed(read_record(run).get("artifacts", [])):
        directory = Path(entry["path"])
        if entry["name"] in _NOT_THE_RUNS or not (directory / SIDECAR).is_file():
            continue
        if read_sidecar(directory).get("kind") == "torch_float":
            return directory
    raise CheckpointError(
        f"{key}={run}: the run has no float artifact on disk (a trained model); give a run that trained one, "
        "a float artifact folder, or a weights file"
    )


def resolve_teacher(c: DictConfig) -> Teacher:
    """The teacher ``c`` (the ``compression`` node) names; raises for one that does not exist."""
    return _resolve(
        c.teacher.model, c.teacher.checkpoint, bool(c.teacher.get("download", False)), "compression.teacher"
    )


def resolve_teachers(c: DictConfig) -> list[Teacher]:
    """The teachers of label-free feature distillation: each of ``compression.feature_kd.teachers`` (a model
    option, or a trained run or float artifact folder), or ``compression.teacher`` when that list is
    empty."""
    named = list(c.feature_kd.teachers)
    if not named:
        return [resolve_teacher(c)]
    download = bool(c.teacher.get("download", False))
    teachers = []
    for i, item in enumerate(named):
        key = f"compression.feature_kd.teachers[{i}]"
        if Path(str(item)).expanduser().is_dir() or "/" in str(item):
            teachers.append(_resolve("", str(item), download, key, path_key=key))
        else:
            teachers.append(replace(_resolve(str(item), None, download, key), named=f"{key}={item}"))
    return teachers


def _resolve(
    option: str, checkpoint: str | None, download: bool, key: str, path_key: str | None = None
) -> Teacher:
    """A teacher from a model option (``option``) and its weights file, or from a run or artifact folder
    (``checkpoint``); ``key`` names the setting in messages."""
    key = path_key or f"{key}.checkpoint"
    path = Path(checkpoint).expanduser() if checkpoint else None
    if path is not None and path.is_dir():  # a trained model on disk: its own architecture and weights
        if is_run_folder(path):
            directory = run_float_artifact(path, key)
        else:
            kind = read_sidecar(path).get("kind")  # raises for a folder that is no artifact
            if kind != "torch_float":
                raise CheckpointError(f"{key}={checkpoint} is a {kind} artifact; distil from a float one")
            directory = path
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), read_sidecar(directory).get("model") or {})
        model.checkpoint = None  # the weights come from the artifact, not from where its training started
        if model.get("smt") is not None:
            model.smt.encoder_checkpoint = None
        return Teacher(model, f"{key}={checkpoint} (model {model.name})", directory)
    if path is not None and not path.is_file():
        raise ConfigError(
            f"{key}={checkpoint} does not exist; give a trained teacher's weights file, run folder or float "
            "artifact folder, or a model option trained once with the plain recipe (cached)"
        )
    model = load_model_option(option)
    model.checkpoint = checkpoint
    model.download = download
    return Teacher(model, f"{key.removesuffix('.checkpoint')}.model={option}" if not path_key else key)


def check_teacher_fits(cfg: DictConfig, teacher: Teacher, class_names: list[str], input_size: int) -> None:
    """The teacher scores the student's images: same classes and normalisation, the student's input size
    (``input_size``), and its weights fit its architecture."""
    if teacher.artifact is not None:
        sidecar = read_sidecar(teacher.artifact)
        theirs = list(sidecar.get("class_names") or [])
        if theirs != list(class_names):
            raise ConfigError(
                f"{teacher.named} was trained on classes {theirs}, this dataset has {list(class_names)}; "
                "distil from a teacher of the same classes"
            )
        for key in ("mean", "std"):  # the teacher sees the student's normalised images
            ours = [float(v) for v in cfg.dataset[key]]
            if [float(v) for v in sidecar.get(key) or ours] != ours:
                raise ConfigError(
                    f"{teacher.named} normalises with {key} {sidecar.get(key)}, this dataset with {ours}; "
                    f"set dataset.{key} to the teacher's"
                )
        size = int(sidecar.get("image_size") or input_size)
        if teacher.model.family != "smt" and size != input_size:
            raise ConfigError(
                f"{teacher.named} takes {size}-px images, the student {input_size}-px ones; set "
                f"dataset.image_size={size} or distil from a teacher trained at {input_size} px"
            )
    size = int(teacher.model.smt.image_size) if teacher.model.family == "smt" else input_size
    check_model_fits(teacher.model, len(class_names), size, key="compression.teacher")
