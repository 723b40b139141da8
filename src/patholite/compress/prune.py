"""Structured pruning of timm Vision Transformers: whole attention heads and MLP hidden channels.

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

A pruned network is rebuilt without pickled code from ``describe_structure`` (JSON) and its state dict
(safetensors): ``apply_structure(fresh_net, structure).load_state_dict(state, strict=True)``.
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

from patholite.errors import ConfigError
from patholite.models.count import count_flops, count_params, unfused_attention

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "taylor", "moving_average")
SALIENCIES = ("taylor", "grad")
STRUCTURE_FORMAT = "patholite.vit_structure"
STRUCTURE_VERSION = 1

# Binary-search steps on the ratio for a FLOPs target: 2**-14 is finer than one channel of any ViT MLP.
_SEARCH_STEPS = 14

__all__ = [
    "IMPORTANCES",
    "SALIENCIES",
    "MovingAverageImportance",
    "apply_structure",
    "describe_structure",
    "flops_and_params",
    "prune_vit",
]


# --------------------------------------------------------------------------------------------------------
# Finding and checking the transformer blocks


def _find_blocks(net: nn.Module) -> tuple[str, list[nn.Module]]:
    """The dotted path and the list of the network's ViT blocks (``net.blocks``, or a wrapped ViT's, such
    as ``PyramidViT.vit.blocks``). Raises ConfigError when there are none or they cannot be pruned."""
    for name, module in net.named_modules():
        blocks = getattr(module, "blocks", None)
        if (
            isinstance(blocks, (nn.Sequential, nn.ModuleList))
            and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks)
        ):
            path = f"{name}.blocks" if name else "blocks"
            for i, block in enumerate(blocks):
                _check_block(block, f"{path}.{i}")
            return path, list(blocks)
    raise ConfigError(
        f"{type(net).__name__} has no Vision Transformer blocks (a `.blocks` list whose items have `.attn` "
        "and `.mlp`): pruning removes attention heads and MLP channels of a timm VisionTransformer; "
        "choose a ViT model (e.g. deit_tiny) or disable pruning"
    )


def _check_block(block: nn.Module, where: str) -> None:
    attn, mlp = block.attn, block.mlp
    for owner, names in ((attn, ("qkv", "proj")), (mlp, ("fc1", "fc2"))):
        for n in names:
            if not isinstance(getattr(owner, n, None), nn.Linear):
                raise ConfigError(
                    f"{where}: expected a timm Attention (qkv, proj) and Mlp (fc1, fc2) made of nn.Linear; "
                    f"{type(owner).__name__}.{n} is missing or not nn.Linear. Only standard timm ViT blocks "
                    "can be pruned"
                )
    # timm before attn_dim reshapes the attention output to the input width, which breaks once heads go.
    if not all(hasattr(attn, a) for a in ("num_heads", "head_dim", "attn_dim")):
        raise ConfigError(
            f"{where}.attn ({type(attn).__name__}) lacks num_heads/head_dim/attn_dim: head pruning needs "
            "timm >= 1.0 Attention; upgrade timm"
        )
    if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise ConfigError(
            f"{where}.attn: qkv has {attn.qkv.out_features} outputs, not 3 x {attn.num_heads} heads x "
            f"{attn.head_dim}; only fused-qkv timm attention can be pruned"
        )
    extras = {
        "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        "scale_attn_norm": not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
        "gated attention": getattr(attn, "gate", None) is not None,
        "scale_mlp_norm": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        "gated MLP (fc1 wider than fc2's input)": mlp.fc1.out_features != mlp.fc2.in_features,
    }
    unsupported = [k for k, v in extras.items() if v]
    if unsupported:
        raise ConfigError(
            f"{where}: pruning does not support {', '.join(unsupported)}; use a plain timm ViT/DeiT "
            "or disable pruning"
        )


def _block_shapes(blocks: list[nn.Module]) -> list[dict[str, int]]:
    return [
        {
            "num_heads": int(b.attn.num_heads),
            "head_dim": int(b.attn.head_dim),
            "mlp_hidden": b.mlp.fc1.out_features,
        }
        for b in blocks
    ]


# --------------------------------------------------------------------------------------------------------
# Structure: describe, plan, apply


def describe_structure(net: nn.Module) -> dict[str, Any]:
    """JSON-serialisable shapes of every ViT block: what ``apply_structure`` needs to rebuild the network."""
    path, blocks = _find_blocks(net)
    return {
        "format": STRUCTURE_FORMAT,
        "version": STRUCTURE_VERSION,
        "blocks_path": path,
        "embed_dim": blocks[0].attn.qkv.in_features,
        "blocks": _block_shapes(blocks),
    }


def _check_structure(structure: Any, path: str, blocks: list[nn.Module]) -> list[dict[str, int]]:
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        raise ConfigError(
            f"the pruned-structure description is not a {STRUCTURE_FORMAT!r} dict (got "
            f"{type(structure).__name__}); give the JSON that describe_structure wrote beside the weights"
        )
    if structure.get("version") != STRUCTURE_VERSION:
        raise ConfigError(
            f"pruned-structure version {structure.get('version')!r} is not {STRUCTURE_VERSION}; "
            "re-export the pruned model with this patholite"
        )
    wanted = structure.get("blocks")
    if structure.get("blocks_path") != path or not isinstance(wanted, list) or len(wanted) != len(blocks):
        raise ConfigError(
            f"the pruned structure describes {len(wanted) if isinstance(wanted, list) else '?'} blocks at "
            f"{structure.get('blocks_path')!r}, but this network has {len(blocks)} at {path!r}: build the "
            "same model config (model=, image size, classes) the pruned model came from"
        )
    if structure.get("embed_dim") != blocks[0].attn.qkv.in_features:
        raise ConfigError(
            f"the pruned structure has embed_dim {structure.get('embed_dim')}, this network "
            f"{blocks[0].attn.qkv.in_features}: build the model config the pruned model came from"
        )
    for i, (shape, have) in enumerate(zip(wanted, _block_shapes(blocks), strict=True)):
        if (
            not isinstance(shape, dict)
            or set(shape) != set(have)
            or not all(isinstance(v, int) and v >= 1 for v in shape.values())
        ):
            raise ConfigError(
                f"pruned structure block {i}: {shape!r} is not {{num_heads, head_dim, mlp_hidden}}"
            )
        if shape["head_dim"] != have["head_dim"]:
            raise ConfigError(
                f"pruned structure block {i}: head_dim {shape['head_dim']} differs from the network's "
                f"{have['head_dim']}; only whole heads are pruned, so build the same model config"
            )
        if shape["num_heads"] > have["num_heads"] or shape["mlp_hidden"] > have["mlp_hidden"]:
            raise ConfigError(
                f"pruned structure block {i}: {shape['num_heads']} heads / {shape['mlp_hidden']} MLP "
                f"channels do not fit a block with {have['num_heads']} / {have['mlp_hidden']}: apply it to a "
                "fresh, unpruned network of the same model config"
            )
    return wanted


def _sliced_linear(layer: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Linear:
    """A new Linear holding the chosen rows/columns of ``layer`` (dtype, device and bias kept)."""
    weight = layer.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if out_idx is None else layer.bias.detach()[out_idx])
    new.weight.requires_grad_(layer.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def _reshape_block(block: nn.Module, num_heads: int, mlp_hidden: int) -> None:
    """Keep the first ``num_heads`` heads and ``mlp_hidden`` MLP channels (values are placeholders until a
    state dict is loaded; the shapes are what matters)."""
    attn, mlp = block.attn, block.mlp
    if num_heads != attn.num_heads:
        d, old_attn_dim = attn.head_dim, attn.attn_dim
        dev = attn.qkv.weight.device
        kept = torch.arange(num_heads * d, device=dev)
        # qkv rows are laid out [q | k | v], each num_heads x head_dim.
        qkv_rows = torch.cat([kept + i * old_attn_dim for i in range(3)])
        attn.qkv = _sliced_linear(attn.qkv, qkv_rows, None)
        attn.proj = _sliced_linear(attn.proj, None, kept)
        _set_heads(attn, num_heads)
    if mlp_hidden != mlp.fc1.out_features:
        kept = torch.arange(mlp_hidden, device=mlp.fc1.weight.device)
        mlp.fc1 = _sliced_linear(mlp.fc1, kept, None)
        mlp.fc2 = _sliced_linear(mlp.fc2, None, kept)


def _set_heads(attn: nn.Module, num_heads: int) -> None:
    # timm's forward reshapes qkv with num_heads/head_dim and the output with attn_dim: all three must agree
    # with the Linear shapes (head_dim, hence the softmax scale, is unchanged by whole-head pruning).
    attn.num_heads = num_heads
    attn.attn_dim = num_heads * attn.head_dim


def apply_structure(net: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Reshape a fresh network of the same config to ``structure`` (from ``describe_structure``), in place,
    so that the pruned state dict loads with ``strict=True``. Returns ``net``."""
    path, blocks = _find_blocks(net)
    wanted = _check_structure(structure, path, blocks)
    for block, shape in zip(blocks, wanted, strict=True):
        _reshape_block(block, shape["num_heads"], shape["mlp_hidden"])
    return net


