"""SMT, the Self-reform Multilayer Transformer (R3): a slide diagnosed from 1 + K + K^2 images.

Layer 1 classifies the slide's thumbnail; a focusing predictor scores each of its ``grid x grid`` patches and
the top-K patch regions are re-read from the slide at ``grid`` times the magnification (same ``image_size``)
as layer 2's inputs; likewise layer 2 -> layer 3, whose images give the slide's prediction.

``SMTNet`` holds one timm ViT per layer (patch size ``image_size // grid``: a ViT token is a focusing
patch) and ``layers - 1`` predictors; ``focusing_gradient`` is the predictors' training signal (see
``smt_focus``); ``predict_slide`` is the inference walk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import timm
import torch
from torch import nn

from patholite.accelerators.runtime import synchronize
from patholite.errors import ConfigError, SlideError
from patholite.models.smt_aggregate import ATTENTION, AttentionAggregate, check_aggregate
from patholite.wsi.region import Box, patch_box


class RegionSource(Protocol):
    def read(self, box: Box, size: int) -> np.ndarray: ...


class TissueSource(Protocol):
    def fractions(self, coords: np.ndarray, size0: float) -> np.ndarray: ...


ADAPTIVE = ("none", "spread", "margin")
READ_KEYS = ("top_k_max", "adaptive", "spread", "margin", "tissue_min")  # model.smt keys of ReadPolicy


@dataclass(frozen=True)
class ReadPolicy:
    """How many regions each image of a layer sends to the next (issue 19's adaptive reads).

    ``none``: ``top_k`` each. ``spread``: per image, the patches whose focusing score is within ``spread`` of
    its best, clipped to ``top_k``..``top_k_max`` (a flat score map, where the predictor cannot tell patches
    apart, reads more). ``margin``: per slide, every image reads ``top_k_max`` while the slide's positive
    probability after this layer (its most positive image) lies within ``margin`` of 0.5, else ``top_k``.
    ``tissue_min``: candidate patches whose tissue fraction (from the slide's low-resolution tissue mask) is
    below it are never read; an image then reads at most its tissue patches."""

    top_k: int = 4
    top_k_max: int | None = None  # None: top_k (no adaptive range)
    adaptive: str = "none"
    spread: float = 0.05
    margin: float = 0.25
    tissue_min: float = 0.0

    @property
    def k_max(self) -> int:
        return self.top_k if self.top_k_max is None else int(self.top_k_max)

    def max_reads(self, layers: int) -> int:
        """The most regions a walk of ``layers`` layers can read: 1 + K_max + ... + K_max^(layers-1)."""
        return sum(self.k_max**layer for layer in range(layers))

    def check(self, grid: int, prefix: str = "model.smt") -> ReadPolicy:
        """The policy if its knobs are consistent, else one ``ConfigError`` naming the key."""
        check_top_k(self.top_k, grid, key=f"{prefix}.top_k")
        if self.top_k_max is not None:
            check_top_k(self.top_k_max, grid, key=f"{prefix}.top_k_max")
            if self.top_k_max < self.top_k:
                raise ConfigError(
                    f"{prefix}.top_k_max={self.top_k_max} is below {prefix}.top_k={self.top_k}: the most "
                    "regions an image may read cannot be fewer than the least; set top_k_max >= "
                    f"{self.top_k} (or null for a fixed K)"
                )
        if self.adaptive not in ADAPTIVE:
            raise ConfigError(f"{prefix}.adaptive={self.adaptive!r}: use one of {list(ADAPTIVE)}")
        if self.adaptive != "none" and self.k_max == self.top_k:
            raise ConfigError(
                f"{prefix}.adaptive={self.adaptive} needs a range to adapt in: set {prefix}.top_k_max above "
                f"{prefix}.top_k={self.top_k}"
            )
        if not self.spread >= 0:
            raise ConfigError(f"{prefix}.spread={self.spread} must be >= 0 (focusing scores lie in 0..1)")
        if not 0 < self.margin <= 0.5:
            raise ConfigError(f"{prefix}.margin={self.margin} must lie in (0, 0.5] (a band around 0.5)")
        if not 0 <= self.tissue_min < 1:
            raise ConfigError(
                f"{prefix}.tissue_min={self.tissue_min} must lie in [0, 1): the least tissue fraction a "
                "candidate patch needs (0: every patch is a candidate)"
            )
        return self


def read_policy(smt: Any, top_k: int | None = None) -> ReadPolicy:
    """The ``ReadPolicy`` of a ``model.smt`` block (a dict or config node; absent keys: the defaults)."""
    get = smt.get
    default = ReadPolicy()
    return ReadPolicy(
        top_k=int(top_k if top_k is not None else get("top_k") or default.top_k),
        top_k_max=None if get("top_k_max") is None else int(get("top_k_max")),
        adaptive=str(get("adaptive") or "none"),
        spread=float(default.spread if get("spread") is None else get("spread")),
        margin=float(default.margin if get("margin") is None else get("margin")),
        tissue_min=float(get("tissue_min") or 0.0),
    )


def check_top_k(k: int, grid: int, key: str = "model.smt.top_k") -> int:
    """``k`` focused patches must exist in a ``grid x grid`` image (``key``: where K was set)."""
    if not 1 <= int(k) <= grid * grid:
        raise ConfigError(
            f"{key}={k}: each image has only {grid}x{grid}={grid * grid} patches; "
            f"choose 1 <= {key.rsplit('.', 1)[-1]} <= {grid * grid}"
        )
    return int(k)


def positive_classes(num_classes: int, negative_class: int = 0) -> list[int]:
    """Every class but the negative one (the slide is "positive" if it has any of them)."""
    return [c for c in range(num_classes) if c != negative_class]


class SMTNet(nn.Module):
    """``layers`` ViT encoders over ``image_size`` px images cut into ``grid x grid`` tokens, and
    ``layers - 1`` focusing predictors (MLP d -> d/2 -> 1 on each detached patch token)."""

    def __init__(
        self,
        encoder: dict[str, Any],
        num_classes: int,
        image_size: int,
        grid: int,
        layers: int = 3,
        top_k: int | None = None,
        aggregate: str = "mean",
    ) -> None:
        super().__init__()
        if grid < 1 or image_size % grid:
            raise ConfigError(
                f"model.smt.grid={grid} must divide model.smt.image_size={image_size} (patch size S/grid)"
            )
        if layers < 2:
            raise ConfigError(f"model.smt.layers={layers}: SMT needs at least 2 layers (R3 uses 3)")
        if num_classes < 2:
            raise ConfigError(f"SMT needs at least 2 classes (a negative and a positive), got {num_classes}")
        if top_k is not None:
            check_top_k(top_k, grid)
        self.num_classes, self.image_size, self.grid, self.layers = num_classes, image_size, grid, layers
        self.top_k = top_k
        kwargs = {
            **dict(encoder.get("kwargs") or {}),
            "img_size": image_size,
            "patch_size": image_size // grid,
            "class_token": True,
            "global_pool": "token",
        }
        try:
            self.encoders = nn.ModuleList(
                timm.create_model(encoder["timm_name"], pretrained=False, num_classes=num_classes, **kwargs)
                for _ in range(layers)
            )
        except (TypeError, RuntimeError, AssertionError, ValueError) as err:
            raise ConfigError(
                f"SMT: timm could not build {encoder['timm_name']!r} with {kwargs}: {err}"
            ) from err
        first = self.encoders[0]
        if not hasattr(first, "blocks") or not hasattr(first.blocks[0], "attn"):
            raise ConfigError(f"SMT needs a Vision Transformer encoder; {encoder['timm_name']} is not one")
        dim = first.num_features
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))
            for _ in range(layers - 1)
        )
        # the learned slide score (models.smt_aggregate), fitted after SMT trains; part of the weights
        self.aggregator = (
            AttentionAggregate(dim, num_classes) if check_aggregate(aggregate) == ATTENTION else None
        )
        if self.aggregator is not None:  # trained apart (fit_attention): SMT's optimizers and DDP skip it
            self.aggregator.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def encode(self, layer: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images (B x 3 x S x S) -> (logits B x C, class token B x d, patches B x grid^2 x d)."""
        enc = self.encoders[layer]
        tokens = enc.forward_features(images)
        cls = enc.forward_head(tokens, pre_logits=True)
        return enc.head(cls), cls, tokens[:, enc.num_prefix_tokens :]

    def focus(self, layer: int, patches: torch.Tensor) -> torch.Tensor:
        """Focus scores in (0, 1) per patch (B x grid^2); the encoder gets no gradient from them."""
        return torch.sigmoid(self.predictors[layer](patches.detach()).squeeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Layer 1's logits: to generic tools SMT is a classifier of thumbnails."""
        return self.encode(0, x)[0]


# ---------------------------------------------------------------------------------- focusing gradient
@contextmanager
def attention_probe(encoder: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within: the first block computes attention unfused and appends its weights (B x H x N x N, after
    softmax and attention dropout) to the yielded list."""
    attn = encoder.blocks[0].attn
    if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise ConfigError(f"SMT cannot read attention weights from {type(attn).__name__}; use a timm ViT")
    captured: list[torch.Tensor] = []
    fused = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()
        attn.fused_attn = fused


def attention_gradient(
    logits: torch.Tensor,
    attn: torch.Tensor,
    positive: Sequence[int],
    num_prefix_tokens: int = 1,
    retain_graph: bool = False,
) -> torch.Tensor:
    """d(sum over the batch of positive-class probabilities) / d(attention weights), summed over heads and
    queries, prefix (class token) columns dropped: B x grid^2. Samples do not interact (LayerNorm), so row b
    is image b's own gradient."""
    total = logits.float().softmax(-1)[:, list(positive)].sum()
    (grad,) = torch.autograd.grad(total, attn, retain_graph=retain_graph)
    return grad.sum(dim=(1, 2))[:, num_prefix_tokens:]


def focusing_gradient(net: SMTNet, layer: int, images: torch.Tensor, positive: Sequence[int]) -> torch.Tensor:
    """The raw focusing signal of ``images`` at ``layer`` (B x grid^2), from a forward pass of its own."""
    encoder = net.encoders[layer]
    with torch.enable_grad(), attention_probe(encoder) as captured:
        logits, _, _ = net.encode(layer, images.detach().requires_grad_(True))
    return attention_gradient(logits, captured[0], positive, encoder.num_prefix_tokens)


# ----------------------------------------------------------------------------------------- inference
def to_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) B x 3 x S x S -> normalised float."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def read_regions(
    readers: Sequence[RegionSource], owners: Sequence[int], boxes: Sequence[Box], size: int
) -> torch.Tensor:
    """One ``read`` per box (``readers[owners[i]]`` reads ``boxes[i]``): uint8 N x 3 x size x size."""
    arrays = []
    for owner, box in zip(owners, boxes, strict=True):
        image = np.asarray(readers[owner].read(box, size))
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise SlideError(
                f"a region read returned {image.dtype} {image.shape}, not uint8 ({size}, {size}, 3); "
                "the reader must render the box at the requested size"
            )
        arrays.append(image)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def patch_tissue(tissue: TissueSource, box: Box, grid: int) -> np.ndarray:
    """Tissue fraction (grid^2,) of each patch of ``box``, in ``patch_box``'s order (row-major)."""
    side = box.side / grid
    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))
    coords = np.stack([box.x + cols.ravel() * side, box.y + rows.ravel() * side], axis=1)
    return np.asarray(tissue.fractions(coords, side), dtype=np.float64)


