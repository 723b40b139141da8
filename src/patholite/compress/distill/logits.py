"""Logit distillation (R2) and the per-sample weights every level's loss is averaged with (R1).

- ``kd_loss``: (1-a)*CE(z_s, y) + a*T^2*KL(softmax(z_t/T) || softmax(z_s/T)) ("soft"), or
  (1-a)*CE(z_s, y) + a*CE(z_s, argmax z_t) ("hard"). KL is summed over classes and averaged over the batch
  (PyTorch's ``batchmean``; the per-element ``mean`` would divide it by the class count as well).
- ``sample_weights``: per-sample weights towards ambiguous samples (teacher entropy) and lesion area.

Argument checks here are guards for direct callers (``ValueError``): a run validates ``compression.kd`` in
the ``distill`` stage's check before any work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from patholite.errors import ConfigError

KD_KINDS = ("soft", "hard")


# ---------------------------------------------------------------------------------------------- validation


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1]; ValueError otherwise."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1] (0 = labels only, 1 = teacher only)")
    return alpha


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float > 0; ValueError otherwise."""
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1 = no softening)")
    return temperature


def check_kind(kind: str, allowed: Sequence[str]) -> str:
    """``kind`` if it is one of ``allowed``; ValueError otherwise."""
    if kind not in allowed:
        raise ValueError(f"kind={kind!r} is unknown: use one of {', '.join(allowed)}")
    return kind


def check_logits(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> None:
    """Student and teacher logits are [batch, classes] of the same shape, with one target per sample."""
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ValueError(
            "distillation needs logits of shape [batch, classes]; got student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"the student predicts {student_logits.shape[1]} classes but the teacher "
            f"{teacher_logits.shape[1]}: distil from a teacher trained on the same dataset (same num_classes)"
        )
    if student_logits.shape[0] != teacher_logits.shape[0] or targets.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"batch sizes differ: student {student_logits.shape[0]}, teacher {teacher_logits.shape[0]}, "
            f"targets {targets.shape[0]}"
        )


def _check_weights(weights: Tensor | None, batch: int) -> None:
    if weights is not None and tuple(weights.shape) != (batch,):
        raise ValueError(f"weights must have shape [{batch}] (one per sample); got {tuple(weights.shape)}")


def weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """Mean over the batch of per-sample terms, each scaled by its weight (weights of 1 = plain mean)."""
    return per_sample.mean() if weights is None else (per_sample * weights).mean()


# ------------------------------------------------------------------------------------------------- losses


def logit_terms(
    ce_logits: Tensor,
    kd_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    kind: str,
    weights: Tensor | None,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """(CE of ``ce_logits`` with the labels, distillation of ``kd_logits`` from the teacher), batch means.

    Two logit tensors so that DeiT's two heads can learn apart; plain KD passes the same tensor twice.
    """
    check_logits(kd_logits, teacher_logits, targets)
    check_logits(ce_logits, teacher_logits, targets)
    _check_weights(weights, ce_logits.shape[0])
    # Losses in float32 even under autocast: log-softmax of bf16 logits loses the small KL differences.
    ce_logits, kd_logits = ce_logits.float(), kd_logits.float()
    teacher_logits = teacher_logits.detach().float()
    ce = F.cross_entropy(ce_logits, targets, reduction="none", label_smoothing=label_smoothing)
    if kind == "soft":
        log_p_s = F.log_softmax(kd_logits / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        # T^2 keeps the gradient scale of the soft term independent of T (Hinton et al.).
        kd = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * temperature**2
    else:
        # Label smoothing belongs to the labels only; the teacher's decision is taken as is (DeiT).
        kd = F.cross_entropy(kd_logits, teacher_logits.argmax(-1), reduction="none")
    return weighted_mean(ce, weights), weighted_mean(kd, weights)


def label_term(
    logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, weights: Tensor | None, label_smoothing: float
) -> Tensor:
    """The label term alone (CE, batch mean), for distillation without the logit level."""
    check_logits(logits, teacher_logits, targets)
    ce = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
    return weighted_mean(ce, weights)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "soft",
    weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Logit distillation: (1-a)*CE(z_s, y) + a*T^2*KL(p_t || p_s) ("soft") or a*CE(z_s, argmax z_t) ("hard").

    ``targets`` are class indices [B] (or class probabilities [B, C]); ``weights`` optional per-sample weights
    [B]; ``label_smoothing`` applies to the label term only. The teacher receives no gradient.
    """
    # One head learns from both labels and teacher: DeiT's token loss with both heads the same.
    return two_head_loss(
        student_logits,
        student_logits,
        teacher_logits,
        targets,
        alpha,
        temperature,
        kind,
        weights,
        label_smoothing,
    )


def two_head_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float,
    temperature: float,
    kind: str,
    weights: Tensor | None,
    label_smoothing: float,
) -> Tensor:
    """(1-a) * the label term of ``cls_logits`` + a * the teacher term of ``dist_logits``."""
    alpha, temperature = check_alpha(alpha), check_temperature(temperature)
    check_kind(kind, KD_KINDS)
    ce, kd = logit_terms(
        cls_logits,
        dist_logits,
        teacher_logits,
        targets,
        temperature=temperature,
        kind=kind,
        weights=weights,
        label_smoothing=label_smoothing,
    )
    return (1.0 - alpha) * ce + alpha * kd


# ------------------------------------------------------------------------------------------ sample weights


def sample_weights(
    teacher_logits: Tensor,
    *,
    entropy_weight: float,
    masks: Tensor | None = None,
    lesion_weight: float = 0.0,
) -> Tensor:
    """Per-sample weights, mean 1 over the batch, larger for ambiguous samples and large lesions (R1).

    w = 1 + entropy_weight * H(softmax(z_t)) / log(C) + lesion_weight * lesion fraction, then w / mean(w).
    ``masks``: [B, H, W] or [B, 1, H, W], values in [0, 1]. Detached: weights steer the loss, not the teacher.
    """
    if entropy_weight < 0 or lesion_weight < 0:
        raise ValueError(
            f"entropy_weight={entropy_weight}, lesion_weight={lesion_weight}: both must be >= 0 "
            "(0 turns a term off)"
        )
    logits = teacher_logits.detach().float()
    probs = logits.softmax(-1)
    classes = probs.shape[-1]
    # Entropy over log(C) lies in [0, 1]: the weight means the same for 2 classes as for 7.
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    entropy = entropy / math.log(classes) if classes > 1 else torch.zeros_like(entropy)
    w = 1.0 + entropy_weight * entropy
    if lesion_weight > 0:
        if masks is None:
            # Config-valid but unusable: only the batch shows that the dataset gives no masks.
            raise ConfigError(
                f"lesion_weight={lesion_weight} needs lesion masks, but the batch has none: "
                "set lesion_weight=0 or use a dataset that provides masks"
            )
        m = masks.detach()
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != w.shape[0]:
            raise ValueError(
                f"lesion masks must be [B, H, W] or [B, 1, H, W] with B={w.shape[0]}; "
                f"got {tuple(masks.shape)}"
            )
        w = w + lesion_weight * m.float().flatten(1).mean(1).to(w.device)
    return (w / w.mean()).detach()
