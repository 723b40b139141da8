"""Label-free feature distillation: a student encoder learns its teachers' embeddings (AM-RADIO, H0-mini),
from several teachers at once with one projection head each, optionally at nested prefixes of its own
embedding (Pathryoshka's Matryoshka sizes).

``FeatureDistiller`` holds the student and the heads and knows nothing of data, Lightning or configs. Its
targets are the teachers' embeddings of the clean tile (cached once per tile set: ``pipelines.embeddings``);
the student sees the augmented tile (``HistologyAugment``: flips, 90-degree turns, HED stain jitter), so it
learns to give an augmented tile the clean tile's embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from patholite.data.transforms import StainJitter
from patholite.models.encoder import as_pooled, embeddings

PROJECTIONS = ("linear", "mlp", "identity")


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cosine_weight: float = 1.0,
    smooth_l1_weight: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """``cosine_weight * mean(1 - cos(s, t)) + smooth_l1_weight * mean(SmoothL1_beta(s - t))`` over a batch of
    projected student embeddings ``s`` and teacher embeddings ``t`` (both B x D): the cosine aligns
    directions, the smooth-L1 magnitudes (the AM-RADIO / H0-mini pair)."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature_loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    loss = student.new_zeros(())
    if cosine_weight:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if smooth_l1_weight:
        loss = loss + smooth_l1_weight * F.smooth_l1_loss(student, teacher, beta=beta)
    return loss


def projection_head(in_dim: int, out_dim: int, kind: str = "mlp") -> nn.Module:
    """Student width -> teacher width: ``linear``, ``mlp`` (Linear, GELU, Linear; hidden = the larger), or
    ``identity`` for equal widths (a fine-tuned encoder matching the encoder it came from)."""
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"projection identity needs equal widths, got {in_dim} -> {out_dim}")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"projection {kind!r}: use one of {PROJECTIONS}")


class FeatureDistiller(nn.Module):
    """The student encoder and one projection head per teacher and nested size (and per teacher for the mean
    patch tokens when ``patch``). ``forward(x)`` gives every head's prediction; ``loss`` weighs them against
    the teachers' targets (averaged over sizes and over teachers, so neither count scales the loss)."""

    def __init__(
        self,
        student: nn.Module,
        student_dim: int,
        teacher_dims: Mapping[str, int],
        nested: Sequence[int] = (),
        projection: str = "mlp",
        patch: bool = False,
    ) -> None:
        super().__init__()
        sizes = sorted({int(n) for n in nested} | {int(student_dim)})
        if sizes[0] < 1 or sizes[-1] > student_dim:
            raise ValueError(f"nested sizes {list(nested)} must lie in 1..{student_dim}, the student's width")
        if not teacher_dims:
            raise ValueError("FeatureDistiller needs at least one teacher")
        self.net = student
        self.sizes = sizes
        self.teachers = list(teacher_dims)
        self.patch = patch
        self.heads = nn.ModuleDict(
            {
                f"{t}@{m}": projection_head(m, int(d), projection)
                for t, d in teacher_dims.items()
                for m in sizes
            }
        )
        self.patch_heads = nn.ModuleDict(
            {t: projection_head(student_dim, int(d), projection) for t, d in teacher_dims.items()}
            if patch
            else {}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.patch:
            pooled, patch_mean = embeddings(self.net, x, "the student")
        else:  # the forward pass alone: a traced (fake-quantized) encoder has no forward_features
            pooled = as_pooled(self.net(x), "the student")
        out = {key: head(pooled[:, : int(key.rsplit("@", 1)[1])]) for key, head in self.heads.items()}
        out.update({f"{t}@patch": head(patch_mean) for t, head in self.patch_heads.items()})
        return out

    def loss(
        self,
        predictions: Mapping[str, torch.Tensor],
        targets: Mapping[str, Mapping[str, torch.Tensor]],
        cosine_weight: float = 1.0,
        smooth_l1_weight: float = 1.0,
        beta: float = 1.0,
        patch_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its parts (``<teacher>@<size>``, ``<teacher>@patch``); ``targets[teacher]``
        holds ``cls`` (and ``patch`` when the heads distil patch tokens)."""
        parts: dict[str, torch.Tensor] = {}
        for t in self.teachers:
            for m in self.sizes:
                parts[f"{t}@{m}"] = feature_loss(
                    predictions[f"{t}@{m}"], targets[t]["cls"], cosine_weight, smooth_l1_weight, beta
                )
            if self.patch:
                parts[f"{t}@patch"] = feature_loss(
                    predictions[f"{t}@patch"], targets[t]["patch"], cosine_weight, smooth_l1_weight, beta
                )
        per_teacher = []
        for t in self.teachers:
            pooled = torch.stack([parts[f"{t}@{m}"] for m in self.sizes]).mean()
            per_teacher.append(pooled + (patch_weight * parts[f"{t}@patch"] if self.patch else 0.0))
        return torch.stack(per_teacher).mean(), parts


class HistologyAugment(nn.Module):
    """The student's view of a batch of tiles in [0, 1] (B x 3 x H x W): each tile flipped, turned by a
    multiple of 90 degrees and stain-jittered on its own draw (tissue has no orientation; stain varies from
    lab to lab)."""

    def __init__(self, flips: bool = True, rotate90: bool = True, stain_sigma: float = 0.0) -> None:
        super().__init__()
        self.flips, self.rotate90 = flips, rotate90
        self.stain = StainJitter(stain_sigma) if stain_sigma > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images:
            if self.flips and bool(torch.rand(()) < 0.5):
                image = image.flip(-1)
            if self.flips and bool(torch.rand(()) < 0.5):
                image = image.flip(-2)
            if self.rotate90:
                image = torch.rot90(image, int(torch.randint(0, 4, ())), dims=(-2, -1))
            if self.stain is not None:
                image = self.stain(image)
            out.append(image)
        return torch.stack(out)