def reads_per_image(
    policy: ReadPolicy,
    scores: torch.Tensor,
    allowed: torch.Tensor,
    positive: torch.Tensor,
    owners: Sequence[int],
) -> list[int]:
    """K of each image (B) under ``policy``: ``scores`` and ``allowed`` are B x grid^2 (focusing scores,
    candidate patches), ``positive`` (B,) each image's positive probability, ``owners`` its slide. At most
    the image's candidate count (possibly 0)."""
    lo, hi = policy.top_k, policy.k_max
    if policy.adaptive == "spread":
        masked = scores.masked_fill(~allowed, float("-inf"))
        best = masked.max(dim=1, keepdim=True).values
        close = ((masked >= best - policy.spread) & allowed).sum(1).tolist()
        ks = [min(hi, max(lo, int(c))) for c in close]
    elif policy.adaptive == "margin":
        slide_positive: dict[int, float] = {}
        for owner, p in zip(owners, positive.tolist(), strict=True):
            slide_positive[owner] = max(slide_positive.get(owner, 0.0), float(p))
        ks = [hi if abs(slide_positive[o] - 0.5) < policy.margin else lo for o in owners]
    else:
        ks = [lo] * len(owners)
    counts = allowed.sum(1).tolist()
    return [min(k, int(c)) for k, c in zip(ks, counts, strict=True)]


