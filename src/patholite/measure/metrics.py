"""Classification quality with torchmetrics: one definition for training logs and artifact records."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)


def scalar_metrics(num_classes: int, **options: Any) -> MetricCollection:
    """Metrics logged every epoch; keys are the record's quality keys. ``options``: torchmetrics' own."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro", **options),
            "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro", **options),
            "macro_f1": MulticlassF1Score(num_classes, average="macro", **options),
            "auroc": MulticlassAUROC(num_classes, average="macro", **options),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1", **options),
        }
    )


def per_class_metrics(num_classes: int, **options: Any) -> MetricCollection:
    return MetricCollection(
        {
            "f1_per_class": MulticlassF1Score(num_classes, average=None, **options),
            "recall_per_class": MulticlassRecall(num_classes, average=None, **options),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes, **options),
        }
    )


class QualityMeter:
    """Accumulates probabilities and labels; ``compute`` gives the record's ``quality`` dict."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        n = len(class_names)
        # one process evaluates the whole set: nothing to gather. torchmetrics would otherwise all-gather over
        # any process group it finds, and a launched job's rank 0 keeps one between fits, where the other
        # ranks wait for its next fit, not for this
        self.scalars = scalar_metrics(n, sync_on_compute=False)
        self.per_class = per_class_metrics(n, sync_on_compute=False)
        self.count = 0

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        probs, labels = probs.detach().float().cpu(), labels.detach().cpu()
        self.scalars.update(probs, labels)
        self.per_class.update(probs, labels)
        self.count += len(labels)

    def compute(self) -> dict:
        return quality_dict(self.scalars.compute(), self.per_class.compute(), self.class_names, self.count)

    def reset(self) -> None:
        self.scalars.reset()
        self.per_class.reset()
        self.count = 0


def quality_dict(scalars: dict, per_class: dict, class_names: list[str], n_samples: int) -> dict:
    """The record's ``quality`` block from computed metric values."""
    out = {k: float(v) for k, v in scalars.items()}
    for key in ("f1_per_class", "recall_per_class"):
        out[key] = {name: float(v) for name, v in zip(class_names, per_class[key], strict=True)}
    out["confusion_matrix"] = per_class["confusion_matrix"].int().tolist()
    out["n_samples"] = int(n_samples)
    return out


def attach_eval_metrics(module, num_classes: int) -> None:
    """A LightningModule's validation and test metrics (scalars with their prefix, per-class F1/recall), as
    attributes Lightning moves, resets and synchronises with the module."""
    module.val_metrics = scalar_metrics(num_classes).clone(prefix="val/")
    module.test_metrics = scalar_metrics(num_classes).clone(prefix="test/")
    module.val_per_class = per_class_metrics(num_classes)
    module.test_per_class = per_class_metrics(num_classes)
