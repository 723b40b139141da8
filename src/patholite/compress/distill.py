"""Knowledge distillation: logit KD (R2), DeiT's distillation token (R4) and multi-level distillation (R1).

Plain torch, no Hydra or Lightning: a Lightning module calls ``Distiller.forward`` in its training step and
evaluates or exports ``distiller.student``.

- ``kd_loss``: (1-a)*CE(z_s, y) + a*T^2*KL(softmax(z_t/T) || softmax(z_s/T)) ("soft", R2), or
  (1-a)*CE(z_s, y) + a*CE(z_s, argmax z_t) ("hard"). KL is summed over classes and averaged over the batch
  (PyTorch's ``batchmean``; the per-element ``mean`` would divide it by the class count as well).
- ``token_kd_loss``: the same with DeiT's two heads: the class head learns from labels, the distillation
  head from the teacher.
- ``sample_weights``: per-sample weights towards ambiguous samples (teacher entropy) and lesion area (R1).
- ``Distiller``: a frozen teacher and a trained student; logits, attention maps and token features of chosen
  blocks (R1's shallow, middle and deep levels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patholite.errors import ConfigError

KD_KINDS = ("soft", "hard")
# "token" is DeiT's best setting: the distillation head learns the teacher's hard decision.
DISTILLER_KINDS = ("soft", "hard", "token", "token_soft", "token_hard")
LEVELS = ("logits", "attention", "features")

# log() of a student attention probability that underflowed to 0 must stay finite.
_EPS = 1e-8


# ---------------------------------------------------------------------------------------------- validation


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"distillation alpha={alpha}: must be in [0, 1] (0 = labels only, 1 = teacher only), e.g. 0.5"
        )
    return alpha


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ConfigError(f"distillation temperature={temperature}: must be > 0, e.g. 4.0 (1 = no softening)")
    return temperature


def _check_kind(kind: str, allowed: Sequence[str]) -> str:
    if kind not in allowed:
        raise ConfigError(f"distillation kind={kind!r} is unknown: use one of {', '.join(allowed)}")
    return kind


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> None:
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ConfigError(
            "distillation needs logits of shape [batch, classes]; got student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ConfigError(
            f"the student predicts {student_logits.shape[1]} classes but the teacher "
            f"{teacher_logits.shape[1]}: distil from a teacher trained on the same dataset (same num_classes)"
        )
    if student_logits.shape[0] != teacher_logits.shape[0] or targets.shape[0] != student_logits.shape[0]:
        raise ConfigError(
            f"batch sizes differ: student {student_logits.shape[0]}, teacher {teacher_logits.shape[0]}, "
            f"targets {targets.shape[0]}"
        )


def _check_weights(weights: Tensor | None, batch: int) -> None:
    if weights is not None and tuple(weights.shape) != (batch,):
        raise ConfigError(
            f"sample weights must have shape [{batch}] (one per sample); got {tuple(weights.shape)}"
        )


def _weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """Mean over the batch of per-sample terms, each scaled by its weight (weights of 1 = plain mean)."""
    return per_sample.mean() if weights is None else (per_sample * weights).mean()


# ------------------------------------------------------------------------------------------- logit losses


def _logit_terms(
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
    """(CE of ``ce_logits`` with the labels, distillation of ``kd_logits`` from the teacher), batch means."""
    _check_logits(kd_logits, teacher_logits, targets)
    _check_logits(ce_logits, teacher_logits, targets)
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
    return _weighted_mean(ce, weights), _weighted_mean(kd, weights)


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
    # One head learning from both labels and teacher is the token loss with both heads the same.
    return token_kd_loss(
        student_logits,
        student_logits,
        teacher_logits,
        targets,
        alpha=alpha,
        temperature=temperature,
        kind=kind,
        weights=weights,
        label_smoothing=label_smoothing,
    )


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
    alpha, temperature = _check_alpha(alpha), _check_temperature(temperature)
    _check_kind(kind, KD_KINDS)
    ce, kd = _logit_terms(
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
        raise ConfigError(
            f"entropy_weight={entropy_weight}, lesion_weight={lesion_weight}: "
            "both must be >= 0 (0 turns a term off)"
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
            raise ConfigError(
                f"lesion_weight={lesion_weight} needs lesion masks, but the batch has none: "
                "set lesion_weight=0 or use a dataset that provides masks"
            )
        m = masks.detach()
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != w.shape[0]:
            raise ConfigError(
                f"lesion masks must be [B, H, W] or [B, 1, H, W] with B={w.shape[0]}; "
                f"got {tuple(masks.shape)}"
            )
        w = w + lesion_weight * m.float().flatten(1).mean(1).to(w.device)
    return (w / w.mean()).detach()


# ----------------------------------------------------------------------------------------------- Distiller


@dataclass
class DistillOutput:
    """What one distillation step gives: the student's logits (for metrics), the loss, detached components."""

    logits: Tensor
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def _blocks_of(net: nn.Module, role: str) -> Sequence[nn.Module]:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ConfigError(
            f"attention/feature distillation needs a ViT-like {role} with `.blocks`; "
            f"{type(net).__name__} has none: use levels=[logits]"
        )
    return blocks