@torch.no_grad()
def focus_walk(
    net: SMTNet,
    thumbs: torch.Tensor,
    boxes: Sequence[Box],
    readers: Sequence[RegionSource],
    k: int,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int | None = None,
    policy: ReadPolicy | None = None,
    tissues: Sequence[TissueSource | None] | None = None,
    negative_class: int = 0,
) -> dict[str, Any]:
    """The inference walk of B slides whose thumbnails (uint8 B x 3 x S x S, showing ``boxes``) are given:
    reads B * (K + ... + K^(depth-1)) regions with a fixed K; under a ``policy`` (adaptive K, tissue-masked
    candidates) each image reads its own K (``tissues[b]``: slide b's tissue mask, needed when
    ``policy.tissue_min`` > 0). ``layers[l]`` holds ``owners`` (slide row per image), ``parents`` (index of
    the image of layer l-1 it was read from; None for thumbnails), ``boxes``, ``scores`` (the focus score
    that chose each box; None for thumbnails), ``probs`` and ``embeddings`` (class tokens)."""
    policy = (policy or ReadPolicy(top_k=k)).check(net.grid)
    depth = net.layers if depth is None else depth
    if not 1 <= depth <= net.layers:
        raise ConfigError(f"SMT walk depth {depth} must be in 1..{net.layers}")
    if policy.tissue_min > 0 and (tissues is None or len(tissues) != len(boxes) or None in tissues):
        raise ConfigError(
            f"model.smt.tissue_min={policy.tissue_min}: the walk needs each slide's tissue mask "
            "(one per slide)"
        )
    device = next(net.parameters()).device
    owners, current = list(range(len(boxes))), list(boxes)
    parents: list[int | None] = [None] * len(current)
    chosen: list[float | None] = [None] * len(current)
    images, layers = thumbs, []
    reads, read_s, model_s = 0, 0.0, 0.0
    for layer in range(depth):
        start = time.perf_counter()
        logits, cls, patches = net.encode(layer, to_input(images.to(device), mean, std))
        probs = logits.float().softmax(-1)
        scores = net.focus(layer, patches) if layer + 1 < depth else None
        synchronize(device)  # queued CUDA/NPU work finishes inside the model time it belongs to
        model_s += time.perf_counter() - start
        layers.append({"owners": owners, "parents": parents, "boxes": current, "scores": chosen,
                       "probs": probs.cpu(), "embeddings": cls.float().cpu()})  # fmt: skip
        if scores is None:
            break
        scores = scores.float().cpu()
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if policy.tissue_min > 0:
            fractions = np.stack(
                [patch_tissue(tissues[o], b, net.grid) for o, b in zip(owners, current, strict=True)]
            )
            allowed = torch.from_numpy(fractions >= policy.tissue_min)
        ks = reads_per_image(policy, scores, allowed, 1.0 - probs[:, negative_class].cpu(), owners)
        order = scores.masked_fill(~allowed, float("-inf")).argsort(dim=1, descending=True, stable=True)
        picks = [(j, i) for j, kj in enumerate(ks) for i in order[j, :kj].tolist()]
        if not picks:
            raise SlideError(
                f"SMT walk: no patch of layer {layer + 1} has a tissue fraction >= model.smt.tissue_min="
                f"{policy.tissue_min}; lower it"
            )
        owners = [owners[j] for j, _ in picks]
        parents = [j for j, _ in picks]
        chosen = [float(scores[j, i]) for j, i in picks]
        current = [patch_box(current[j], i, net.grid) for j, i in picks]
        start = time.perf_counter()
        images = read_regions(readers, owners, current, net.image_size)
        read_s += time.perf_counter() - start
        reads += len(current)
    return {"layers": layers, "reads": reads, "read_seconds": read_s, "model_seconds": model_s}


