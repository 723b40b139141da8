"""The ``Distiller``: a trained student and a frozen teacher, distilled at the logit, attention and feature
levels of chosen blocks (R1's shallow, middle and deep levels), with DeiT's distillation token (R4).

Plain torch, no Hydra or Lightning: a Lightning module calls ``Distiller.forward`` in its training step and
evaluates or exports ``distiller.student``. Argument checks that repeat the ``distill`` stage's config check
are ``ValueError`` guards for direct callers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from patholite.compress.distill.align import TokenAlignment, block_pairs, num_patches
from patholite.compress.distill.attention import attention_loss, capture_attention, materialise_attention
from patholite.compress.distill.features import capture_features, feature_loss, feature_projections
from patholite.compress.distill.logits import (
    check_alpha,
    check_kind,
    check_temperature,
    label_term,
    logit_terms,
    sample_weights,
    weighted_mean,
)
from patholite.compress.distill.token import (
    TOKEN_KINDS,
    check_student,
    merged,
    separate_heads,
    split_heads,
)

DISTILLER_KINDS = ("soft", "hard", *TOKEN_KINDS)
LEVELS = ("logits", "attention", "features")


@dataclass
class DistillOutput:
    """What one distillation step gives: the student's logits (for metrics), the loss, detached components."""

    logits: Tensor
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def _num_classes(net: nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


class Distiller(nn.Module):
    """A trained student distilled from a frozen teacher at the logit, attention and feature levels (R1).

    ``forward(images, targets, masks=None)`` returns a ``DistillOutput`` whose loss is
    ``(1-a)*ce + a*kd + attention_weight*attention + feature_weight*features`` (``kd`` only with the "logits"
    level; without it the label term is plain ``ce``), each term averaged with ``sample_weights``.

    - The teacher is kept outside the module tree: not in ``parameters()`` nor ``state_dict()`` (checkpoints
      hold the student and the projections only), always in eval mode, never trained; ``.to()`` moves it too.
    - ``attention`` (``attention_loss``: KL of head-averaged maps) and ``features`` (``feature_loss``: MSE of
      projected tokens) compare chosen block pairs, by default R1's shallow, middle and deep blocks
      (``default_blocks``). Prefix tokens only one network has (a DeiT's distillation token) are left out.
    - Token kinds (``TOKEN_KINDS``): labels teach a distilled DeiT's class head, the teacher its distillation
      head.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        kind: str = "soft",
        alpha: float = 0.5,
        temperature: float = 4.0,
        levels: Sequence[str] = ("logits",),
        student_blocks: Sequence[int] | None = None,
        teacher_blocks: Sequence[int] | None = None,
        attention_weight: float = 1.0,
        feature_weight: float = 1.0,
        entropy_weight: float = 0.0,
        lesion_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.kind = check_kind(kind, DISTILLER_KINDS)
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)
        # A bare string (a Hydra override like levels=logits) is one level, not its letters.
        levels = (levels,) if isinstance(levels, str) else tuple(levels)
        if not levels or any(lv not in LEVELS for lv in levels):
            raise ValueError(f"levels={list(levels)}: unknown or empty; use any of {', '.join(LEVELS)}")
        self.levels = tuple(dict.fromkeys(levels))
        for name, value in (
            ("attention_weight", attention_weight),
            ("feature_weight", feature_weight),
            ("entropy_weight", entropy_weight),
            ("lesion_weight", lesion_weight),
        ):
            if float(value) < 0:
                raise ValueError(f"{name}={value}: must be >= 0 (0 turns it off)")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 1)")
        self.attention_weight = float(attention_weight)
        self.feature_weight = float(feature_weight)
        self.entropy_weight = float(entropy_weight)
        self.lesion_weight = float(lesion_weight)
        self.label_smoothing = float(label_smoothing)

        self.token = self.kind in TOKEN_KINDS
        self.logit_kind = TOKEN_KINDS.get(self.kind, self.kind)
        if self.token:
            check_student(student, self.kind)
            if "logits" not in self.levels:
                raise ValueError(f"kind={self.kind!r} trains the distillation head: add 'logits' to levels")

        self.student = student
        teacher.eval()
        teacher.requires_grad_(False)
        # A tuple hides the teacher from nn.Module's registry: not in parameters, state_dict, optimizer, DDP.
        self._teacher_box: tuple[nn.Module] = (teacher,)

        n_s, n_t = _num_classes(student), _num_classes(teacher)
        if n_s is not None and n_t is not None and n_s != n_t:
            raise ValueError(
                f"the student predicts {n_s} classes but the teacher {n_t}: distil from a teacher trained on "
                "the same dataset (same num_classes)"
            )

        self._align = TokenAlignment.of(student, teacher)
        pairs = []
        if "attention" in self.levels or "features" in self.levels:
            pairs = block_pairs(student, teacher, student_blocks, teacher_blocks)
            p_s, p_t = num_patches(student), num_patches(teacher)
            if p_s is not None and p_t is not None and p_s != p_t:
                raise self._align.mismatch(p_s, p_t)
        self.student_blocks: list[int] = [s for s, _ in pairs]
        self.teacher_blocks: list[int] = [t for _, t in pairs]
        if "attention" in self.levels:
            materialise_attention(student.blocks, self.student_blocks, "student")
            materialise_attention(teacher.blocks, self.teacher_blocks, "teacher")
        if "features" in self.levels:
            # Projections train with the student but are not part of it: the exported student stays clean.
            self.projections = feature_projections(student, teacher, len(pairs))
        if self.token:
            separate_heads(student)

    # -------------------------------------------------------------------------------------- teacher handling

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule)."""
        return self._teacher_box[0]

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student (and projections); the teacher stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Distiller:
        # .to(), .cuda(), .half() reach only registered children: move the hidden teacher explicitly.
        super()._apply(fn, recurse)
        if recurse:
            self.teacher._apply(fn)
        return self

    def extra_repr(self) -> str:
        return (
            f"teacher={type(self.teacher).__name__} (frozen), kind={self.kind}, alpha={self.alpha}, "
            f"temperature={self.temperature}, levels={list(self.levels)}, "
            f"student_blocks={self.student_blocks}, teacher_blocks={self.teacher_blocks}"
        )

    # ------------------------------------------------------------------------------------------------ losses

    @contextmanager
    def _capture(self, net: nn.Module, indices: Sequence[int]) -> Iterator[dict[str, dict[int, Tensor]]]:
        """Hooks on the chosen blocks for one forward pass; removed and emptied on exit, even on error.

        Registered per call rather than once: a student carrying hooks into an EMA deepcopy, torch.save or an
        export would drag this distiller (and its teacher) along.
        """
        store: dict[str, dict[int, Tensor]] = {"attention": {}, "features": {}}
        handles = []
        if indices:
            blocks = net.blocks
            for i in dict.fromkeys(indices):
                if "attention" in self.levels:
                    handles.append(capture_attention(blocks[i], i, store["attention"]))
                if "features" in self.levels:
                    handles.append(capture_features(blocks[i], i, store["features"]))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()
            store["attention"].clear()
            store["features"].clear()

    def forward(self, images: Tensor, targets: Tensor, masks: Tensor | None = None) -> DistillOutput:
        """One distillation step's loss; ``masks`` [B, H, W] only for ``lesion_weight`` > 0."""
        teacher = self.teacher
        if teacher.training:  # someone called teacher.train() directly
            teacher.eval()
        pairs = list(zip(self.student_blocks, self.teacher_blocks, strict=True))
        with (
            self._capture(self.student, self.student_blocks) as s_cap,
            self._capture(teacher, self.teacher_blocks) as t_cap,
        ):
            with torch.no_grad():
                t_logits = merged(*split_heads(teacher(images)))
            cls_logits, dist_logits = split_heads(self.student(images))
            # Metrics see what the student predicts at inference.
            logits = merged(cls_logits, dist_logits)

            weights = None
            if self.entropy_weight > 0 or self.lesion_weight > 0:
                weights = sample_weights(
                    t_logits,
                    entropy_weight=self.entropy_weight,
                    masks=masks,
                    lesion_weight=self.lesion_weight,
                )

            terms: dict[str, Tensor] = {}
            if "logits" in self.levels:
                # Token kinds: labels teach the class head, the teacher the distillation head.
                ce, kd = logit_terms(
                    cls_logits if self.token else logits,
                    dist_logits if self.token else logits,
                    t_logits,
                    targets,
                    temperature=self.temperature,
                    kind=self.logit_kind,
                    weights=weights,
                    label_smoothing=self.label_smoothing,
                )
                loss = (1.0 - self.alpha) * ce + self.alpha * kd
                terms["ce"], terms["kd"] = ce, kd
            else:
                loss = terms["ce"] = label_term(
                    logits, t_logits, targets, weights=weights, label_smoothing=self.label_smoothing
                )
            if "attention" in self.levels:
                per_sample = attention_loss(s_cap["attention"], t_cap["attention"], pairs, self._align)
                att = weighted_mean(per_sample, weights)
                loss = loss + self.attention_weight * att
                terms["attention"] = att
            if "features" in self.levels:
                per_sample = feature_loss(
                    s_cap["features"], t_cap["features"], self.projections, pairs, self._align
                )
                feat = weighted_mean(per_sample, weights)
                loss = loss + self.feature_weight * feat
                terms["features"] = feat
        return DistillOutput(logits=logits, loss=loss, terms={k: v.detach() for k, v in terms.items()})
