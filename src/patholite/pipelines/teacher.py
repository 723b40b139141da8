"""``compression=none``: train the plain classifier (a teacher, or any baseline) and record it as ``fp32``."""

from __future__ import annotations

import logging

import torch

from patholite.measure.artifacts import load_float_artifact, save_float_artifact
from patholite.measure.evaluate import artifact_record
from patholite.measure.records import ArtifactRecord
from patholite.modules import ClassifierModule
from patholite.pipelines.context import RunContext
from patholite.pipelines.lightning import build_trainer

log = logging.getLogger(__name__)


def train_classifier(ctx: RunContext) -> ClassifierModule:
    """Fit the classifier (resuming when asked), restore its best weights and test them."""
    dm = ctx.datamodule
    module = ClassifierModule(
        model=ctx.plain("model"),
        class_names=dm.class_names,
        image_size=ctx.cfg.dataset.image_size,
        optim=ctx.plain("optim"),
    )
    trainer = build_trainer(ctx)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ctx.resume_from) if ctx.resume_from else None)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        log.info("restoring the best checkpoint %s", best)
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    trainer.test(module, datamodule=dm, verbose=False)
    return module


def record_float(ctx: RunContext, module: ClassifierModule, name: str = "fp32") -> ArtifactRecord:
    """Save the module's network as a float artifact, reload it from disk, evaluate and cost it."""
    directory = ctx.artifact_dir(name)
    files = save_float_artifact(module.net, directory, ctx.artifact_meta())
    net, meta = load_float_artifact(directory)
    bench = ctx.cfg.bench
    return artifact_record(
        name,
        net,
        directory,
        files,
        ctx.datamodule.test_dataloader(),
        meta["class_names"],
        meta["image_size"],
        bench,
        ctx.accelerator.device,
    )


def run(ctx: RunContext) -> list[ArtifactRecord]:
    module = train_classifier(ctx)
    return [record_float(ctx, module)]
