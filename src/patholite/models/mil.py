"""Gated-attention multiple-instance learning over tile embeddings: the slide-level baseline trained on slide
labels alone (Ilse et al. 2018; CLAM-SB's single attention branch, Lu et al. 2021).

A slide is a bag of N tile embeddings (N x d, e.g. ``slides.baselines.tile_outputs(...).embeddings``). Each is
projected (Linear d -> h, ReLU, dropout), scored by gated attention a_i = w^T (tanh(V h_i) * sigmoid(U h_i)),
the scores are softmaxed over the bag, and the attention-weighted sum of the h_i is classified. The
prediction does not depend on the order of the tiles; the attention says which tiles drove it.

Saved as an artifact of its own kind (``patholite.artifacts.mil``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from patholite.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MIL_NAME = "gated_attention_mil"
MIL_KIND = "mil"


class GatedAttentionMIL(nn.Module):
    """``forward(bag)``: a bag of tile embeddings (N x d) to slide logits (C) and tile attention (N, sums to
    1). Dropout (CLAM's 0.25) follows the projection and both attention branches."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 128,
        attention_dim: int = 64,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if min(in_dim, num_classes, hidden_dim, attention_dim) < 1:
            raise ConfigError(
                f"GatedAttentionMIL: in_dim={in_dim}, num_classes={num_classes}, hidden_dim={hidden_dim} and "
                f"attention_dim={attention_dim} must be positive"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"GatedAttentionMIL: dropout={dropout} must lie in [0, 1)")
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)
        self.hidden_dim, self.attention_dim, self.dropout = (
            int(hidden_dim),
            int(attention_dim),
            float(dropout),
        )
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_u = nn.Sequential(
            nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def config(self) -> dict[str, Any]:
        """What rebuilds this network (``from_config``): plain JSON values."""
        return {
            "name": MIL_NAME,
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "hidden_dim": self.hidden_dim,
            "attention_dim": self.attention_dim,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GatedAttentionMIL:
        """The network ``config()`` describes, with fresh weights."""
        config = dict(config)
        name = config.pop("name", MIL_NAME)
        if name != MIL_NAME:
            raise CheckpointError(f"model config names {name!r}, not {MIL_NAME!r}")
        try:
            return cls(**config)
        except TypeError as err:
            raise CheckpointError(
                f"model config {config} does not describe a GatedAttentionMIL: {err}"
            ) from err

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bag.ndim == 3 and bag.shape[0] == 1:  # a batch of one bag
            bag = bag[0]
        if bag.ndim != 2 or bag.shape[0] < 1 or bag.shape[1] != self.in_dim:
            raise ValueError(
                f"GatedAttentionMIL: a bag is (tiles, {self.in_dim}) with at least one tile, got "
                f"{tuple(bag.shape)}"
            )
        h = self.project(bag)  # N x h
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(1)  # N
        attention = torch.softmax(scores, dim=0)
        # a batch of one: a dynamic-INT8 Linear (an SMT artifact's attention head) takes 2-D input only
        return self.classifier((attention @ h)[None])[0], attention


def _as_tensor(bag) -> torch.Tensor:
    return torch.as_tensor(np.asarray(bag) if not isinstance(bag, torch.Tensor) else bag).float()


def _class_weights(class_weights, labels: list[int], num_classes: int) -> torch.Tensor | None:
    """None (unweighted), ``"balanced"`` (n / (C * n_c), sklearn's rule) or one weight per class."""
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ConfigError(f"train_mil: class_weights={class_weights!r}; use None, 'balanced' or a list")
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32)
    weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
    if weights.shape != (num_classes,) or (weights < 0).any():
        raise ConfigError(f"train_mil: class_weights={list(class_weights)} must be {num_classes} values >= 0")
    return weights


def train_mil(
    bags: Sequence[torch.Tensor | np.ndarray],
    labels: Sequence[int],
    num_classes: int,
    epochs: int = 20,
    lr: float = 2e-4,
    weight_decay: float = 1e-5,
    seed: int = 0,
    class_weights: str | Sequence[float] | None = "balanced",
    hidden_dim: int = 128,
    attention_dim: int = 64,
    dropout: float = 0.25,
) -> GatedAttentionMIL:
    """A ``GatedAttentionMIL`` trained on slide-labelled bags (CLAM's recipe: Adam, lr 2e-4, weight decay
    1e-5, one bag per step, bags shuffled each epoch), on the CPU; the same arguments give the same weights
    (the seed drives the initialisation, the order and the dropout, without touching the global RNG).
    ``class_weights``: weights of the cross-entropy, ``"balanced"`` for imbalanced slide labels."""
    bags = [_as_tensor(b) for b in bags]
    labels = [int(v) for v in labels]
    if not bags or len(bags) != len(labels):
        raise ConfigError(f"train_mil: {len(bags)} bags and {len(labels)} labels; give one label per bag")
    if epochs < 1:
        raise ConfigError(f"train_mil: epochs={epochs} must be at least 1")
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        raise ConfigError(f"train_mil: labels {bad} are not classes 0..{num_classes - 1}")
    if len(set(labels)) < 2:
        raise ConfigError(
            f"train_mil: every slide has label {labels[0]}; a slide classifier needs slides of at least two "
            "classes"
        )
    dims = {b.shape[1] if b.ndim == 2 else None for b in bags}
    if len(dims) != 1 or None in dims or any(b.shape[0] < 1 for b in bags):
        raise ConfigError(f"train_mil: bags must be (tiles >= 1, d) with one d, got shapes "
                          f"{sorted({tuple(b.shape) for b in bags})[:5]}")  # fmt: skip
    weights = _class_weights(class_weights, labels, num_classes)
    targets = torch.tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GatedAttentionMIL(dims.pop(), num_classes, hidden_dim, attention_dim, dropout)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            total = 0.0
            for i in torch.randperm(len(bags), generator=order).tolist():
                logits, _ = model(bags[i])
                loss = F.cross_entropy(logits[None], targets[i : i + 1], weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            log.debug("MIL epoch %d: mean loss %.4f", epoch, total / len(bags))
    return model.eval()


@torch.inference_mode()
def predict_mil(
    model: GatedAttentionMIL, bag: torch.Tensor | np.ndarray, return_attention: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The slide's class probabilities (C,), and with ``return_attention`` the tiles' attention (N,)."""
    model.eval()
    logits, attention = model(_as_tensor(bag))
    probs = torch.softmax(logits.float(), dim=0).numpy()
    return (probs, attention.numpy()) if return_attention else probs
