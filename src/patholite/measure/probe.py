"""How an encoder (a network whose forward returns embeddings, (B, D)) is judged, as kaiko's eva does: the
labelled splits are embedded once (``embed``), then a linear probe (``linear_probe``: logistic regression,
L2 chosen on val) and a weighted kNN (``knn_probe``) are fitted on the frozen embeddings, and their test
probabilities are scored like any classifier's (``probe_quality``). Two encoders of the same items are
compared by ``mean_cosine`` (same width) and ``neighbour_overlap`` (any widths).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from patholite.measure.evaluate import bootstrap_accuracy_ci
from patholite.measure.metrics import QualityMeter
from patholite.measure.stats import bootstrap

Split = tuple[Tensor, Tensor]  # (features (N, D), int labels (N,))

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# a similarity block holds at most this many entries (64 MiB of float32): 100k x 10k items never
# allocate their whole (N, M) matrix
BLOCK_ENTRIES = 1 << 24
# bootstrap resamples summarised per block (a resample of 100k items is 800 KiB of indices and counts)
RESAMPLE_BLOCK = 100


@torch.inference_mode()
def embed(
    net: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Float32 embeddings (N, D) on the CPU (extra dimensions flattened) and int64 labels (N,) over
    ``loader``, in loader order. ``transform`` (e.g. a re-staining) is applied to each image batch on
    ``device``, just before the net."""
    net.eval()
    features, labels = [], []
    for images, y in loader:
        images = images.to(device)
        if transform is not None:
            images = transform(images)
        features.append(net(images).float().flatten(1).cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    return torch.cat(features), torch.cat(labels)


def balanced_accuracy(confusion: Tensor) -> Tensor:
    """Balanced accuracy of confusion matrices (..., C, C) (rows: true class), as torchmetrics' macro
    accuracy (QualityMeter's) computes it: the mean recall over the classes that occur as a label or a
    prediction. A class absent from the labels counts only if it was predicted, then with recall 0."""
    confusion = confusion.double()
    support, predicted = confusion.sum(-1), confusion.sum(-2)
    recall = confusion.diagonal(dim1=-2, dim2=-1) / support.clamp(min=1)
    counted = (support + predicted) > 0
    return (recall * counted).sum(-1) / counted.sum(-1).clamp(min=1)


def confusions(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """Confusion matrices of rows of labels and predictions (..., n) -> (..., C, C), one bincount."""
    rows = labels.shape[:-1].numel()
    key = labels.reshape(rows, -1) * num_classes + predictions.reshape(rows, -1)
    key = key + torch.arange(rows, device=key.device)[:, None] * num_classes**2  # a block per row
    counts = torch.bincount(key.flatten(), minlength=rows * num_classes**2)
    return counts.reshape(*labels.shape[:-1], num_classes, num_classes)


def probe_quality(
    probabilities: Tensor, labels: Tensor, class_names: list[str], seed: int = 0
) -> dict[str, Any]:
    """The record's ``quality`` dict (QUALITY_KEYS) of test ``probabilities`` (N, C), rows summing to 1,
    plus ``balanced_accuracy_ci95``: its percentile bootstrap interval over test items (1000 resamples,
    ``seed``, the same resamples as ``accuracy_ci95``)."""
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), num_classes):
        raise ValueError(
            f"probe_quality: probabilities {tuple(probabilities.shape)} for {len(labels)} labels and "
            f"{num_classes} classes"
        )
    probabilities, labels = probabilities.detach().float().cpu(), labels.detach().long().cpu()
    meter = QualityMeter(class_names)
    meter.update(probabilities, labels)
    quality = meter.compute()
    predictions = probabilities.argmax(1)
    quality["accuracy_ci95"] = bootstrap_accuracy_ci(predictions == labels, seed=seed)

    def statistic(idx: Tensor) -> Tensor:
        return torch.cat(
            [
                balanced_accuracy(confusions(labels[block], predictions[block], num_classes))
                for block in idx.split(RESAMPLE_BLOCK)
            ]
        )

    quality["balanced_accuracy_ci95"] = bootstrap(statistic, len(labels), 1000, 0.95, seed)["ci"]
    return quality


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression (W (D, C), b (C,)) fitted full-batch by L-BFGS (strong Wolfe) from
    zeros, so the same data give the same fit; loss = mean cross-entropy + l2 * ||W||^2 (bias free)."""
    # embeddings made under inference_mode (``embed``) cannot be saved for backward: a plain copy can
    with torch.inference_mode(False), torch.enable_grad():
        x, y = (t.clone() if t.is_inference() else t for t in (x, y))
        weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    train: Split,
    val: Split,
    test: Split,
    class_names: list[str],
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """A linear probe as eva fits one: features standardised with the train mean and std, one logistic
    regression per ``l2`` on train, the ``l2`` with the best val balanced accuracy kept (ties: the larger,
    the simpler model), and that train-only fit (val is never merged in) scored on test.

    Returns ``{"quality", "l2", "val_balanced_accuracy": {str(l2): value}, "probabilities": (N, C),
    "head": {"weight", "bias", "mean", "std"}}`` (``apply_probe`` reads the head on other embeddings)."""
    if not l2_grid:
        raise ValueError("linear_probe: empty l2_grid")
    num_classes = len(class_names)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    # the train split's statistics standardise every split: val and test must not leak into the scaling
    mean = x_train.float().mean(0)
    std = x_train.float().std(0, correction=0).clamp(min=1e-6)  # a constant feature stays 0, not NaN

    def standardise(x: Tensor) -> Tensor:
        return (x.float() - mean) / std

    x_train, x_val, x_test = standardise(x_train), standardise(x_val), standardise(x_test)
    y_train, y_val = y_train.long(), y_val.long()
    fits, scores = {}, {}
    for l2 in l2_grid:
        weight, bias = fit_logistic(x_train, y_train, num_classes, float(l2), max_iter)
        val_pred = (x_val @ weight + bias).argmax(1)
        fits[l2] = (weight, bias)
        scores[l2] = float(balanced_accuracy(confusions(y_val.cpu(), val_pred.cpu(), num_classes)))
    chosen = max(l2_grid, key=lambda l2: (scores[l2], l2))
    # eva refits on train alone with the chosen l2; the fit is deterministic (zeros, full batch), so that
    # refit is exactly the fit already made on train for this l2
    weight, bias = fits[chosen]
    probabilities = torch.softmax(x_test @ weight + bias, dim=1).cpu()
    return {
        "quality": probe_quality(probabilities, y_test, class_names, seed),
        "l2": chosen,
        "val_balanced_accuracy": {str(l2): scores[l2] for l2 in l2_grid},
        "probabilities": probabilities,
        "head": {"weight": weight.cpu(), "bias": bias.cpu(), "mean": mean.cpu(), "std": std.cpu()},
    }


def apply_probe(head: dict[str, Tensor], x: Tensor) -> Tensor:
    """A fitted linear probe's (``linear_probe(...)["head"]``) class probabilities for embeddings ``x``:
    one encoder's probe read on another's embeddings of the same tiles (INT8 against its float source)."""
    if x.shape[1] != head["weight"].shape[0]:
        raise ValueError(
            f"apply_probe: embeddings of width {x.shape[1]}, probe of width {head['weight'].shape[0]}"
        )
    z = (x.float().cpu() - head["mean"]) / head["std"]
    return torch.softmax(z @ head["weight"] + head["bias"], dim=1)


def unit_rows(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=1)


def row_blocks(n_rows: int, n_columns: int) -> Iterator[slice]:
    """Slices of ``n_rows`` so that a block of rows against ``n_columns`` holds at most BLOCK_ENTRIES."""
    step = max(1, BLOCK_ENTRIES // max(1, n_columns))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def knn_probe(
    train: Split, test: Split, class_names: list[str], k: int = 20, temperature: float = 0.07
) -> dict[str, Any]:
    """DINO's weighted kNN on cosine similarity: each test item's ``k`` most similar train items (``k``
    capped at their number) vote for their class with weight exp(sim / ``temperature``); the probabilities
    are the normalised votes. Returns ``{"quality", "k", "probabilities": (N, C)}``."""
    (x_train, y_train), (x_test, y_test) = train, test
    if k < 1 or len(x_train) == 0:
        raise ValueError(f"knn_probe: k={k} with {len(x_train)} train items")
    k_used = min(k, len(x_train))
    num_classes = len(class_names)
    bank, y_train = unit_rows(x_train), y_train.long().to(x_train.device)
    queries = unit_rows(x_test).to(bank.device)
    probabilities = []
    for rows in row_blocks(len(queries), len(bank)):
        sims, idx = (queries[rows] @ bank.T).topk(k_used, dim=1)
        # shifted by each row's top similarity: the normalised votes are unchanged, and exp cannot
        # overflow at small temperatures (exp(1 / 0.01) is past float32's range)
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        votes = torch.zeros(len(sims), num_classes, device=bank.device)
        votes.scatter_add_(1, y_train[idx], weights)
        probabilities.append((votes / votes.sum(1, keepdim=True)).cpu())
    probabilities = torch.cat(probabilities) if probabilities else torch.zeros(0, num_classes)
    return {
        "quality": probe_quality(probabilities, y_test, class_names),
        "k": k_used,
        "probabilities": probabilities,
    }


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity of two (N, D) embeddings of the same items."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"mean_cosine: embeddings {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    return float(F.cosine_similarity(a.float(), b.float().to(a.device), dim=1).mean())


def nearest_within(x: Tensor, k: int) -> Tensor:
    """Indices (N, k) of each item's ``k`` most cosine-similar items in ``x``, itself excluded."""
    x = unit_rows(x)
    out = []
    for rows in row_blocks(len(x), len(x)):
        sims = x[rows] @ x.T
        own = torch.arange(rows.start, rows.stop, device=x.device)
        sims[torch.arange(len(own), device=x.device), own] = -float("inf")  # an item is not its neighbour
        out.append(sims.topk(k, dim=1).indices.cpu())
    return torch.cat(out)


