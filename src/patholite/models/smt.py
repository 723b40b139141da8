"""SMT, the Self-reform Multilayer Transformer (R3): a slide diagnosed from 1 + K + K^2 images.

Layer 1 classifies the slide's thumbnail; a focusing predictor scores each of its ``grid x grid`` patches and
the top-K patch regions are re-read from the slide at ``grid`` times the magnification (same ``image_size``)
as layer 2's inputs; likewise layer 2 -> layer 3, whose images give the slide's prediction.

``SMTNet`` holds one timm ViT per layer (patch size ``image_size // grid``: a ViT token is a focusing
patch) and ``layers - 1`` predictors; ``focusing_gradient`` is the predictors' training signal (see
``smt_focus``); ``predict_slide`` is the inference walk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import timm
import torch
from torch import nn

from patholite.accelerators.runtime import synchronize
from patholite.errors import ConfigError, SlideError
from patholite.wsi.region import Box, patch_box


class RegionSource(Protocol):
    def read(self, box: Box, size: int) -> np.ndarray: ...


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
) -> dict[str, Any]:
    """The inference walk of B slides whose thumbnails (uint8 B x 3 x S x S, showing ``boxes``) are given:
    reads B * (K + ... + K^(depth-1)) regions. ``layers[l]`` holds ``owners`` (slide row per image),
    ``boxes``, ``scores`` (the focus score that chose each box; None for thumbnails) and ``probs``."""
    check_top_k(k, net.grid)
    depth = net.layers if depth is None else depth
    if not 1 <= depth <= net.layers:
        raise ConfigError(f"SMT walk depth {depth} must be in 1..{net.layers}")
    device = next(net.parameters()).device
    owners, current = list(range(len(boxes))), list(boxes)
    chosen: list[float | None] = [None] * len(current)
    images, layers = thumbs, []
    reads, read_s, model_s = 0, 0.0, 0.0
    for layer in range(depth):
        start = time.perf_counter()
        logits, _, patches = net.encode(layer, to_input(images.to(device), mean, std))
        probs = logits.float().softmax(-1)
        scores = net.focus(layer, patches) if layer + 1 < depth else None
        synchronize(device)  # queued CUDA/NPU work finishes inside the model time it belongs to
        model_s += time.perf_counter() - start
        layers.append({"owners": owners, "boxes": current, "scores": chosen, "probs": probs.cpu()})
        if scores is None:
            break
        top = scores.float().topk(k, dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        owners = [owners[j] for j in range(len(current)) for _ in range(k)]
        chosen = [v for row in values for v in row]
        current = [patch_box(current[j], i, net.grid) for j, row in enumerate(indices) for i in row]
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
    probs: torch.Tensor, owners: Sequence[int], n_slides: int, how: str = "mean", negative_class: int = 0
) -> torch.Tensor:
    """Slide probabilities (n_slides x C) from image probabilities: their ``mean``, or (``max``) those of
    the slide's most positive image (lowest negative-class probability)."""
    if how not in ("mean", "max"):
        raise ConfigError(f"model.smt.aggregate={how!r}: use mean or max")
    owners_t = torch.as_tensor(list(owners), dtype=torch.long, device=probs.device)
    out = torch.zeros(n_slides, probs.shape[1], dtype=probs.dtype, device=probs.device)
    for s in range(n_slides):
        mine = probs[owners_t == s]
        out[s] = mine.mean(0) if how == "mean" else mine[mine[:, negative_class].argmin()]
    return out


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
) -> dict[str, Any]:
    """Diagnose one slide whose layer-1 region is ``box``.

    Reads 1 + K + ... + K^(depth-1) regions through ``reader.read`` (1 + K + K^2 for three layers), or one
    fewer when ``thumbnail`` (uint8 S x S x 3 or 3 x S x S, e.g. from the thumbnail cache) is given.
    Returns ``probs`` (slide class probabilities from the deepest layer), ``label``, ``layers`` (per layer:
    ``boxes`` [x, y, side], ``scores`` (focus score that chose each box; None for the thumbnail), ``probs``),
    ``reads``, ``read_seconds`` and ``model_seconds``."""
    check_top_k(k, net.grid)
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
        walk = focus_walk(net, thumbs, [box], [reader], k, mean, std, depth)
    finally:
        net.train(was_training)
    last = walk["layers"][-1]
    probs = aggregate_slides(last["probs"], last["owners"], 1, aggregate, negative_class)[0]
    return {
        "probs": probs.tolist(),
        "label": int(probs.argmax()),
        "layers": [
            {
                "boxes": [b.as_list() for b in rec["boxes"]],
                "scores": rec["scores"],
                "probs": rec["probs"].tolist(),
            }
            for rec in walk["layers"]
        ],
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
    )
