"""Image transforms: resize and normalise for evaluation; flips, 90-degree turns, colour and stain jitter
for training (tissue has no orientation, and stain intensity varies from lab to lab)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import v2

from patholite.data.stain_norm import StainNormalise

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) as optical densities of RGB.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class RandomRotate90(torch.nn.Module):
    """Rotate by a uniformly drawn multiple of 90 degrees."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


class StainJitter(torch.nn.Module):
    """Scale and shift each stain's optical density in HED space (Tellez et al.'s HED augmentation).

    Works on float images in [0, 1], CxHxW.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        od = -torch.log(image.clamp(min=1e-6)).permute(1, 2, 0) @ _HED_FROM_RGB  # HxWx3 stains
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        od = (od * alpha + beta).clamp(min=0)
        return torch.exp(-(od @ _RGB_FROM_HED)).permute(2, 0, 1).clamp(0, 1)


class ToTensorImage(torch.nn.Module):
    """HxWx3 uint8 array -> 3xHxW uint8 tensor."""

    def forward(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def build_transform(cfg, train: bool, stain_norm: Callable | None = None) -> v2.Compose:
    """The transform of one split for the dataset config ``cfg``; ``stain_norm``: a fitted classical stain
    normaliser (``data/stain_norm.py``), applied first, to every split."""
    steps: list[Callable] = [StainNormalise(stain_norm)] if stain_norm is not None else []
    steps += [
        ToTensorImage(),
        v2.Resize((cfg.image_size, cfg.image_size), antialias=True),
    ]
    aug = cfg.augment
    if train and aug.flips:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if train and aug.rotate90:
        steps.append(RandomRotate90())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and aug.stain_jitter > 0:
        steps.append(StainJitter(aug.stain_jitter))
    if train and aug.color_jitter > 0:
        s = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)))
    steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    return v2.Compose(steps)
