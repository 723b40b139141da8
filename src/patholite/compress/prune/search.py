"""Torch-Pruning importance, scoring and the search for how far to prune a timm ViT: ``prune_vit``.

Torch-Pruning (``torch_pruning``) traces the network and removes coupled weights together (the q, k and v
rows of a head with the matching ``proj`` columns; an ``fc1`` row with its ``fc2`` column). The embedding
width, patch embedding, position embedding and classifier are never touched, so a pruned network still
loads the same data and heads as its parent.

Pruning is uniform per layer: ``ratio`` removes ``ratio * num_heads`` heads from every attention block, to
the nearest whole head (halves up; at least one head stays), and keeps ``floor((1 - ratio) * hidden)`` MLP
channels in every block, rounded down to a multiple of ``round_to`` (at least ``round_to`` stay). Per-layer
counts are predictable, give every block the same shape and keep the widths the accelerator prefers (R1:
"widths aligned to the accelerator's preferred multiples"); global ranking could collapse a layer.

Importance scores (R4 magnitude / Taylor; R1 moving-average significance):

- ``magnitude``: L2 norm of each channel's weights across the coupled layers.
- ``taylor``: ``|w * dL/dw|`` summed over the channel's weights, with the gradients of the cross-entropy
  summed over ``scoring_batches`` (Molchanov et al. 2019, as Torch-Pruning's ViT example does).
- ``moving_average``: R1's significance ``S_t = beta * S_{t-1} + (1 - beta) * s_t``, one step per scoring
  batch, where ``s_t`` is ``|w * g_t|`` (``saliency="taylor"``) or R1's raw ``|g_t|`` (``saliency="grad"``).

Errors: the arguments that user config sets are validated by the ``prune`` stage's check, so a bad argument
here is a caller's bug and raises ``ValueError``/``TypeError`` naming it. What only the network reveals (no
prunable ViT blocks, a ``target_flops`` out of its reach) raises ``ConfigError``: the config must change.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner import function as tp_function

from patholite.compress.prune.structure import block_shapes, find_blocks, reshape_block, set_heads
from patholite.errors import ConfigError
from patholite.models.count import count_params, count_unfused_flops, unfused_attention

log = logging.getLogger(__name__)

# The one definition of the names that the prune stage's config check accepts.
IMPORTANCES = ("magnitude", "taylor", "moving_average")
SALIENCIES = ("taylor", "grad")

# Binary-search steps on the ratio for a FLOPs target: 2**-14 is finer than one channel of any ViT MLP.
_SEARCH_STEPS = 14

__all__ = [
    "IMPORTANCES",
    "SALIENCIES",
    "MovingAverageImportance",
    "flops_and_params",
    "prune_vit",
]


# --------------------------------------------------------------------------------------------------------
# Planning: per-block shapes and their cost


def _plan(
    blocks: list[nn.Module], head_ratio: float, mlp_ratio: float, heads: bool, mlp: bool, round_to: int
) -> list[dict[str, int]]:
    """The per-block shapes that the ratios give (uniform per layer, see the module docstring)."""
    plan = []
    for shape in block_shapes(blocks):
        h, w = shape["num_heads"], shape["mlp_hidden"]
        if heads:
            # Nearest whole head, halves rounded up (DeiT-Tiny's 3 heads at 0.5 keep 1); at least one stays.
            # The 1e-9 absorbs float error in ratio * h.
            shape["num_heads"] = h - min(h - 1, math.floor(head_ratio * h + 0.5 + 1e-9))
        if mlp:
            keep = math.floor((1.0 - mlp_ratio) * w + 1e-9)
            keep -= keep % round_to
            shape["mlp_hidden"] = min(w, max(keep, round_to))
        plan.append(shape)
    return plan


def flops_and_params(net: nn.Module, image_size: int) -> tuple[float, int]:
    """FLOPs of one image (2 per multiply-add, attention included) and the parameter count."""
    return float(count_unfused_flops(net, image_size)), count_params(net)


def _meta_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose tensors live on the meta device: shapes without memory or arithmetic."""
    memo: dict[int, Tensor] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)


