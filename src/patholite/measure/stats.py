"""Statistics of scores over units (images, slides) that know nothing of what the units are: binary AUROC,
the binary quality of scores, and the percentile bootstrap, alone or paired (two methods on the same units,
resampled together).

Every bootstrap here draws its resamples in ``bootstrap``: units with replacement from a seeded torch
generator, so two statistics bootstrapped with the same seed over the same units see the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

# A statistic of resamples: (R, n) unit indices, one resample a row -> (R,) values, NaN where the statistic
# is undefined on a resample (an AUROC of one class).
Statistic = Callable[[torch.Tensor], torch.Tensor]


def auroc(scores: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> float:
    """Binary AUROC (torchmetrics) of positive-class ``scores`` against 0/1 ``labels``: the share of
    (positive, negative) pairs the scores order correctly, a tie counting half. Both classes must be
    present (``has_both_classes``)."""
    return float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(np.asarray(labels))))


def has_both_classes(labels: Sequence[int] | np.ndarray | torch.Tensor) -> bool:
    y = np.asarray(labels)
    return bool(0 < (y == 1).sum() < len(y))


def binary_quality(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict[str, Any]:
    """Quality of positive-class ``scores`` against 0/1 ``labels``, called positive at ``threshold`` or
    above: accuracy, balanced accuracy (the mean recall of the classes present) and AUROC (None with one
    class)."""
    y, p = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    recalls = [float((pred[y == c] == c).mean()) for c in (0, 1) if (y == c).any()]
    return {
        "n_slides": len(y),
        "n_positive": int(y.sum()),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc": auroc(p, y) if has_both_classes(y) else None,
    }


def bootstrap(
    statistic: Statistic, n_units: int, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Percentile bootstrap of ``statistic`` over ``n_units`` units resampled with replacement (torch
    generator seeded with ``seed``): ``value``, the statistic on the units themselves; ``ci``, the
    ``level`` interval of its values over the resamples where it is defined (NaN, NaN where none is);
    ``draws``, how many those are."""
    nan = float("nan")
    if n_units == 0:
        return {"value": nan, "ci": [nan, nan], "draws": 0}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_units, (resamples, n_units), generator=g)
    value = float(torch.as_tensor(statistic(torch.arange(n_units)[None]))[0])
    values = torch.as_tensor(statistic(idx))
    values = values[~torch.isnan(values)]
    if values.numel() == 0:  # e.g. every resample of one class: no interval, not a crash
        return {"value": value, "ci": [nan, nan], "draws": 0}
    tail = (1 - level) / 2
    ci = [float(torch.quantile(values, tail)), float(torch.quantile(values, 1 - tail))]
    return {"value": value, "ci": ci, "draws": int(values.numel())}


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    labels: Sequence[int],
    n: int = 2000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Scores ``a`` minus scores ``b`` of two methods on the same units, resampled together (the unit, e.g.
    a slide, is what is drawn): accuracy at ``threshold`` and AUROC, each ``{"difference", "ci95",
    "draws"}``, the observed difference and its 95% percentile interval over ``n`` resamples. A resample of
    one class has an accuracy but no AUROC: the AUROC's interval is over the others (``draws`` counts them),
    and NaN where there are none."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    pa, pb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if not len(pa) == len(pb) == len(y):
        raise ValueError(f"paired_bootstrap: {len(pa)} and {len(pb)} scores for {len(y)} labels")
    right_a, right_b = ((pa >= threshold).long() == y).double(), ((pb >= threshold).long() == y).double()

    def accuracy(idx: torch.Tensor) -> torch.Tensor:
        return right_a[idx].mean(1) - right_b[idx].mean(1)

    def auroc_difference(idx: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(idx),), float("nan"), dtype=torch.float64)
        for r, row in enumerate(idx):
            if has_both_classes(y[row]):
                out[r] = auroc(pa[row], y[row]) - auroc(pb[row], y[row])
        return out

    out = {}
    for name, statistic in (("accuracy", accuracy), ("auroc", auroc_difference)):
        result = bootstrap(statistic, len(y), resamples=n, level=0.95, seed=seed)
        out[name] = {"difference": result["value"], "ci95": result["ci"], "draws": result["draws"]}
    return out