def _plan(
    blocks: list[nn.Module], head_ratio: float, mlp_ratio: float, heads: bool, mlp: bool, round_to: int
) -> list[dict[str, int]]:
    """The per-block shapes that the ratios give (uniform per layer, see the module docstring)."""
    plan = []
    for shape in _block_shapes(blocks):
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
    device = next(net.parameters()).device
    return float(count_flops(net, image_size, device=device)["flops"]), count_params(net)


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

    def count(probe: nn.Module, device: torch.device | str) -> float:
        for block, shape in zip(probe.get_submodule(path), plan, strict=True):
            _reshape_block(block, shape["num_heads"], shape["mlp_hidden"])
        return float(count_flops(probe, image_size, device=device)["flops"])

    try:  # FLOPs depend on shapes only: the meta device counts a ViT-L without copying its weights.
        return count(_meta_copy(net), "meta")
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: count a real copy
        return count(copy.deepcopy(net), next(net.parameters()).device)


# --------------------------------------------------------------------------------------------------------
# Importance


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
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"beta={beta} must lie in [0, 1) (R1 moving-average decay; 0.9 is typical)")
        if saliency not in SALIENCIES:
            raise ConfigError(f"saliency={saliency!r} is not one of {SALIENCIES}")
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
                raise ConfigError(
                    f"scoring batch {n} is a {type(batch).__name__}, not an (images, labels) pair: pass "
                    "batches as a DataLoader yields them"
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


def _validate(
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
    if (ratio is None) == (target_flops is None):
        raise ConfigError(
            "pruning needs exactly one of ratio (fraction of heads and MLP channels to remove, in (0, 1)) "
            f"and target_flops (FLOPs per image to reach); got ratio={ratio}, target_flops={target_flops}"
        )
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ConfigError(f"pruning ratio={ratio} must lie strictly between 0 and 1 (e.g. 0.3 removes 30%)")
    if target_flops is not None and not (isinstance(target_flops, (int, float)) and target_flops > 0):
        raise ConfigError(f"target_flops={target_flops} must be a positive number of FLOPs per image")
    if importance not in IMPORTANCES:
        raise ConfigError(f"pruning importance={importance!r} is not one of {IMPORTANCES}")
    if saliency not in SALIENCIES:
        raise ConfigError(f"pruning saliency={saliency!r} is not one of {SALIENCIES}")
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"pruning beta={beta} must lie in [0, 1) (moving-average decay; 0.9 is typical)")
    if importance != "magnitude" and scoring_batches is None:
        raise ConfigError(
            f"pruning importance={importance!r} needs gradients: pass scoring_batches (a few labelled "
            "training batches), or use importance='magnitude'"
        )
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ConfigError(f"pruning round_to={round_to!r} must be a positive integer (1: no rounding)")
    if not (heads or mlp):
        raise ConfigError("pruning with heads=false and mlp=false removes nothing: enable at least one")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} must be a positive integer")


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
    ``target_flops`` (FLOPs per image, attention counted, as ``patholite.measure.cost.count_flops``: the
    smallest uniform ratio that reaches it sets the heads, then the MLP keeps the most channels that fit).
    ``importance`` is ``"magnitude"``, ``"taylor"`` or ``"moving_average"`` (R1; ``beta``, ``saliency``);
    the last two need ``scoring_batches`` of (images, labels). MLP widths are multiples of ``round_to``.
    """
    _validate(
        ratio, target_flops, importance, scoring_batches, beta, saliency, round_to, heads, mlp, image_size
    )
    path, blocks = _find_blocks(net)
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
                raise ConfigError(
                    f"scoring_batches yielded no batch; importance={importance!r} needs at least one"
                )
        _prune_with_plan(net, blocks, plan, imp, image_size, device)
    finally:
        net.zero_grad(set_to_none=True)
        for name, p in net.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        net.train(was_training)

    got = _block_shapes(blocks)
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
        _set_heads(block.attn, pruner.num_heads[block.attn.qkv])


def _in_channels(net: nn.Module) -> int:
    """Image channels the network takes (its first Conv2d, the patch embedding), 3 when none is found."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3