class BlankRegions:
    """A region source of black images: what ``warm_up`` walks instead of a slide."""

    def read(self, box: Box, size: int) -> np.ndarray:
        return np.zeros((size, size, 3), np.uint8)


def warm_up(net: SMTNet, k: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """One untimed walk of a blank slide (1 + K + ... images, the batch shapes a real walk runs) on the
    net's device, synchronised: the first timed slide then does not pay one-off start-up (the CUDA/NPU
    context, kernel selection and caching allocator; the CPU's thread pool and oneDNN primitives)."""
    side = float(net.image_size * net.grid ** (net.layers - 1))
    thumbs = torch.zeros(1, 3, net.image_size, net.image_size, dtype=torch.uint8)
    was_training = net.training
    net.eval()
    try:
        focus_walk(net, thumbs, [Box(0.0, 0.0, side)], [BlankRegions()], k, mean, std)
    finally:
        net.train(was_training)


def aggregate_slides(
    probs: torch.Tensor,
    owners: Sequence[int],
    n_slides: int,
    how: str = "mean",
    negative_class: int = 0,
    embeddings: torch.Tensor | None = None,
    aggregator: AttentionAggregate | None = None,
) -> torch.Tensor:
    """Slide probabilities (n_slides x C) from image probabilities: their ``mean``, (``max``) those of the
    slide's most positive image (lowest negative-class probability), or (``attention``) the learned head
    over the images' ``embeddings``."""
    check_aggregate(how)
    if how == ATTENTION and (aggregator is None or embeddings is None):
        raise ConfigError(
            "model.smt.aggregate=attention: this SMT network has no trained attention head; fit one "
            "(train with model.smt.aggregate=attention, or scripts/smt_attention.py on a trained run)"
        )
    owners_t = torch.as_tensor(list(owners), dtype=torch.long, device=probs.device)
    out = torch.zeros(n_slides, probs.shape[1], dtype=probs.dtype, device=probs.device)
    for s in range(n_slides):
        mine = owners_t == s
        if how == ATTENTION:
            out[s] = aggregator(embeddings[mine.to(embeddings.device)]).to(out)
        elif how == "mean":
            out[s] = probs[mine].mean(0)
        else:
            out[s] = probs[mine][probs[mine][:, negative_class].argmin()]
    return out


def slide_label(probs: torch.Tensor, negative_class: int, threshold: float | None = None) -> int:
    """The slide's call: the argmax, or with a ``threshold`` on the positive score (1 - p(negative)) the
    most probable positive class at or above it, else the negative class."""
    if threshold is None or math.isnan(threshold):
        return int(probs.argmax())
    if 1.0 - float(probs[negative_class]) < threshold:
        return int(negative_class)
    masked = probs.clone()
    masked[negative_class] = -1.0
    return int(masked.argmax())


def _as_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(image)) if isinstance(image, np.ndarray) else image
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 and t.shape[-1] == 3 else t


