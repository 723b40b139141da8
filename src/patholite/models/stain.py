"""R1's learnable stain front-end: colour deconvolution with a learnable stain matrix and per-stain gains.

``StainFrontEnd`` takes the classifier's normalised input, undoes the normalisation, maps RGB to optical
density ``OD = -log10(max(I, 1e-6))`` (Beer-Lambert; the epsilon is skimage's), unmixes the stains with a
learnable 3x3 matrix (initialised to Ruifrok & Johnston's H&E/DAB deconvolution, ``skimage.color.
hed_from_rgb``), scales each stain's density by a learnable gain, re-renders the stains with the reference
stain vectors (``skimage.color.rgb_from_hed``) and returns the re-normalised RGB. Initialised, unmixing and
re-rendering are inverses and the gains are 1, so it is the identity on images (below the epsilon aside).
Trained, the unmixing learns the data's stain vectors and the gains their weights: the network sees tissue
re-rendered in the reference staining.

``attach_stain`` puts it in front of a network built by ``models/factory.py`` as the submodule ``stain``,
run by a forward pre-hook on the network's entry (a ViT's ``patch_embed``, a CNN's stem): every other key
of the state dict is unchanged (checkpoints and hub weights without a front-end still load), and every path
into the network (``forward``, ``forward_features``, torch.fx for QAT, the ONNX exporter) runs it. It has
no ``nn.Linear``/``nn.Conv2d``, so INT8 (dynamic quantization, QAT) leaves it float.

``model.stain=adaptive`` also adapts to each image, as stain normalisation does (a fixed matrix cannot: it
is the same for every image): after unmixing, each image's haematoxylin and eosin densities are divided by
a per-image density statistic and multiplied by the learnable gains (the per-stain target density), so an
image whose stains are uniformly denser or fainter (another lab's staining time, section thickness) maps to
the same output as the original. The statistic is ``mean(c+^2) / mean(c+)`` over the image's pixels
(``c+``: the density clipped at 0), the density-weighted mean density: scaling a stain's density by ``k``
scales it by ``k`` exactly, and background pixels (density 0) drop out of both means, so it does not depend
on how much of the tile is glass. It exports as ReduceMean (ONNX opset 17, OpenVINO), where a percentile
would need a sort or TopK of every pixel. The third channel (DAB or the H/E cross product, mostly noise in
H&E) is not adapted: dividing noise by its own scale would amplify it. A (near) blank image's statistic is
floored at ``ADAPT_FLOOR`` so its noise is not blown up. It is not the identity at initialisation (no
per-image normalisation can be): the gains start at ``ADAPT_TARGET``, the typical statistic of the synthetic
training tiles under Ruifrok's vectors, so a typical tile passes nearly unchanged (with other vectors the
typical statistic differs and the gains learn it). A hue shift (stain vectors turned) is not undone:
that needs the image's own stain directions (Macenko's eigen-analysis), left to ``dataset.stain_norm``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patholite.errors import ConfigError

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) as RGB optical densities, exactly the
# table skimage.color.rgb_from_hed holds (its rows are within 0.3% of unit length; custom vectors are
# normalised to unit length, as Ruifrok's procedure does).
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
STAIN_NAMES = ("haematoxylin", "eosin", "third")
OD_EPS = 1e-6  # skimage's floor on intensities before the logarithm
MAX_CONDITION = 100.0  # a stain matrix worse conditioned than this amplifies noise beyond use
MODES = ("learnable", "adaptive")
# adaptive mode: which stains are normalised per image (H and E, not the third), their initial target
# density (log10 OD; with Ruifrok's vectors the synthetic tiles' statistic at 32 px averaged 0.28 H, 0.11 E)
# and the floor on an image's statistic (those tiles' lowest was 0.065)
ADAPT_STAINS = (1.0, 1.0, 0.0)
ADAPT_TARGET = (0.25, 0.1, 1.0)
ADAPT_FLOOR = 0.02
# Where a network's pixels enter it, in the order tried: timm ViTs, ResNets, EfficientNet/MobileNet, ConvNeXt
_ENTRIES = ("patch_embed", "conv1", "conv_stem", "stem")


def stain_matrix(vectors: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """The 3x3 matrix whose rows are the stains' RGB optical densities (float64).

    ``vectors``: None for Ruifrok & Johnston's H&E/DAB table; else 2 or 3 RGB OD vectors (rows), each
    normalised to unit length; with 2 the third is their normalised cross product (the residual channel).
    A singular or near-singular matrix (condition number above ``MAX_CONDITION``) is refused: its
    unmixing would divide by nearly nothing."""
    if vectors is None:
        return RUIFROK_HED.copy()
    try:
        rows = np.asarray([[float(v) for v in row] for row in vectors], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"model.stain_vectors={vectors!r} must be 2 or 3 rows of 3 numbers (RGB optical densities)"
        ) from err
    if rows.ndim != 2 or rows.shape[1] != 3 or rows.shape[0] not in (2, 3):
        raise ConfigError(
            f"model.stain_vectors has shape {rows.shape}; give 2 or 3 rows of 3 numbers, e.g. "
            "[[0.65,0.70,0.29],[0.07,0.99,0.11]] (haematoxylin, eosin; the third is their cross product)"
        )
    norms = np.linalg.norm(rows, axis=1)
    if not np.all(np.isfinite(rows)) or np.any(norms < 1e-8):
        raise ConfigError(
            f"model.stain_vectors={rows.tolist()}: every stain vector must be finite and non-zero"
        )
    rows = rows / norms[:, None]
    if len(rows) == 2:
        third = np.cross(rows[0], rows[1])
        if np.linalg.norm(third) < 1e-8:
            raise ConfigError(
                f"model.stain_vectors={vectors!r}: the two stain vectors are parallel, so the stains cannot "
                "be told apart; give two different stain colours"
            )
        rows = np.vstack([rows, third / np.linalg.norm(third)])
    cond = float(np.linalg.cond(rows))
    if not math.isfinite(cond) or cond > MAX_CONDITION:
        raise ConfigError(
            f"model.stain_vectors={vectors!r} make a singular stain matrix (condition number "
            f"{cond:.3g} > {MAX_CONDITION:g}): two stains are (nearly) the same colour, or the third lies "
            "in their plane; give distinct stain vectors, or model.stain_vectors=null for Ruifrok's H&E/DAB"
        )
    return rows


class StainFrontEnd(nn.Module):
    """Normalised RGB in, normalised RGB out, through a learnable stain deconvolution (module docstring)."""

    def __init__(
        self,
        vectors: Sequence[Sequence[float]] | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        adaptive: bool = False,
    ) -> None:
        super().__init__()
        rgb_from_stain = stain_matrix(vectors)  # checked in float64 before any (maybe meta) tensor exists
        stain_from_rgb = np.linalg.inv(rgb_from_stain)
        self.adaptive = bool(adaptive)
        self.unmix = nn.Parameter(torch.tensor(stain_from_rgb, dtype=torch.float32))  # the learnable matrix
        # learnable per-stain gains; adaptive: the target density of each normalised stain
        self.gains = nn.Parameter(torch.tensor(ADAPT_TARGET if self.adaptive else (1.0, 1.0, 1.0)))
        self.register_buffer("adapt", torch.tensor(ADAPT_STAINS).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mix", torch.tensor(rgb_from_stain, dtype=torch.float32))  # reference stains
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, 3, 1, 1))

    def optical_density(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B,3,H,W) -> RGB optical density ``-log10(max(I, 1e-6))``."""
        return -torch.log10((x * self.std + self.mean).clamp(min=OD_EPS))

    def concentrations(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> stain densities (B,3,H,W), the learned unmixing (skimage's ``rgb2hed`` at
        initialisation, times ``-log10(1e-6) = 6``: skimage divides by ``ln 1e-6`` where this uses log10,
        and skimage also clips negatives to 0)."""
        return F.conv2d(self.optical_density(x), self.unmix.t()[:, :, None, None])

    def od_map(self) -> torch.Tensor:
        """The 3x3 map from RGB OD (rows) to re-rendered RGB OD: unmix, scale each stain, re-mix."""
        return (self.unmix * self.gains) @ self.mix  # scales column j, stain j (aten::diag has no ONNX op)

    def density_scale(self, conc: torch.Tensor) -> torch.Tensor:
        """Each image's per-stain density statistic (B,3,1,1): ``mean(c+^2) / mean(c+)``, floored at
        ``ADAPT_FLOOR`` (module docstring); scaling a stain's density by k scales it by k."""
        pos = conc.clamp(min=0)
        first = pos.mean(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        return ((pos * pos).mean(dim=(2, 3), keepdim=True) / first).clamp(min=ADAPT_FLOOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            conc = self.concentrations(x)
            # adapted stains: gain / statistic; the third: gain alone
            scale = self.adapt / self.density_scale(conc) + (1 - self.adapt)
            conc = conc * scale * self.gains.view(1, 3, 1, 1)
            od = F.conv2d(conc, self.mix.t()[:, :, None, None])
        else:
            od = F.conv2d(self.optical_density(x), self.od_map().t()[:, :, None, None])
        rgb = torch.pow(10.0, -od)
        return (rgb - self.mean) / self.std


def entry_module(net: nn.Module) -> nn.Module:
    """The submodule the network's pixels enter first (a ViT's patch embedding, a CNN's stem)."""
    for owner in (net, getattr(net, "vit", None)):  # PyramidViT keeps its ViT as ``vit``
        for name in _ENTRIES:
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, nn.Module):
                return module
    raise ConfigError(
        f"model.stain: cannot find where pixels enter {type(net).__name__} (none of {', '.join(_ENTRIES)}); "
        "the stain front-end supports timm ViTs and CNNs with one of those stems"
    )


def _wants_stain(model_cfg: Any) -> bool:
    """Whether ``model.stain`` asks for a front-end; an unknown mode or an SMT model is refused."""
    mode = model_cfg.get("stain")
    if mode is None:
        return False
    if mode not in MODES:
        raise ConfigError(f"model.stain={mode!r} is not one of {', '.join(MODES)} (or null: none)")
    if model_cfg.get("family") == "smt":
        raise ConfigError("model.stain is for tile classifiers; SMT (family smt) does not take it")
    return True


def _run_stain(stain: StainFrontEnd, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the entry module: the front-end first. Module-level (with ``functools.partial``)
    so the network still pickles (DDP spawn) and deep-copies (EMA, QAT) with its hook."""
    return (stain(args[0]), *args[1:])


def attach_stain(net: nn.Module, model_cfg: dict[str, Any]) -> nn.Module:
    """Put the stain front-end ``model_cfg`` asks for (``model.stain``) in front of ``net``; a no-op for
    none. The normalisation it undoes is ``model.mean``/``model.std`` (preflight sets the dataset's)."""
    if not _wants_stain(model_cfg):
        return net
    mean = model_cfg.get("mean") or (0.485, 0.456, 0.406)
    std = model_cfg.get("std") or (0.229, 0.224, 0.225)
    entry = entry_module(net)
    adaptive = model_cfg.get("stain") == "adaptive"
    net.stain = StainFrontEnd(model_cfg.get("stain_vectors"), mean, std, adaptive=adaptive)
    entry.register_forward_pre_hook(functools.partial(_run_stain, net.stain))
    return net


def prepare_stain(cfg: Any) -> None:
    """Preflight for ``model.stain``: the mode and the stain vectors are checked (a singular matrix fails
    here, before any work), and the normalisation the front-end undoes is pinned into the model config
    (``model.mean``/``model.std``, the dataset's after hub weights had their say), so every artifact's
    sidecar rebuilds the same front-end."""
    model = cfg.model
    if not _wants_stain(model):
        return
    stain_matrix(model.get("stain_vectors"))
    if model.get("mean") is None and model.get("std") is None:
        model.mean, model.std = list(cfg.dataset.mean), list(cfg.dataset.std)
