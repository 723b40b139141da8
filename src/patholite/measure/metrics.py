"""Classification quality with torchmetrics: one definition for training logs and artifact records."""

from __future__ import annotations

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


def scalar_metrics(num_classes: int) -> MetricCollection:
    """Metrics logged every epoch; keys are the record's quality keys."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
        }
    )


def per_class_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "f1_per_class": MulticlassF1Score(num_classes, average=None),
            "recall_per_class": MulticlassRecall(num_classes, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }
    )


class QualityMeter:
    """Accumulates probabilities and labels; ``compute`` gives the record's ``quality`` dict."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        n = len(class_names)
        self.scalars = scalar_metrics(n)
        self.per_class = per_class_metrics(n)
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