def _planned_flops(net: nn.Module, path: str, plan: list[dict[str, int]], image_size: int) -> float:
    """FLOPs of ``net`` reshaped to ``plan``, counted on a copy (``net`` is untouched)."""

    def count(probe: nn.Module) -> float:
        for block, shape in zip(probe.get_submodule(path), plan, strict=True):
            reshape_block(block, shape["num_heads"], shape["mlp_hidden"])
        return float(count_unfused_flops(probe, image_size))  # on the meta device or the CPU, never a GPU

    try:  # FLOPs depend on shapes only: the meta device counts a ViT-L without copying its weights.
        return count(_meta_copy(net))
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: count a real copy
        return count(copy.deepcopy(net))


def _search_plan(
    net: nn.Module,
    path: str,
    blocks: list[nn.Module],
    target_flops: float,
    heads: bool,
    mlp: bool,
    round_to: int,
    image_size: int,
) -> list[dict[str, int]] | None:
    """The least pruning that costs at most ``target_flops``; None when the network already does.

    First the smallest uniform ratio that reaches the target (bisection: FLOPs only fall as the ratio grows,
    every count being monotone); heads come in coarse steps (a third of DeiT-Tiny's per head), so the MLP
    ratio is then bisected again, with those heads, to keep the widest MLP that still fits.
    """
    cache: dict[tuple, float] = {}

    def plan(head_ratio: float, mlp_ratio: float) -> list[dict[str, int]]:
        return _plan(blocks, head_ratio, mlp_ratio, heads, mlp, round_to)

    def cost(p: list[dict[str, int]]) -> float:
        key = tuple((s["num_heads"], s["mlp_hidden"]) for s in p)
        if key not in cache:
            cache[key] = _planned_flops(net, path, p, image_size)
        return cache[key]

    def smallest_ratio(make: Any, hi: float) -> float:
        lo = 0.0
        for _ in range(_SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(make(mid)) <= target_flops else (mid, hi)
        return hi

    unpruned = cost(plan(0.0, 0.0))
    if unpruned <= target_flops:
        return None
    smallest = cost(plan(1.0, 1.0))  # one head and round_to channels per block
    if smallest > target_flops:
        # Only the network's FLOPs reveal this, so the config check cannot: the target must change.
        raise ConfigError(
            f"target_flops={target_flops:.4g} is out of reach: pruning this network as far as it goes "
            f"(heads={heads}, mlp={mlp}: one head and {round_to} MLP channels per block) still costs "
            f"{smallest:.4g} FLOPs per image at image size {image_size} (unpruned: {unpruned:.4g}). "
            "Raise target_flops, enable heads/mlp pruning, or lower round_to"
        )
    ratio = smallest_ratio(lambda r: plan(r, r), 1.0)
    mlp_ratio = smallest_ratio(lambda r: plan(ratio, r), ratio) if mlp else ratio
    log.info("target_flops=%.4g: head ratio %.4f, MLP ratio %.4f", target_flops, ratio, mlp_ratio)
    return plan(ratio, mlp_ratio)


# --------------------------------------------------------------------------------------------------------
# Importance


def _check_moving_average(beta: float, saliency: str) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1) (R1 moving-average decay; 0.9 is typical)")
    if saliency not in SALIENCIES:
        raise ValueError(f"saliency={saliency!r} is not one of {SALIENCIES}")


