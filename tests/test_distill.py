"""Distillation losses and the multi-level Distiller on tiny timm ViTs (random weights, CPU, 32 px images)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from patholite.compress.distill import (
    Distiller,
    DistillOutput,
    kd_loss,
    sample_weights,
    token_kd_loss,
)
from patholite.errors import ConfigError

ZS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
ZT = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
Y = [1, 2]


def vit(
    dim: int = 64, heads: int = 4, depth: int = 4, classes: int = 4, patch: int = 4, distilled: bool = False
) -> nn.Module:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return timm.create_model(
        name,
        pretrained=False,
        img_size=32,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=classes,
    )


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32), torch.tensor([0, 3])


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------------------------- kd_loss


def test_kd_loss_soft_matches_hand_computation_with_batchmean() -> None:
    a, t = 0.3, 2.0
    ce = [-math.log(_softmax(z)[y]) for z, y in zip(ZS, Y, strict=True)]
    kl = []
    for zs, zt in zip(ZS, ZT, strict=True):
        ps, pt = _softmax([v / t for v in zs]), _softmax([v / t for v in zt])
        kl.append(sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True)))  # summed over classes
    expected = (1 - a) * sum(ce) / 2 + a * t**2 * sum(kl) / 2  # averaged over the batch

    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    got = kd_loss(zs, zt, y, alpha=a, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # The same with torch ops, written out.
    log_ps, log_pt = torch.log_softmax(zs / t, -1), torch.log_softmax(zt / t, -1)
    kl_t = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ce_t = -torch.log_softmax(zs, -1).gather(1, y[:, None]).mean()
    assert torch.allclose(got, (1 - a) * ce_t + a * t**2 * kl_t, atol=1e-6)

    # A per-element mean (F.kl_div reduction="mean") also divides by the class count: a different loss.
    kl_per_element = (log_pt.exp() * (log_pt - log_ps)).mean()
    per_element = (1 - a) * ce_t + a * t**2 * kl_per_element
    assert not torch.allclose(got, per_element, atol=1e-4)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels() -> None:
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    assert torch.allclose(kd_loss(zs, zt, y, alpha=0.0, temperature=4.0), F.cross_entropy(zs, y))
    other = torch.tensor([0, 0])
    assert torch.allclose(
        kd_loss(zs, zt, y, alpha=1.0, temperature=4.0), kd_loss(zs, zt, other, alpha=1.0, temperature=4.0)
    )


def test_hard_kind_uses_teacher_argmax() -> None:
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    got = kd_loss(zs, zt, y, alpha=0.4, temperature=3.0, kind="hard")
    expected = 0.6 * F.cross_entropy(zs, y) + 0.4 * F.cross_entropy(zs, torch.tensor([0, 2]))
    assert torch.allclose(got, expected)
    # Only the argmax matters: sharpening the teacher or changing T leaves it unchanged.
    assert torch.allclose(got, kd_loss(zs, 10 * zt, y, alpha=0.4, temperature=1.0, kind="hard"))


def test_weights_of_ones_equal_unweighted_and_weights_scale_samples() -> None:
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    for kind in ("soft", "hard"):
        plain = kd_loss(zs, zt, y, alpha=0.5, temperature=2.0, kind=kind)
        ones = kd_loss(zs, zt, y, alpha=0.5, temperature=2.0, kind=kind, weights=torch.ones(2))
        assert torch.equal(plain, ones)
    w = torch.tensor([2.0, 0.0])  # only the first sample counts, doubled, over a batch of 2
    weighted = kd_loss(zs, zt, y, alpha=0.5, temperature=2.0, weights=w)
    first = kd_loss(zs[:1], zt[:1], y[:1], alpha=0.5, temperature=2.0)
    assert torch.allclose(weighted, first)


def test_label_smoothing_touches_the_label_term_only() -> None:
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    got = kd_loss(zs, zt, y, alpha=0.5, temperature=1.0, kind="hard", label_smoothing=0.1)
    hard_y = torch.tensor([0, 2])
    expected = 0.5 * F.cross_entropy(zs, y, label_smoothing=0.1) + 0.5 * F.cross_entropy(zs, hard_y)
    assert torch.allclose(got, expected)


def test_token_kd_loss_splits_heads() -> None:
    zs, zt, y = torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y)
    dist = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    got = token_kd_loss(zs, dist, zt, y, alpha=0.5, temperature=1.0, kind="hard")
    expected = 0.5 * F.cross_entropy(zs, y) + 0.5 * F.cross_entropy(dist, torch.tensor([0, 2]))
    assert torch.allclose(got, expected)
    soft = token_kd_loss(zs, dist, zt, y, alpha=0.5, temperature=2.0, kind="soft")
    kd_part = kd_loss(dist, zt, y, alpha=1.0, temperature=2.0)
    assert torch.allclose(soft, 0.5 * F.cross_entropy(zs, y) + 0.5 * kd_part)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5, "temperature": 1.0}, "alpha"),
        ({"alpha": 0.5, "temperature": 0.0}, "temperature"),
        ({"alpha": 0.5, "temperature": 1.0, "kind": "medium"}, "kind"),
    ],
)
def test_kd_loss_rejects_bad_settings(kwargs: dict, match: str) -> None:
    # A guard for direct callers (ValueError); runs validate compression.kd in the distill stage's check.
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.tensor(ZS), torch.tensor(ZT), torch.tensor(Y), **kwargs)


def test_kd_loss_class_count_mismatch_names_both() -> None:
    with pytest.raises(ValueError, match="3 classes but the teacher 4"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor(Y), alpha=0.5, temperature=1.0)


# ---------------------------------------------------------------------------------------- sample_weights


def test_sample_weights_mean_one_and_favour_flat_teachers() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.1, 0.0], [4.0, 3.0, 0.0, 0.0]])
    w = sample_weights(logits, entropy_weight=2.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[1] > w[2] > w[0]
    assert not w.requires_grad
    assert torch.allclose(sample_weights(logits, entropy_weight=0.0), torch.ones(3))


def test_sample_weights_lesion_area() -> None:
    logits = torch.zeros(2, 4)  # same entropy: only the masks differ
    masks = torch.zeros(2, 1, 8, 8)
    masks[1, 0, :4] = 1  # half the image
    w = sample_weights(logits, entropy_weight=1.0, masks=masks, lesion_weight=1.0)
    # raw weights 2 and 2.5, normalised to mean 1
    assert torch.allclose(w, torch.tensor([2.0, 2.5]) / 2.25)
    with pytest.raises(ConfigError, match="lesion_weight"):
        sample_weights(logits, entropy_weight=1.0, lesion_weight=1.0)


# --------------------------------------------------------------------------------------------- Distiller


def test_teacher_is_frozen_hidden_and_in_eval(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = vit(), vit(dim=96, heads=6, depth=6)
    d = Distiller(student, teacher, entropy_weight=1.0)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.parameters()}
    assert all(k.startswith("student.") for k in d.state_dict())
    d.train()
    assert d.student.training and not d.teacher.training
    teacher.train()  # even if someone flips it directly, the forward runs it in eval
    out = d(*batch)
    assert not teacher.training
    assert isinstance(out, DistillOutput) and out.logits.shape == (2, 4)
    assert set(out.terms) == {"ce", "kd"} and not any(t.requires_grad for t in out.terms.values())
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    d.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64


def test_attention_and_features_across_widths_and_heads(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = vit(dim=64, heads=4, depth=4), vit(dim=96, heads=6, depth=8)
    d = Distiller(student, teacher, levels=("logits", "attention", "features"), attention_weight=2.0)
    assert d.student_blocks == [1, 2, 3] and d.teacher_blocks == [2, 4, 7]
    assert not student.blocks[1].attn.fused_attn and not teacher.blocks[7].attn.fused_attn
    out = d(*batch)
    assert set(out.terms) == {"ce", "kd", "attention", "features"}
    assert all(torch.isfinite(t) for t in out.terms.values())
    assert out.terms["attention"] >= 0 and out.terms["features"] > 0
    total = (
        0.5 * out.terms["ce"] + 0.5 * out.terms["kd"] + 2.0 * out.terms["attention"] + out.terms["features"]
    )
    assert torch.allclose(out.loss.detach(), total)
    out.loss.backward()
    proj = d.projections[0]
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (96, 64)
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert student.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    # Hooks live only during the forward: the student leaves clean (EMA copies, export).
    for blk in student.blocks:
        assert not blk._forward_hooks and not blk.attn.attn_drop._forward_hooks
    assert not any(k.startswith("teacher") for k in copy.deepcopy(student).state_dict())


def test_attention_only_level_trains_without_kd(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    d = Distiller(vit(), vit(depth=2), levels=["attention"], student_blocks=[0, -1])
    assert d.teacher_blocks == [0, 1]
    out = d(*batch)
    assert set(out.terms) == {"ce", "attention"}
    assert torch.isfinite(out.loss)


def test_token_kind_with_distilled_deit(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    student = vit(depth=2, distilled=True)
    teacher = vit(dim=96, heads=6, depth=4)
    d = Distiller(student, teacher, kind="token", levels=("logits", "attention", "features"))
    d.train()
    out = d(*batch)
    cls, dist = student(batch[0])  # train mode + distilled training: the two heads apart
    assert torch.allclose(out.logits, (cls + dist) / 2, atol=1e-5)
    assert all(torch.isfinite(t) for t in out.terms.values())
    out.loss.backward()
    assert student.head.weight.grad.abs().sum() > 0
    assert student.head_dist.weight.grad.abs().sum() > 0
    student.eval()  # at inference timm averages the heads into one tensor
    assert student(batch[0]).shape == (2, 4)


def test_token_kind_needs_distilled_student() -> None:
    with pytest.raises(ValueError, match="distillation token"):
        Distiller(vit(), vit(), kind="token")


def test_class_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="4 classes but the teacher 5"):
        Distiller(vit(classes=4), vit(classes=5))


def test_token_count_mismatch_raises() -> None:
    with pytest.raises(ConfigError, match="64 patch tokens.*16"):
        Distiller(vit(patch=4), vit(patch=8), levels=("logits", "features"))
    Distiller(vit(patch=4), vit(patch=8))  # logits alone do not compare tokens


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # Guards for direct callers: the distill stage's check validates these config keys first.
        ({"kind": "medium"}, ValueError, "kind"),
        ({"levels": ("logits", "pixels")}, ValueError, "levels"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"temperature": 0}, ValueError, "temperature"),
        # Only the network knows its depth: a user-facing ConfigError.
        ({"levels": ("attention",), "student_blocks": [9]}, ConfigError, "student_blocks"),
    ],
)
def test_distiller_rejects_bad_settings(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Distiller(vit(), vit(), **kwargs)


def test_attention_level_needs_blocks() -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"\.blocks"):
        Distiller(cnn, vit(), levels=("logits", "attention"))


def test_lesion_weight_needs_masks(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    d = Distiller(vit(), vit(), lesion_weight=1.0)
    with pytest.raises(ConfigError, match="masks"):
        d(*batch)
    masks = torch.zeros(2, 32, 32)
    masks[0, :8] = 1
    assert torch.isfinite(d(*batch, masks=masks).loss)
