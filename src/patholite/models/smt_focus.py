"""SMT's training signals (R3): the focusing memory, the four losses and the staged loss weights.

Focusing target: per patch, the gradient of the summed positive-class probability with respect to the first
block's attention weights, accumulated across epochs (``S(e) = eps * S(e-1) + (1 - eps) * g``, ``S(0) = 0``)
and min-max normalised per image when read. The focusing predictor outputs a score in (0, 1) per patch
(a sigmoid over its logit), so the same number is regressed by ``L_focus`` and read as the Bernoulli
probability "this patch is positive" by ``L_ret``.

Totals: ``L_V = sum_l fwd_l * L_cls_l + sum_l bwd_l * L_emb_l`` trains the encoders,
``L_F = sum_l fwd_l * L_focus_l + sum_l bwd_l * L_ret_l`` the predictors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from patholite.errors import CheckpointError, ConfigError

FocusKey = tuple[int, ...]  # (slide, layer, *patch indices from the thumbnail down to this image)
# One rank's updates since the last synchronisation: (key as a list, new S, epoch) per key
Updates = list[tuple[list[int], torch.Tensor, int]]
Gather = Callable[[Updates], list[Updates]]  # every rank's object, in rank order (all_gather_object)


def focus_key(slide: int, path: Sequence[int]) -> FocusKey:
    """The memory key of the image reached from slide ``slide``'s thumbnail through patch indices ``path``
    (``()`` is the thumbnail; its layer is ``len(path)``)."""
    return (int(slide), len(path), *(int(i) for i in path))


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row to [0, 1]; a constant row becomes zeros."""
    lo = scores.min(dim=-1, keepdim=True).values
    span = scores.max(dim=-1, keepdim=True).values - lo
    return torch.where(span > 0, (scores - lo) / span.clamp_min(1e-12), torch.zeros_like(scores))


