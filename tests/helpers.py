"""Lightning callbacks that interrupt training the way a user or a scheduler would."""

from __future__ import annotations

import os
import signal

import lightning as L


class InterruptAt(L.Callback):
    """At global step ``step``: raise KeyboardInterrupt (Ctrl-C) or send this process SIGTERM (a kill)."""

    def __init__(self, step: int = 2, kind: str = "keyboard") -> None:
        self.step = step
        self.kind = kind

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt


def tiny_vit(img: int = 32, depth: int = 4, seed: int = 0):
    """A random micro ViT (timm, patch 4, width 64, 4 heads of 16 dims, 4 classes): 65 tokens at 32 px."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img,
        patch_size=4,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        num_classes=4,
    )


def csv_rows(path) -> list[dict]:
    """The rows of a CSV the slide engine wrote (tiles.csv, summary.csv) as dicts."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
