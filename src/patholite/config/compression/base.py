"""The keys every ``compression`` option has, whatever its techniques: its name, its stages, the teacher a
distillation learns from, EMA of the weights, the ONNX export, and the fine-tune block techniques share."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class TeacherConfig:
    """The network distillation learns from: a ``model=`` option name and its trained weights, or a trained
    run or artifact folder (its own architecture and weights)."""

    model: str = "deit_small"
    # a weights file for `model`, a run folder (its final float model) or a float artifact folder; None:
    # `model` trained once with the plain recipe, cached under paths.cache_dir
    checkpoint: str | None = None
    # a teacher option with hub weights (e.g. uni): fetch them when absent from the local cache
    download: bool = False


@dataclass
class EmaConfig:
    """EMA of weights (R2: 0.999). Validation, test and export use the average; the raw model is kept too."""

    decay: float | None = None  # None: off
    start_step: int = 0  # optimizer steps before the average starts
    warmup: bool = True  # decay ramps up as 1 - (1 + step)^-power, capped at `decay` (short runs)
    warmup_power: float = 0.75
    keep_raw: bool = True  # also record the raw (non-averaged) weights as an artifact


@dataclass
class FinetuneConfig:
    """A short training after a structural change (pruning, low-rank) or for QAT."""

    epochs: int = 3
    lr: float = 1e-4
    distill: bool = False  # learn from the model as it was before the change (R1's prune -> distill)


@dataclass
class ExportConfig:
    onnx: bool = False  # also export the final float model to ONNX and record it (parity checked)
    opset: int = 17


@dataclass
class CompressionBase:
    """An ordered list of stages, each handing its model to the next (``patholite.pipelines.stages``).

    ``train`` fits ``model=`` with the plain recipe (and publishes it to the cache); ``start`` takes the
    trained plain model from ``model.checkpoint`` or the cache (training it once if absent); ``distill``
    trains ``model=`` from a teacher; the other stages transform the current model. Each technique adds its
    own block (``compression.<key>``, a module of this package).
    """

    name: str = MISSING
    stages: list[str] = MISSING
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