class FocusMemory:
    """Temporal ensemble of focusing gradients, keyed by ``focus_key`` (slide, layer, patch path).

    Each key is updated at most once per epoch (the first observation in an epoch counts; later ones in the
    same epoch are ignored), and one update is one ensembling step: a key not seen for a few epochs (its
    parent focused elsewhere) continues from its last value. Scores live on the CPU as float32.

    Under DDP each rank updates the keys of the slides it sees; ``synchronise`` (called after every training
    step on every rank) exchanges those updates, so all ranks hold the same memory at every step boundary.
    """

    def __init__(self, eps: float = 0.9) -> None:
        if not 0.0 <= eps < 1.0:
            raise ConfigError(f"model.smt.eps={eps}: the focusing memory decay must be in [0, 1), e.g. 0.9")
        self.eps = float(eps)
        self._scores: dict[FocusKey, torch.Tensor] = {}
        self._epochs: dict[FocusKey, int] = {}
        self._pending: dict[FocusKey, None] = {}  # keys updated since the last synchronise (ordered)

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, key: FocusKey) -> bool:
        return tuple(key) in self._scores

    def raw(self, key: FocusKey) -> torch.Tensor | None:
        """The un-normalised ``S`` of ``key`` (None: never observed)."""
        return self._scores.get(tuple(key))

    def update(self, keys: Sequence[FocusKey], grads: torch.Tensor, epoch: int) -> torch.Tensor:
        """Fold ``grads`` (N x P, one row per key) in at ``epoch``; returns the normalised targets (N x P)
        on ``grads``' device."""
        if len(keys) != len(grads):
            raise ValueError(f"{len(keys)} keys for {len(grads)} gradient rows")
        rows = grads.detach().float().cpu()
        for key, g in zip(keys, rows, strict=True):
            key = tuple(key)
            if self._epochs.get(key, -1) >= epoch:
                continue
            prev = self._scores.get(key)
            prev = torch.zeros_like(g) if prev is None else prev
            self._scores[key] = self.eps * prev + (1.0 - self.eps) * g
            self._epochs[key] = int(epoch)
            self._pending[key] = None
        return self.read(keys, width=grads.shape[-1]).to(grads.device)

    def take_updates(self) -> Updates:
        """This rank's updates since the last call, as ``(key, S, epoch)``: what it sends to the others."""
        mine: Updates = [(list(k), self._scores[k], self._epochs[k]) for k in self._pending]
        self._pending = {}
        return mine

    def merge(self, gathered: Sequence[Updates]) -> None:
        """Apply every rank's updates (``gathered``: one list per rank, in rank order, this rank's included).

        Within an epoch a key is updated at most once, so after a per-step exchange another rank can only
        have updated a key in this same step, and only when the distributed sampler padded its share with a
        slide another rank also holds. Such a key takes the lowest rank's value: every rank applies the same
        rule to the same lists and keeps an identical memory."""
        claimed: set[FocusKey] = set()
        for updates in gathered:
            for key_list, score, epoch in updates:
                key = tuple(int(i) for i in key_list)
                if key in claimed or self._epochs.get(key, -1) > int(epoch):
                    continue
                claimed.add(key)
                self._scores[key] = score.detach().float().cpu()
                self._epochs[key] = int(epoch)

    def synchronise(self, gather: Gather | None) -> None:
        """Exchange this rank's updates since the last call with every other rank and merge them all;
        ``gather``: ``all_gather_object`` over the ranks (``process_group_gather``; None: one process)."""
        mine = self.take_updates()
        if gather is not None:
            self.merge(gather(mine))

    def restart_epochs(self) -> None:
        """Keep the scores, forget when each was last updated: a new training stage (QAT fine-tuning)
        counts its epochs from 0 again and must still fold its gradients in."""
        self._epochs = {key: -1 for key in self._epochs}

    def read(self, keys: Sequence[FocusKey], width: int | None = None) -> torch.Tensor:
        """Normalised targets (N x P); a key never observed reads as zeros (``width`` sets P then)."""
        if width is None:
            width = next(iter(self._scores.values())).numel() if self._scores else 0
        rows = [self._scores.get(tuple(k), torch.zeros(width)) for k in keys]
        return minmax(torch.stack(rows)) if rows else torch.zeros(0, width)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and tensors (loads with ``torch.load(weights_only=True)``)."""
        keys = list(self._scores)
        return {
            "eps": self.eps,
            "keys": [list(k) for k in keys],
            "scores": torch.stack([self._scores[k] for k in keys]) if keys else torch.zeros(0, 0),
            "epochs": torch.tensor([self._epochs[k] for k in keys], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            keys = [tuple(int(i) for i in k) for k in state["keys"]]
            scores, epochs = state["scores"], state["epochs"]
            if len(keys) != len(scores) or len(keys) != len(epochs):
                raise ValueError("keys, scores and epochs differ in length")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"the checkpoint's SMT focusing memory is malformed ({err}); resume from another checkpoint"
            ) from err
        self.eps = float(state.get("eps", self.eps))
        self._scores = {k: s.detach().float().cpu().clone() for k, s in zip(keys, scores, strict=True)}
        self._epochs = {k: int(e) for k, e in zip(keys, epochs.tolist(), strict=True)}
        self._pending = {}


def process_group_gather() -> Gather | None:
    """For ``FocusMemory.synchronise``: ``all_gather_object`` over the initialised process group (every rank's
    object in rank order; it pickles, so keys of any length and CPU tensors travel as they are), or None when
    one process trains."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(obj: Updates) -> list[Updates]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return gather


# ---------------------------------------------------------------------------------------------- losses
def cls_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``L_cls``: cross-entropy, optionally class-weighted."""
    return F.cross_entropy(logits.float(), labels, weight=weight)


def focus_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``L_focus``: mean absolute error between predicted focus scores and the normalised memory."""
    return (scores.float() - targets.float()).abs().mean()


