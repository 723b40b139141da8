"""Knowledge distillation: logit KD (R2), DeiT's distillation token (R4) and multi-level distillation (R1).

- ``logits``: soft/hard logit KD (``kd_loss``) and per-sample weights (``sample_weights``).
- ``token``: DeiT's distillation-token loss (``token_kd_loss``) and its two heads.
- ``attention``: attention maps of chosen blocks and their KL loss.
- ``features``: token features of chosen blocks, the width projection and their MSE loss.
- ``align``: which student and teacher blocks (``default_blocks``) and tokens pair up, for the two above.
- ``distiller``: the ``Distiller`` module that owns the student, hides the teacher and combines the levels.
"""

from patholite.compress.distill.align import default_blocks
from patholite.compress.distill.distiller import DISTILLER_KINDS, LEVELS, Distiller, DistillOutput
from patholite.compress.distill.logits import KD_KINDS, kd_loss, sample_weights
from patholite.compress.distill.token import token_kd_loss

__all__ = [
    "DISTILLER_KINDS",
    "KD_KINDS",
    "LEVELS",
    "DistillOutput",
    "Distiller",
    "default_blocks",
    "kd_loss",
    "sample_weights",
    "token_kd_loss",
]
