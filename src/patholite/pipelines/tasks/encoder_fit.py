"""How an encoder is trained without labels: it learns frozen encoders' embeddings of unlabelled tiles.

The ``feature_kd`` stage distils a student from its teachers this way; the encoders task fine-tunes a pruned,
low-rank or fake-quantized encoder the same way against the float encoder it came from (no labels needed).
The targets are each frozen encoder's embeddings of the clean tiles, computed once per encoder and tile set
and cached (``pipelines.embeddings``); the student sees the tiles augmented.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from patholite.compress.feature_kd import FeatureDistiller, HistologyAugment
from patholite.data.unlabelled import UnlabelledTiles, unlabelled_tiles
from patholite.models.encoder import embeddings
from patholite.modules.encoder import MONITOR, MONITOR_TRAIN, FeatureKdModule
from patholite.pipelines.context import RunContext
from patholite.pipelines.embeddings import cached_embeddings
from patholite.pipelines.fit import Fitted, fit


@dataclass
class FrozenEncoder:
    """An encoder whose embeddings are targets: its headless network, the normalisation its weights expect,
    the digest of its weights (its cache key) and how messages name it."""

    named: str
    model_name: str
    net: nn.Module
    mean: list[float]
    std: list[float]
    digest: str = field(default="")

    def __post_init__(self) -> None:
        self.digest = self.digest or weights_digest(self.net)


@dataclass
class Distilled:
    """A feature training's result: the fitted student, the distiller (its heads) and the per-teacher
    standardisation of the targets."""

    fitted: Fitted
    distiller: FeatureDistiller
    stats: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def weights_digest(net: nn.Module) -> str:
    """sha256 of a network's state dict (names, shapes, bytes): what its embeddings depend on."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        # reshape first: a 0-d buffer (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embedding_key(enc: FrozenEncoder, tiles_key: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any]:
    """What an encoder's cached embeddings depend on: its weights and input, which embeddings, the tiles."""
    return {
        "version": 1,
        "model": enc.model_name,
        "weights_sha256": enc.digest,
        "mean": enc.mean,
        "std": enc.std,
        "embeddings": list(kinds),
        "tiles": tiles_key,
    }


def encoder_compute(enc: FrozenEncoder, kinds: tuple[str, ...], device: Any):
    """uint8 tiles -> the encoder's named embeddings of them, clean (no augmentation)."""
    net = enc.net.to(device).eval()
    mean = torch.tensor(enc.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(enc.std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def compute(tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (tiles.to(device).float() / 255.0 - mean) / std
        pooled, patch = embeddings(net, x, enc.named)
        found = {"cls": pooled, "patch": patch}
        return {k: found[k].float().cpu() for k in kinds}

    return compute


class DistillTiles(Dataset):
    """Unlabelled tiles (``indices`` of ``tiles``) with each teacher's standardised embeddings as targets."""

    def __init__(
        self,
        tiles: Dataset,
        indices: list[int],
        targets: dict[str, dict[str, np.ndarray]],
        stats: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    ) -> None:
        self.tiles, self.indices, self.targets, self.stats = tiles, list(indices), targets, stats

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        index = self.indices[i]
        image, _ = self.tiles[index]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for t, per in self.targets.items():
            out[t] = {}
            for kind, values in per.items():
                mu, sd = self.stats[t][kind]
                out[t][kind] = torch.from_numpy((np.asarray(values[index], dtype=np.float32) - mu) / sd)
        return image, out


def standardisation(values: np.ndarray, rows: list[int], on: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over the training tiles (identity when ``on`` is false): teachers'
    embeddings differ in scale by orders of magnitude, and smooth-L1 would weigh them by it."""
    if not on:
        width = values.shape[1]
        return np.zeros(width, np.float32), np.ones(width, np.float32)
    sample = np.asarray(values[np.sort(np.asarray(rows))], dtype=np.float64)
    return sample.mean(0).astype(np.float32), (sample.std(0) + 1e-6).astype(np.float32)


def tile_source(ctx: RunContext) -> UnlabelledTiles:
    """The run's unlabelled tiles (``compression.feature_kd.tiles``) at the dataset's input size."""
    return unlabelled_tiles(
        ctx.cfg.compression.feature_kd.tiles,
        ctx.datamodule.splits["train"],
        int(ctx.cfg.dataset.image_size),
    )


def distil_features(
    ctx: RunContext,
    stage: str,
    student: nn.Module,
    student_dim: int,
    teachers: list[FrozenEncoder],
    epochs: int | None,
    lr: float,
    projection: str | None = None,
    standardize: bool | None = None,
    nested: list[int] | None = None,
    ema: DictConfig | None = None,
    patch: bool | None = None,
) -> Distilled:
    """Fit ``student`` to the teachers' embeddings of the run's unlabelled tiles (``compression.feature_kd``
    gives the tiles, losses and augmentations; the arguments what differs between distillation and a
    fine-tune: ``projection`` "identity" and ``standardize`` false match a same-width encoder directly)."""
    fk, d = ctx.cfg.compression.feature_kd, ctx.cfg.dataset
    tiles = tile_source(ctx)
    train_rows, val_rows = tiles.split(float(fk.tiles.val_fraction), int(fk.tiles.seed))
    standardize = bool(fk.standardize) if standardize is None else standardize
    patch = fk.patch_weight > 0 if patch is None else patch
    kinds = ("cls", "patch") if patch else ("cls",)
    targets, stats, dims = {}, {}, {}
    for i, enc in enumerate(teachers):
        key = f"t{i}"
        targets[key] = cached_embeddings(
            Path(ctx.cfg.paths.cache_dir),
            embedding_key(enc, tiles.key(), kinds),
            tiles,
            encoder_compute(enc, kinds, ctx.accelerator.device),
            batch_size=int(fk.teacher_batch_size),
            num_workers=int(d.num_workers),
            log_name=enc.named,
        )
        stats[key] = {k: standardisation(v, train_rows, standardize) for k, v in targets[key].items()}
        dims[key] = int(targets[key]["cls"].shape[1])
    distiller = FeatureDistiller(
        student,
        student_dim,
        dims,
        list(fk.nested if nested is None else nested),
        projection or fk.projection,
        patch=patch,
    )
    optim = {
        **ctx.plain("optim"),
        "lr": lr,
        "weight_decay": fk.weight_decay,
        "warmup_epochs": fk.warmup_epochs,
    }
    module = FeatureKdModule(
        distiller,
        d.mean,
        d.std,
        HistologyAugment(fk.augment.flips, fk.augment.rotate90, float(fk.augment.stain_sigma)),
        {
            "cosine_weight": fk.cosine_weight,
            "smooth_l1_weight": fk.smooth_l1_weight,
            "beta": fk.smooth_l1_beta,
            "patch_weight": fk.patch_weight,
        },
        optim,
    )
    data = L.LightningDataModule.from_datasets(
        train_dataset=DistillTiles(tiles, train_rows, targets, stats),
        val_dataset=DistillTiles(tiles, val_rows, targets, stats) if val_rows else None,
        batch_size=int(d.batch_size),
        num_workers=int(d.num_workers),
    )
    monitor = MONITOR if val_rows else MONITOR_TRAIN
    fitted = fit(ctx, module, stage, epochs, ema=ema, datamodule=data, monitor=monitor)
    return Distilled(fitted, distiller, stats)
