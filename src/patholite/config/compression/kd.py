"""``compression.kd``: knowledge distillation (the ``distill`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KdConfig:
    """Knowledge distillation. R2 leaves a and T open: a = 0.5 weighs labels and teacher equally, T = 4
    softens enough for the teacher's class similarities to show (Hinton's range 2-5)."""

    # soft (KL on softened logits) | hard (CE on the teacher's argmax) | token (DeiT distillation token,
    # hard as DeiT's best; token_soft for KL)
    kind: str = "soft"
    alpha: float = 0.5
    temperature: float = 4.0
    levels: list[str] = field(default_factory=lambda: ["logits"])  # logits, attention, features (R1)
    student_blocks: list[int] | None = None  # None: shallow, middle, deep = depth//4, depth//2, depth-1
    teacher_blocks: list[int] | None = None  # None: the same relative depths in the teacher
    attention_weight: float = 1.0
    feature_weight: float = 1.0
    entropy_weight: float = 0.0  # > 0: emphasise samples the teacher finds ambiguous (R1)
    lesion_weight: float = 0.0  # > 0: emphasise lesion area, where the dataset gives masks (R1)


SCHEMA = KdConfig