def _attention_of(block: nn.Module, role: str, index: int) -> nn.Module:
    """The module that computes the block's attention matrix (timm Attention, or the block itself)."""
    attn = getattr(block, "attn", block)
    if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
        raise ConfigError(
            f"{role} block {index} ({type(block).__name__}) has no timm-style attention (`attn.fused_attn`, "
            "`attn.attn_drop`) to read attention maps from: drop the attention level"
        )
    return attn


def _width(net: nn.Module, role: str) -> int:
    width = getattr(net, "embed_dim", None) or getattr(net, "num_features", None)
    if not isinstance(width, int):
        raise ConfigError(
            f"cannot tell the token width of the {role} ({type(net).__name__} has no embed_dim)"
        )
    return width


def _resolve_indices(indices: Sequence[int], depth: int, role: str) -> list[int]:
    out = []
    for i in indices:
        i = int(i)
        if not -depth <= i < depth:
            raise ConfigError(f"{role}_blocks has {i}, but the {role} has {depth} blocks (0..{depth - 1})")
        out.append(i % depth)
    return out


def default_blocks(depth: int) -> list[int]:
    """R1's shallow, middle and deep levels: blocks depth//4, depth//2 and depth-1."""
    return [depth // 4, depth // 2, depth - 1]


def _relative(indices: Sequence[int], depth_from: int, depth_to: int) -> list[int]:
    """Same relative depth in the other network; first maps to first, last to last."""
    if depth_from == 1:
        return [depth_to - 1 for _ in indices]
    return [round(i * (depth_to - 1) / (depth_from - 1)) for i in indices]


def _is_distilled_deit(net: nn.Module) -> bool:
    return callable(getattr(net, "set_distilled_training", None)) and hasattr(net, "head_dist")


def _num_classes(net: nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


def _num_patches(net: nn.Module) -> int | None:
    """Patch tokens a timm ViT makes at its configured image size; None if it cannot tell statically."""
    patch_embed = getattr(net, "patch_embed", None)
    n = getattr(patch_embed, "num_patches", None)
    if getattr(net, "dynamic_img_size", False) or not isinstance(n, int):
        return None
    return n


def _shape_hint(net: nn.Module) -> str:
    pe = getattr(net, "patch_embed", None)
    return f"img_size={getattr(pe, 'img_size', '?')}, patch_size={getattr(pe, 'patch_size', '?')}"


def _merge_heads(out: Any) -> tuple[Tensor, Tensor]:
    """(class-head logits, distillation-head logits); the same tensor twice for single-head networks."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, out


class Distiller(nn.Module):
    """A trained student distilled from a frozen teacher at the logit, attention and feature levels (R1).

    ``forward(images, targets, masks=None)`` returns a ``DistillOutput`` whose loss is
    ``(1-a)*ce + a*kd + attention_weight*attention + feature_weight*features`` (``kd`` only with the "logits"
    level; without it the label term is plain ``ce``).

    - The teacher is kept outside the module tree: not in ``parameters()`` nor ``state_dict()`` (checkpoints
      hold the student and the projections only), always in eval mode, never trained; ``.to()`` moves it too.
    - ``attention``: per block pair, the head-averaged attention maps [B, N, N]; KL(teacher || student) per
      query row, averaged over query rows and block pairs, then over the batch. Head counts may differ.
    - ``features``: per block pair, the block's output tokens [B, N, D]; the student's projected to the
      teacher's width by a trained ``nn.Linear`` (identity when widths agree); MSE per sample.
    - Default blocks: R1's shallow, middle, deep: [depth//4, depth//2, depth-1] in each network.
    - Extra prefix tokens (DeiT's distillation token, registers) are dropped from the comparison so a
      distilled DeiT student can learn from a plain ViT teacher; patch tokens must match in number.
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
        self.kind = _check_kind(kind, DISTILLER_KINDS)
        self.alpha = _check_alpha(alpha)
        self.temperature = _check_temperature(temperature)
        # A bare string (a Hydra override like levels=logits) is one level, not its letters.
        levels = (levels,) if isinstance(levels, str) else tuple(levels)
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown or not levels:
            raise ConfigError(
                f"distillation levels {list(levels)}: unknown or empty; use any of {', '.join(LEVELS)}"
            )
        self.levels = tuple(dict.fromkeys(levels))
        for name, value in (
            ("attention_weight", attention_weight),
            ("feature_weight", feature_weight),
            ("entropy_weight", entropy_weight),
            ("lesion_weight", lesion_weight),
        ):
            if float(value) < 0:
                raise ConfigError(f"distillation {name}={value}: must be >= 0 (0 turns it off)")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing}: must be in [0, 1), e.g. 0.1")
        self.attention_weight = float(attention_weight)
        self.feature_weight = float(feature_weight)
        self.entropy_weight = float(entropy_weight)
        self.lesion_weight = float(lesion_weight)
        self.label_smoothing = float(label_smoothing)

        self.token = self.kind.startswith("token")
        self.logit_kind = "soft" if self.kind in ("soft", "token_soft") else "hard"
        if self.token:
            if not _is_distilled_deit(student):
                raise ConfigError(
                    f"kind={self.kind!r} needs a student with a distillation token and head (a timm "
                    "distilled DeiT such as deit_tiny_distilled_patch16_224); "
                    f"{type(student).__name__} has none: use kind=soft or kind=hard"
                )
            if "logits" not in self.levels:
                raise ConfigError(f"kind={self.kind!r} trains the distillation head: add 'logits' to levels")

        self.student = student
        teacher.eval()
        teacher.requires_grad_(False)
        # A tuple hides the teacher from nn.Module's registry: not in parameters, state_dict, optimizer, DDP.
        self._teacher_box: tuple[nn.Module] = (teacher,)

        n_s, n_t = _num_classes(student), _num_classes(teacher)
        if n_s is not None and n_t is not None and n_s != n_t:
            raise ConfigError(
                f"the student predicts {n_s} classes but the teacher {n_t}: distil from a teacher trained on "
                "the same dataset (same num_classes)"
            )

        self.student_blocks: list[int] = []
        self.teacher_blocks: list[int] = []
        self._student_prefix = int(getattr(student, "num_prefix_tokens", 0))
        self._teacher_prefix = int(getattr(teacher, "num_prefix_tokens", 0))
        if "attention" in self.levels or "features" in self.levels:
            self._setup_blocks(student_blocks, teacher_blocks)
        if "features" in self.levels:
            d_s, d_t = _width(student, "student"), _width(teacher, "teacher")
            # Projections train with the student but are not part of it: the exported student stays clean.
            self.projections = nn.ModuleList(
                nn.Linear(d_s, d_t) if d_s != d_t else nn.Identity() for _ in self.student_blocks
            )
        if self.token:
            # timm returns the two heads apart only in train mode with this flag; eval still averages them.
            student.set_distilled_training(True)

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

    # --------------------------------------------------------------------------------------- block selection

    def _setup_blocks(
        self, student_blocks: Sequence[int] | None, teacher_blocks: Sequence[int] | None
    ) -> None:
        s_all, t_all = _blocks_of(self.student, "student"), _blocks_of(self.teacher, "teacher")
        d_s, d_t = len(s_all), len(t_all)
        if student_blocks is None and teacher_blocks is None:
            s_idx, t_idx = default_blocks(d_s), default_blocks(d_t)
        elif teacher_blocks is None:
            s_idx = _resolve_indices(student_blocks, d_s, "student")
            t_idx = _relative(s_idx, d_s, d_t)
        elif student_blocks is None:
            t_idx = _resolve_indices(teacher_blocks, d_t, "teacher")
            s_idx = _relative(t_idx, d_t, d_s)
        else:
            s_idx = _resolve_indices(student_blocks, d_s, "student")
            t_idx = _resolve_indices(teacher_blocks, d_t, "teacher")
        if len(s_idx) != len(t_idx) or not s_idx:
            raise ConfigError(
                f"student_blocks {list(s_idx)} and teacher_blocks {list(t_idx)} must pair up one to one "
                "(same non-zero length)"
            )
        # Shallow nets repeat an index in the defaults (depth 2: [0, 1, 1]): keep each pair once.
        pairs = list(dict.fromkeys(zip(s_idx, t_idx, strict=True)))
        self.student_blocks = [s for s, _ in pairs]
        self.teacher_blocks = [t for _, t in pairs]

        p_s, p_t = _num_patches(self.student), _num_patches(self.teacher)
        if p_s is not None and p_t is not None and p_s != p_t:
            raise ConfigError(self._token_mismatch(p_s, p_t))

        if "attention" in self.levels:
            # The fused kernel never materialises the attention matrix; the explicit path does. Left set: the
            # explicit path computes the same function, and the student exports to ONNX more easily with it.
            for i in self.student_blocks:
                _attention_of(self.student.blocks[i], "student", i).fused_attn = False
            for i in self.teacher_blocks:
                _attention_of(self.teacher.blocks[i], "teacher", i).fused_attn = False

    def _token_mismatch(self, p_s: int, p_t: int) -> str:
        return (
            f"the student sees {p_s} patch tokens ({_shape_hint(self.student)}) but the teacher {p_t} "
            f"({_shape_hint(self.teacher)}): attention and feature distillation compare token by token, so "
            "both need the same image size and patch size; align them or use levels=[logits]"
        )

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
                    # The input of attn_drop is the softmaxed attention before dropout: [B, heads, N, N].
                    def attn_hook(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor, i: int = i) -> None:
                        store["attention"][i] = args[0]

                    handles.append(_attention_of(blocks[i], "", i).attn_drop.register_forward_hook(attn_hook))
                if "features" in self.levels:

                    def feat_hook(_m: nn.Module, _args: tuple[Tensor, ...], out: Tensor, i: int = i) -> None:
                        store["features"][i] = out

                    handles.append(blocks[i].register_forward_hook(feat_hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()
            store["attention"].clear()
            store["features"].clear()

    # ------------------------------------------------------------------------------------------------ losses

    def _align(self, x: Tensor, prefix: int, dims: Sequence[int]) -> Tensor:
        """Drop prefix tokens the other network lacks (keep the first min(P_s, P_t) and all patch tokens)."""
        keep = min(self._student_prefix, self._teacher_prefix)
        if prefix == keep:
            return x
        for d in dims:
            x = torch.cat((x.narrow(d, 0, keep), x.narrow(d, prefix, x.shape[d] - prefix)), dim=d)
        return x

    def _check_tokens(self, n_s: int, n_t: int) -> None:
        p_s, p_t = n_s - self._student_prefix, n_t - self._teacher_prefix
        if p_s != p_t:
            raise ConfigError(self._token_mismatch(p_s, p_t))

    def _attention_loss(self, s_maps: dict[int, Tensor], t_maps: dict[int, Tensor]) -> Tensor:
        per_sample = []
        for si, ti in zip(self.student_blocks, self.teacher_blocks, strict=True):
            # Head average: a distribution over keys per query whatever the head count.
            a_s, a_t = s_maps[si].float().mean(1), t_maps[ti].float().mean(1)
            self._check_tokens(a_s.shape[-1], a_t.shape[-1])
            a_s = self._align(a_s, self._student_prefix, (1, 2))
            a_t = self._align(a_t, self._teacher_prefix, (1, 2))
            if self._student_prefix != self._teacher_prefix:
                # Dropped key columns took probability mass: renormalise each row to a distribution again.
                a_s = a_s / a_s.sum(-1, keepdim=True).clamp_min(_EPS)
                a_t = a_t / a_t.sum(-1, keepdim=True).clamp_min(_EPS)
            kl_rows = (torch.special.xlogy(a_t, a_t) - a_t * a_s.clamp_min(_EPS).log()).sum(-1)  # [B, N]
            per_sample.append(kl_rows.mean(-1))
        return torch.stack(per_sample).mean(0)

    def _feature_loss(self, s_feats: dict[int, Tensor], t_feats: dict[int, Tensor]) -> Tensor:
        per_sample = []
        for proj, si, ti in zip(self.projections, self.student_blocks, self.teacher_blocks, strict=True):
            f_s, f_t = s_feats[si], t_feats[ti]
            self._check_tokens(f_s.shape[1], f_t.shape[1])
            f_s = self._align(f_s, self._student_prefix, (1,))
            f_t = self._align(f_t, self._teacher_prefix, (1,))
            diff = proj(f_s).float() - f_t.float()
            per_sample.append(diff.pow(2).mean((1, 2)))
        return torch.stack(per_sample).mean(0)

    def forward(self, images: Tensor, targets: Tensor, masks: Tensor | None = None) -> DistillOutput:
        """One distillation step's loss; ``masks`` [B, H, W] only for ``lesion_weight`` > 0."""
        teacher = self.teacher
        if teacher.training:  # someone called teacher.train() directly
            teacher.eval()
        with (
            self._capture(self.student, self.student_blocks) as s_cap,
            self._capture(teacher, self.teacher_blocks) as t_cap,
        ):
            with torch.no_grad():
                t_cls, t_dist = _merge_heads(teacher(images))
                t_logits = t_cls if t_cls is t_dist else (t_cls + t_dist) / 2
            cls_logits, dist_logits = _merge_heads(self.student(images))
            # Metrics see what the student predicts at inference: timm's distilled DeiT averages its heads.
            logits = cls_logits if cls_logits is dist_logits else (cls_logits + dist_logits) / 2

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
                ce, kd = _logit_terms(
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
                _check_logits(logits, t_logits, targets)
                ce = F.cross_entropy(
                    logits.float(), targets, reduction="none", label_smoothing=self.label_smoothing
                )
                loss = terms["ce"] = _weighted_mean(ce, weights)
            if "attention" in self.levels:
                att = _weighted_mean(self._attention_loss(s_cap["attention"], t_cap["attention"]), weights)
                loss = loss + self.attention_weight * att
                terms["attention"] = att
            if "features" in self.levels:
                feat = _weighted_mean(self._feature_loss(s_cap["features"], t_cap["features"]), weights)
                loss = loss + self.feature_weight * feat
                terms["features"] = feat
        return DistillOutput(logits=logits, loss=loss, terms={k: v.detach() for k, v in terms.items()})
