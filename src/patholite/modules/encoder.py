"""The Lightning module of label-free feature distillation: a student encoder and its projection heads
(``compress.feature_kd.FeatureDistiller``) learn the teachers' cached embeddings on unlabelled tiles.

A batch is ``(tiles, targets)``: uint8 tiles (B x 3 x H x W) and, per teacher, its standardised embeddings
of the clean tiles. The student sees each tile augmented (``HistologyAugment``) and normalised with its own
mean and std; validation reads clean tiles, and its feature loss chooses the best epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from patholite.compress.feature_kd import FeatureDistiller, HistologyAugment
from patholite.modules.classifier import adamw_warmup_cosine

MONITOR = ("val/feature_loss", "min")
MONITOR_TRAIN = ("train/feature_loss_epoch", "min")  # no tiles held out: the training loss chooses


class FeatureKdModule(L.LightningModule):
    def __init__(
        self,
        distiller: FeatureDistiller,
        mean: Sequence[float],
        std: Sequence[float],
        augment: HistologyAugment,
        loss: dict[str, float],
        optim: dict[str, Any],
    ) -> None:
        """``loss``: the keyword arguments of ``FeatureDistiller.loss`` (weights, beta); ``optim``: the
        ``optim`` node as a dict."""
        super().__init__()
        self.distiller = distiller
        self.net = distiller.net  # what fit() returns: the student encoder alone
        self.augment = augment
        self.loss_weights = dict(loss)
        self.optim = dict(optim)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def _inputs(self, tiles: torch.Tensor, augment: bool) -> torch.Tensor:
        x = tiles.float() / 255.0
        if augment:
            x = self.augment(x)
        return (x - self.mean) / self.std

    def _loss(self, batch: Any, augment: bool) -> torch.Tensor:
        tiles, targets = batch
        predictions = self.distiller(self._inputs(tiles, augment))
        loss, _ = self.distiller.loss(predictions, targets, **self.loss_weights)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, augment=True)
        self.log("train/feature_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/feature_loss", self._loss(batch, augment=False), prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.trainer, self.distiller, self.optim)