class MovingAverageImportance(tp.importance.GroupMagnitudeImportance):
    """R1's moving-average significance as a Torch-Pruning importance.

    ``update(model)`` after each backward pass folds the current gradients into
    ``S_t = beta * S_{t-1} + (1 - beta) * s_t`` per weight (``S_0 = 0``), with ``s_t = |w * g|``
    (``saliency="taylor"``) or ``|g|`` (``saliency="grad"``). Calling it on a group sums ``S`` over each
    channel's weights in every coupled Linear and reduces across the group as Torch-Pruning's Taylor
    importance does (mean over layers, then divided by the group mean). Without bias correction: the common
    factor ``1 - beta**t`` cancels in the normalisation.
    """

    def __init__(
        self,
        beta: float = 0.9,
        saliency: str = "taylor",
        group_reduction: str = "mean",
        normalizer: str = "mean",
    ) -> None:
        super().__init__(
            p=1, group_reduction=group_reduction, normalizer=normalizer, target_types=[nn.Linear]
        )
        _check_moving_average(beta, saliency)
        self.beta = beta
        self.saliency = saliency
        self.scores: dict[nn.Module, Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One moving-average step from the gradients now in ``model``'s Linear weights."""
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.grad is not None:
                g = m.weight.grad.detach().float()
                s = (m.weight.detach().float() * g).abs() if self.saliency == "taylor" else g.abs()
                prev = self.scores.get(m)
                self.scores[m] = (
                    (1.0 - self.beta) * s
                    if prev is None
                    else prev.mul_(self.beta).add_(s, alpha=1.0 - self.beta)
                )
        self.steps += 1

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        """Per-channel importance of a Torch-Pruning group (None when no layer of it has scores)."""
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.target.module, dep.handler
            score = self.scores.get(layer)
            if score is None:
                continue
            if prune_fn == tp_function.prune_linear_out_channels:
                local = score[idxs].sum(1)
            elif prune_fn == tp_function.prune_linear_in_channels:
                local = score.sum(0)[idxs]
            else:
                continue
            group_imp.append(local)
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def _make_importance(importance: str, beta: float, saliency: str) -> tp.importance.Importance:
    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return MovingAverageImportance(beta=beta, saliency=saliency)


def _score(net: nn.Module, batches: Iterable[Any], imp: tp.importance.Importance) -> int:
    """Forward/backward the cross-entropy over ``batches``: Taylor keeps the summed gradients in ``.grad``;
    the moving average takes one step per batch. Returns the number of batches."""
    device = next(net.parameters()).device
    per_step = isinstance(imp, MovingAverageImportance)
    net.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(
                    f"scoring_batches item {n} is a {type(batch).__name__}, not an (images, labels) pair: "
                    "pass batches as a DataLoader yields them"
                )
            x, y = batch[0].to(device), batch[1].to(device)
            if per_step:
                net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if per_step:
                imp.update(net)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------------
# Pruning


def _check_arguments(
    ratio: float | None,
    target_flops: float | None,
    importance: str,
    scoring_batches: Any,
    beta: float,
    saliency: str,
    round_to: int,
    heads: bool,
    mlp: bool,
    image_size: int,
) -> None:
    """A guard for direct callers: the prune stage has already checked the config these come from."""
    if (ratio is None) == (target_flops is None):
        raise ValueError(
            "prune_vit needs exactly one of ratio (fraction of heads and MLP channels to remove, in (0, 1)) "
            f"and target_flops (FLOPs per image to reach); got ratio={ratio}, target_flops={target_flops}"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ValueError(f"ratio={ratio} must lie strictly between 0 and 1 (e.g. 0.3 removes 30%)")
    if target_flops is not None and not (isinstance(target_flops, (int, float)) and target_flops > 0):
        raise ValueError(f"target_flops={target_flops} must be a positive number of FLOPs per image")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r} is not one of {IMPORTANCES}")
    _check_moving_average(beta, saliency)
    if importance != "magnitude" and scoring_batches is None:
        raise ValueError(
            f"importance={importance!r} needs gradients: pass scoring_batches (a few labelled "
            "training batches), or use importance='magnitude'"
        )
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to={round_to!r} must be a positive integer (1: no rounding)")
    if not (heads or mlp):
        raise ValueError("heads=False and mlp=False removes nothing: enable at least one")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer")


def prune_vit(
    net: nn.Module,
    *,
    ratio: float | None = None,
    target_flops: float | None = None,
    importance: str = "taylor",
    scoring_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    beta: float = 0.9,
    saliency: str = "taylor",
    round_to: int = 8,
    heads: bool = True,
    mlp: bool = True,
    image_size: int,
) -> nn.Module:
    """Remove whole attention heads and MLP hidden channels of a timm ViT in place; returns ``net``.

    Give ``ratio`` (fraction of heads and MLP channels removed in every block, in (0, 1)) or
    ``target_flops`` (FLOPs per image, attention counted, as ``patholite.models.count.count_flops``: the
    smallest uniform ratio that reaches it sets the heads, then the MLP keeps the most channels that fit).
    ``importance`` is ``"magnitude"``, ``"taylor"`` or ``"moving_average"`` (R1; ``beta``, ``saliency``);
    the last two need ``scoring_batches`` of (images, labels). MLP widths are multiples of ``round_to``.

    Raises ValueError for bad arguments, ConfigError for a network that cannot be pruned or a
    ``target_flops`` it cannot reach; ``net`` is left unchanged in both cases.
    """
    _check_arguments(
        ratio, target_flops, importance, scoring_batches, beta, saliency, round_to, heads, mlp, image_size
    )
    path, blocks = find_blocks(net)
    if target_flops is None:
        assert ratio is not None
        plan = _plan(blocks, ratio, ratio, heads, mlp, round_to)
    else:
        found = _search_plan(net, path, blocks, target_flops, heads, mlp, round_to, image_size)
        if found is None:
            warnings.warn(
                f"the network already costs at most target_flops={target_flops:.4g}; nothing pruned",
                stacklevel=2,
            )
            return net
        plan = found

    imp = _make_importance(importance, beta, saliency)
    was_training = net.training
    requires_grad = {name: p.requires_grad for name, p in net.named_parameters()}
    device = next(net.parameters()).device
    # Eval mode: dropout and drop-path would make the scores (and tracing) random.
    net.eval()
    try:
        if importance != "magnitude":
            for p in net.parameters():
                p.requires_grad_(True)
            if _score(net, scoring_batches, imp) == 0:
                raise ValueError(
                    f"scoring_batches yielded no batch; importance={importance!r} needs at least one"
                )
        _prune_with_plan(net, blocks, plan, imp, image_size, device)
    finally:
        net.zero_grad(set_to_none=True)
        for name, p in net.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        net.train(was_training)

    got = block_shapes(blocks)
    if got != plan:  # a Torch-Pruning change would show here, not as a silent wrong shape
        raise RuntimeError(f"pruning produced {got}, planned {plan}")
    return net


def _prune_with_plan(
    net: nn.Module,
    blocks: list[nn.Module],
    plan: list[dict[str, int]],
    imp: tp.importance.Importance,
    image_size: int,
    device: torch.device,
) -> None:
    """Let Torch-Pruning remove the lowest-importance heads/channels so each block matches ``plan``."""
    targets = {b.attn.qkv for b in blocks} | {b.mlp.fc1 for b in blocks}
    # Ignoring every other Linear/Conv makes the residual-stream group (patch embed, proj/fc2 outputs,
    # norms, position embedding) and the classifier unprunable: only the inner head and MLP dims move.
    ignored = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in targets]
    ratio_dict: dict[nn.Module, float] = {}
    head_ratio_dict: dict[nn.Module, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for block, shape in zip(blocks, plan, strict=True):
        attn, fc1 = block.attn, block.mlp.fc1
        num_heads[attn.qkv] = attn.num_heads
        removed = attn.num_heads - shape["num_heads"]
        if removed:
            # Torch-Pruning removes ceil(r * heads) heads; the -0.5 makes that exactly `removed`. Its head
            # pruning only runs inside a scope with a positive width ratio, hence the (otherwise unused,
            # prune_head_dims=False) 0.5 on qkv.
            head_ratio_dict[attn.qkv] = (removed - 0.5) / attn.num_heads
            ratio_dict[attn.qkv] = 0.5
        width = fc1.out_features
        if shape["mlp_hidden"] != width:
            # It keeps int(width * (1 - r)) channels; the +0.5 makes that exactly the planned width.
            ratio_dict[fc1] = 1.0 - (shape["mlp_hidden"] + 0.5) / width
    if not ratio_dict:
        return
    example = torch.zeros(1, _in_channels(net), image_size, image_size, device=device)
    with warnings.catch_warnings(), unfused_attention(net):
        # cls_token / pos_embed are "unwrapped parameters" on the residual stream, which stays whole.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            net,
            example,
            importance=imp,
            pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.0,
            head_pruning_ratio_dict=head_ratio_dict,
            round_to=None,  # widths are planned (and rounded) above
        )
        pruner.step()
    for block in blocks:
        set_heads(block.attn, pruner.num_heads[block.attn.qkv])


def _in_channels(net: nn.Module) -> int:
    """Image channels the network takes (its first Conv2d, the patch embedding), 3 when none is found."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3