def predict_slide(
    net: SMTNet,
    reader: RegionSource,
    box: Box,
    k: int,
    mean: Sequence[float],
    std: Sequence[float],
    thumbnail: np.ndarray | torch.Tensor | None = None,
    depth: int | None = None,
    aggregate: str = "mean",
    negative_class: int = 0,
    policy: ReadPolicy | None = None,
    tissue: TissueSource | None = None,
) -> dict[str, Any]:
    """Diagnose one slide whose layer-1 region is ``box``.

    Reads 1 + K + ... + K^(depth-1) regions through ``reader.read`` (1 + K + K^2 for three layers), or one
    fewer when ``thumbnail`` (uint8 S x S x 3 or 3 x S x S, e.g. from the thumbnail cache) is given; under a
    ``policy`` (``ReadPolicy``: adaptive K, tissue-masked candidates from ``tissue``, the slide's mask) each
    image reads its own K. Returns ``probs`` (slide class probabilities from the deepest layer), ``label``
    (with ``aggregate=attention`` at the head's calibrated threshold), ``layers`` (per layer: ``boxes`` [x, y,
    side], ``parents``, ``scores`` (focus score that chose each box; None for the thumbnail), ``probs``),
    ``reads``, ``read_seconds`` and ``model_seconds``."""
    policy = (policy or ReadPolicy(top_k=k)).check(net.grid)
    check_aggregate(aggregate)
    reads, read_s = 0, 0.0
    if thumbnail is None:
        start = time.perf_counter()
        thumbs = read_regions([reader], [0], [box], net.image_size)
        read_s, reads = time.perf_counter() - start, 1
    else:
        thumbs = _as_chw(thumbnail).unsqueeze(0)
    was_training = net.training
    net.eval()
    try:
        walk = focus_walk(net, thumbs, [box], [reader], policy.top_k, mean, std, depth, policy,
                          [tissue], negative_class)  # fmt: skip
        last = walk["layers"][-1]
        head = getattr(net, "aggregator", None)
        with torch.no_grad():
            probs = aggregate_slides(last["probs"], last["owners"], 1, aggregate, negative_class,
                                     last["embeddings"], head)[0]  # fmt: skip
            threshold = float(head.threshold) if aggregate == ATTENTION else None
            attention = head.attention(last["embeddings"]).tolist() if aggregate == ATTENTION else None
    finally:
        net.train(was_training)
    return {
        "probs": probs.tolist(),
        "label": slide_label(probs, negative_class, threshold),
        "threshold": None if threshold is None or math.isnan(threshold) else threshold,
        "attention": attention,
        "layers": [
            {
                "boxes": [b.as_list() for b in rec["boxes"]],
                "parents": rec["parents"],
                "scores": rec["scores"],
                "probs": rec["probs"].tolist(),
            }
            for rec in walk["layers"]
        ],
        "embeddings": last["embeddings"],  # the last layer's class tokens (N x d): the attention head's bag
        "reads": reads + walk["reads"],
        "read_seconds": read_s + walk["read_seconds"],
        "model_seconds": walk["model_seconds"],
    }


def smt_from_config(cfg: dict[str, Any], num_classes: int) -> SMTNet:
    """``SMTNet`` of a ``family: smt`` model config (plain dict): encoders from ``timm_name``/``kwargs``,
    geometry from ``smt`` (``image_size``, ``grid``, ``layers``, ``top_k``)."""
    smt = cfg.get("smt")
    if not smt:
        raise ConfigError(
            f"model={cfg.get('name')}: family smt needs a model.smt block (image_size, grid, ...)"
        )
    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.get("drop_path_rate"):
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    return SMTNet(
        {"timm_name": cfg["timm_name"], "kwargs": kwargs},
        num_classes,
        image_size=int(smt["image_size"]),
        grid=int(smt["grid"]),
        layers=int(smt.get("layers", 3)),
        top_k=smt.get("top_k"),
        aggregate=str(smt.get("aggregate") or "mean"),
    )
