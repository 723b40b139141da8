"""``prune``: remove attention heads and MLP channels (Torch-Pruning), fine-tune, record the really smaller
network; its structure goes into the sidecar so the artifact reloads without pickled code."""

from __future__ import annotations

import copy
import json

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.compress.prune import IMPORTANCES, SALIENCIES, describe_structure, prune_vit
from patholite.compress.surgery import apply_surgery
from patholite.config.checks import check_finetune, choice, require
from patholite.io import write_json
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.stages.distill import check_kd
from patholite.pipelines.tasks import Task


def run(run: StageRun) -> None:
    ctx, src, p = run.ctx, run.current, run.c.prune
    structure_file = ctx.run_dir / "stages" / "prune_structure.json"
    if ctx.resuming and structure_file.is_file():
        # the fine-tune's checkpoint holds the weights; rebuild the pruned shape to load them
        op = json.loads(structure_file.read_text())
        net = apply_surgery(copy.deepcopy(src.net), [op])
    else:
        scoring = (
            ctx.datamodule.labelled_batches(
                p.scoring_batches * ctx.cfg.dataset.batch_size, split="train", seed=ctx.cfg.seed
            )
            if p.importance != "magnitude"
            else None
        )
        net = prune_vit(
            copy.deepcopy(src.net),
            ratio=p.ratio,
            target_flops=p.target_flops,
            importance=p.importance,
            scoring_batches=scoring,
            beta=p.beta,
            saliency=p.saliency,
            round_to=p.round_to,
            heads=p.heads,
            mlp=p.mlp,
            image_size=int(ctx.cfg.dataset.image_size),
        )
        op = {"op": "prune", "structure": describe_structure(net)}
        write_json(structure_file, op)
    net = run.task.finetune(ctx, "prune", net, p.finetune, src.net)
    run.current = run.record_float("pruned", net, surgery=[*src.surgery, op], source=src)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    p = cfg.compression.prune
    require(
        (p.ratio is None) != (p.target_flops is None),
        "compression.prune: set exactly one of ratio (fraction removed) and target_flops",
    )
    require(
        p.ratio is None or 0 < p.ratio < 1,
        f"compression.prune.ratio={p.ratio} must lie strictly between 0 and 1 (the fraction removed)",
    )
    require(p.target_flops is None or p.target_flops > 0, "compression.prune.target_flops must be > 0")
    choice(p.importance, "compression.prune.importance", IMPORTANCES)
    choice(p.saliency, "compression.prune.saliency", SALIENCIES)
    require(0 <= p.beta < 1, f"compression.prune.beta={p.beta} must lie in [0, 1)")
    require(p.round_to >= 1, f"compression.prune.round_to={p.round_to} must be >= 1")
    require(p.heads or p.mlp, "compression.prune: heads and mlp are both false, nothing to prune")
    require(
        p.importance == "magnitude" or p.scoring_batches >= 1,
        f"compression.prune.importance={p.importance} needs compression.prune.scoring_batches >= 1",
    )
    check_finetune(p.finetune, "compression.prune")
    require(
        task.name != "encoders" or p.importance == "magnitude",
        f"compression.prune.importance={p.importance} scores channels by a loss on labels, which an encoder "
        "has none of: use compression.prune.importance=magnitude (the fine-tune then learns the float "
        "encoder's embeddings)",
    )
    if cfg.compression.prune.finetune.distill and task.name != "encoders":  # learns from the model before
        check_kd(cfg)
    check_vit(cfg, "prune")


def check_vit(cfg: DictConfig, stage: str) -> None:
    """Structural stages change heads and attention: a plain Vision Transformer's."""
    c, m = cfg.compression, cfg.model
    require(
        m.family == "vit",
        f"compression={c.name}: {stage} works on Vision Transformers (heads, attention, tokens); "
        f"model={m.name} is a {m.family}",
    )
    require(
        not m.pyramid.enabled,
        f"compression={c.name}: pruning, low-rank attention and attention/feature distillation do not "
        "support model.pyramid.enabled=true yet; use the plain ViT head",
    )


STAGE = Stage(
    name="prune",
    run=run,
    key="prune",
    tasks=("tiles", "encoders"),
    check=check,
    artifacts={"pruned": "structurally pruned (heads, MLP channels) and fine-tuned"},
)
