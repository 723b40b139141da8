"""What a pipeline gets to work with: the config, the run directory, data, accelerator, the resolved teacher,
loggers. (How this kind of model is trained and judged is its task: ``pipelines.tasks.task_for``.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.sidecar import weights_source_of
from patholite.data import HistologyDataModule
from patholite.models.hub import sidecar_model
from patholite.pipelines.teacher import Teacher


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    datamodule: HistologyDataModule
    accelerator: ResolvedAccelerator
    teacher: Teacher | None = None  # resolved once, in preflight, when a stage distils
    loggers: list[Any] = field(default_factory=list)
    resume_from: Path | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def artifact_dir(self, name: str) -> Path:
        return self.run_dir / "artifacts" / name

    def plain(self, key: str) -> dict[str, Any]:
        """A config node as plain containers (what checkpoints and sidecars store)."""
        return OmegaConf.to_container(self.cfg[key], resolve=True)

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    def artifact_meta(self, model_cfg: DictConfig | None = None) -> dict[str, Any]:
        """The sidecar facts every artifact of this run shares (``model_cfg``: another network's, e.g. the
        teacher's)."""
        model = self.plain("model") if model_cfg is None else OmegaConf.to_container(model_cfg, resolve=True)
        # a hub model's architecture written out, and where its weights came from (hub id, commit, sha256,
        # licence, mpp): every artifact made from them (pruned, quantized, fine-tuned) carries the record
        model, provenance = sidecar_model(model)
        provenance = provenance or weights_source_of(model.get("checkpoint"))  # started from such an artifact
        model["checkpoint"] = None  # the artifact's own weights replace it
        if model.get("smt"):
            model["smt"]["encoder_checkpoint"] = None
        d = self.cfg.dataset
        return {
            "model": model,
            "class_names": list(self.datamodule.class_names),
            "image_size": int(d.image_size),
            "mean": list(d.mean),
            "std": list(d.std),
            "dataset": d.name,
            **self.datamodule.tile_geometry(),  # mpp and tile_size: how the slide engine cuts tiles
            **({"weights_source": provenance} if provenance else {}),
        }
