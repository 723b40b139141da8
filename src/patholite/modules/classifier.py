"""The plain classifier: how a teacher (or any baseline) is trained and evaluated.

Hyperparameters are stored as plain containers, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from patholite.measure.metrics import attach_eval_metrics
from patholite.models.factory import build_model


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        class_names: list[str],
        image_size: int,
        optim: dict[str, Any],
        load_checkpoint: bool = True,
        net: nn.Module | None = None,
        distiller: nn.Module | None = None,
    ) -> None:
        """``model`` and ``optim`` are plain dicts of the ``model`` and ``optim`` config nodes.

        ``net``: train this network instead of building ``model`` (a pruned, low-rank or fake-quantized one);
        ``distiller``: a ``compress.distill.Distiller`` whose student is ``net`` and whose loss replaces CE.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["net", "distiller"])
        self.class_names = list(class_names)
        if distiller is not None:
            net = distiller.student
        if net is None:
            spec = model if load_checkpoint else {**model, "checkpoint": None}
            net = build_model(spec, len(class_names), image_size)
        self.net = net
        self.distiller = distiller
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.get("label_smoothing", 0.0))
        attach_eval_metrics(self, len(class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.distiller is not None:
            out = self.distiller(images, labels)
            logits, loss = out.logits, out.loss
            self.log_dict(
                {f"train/{k}": v for k, v in out.terms.items()}, on_step=False, on_epoch=True, sync_dist=True
            )
        else:
            logits = self(images)
            loss = self.criterion(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        # sync_dist: under DDP every logged value is the mean over the ranks (a no-op in one process);
        # torchmetrics collections synchronise their states themselves when computed
        values = {"train/loss": loss, "train/accuracy": acc}
        self.log_dict(values, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _eval_step(self, batch, *collections) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        probs = torch.softmax(logits.float(), dim=1)
        for metrics in collections:
            metrics.update(probs, labels)
        return self.criterion(logits, labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self._eval_step(batch, self.val_metrics, self.val_per_class)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict(self.val_metrics, prog_bar=False)

    def test_step(self, batch, batch_idx: int) -> None:
        loss = self._eval_step(batch, self.test_metrics, self.test_per_class)
        self.log("test/loss", loss, sync_dist=True)
        self.log_dict(self.test_metrics)

    def _log_per_class(self, stage: str, metrics) -> None:
        """Per-class F1 and recall as scalars (``val/f1/<class>``); the confusion matrix is in the record."""
        values = metrics.compute()
        for key in ("f1_per_class", "recall_per_class"):
            metric = key.removesuffix("_per_class")
            named = zip(self.class_names, values[key], strict=True)
            # sync_dist: already equal on every rank (computed from synced states); it silences Lightning
            self.log_dict({f"{stage}/{metric}/{name}": v for name, v in named}, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val", self.val_per_class)

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test", self.test_per_class)

    def configure_optimizers(self):
        # the distiller's own parameters (feature projections) train with the student; its teacher has none
        owner = self.distiller if self.distiller is not None else self.net
        return adamw_warmup_cosine(self.trainer, owner, self.hparams.optim)


def adamw_warmup_cosine(trainer: L.Trainer, owner: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """AdamW over ``owner``'s trainable parameters (``cfg``: the ``optim`` node as a dict) with a linear
    warm-up and a cosine decay per step: Lightning's ``configure_optimizers`` result."""
    decay, no_decay = [], []
    for name, param in owner.named_parameters():
        if not param.requires_grad:
            continue
        # norms, biases and token/position embeddings are not weight-decayed (timm's convention), nor the
        # stain front-end's unmixing matrix (models/stain.py): decay would pull it from the deconvolution to 0
        keep = name.endswith(("pos_embed", "cls_token", "dist_token")) or "stain" in name.split(".")
        (no_decay if param.ndim <= 1 or keep else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )
    total = max(1, int(trainer.estimated_stepping_batches))
    per_epoch = total / max(1, trainer.max_epochs or 1)
    warmup = min(total - 1, int(cfg["warmup_epochs"] * per_epoch)) if total > 1 else 0
    schedule = LambdaLR(optimizer, warmup_cosine(total, max(1, warmup), cfg["min_lr_ratio"]))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
