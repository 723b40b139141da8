"""How SMT turns its last layer's images into one slide score: ``mean`` or ``max`` of their class
probabilities, or a small learned ``attention`` over their embeddings (issue 19).

``attention`` is the gated-attention MIL of ``models.mil`` (one home for it) over the class-token embeddings
of the last layer's K^2 images, trained on slide labels after SMT itself has trained (SMT's weights stay as
they are: the bags are what the trained walk reads), with a decision threshold on the positive score chosen
on validation slides (balanced accuracy, Youden's J). It lives inside ``SMTNet`` as ``net.aggregator``, so
its weights and threshold travel in every SMT artifact (float and dynamic INT8) and the sidecar's
``model.smt.aggregate: attention`` rebuilds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from patholite.errors import ConfigError
from patholite.models.mil import GatedAttentionMIL, train_mil

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "max", "attention")
ATTENTION = "attention"
HIDDEN, ATTENTION_DIM = 64, 32  # small: a few dozen bags of K^2 embeddings train it


def check_aggregate(how: str, key: str = "model.smt.aggregate") -> str:
    """``how`` is one of ``AGGREGATES`` (``key``: where it was set)."""
    if how not in AGGREGATES:
        raise ConfigError(f"{key}={how!r}: use one of {list(AGGREGATES)}")
    return how


def training_aggregate(how: str) -> str:
    """The aggregation SMT's own validation uses while it trains: the attention head is fitted after SMT,
    so until then its slides are scored by max."""
    return "max" if check_aggregate(how) == ATTENTION else how


class AttentionAggregate(nn.Module):
    """Gated attention over the last layer's embeddings (B x d) to slide logits, and the positive score's
    decision threshold (NaN until calibrated: the call is then the argmax)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mil = GatedAttentionMIL(dim, num_classes, HIDDEN, ATTENTION_DIM, dropout=0.25)
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Slide class probabilities (C,) of one slide's images' embeddings (N x d)."""
        logits, _ = self.mil(embeddings.float())
        return logits.float().softmax(-1)

    def attention(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Each image's attention weight (N,), summing to 1."""
        return self.mil(embeddings.float())[1]

    @property
    def calibrated(self) -> bool:
        return not math.isnan(float(self.threshold))


def calibrate_threshold(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """The positive-score threshold (call positive at >= it) with the best balanced accuracy on these
    slides; the midpoint between neighbouring scores, the lowest such on ties."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape or y.all() or not y.any():
        raise ConfigError(
            "calibrating a threshold needs slides of both kinds (lesion and lesion-free); got "
            f"{int(y.sum())} positive of {y.size}"
        )
    values = np.unique(s)
    cuts = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]])
    best, best_cut = -1.0, float(cuts[0])
    for cut in cuts:
        call = s >= cut
        balanced = 0.5 * (call[y].mean() + (~call[~y]).mean())
        if balanced > best + 1e-12:
            best, best_cut = balanced, float(cut)
    return best_cut


def bag_loss(aggregate: AttentionAggregate, bags: Sequence[torch.Tensor], labels: Sequence[int]) -> float:
    """Mean cross-entropy of the head over slide bags (eval mode): what training lowers."""
    was = aggregate.training
    aggregate.eval()
    with torch.no_grad():
        losses = [
            float(F.nll_loss(aggregate(b).clamp_min(1e-12).log()[None], torch.tensor([int(y)])))
            for b, y in zip(bags, labels, strict=True)
        ]
    aggregate.train(was)
    return float(np.mean(losses))


def fit_attention(
    aggregate: AttentionAggregate,
    bags: Sequence[torch.Tensor],
    labels: Sequence[int],
    negative_class: int,
    val_bags: Sequence[torch.Tensor] = (),
    val_labels: Sequence[int] = (),
    epochs: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``aggregate`` in place on slide bags (last-layer embeddings, N x d each) and their labels, then
    set its threshold on the validation bags (the training bags when there are none: said in the result).
    Returns what it did: slides, losses before and after, the threshold and where it was chosen."""
    bags = [torch.as_tensor(b).float() for b in bags]
    mil = aggregate.mil
    before = bag_loss(aggregate, bags, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide head steps in microseconds: a thread pool's handoffs cost more
    try:
        trained = train_mil(
            bags, labels, mil.num_classes, epochs=epochs, lr=1e-3, seed=seed,
            hidden_dim=mil.hidden_dim, attention_dim=mil.attention_dim, dropout=mil.dropout,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # a QAT-prepared head has fake-quantize state of its own that the plain trained copy lacks
    missing, unexpected = mil.load_state_dict(trained.state_dict(), strict=False)
    if unexpected or any("fake_quant" not in k and "activation_post_process" not in k for k in missing):
        raise ConfigError(f"attention head: weights do not fit (missing {missing}, unexpected {unexpected})")
    after = bag_loss(aggregate, bags, labels)
    use_val = len(val_bags) > 0 and len({int(v) == negative_class for v in val_labels}) == 2
    if len(val_bags) and not use_val:
        log.warning(
            "validation slides are all of one kind: the attention threshold is chosen on training slides"
        )
    cal_bags, cal_labels = (val_bags, val_labels) if use_val else (bags, labels)
    aggregate.eval()
    with torch.no_grad():
        scores = [1.0 - float(aggregate(torch.as_tensor(b).float())[negative_class]) for b in cal_bags]
    threshold = calibrate_threshold(scores, [int(v) != negative_class for v in cal_labels])
    aggregate.threshold.fill_(threshold)
    return {
        "kind": ATTENTION,
        "train_slides": len(bags),
        "calibration_slides": len(cal_bags),
        "calibrated_on": "validation" if use_val else "training",
        "loss_before": before,
        "loss_after": after,
        "threshold": threshold,
        "epochs": epochs,
    }
