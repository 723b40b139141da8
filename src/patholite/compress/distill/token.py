"""DeiT's distillation token (R4): a student with two heads, the class head learning from the labels and the
distillation head from the teacher (timm's ``deit_*_distilled_*`` models)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from patholite.compress.distill.logits import two_head_loss

# Distiller kinds that train a distillation head, and the logit loss that head learns with. "token" is DeiT's
# best setting: the distillation head learns the teacher's hard decision.
TOKEN_KINDS = {"token": "hard", "token_soft": "soft", "token_hard": "hard"}


def token_kd_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: str = "hard",
    weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DeiT distillation-token loss: (1-a)*CE(cls head, y) + a*distill(dist head, teacher).

    ``kind`` "hard" (DeiT's default: CE on the teacher's argmax) or "soft" (T^2 * KL on softened logits).
    """
    return two_head_loss(
        cls_logits, dist_logits, teacher_logits, targets, alpha, temperature, kind, weights, label_smoothing
    )


def is_distilled_deit(net: nn.Module) -> bool:
    """Whether ``net`` has timm's distillation token and head."""
    return callable(getattr(net, "set_distilled_training", None)) and hasattr(net, "head_dist")


def check_student(student: nn.Module, kind: str) -> None:
    """ValueError unless ``student`` is a distilled DeiT, which a token ``kind`` needs."""
    if not is_distilled_deit(student):
        raise ValueError(
            f"kind={kind!r} needs a student with a distillation token and head (a timm distilled DeiT such "
            f"as deit_tiny_distilled_patch16_224); {type(student).__name__} has none: use kind=soft or hard"
        )


def separate_heads(student: nn.Module) -> None:
    """Make a distilled DeiT return its two heads apart when training."""
    # timm returns the two heads apart only in train mode with this flag; eval still averages them.
    student.set_distilled_training(True)


def split_heads(out: Any) -> tuple[Tensor, Tensor]:
    """(class-head logits, distillation-head logits); the same tensor twice for single-head networks."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, out


def merged(cls_logits: Tensor, dist_logits: Tensor) -> Tensor:
    """What the network predicts at inference: timm's distilled DeiT averages its two heads."""
    return cls_logits if cls_logits is dist_logits else (cls_logits + dist_logits) / 2