def ret_loss(scores: torch.Tensor, p_next: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``L_ret``: mean over focused patches of KL(Bernoulli(p_next) || Bernoulli(score)).

    ``p_next``: the next layer's positive-class probability of each focused patch's image (a target, detached
    here); ``scores``: the focus predictions of those patches, in (0, 1). Zero when they agree."""
    p = p_next.detach().float().clamp(eps, 1 - eps)
    q = scores.float().clamp(eps, 1 - eps)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    return kl.mean()


def emb_loss(cls: torch.Tensor, cls_next: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``L_emb``: squared L2 between each image's class token (B x d) and the detached mean class token of
    its K next-layer images (B x K x d), averaged over the batch.

    ``reduction="mean"`` divides the squared norm by d (so the term does not grow with the encoder's width);
    ``"sum"`` is the literal squared L2."""
    diff = cls.float() - cls_next.detach().float().mean(dim=1)
    per_image = diff.pow(2).sum(-1) if reduction == "sum" else diff.pow(2).mean(-1)
    return per_image.mean()


def class_weights_from_counts(counts: Iterable[int]) -> list[float]:
    """Inverse-frequency class weights ``n / (C * count)`` (``class_weights: auto``); absent classes get 0."""
    counts = [int(c) for c in counts]
    total, n = sum(counts), len(counts)
    return [total / (n * c) if c > 0 else 0.0 for c in counts]


# -------------------------------------------------------------------------------------------- schedule
def _ramp(epoch: float, start: float, target: float, ramp_epochs: float) -> float:
    if epoch < start:
        return 0.0
    if ramp_epochs <= 0:
        return float(target)
    return float(target) * min(1.0, (epoch - start + 1) / ramp_epochs)


def check_start_epochs(start_epochs: Sequence[int], layers: int) -> list[int]:
    starts = [int(s) for s in start_epochs]
    if len(starts) != layers or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ConfigError(
            f"model.smt.start_epochs={starts}: give one non-decreasing start epoch per layer "
            f"({layers} layers), e.g. [0, 20, 50]"
        )
    return starts


def active_layers(epoch: float, start_epochs: Sequence[int]) -> int:
    """How many layers train at ``epoch`` (layer l is active from ``start_epochs[l]``)."""
    return sum(1 for s in start_epochs if epoch >= s)


def forward_weight(
    layer: int, epoch: float, start_epochs: Sequence[int], fwd_weight: float, ramp_epochs: float
) -> float:
    """Weight of layer ``layer``'s ``L_cls`` and ``L_focus``: 0 before ``start_epochs[layer]``, then a linear
    ramp reaching ``fwd_weight`` after ``ramp_epochs`` epochs (``1/ramp_epochs`` of it in the first)."""
    return _ramp(epoch, start_epochs[layer], fwd_weight, ramp_epochs)


def backward_weight(
    layer: int, epoch: float, start_epochs: Sequence[int], bwd_weight: float, ramp_epochs: float
) -> float:
    """Weight of the reform terms between layers ``layer`` and ``layer + 1`` (``L_emb`` of encoder
    ``layer``, ``L_ret`` of predictor ``layer``): 0 before ``start_epochs[layer + 1]``, then ramping to
    ``bwd_weight``."""
    return _ramp(epoch, start_epochs[layer + 1], bwd_weight, ramp_epochs)


def schedule_weights(
    epoch: float,
    start_epochs: Sequence[int],
    fwd_weight: float = 1.0,
    bwd_weight: float = 0.1,
    ramp_epochs: float = 5,
    reform: Iterable[str] = ("ret", "emb"),
) -> dict[str, list[float]]:
    """All loss weights at ``epoch``: ``cls`` and ``focus`` per layer, ``ret`` and ``emb`` per layer pair
    (zero for a reform term not in ``reform``)."""
    reform = set(reform)
    unknown = reform - {"ret", "emb"}
    if unknown:
        raise ConfigError(f"model.smt.reform has {sorted(unknown)}; use a subset of [ret, emb]")
    n = len(start_epochs)
    fwd = [forward_weight(layer, epoch, start_epochs, fwd_weight, ramp_epochs) for layer in range(n)]
    bwd = [backward_weight(layer, epoch, start_epochs, bwd_weight, ramp_epochs) for layer in range(n - 1)]
    return {
        "cls": fwd,
        "focus": fwd[:-1],
        "ret": bwd if "ret" in reform else [0.0] * (n - 1),
        "emb": bwd if "emb" in reform else [0.0] * (n - 1),
    }