def neighbour_overlap(a: Tensor, b: Tensor, k: int = 20) -> float:
    """The mean share of each item's ``k`` nearest neighbours (cosine, itself excluded, ``k`` capped at
    N - 1) that embeddings ``a`` and ``b`` of the same N items agree on. Widths may differ: a student is
    compared with a wider teacher by what each places near each item, not by coordinates."""
    if len(a) != len(b):
        raise ValueError(
            f"neighbour_overlap: embeddings {tuple(a.shape)} and {tuple(b.shape)} hold different items"
        )
    if len(a) < 2 or k < 1:
        raise ValueError(f"neighbour_overlap: k={k} neighbours among {len(a)} items")
    k = min(k, len(a) - 1)
    near_a, near_b = nearest_within(a.flatten(1), k), nearest_within(b.flatten(1), k)
    shared = (near_a[:, :, None] == near_b[:, None, :]).any(2).sum(1)  # indices within a row are distinct
    return float(shared.double().mean() / k)


def subsample_labels(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a stratified draw of ``fraction`` of the items (seeded; each class present keeps
    round(fraction * its count) items, at least one); ``fraction`` 1.0 gives every index in order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subsample_labels: fraction {fraction} is outside (0, 1]")
    labels = labels.detach().cpu()
    if fraction == 1:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    kept = []
    for cls in labels.unique(sorted=True):  # a fixed class order: the same seed draws the same items
        members = torch.nonzero(labels == cls).flatten()
        n = max(1, round(fraction * len(members)))
        kept.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(kept).sort().values
