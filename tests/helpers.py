"""Lightning callbacks that interrupt training the way a user or a scheduler would, or record what it starts
from; small models and CSV readers."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import lightning as L
import pytest


class InterruptAt(L.Callback):
    """At global step ``step``: raise KeyboardInterrupt (Ctrl-C) or send this process SIGTERM (a kill) or
    SIGUSR1 (SLURM's warning before a time limit)."""

    def __init__(self, step: int = 2, kind: str = "keyboard") -> None:
        self.step = step
        self.kind = kind

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind in ("sigterm", "sigusr1"):
            os.kill(os.getpid(), signal.SIGTERM if self.kind == "sigterm" else signal.SIGUSR1)
        else:
            raise KeyboardInterrupt


class RecordStart(L.Callback):
    """At ``on_train_start`` (after a resume has restored everything, before the first batch): save what
    training starts from to ``path`` with ``torch.save``: global step and epoch, the module's state_dict,
    every optimiser's and LR scheduler's state, the EMA callback's average and an SMT module's focusing
    memory (with its trained depth)."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import copy

        import torch

        from patholite.compress.ema import EmaCallback

        def plain(state):  # a deep CPU copy: later steps update these tensors in place
            return copy.deepcopy(
                {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            )

        ema = [cb for cb in trainer.callbacks if isinstance(cb, EmaCallback)]
        memory = getattr(pl_module, "memory", None)
        torch.save(
            {
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "state_dict": plain(pl_module.state_dict()),
                "optimizer_states": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
                "lr_schedulers": [
                    copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs
                ],
                "ema_state_dict": plain(ema[0].ema_net.state_dict()) if ema else None,
                "smt_focus_memory": copy.deepcopy(memory.state_dict()) if memory is not None else None,
                "smt_trained_depth": getattr(pl_module, "trained_depth", None),
            },
            self.path,
        )


@contextmanager
def one_thread():
    """Torch on one intra-op thread for the block: tiny models gain nothing from a second one, and on a busy
    2-core machine (or beside a DataLoader worker) the threads' contention makes them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def colour_task(n: int, seed: int, size: int = 32):
    """An easy 4-class task (a colour shift per class): a few steps give a classifier with real margins,
    which agreement tests of quantized models need (a random ViT's near-equal logits flip at any noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    for k in range(3):
        x[y == k, k] += 1.0
    x[y == 3] -= 1.0
    return x, y


def train_on_colour_task(net, batches: int, seed: int = 100, size: int = 32):
    """``net`` trained for ``batches`` AdamW steps of 32 images of ``colour_task``, in eval mode."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    x, y = colour_task(batches * 32, seed, size)
    net.train()
    for xb, yb in zip(x.split(32), y.split(32), strict=True):
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def module_on_one_thread():
    """``one_thread`` for a whole test module of tiny models (import it into the module)."""
    with one_thread():
        yield


MICRO_SMT = {"image_size": 32, "grid": 4, "top_k": 2, "layers": 3, "aggregate": "mean",
             "too_small": "upsample", "tissue_px": 512}  # fmt: skip


def micro_smt_and_tiles(root, classes: list[str]) -> tuple[tuple, tuple]:
    """An untrained micro SMT and micro ViT tile classifier (32-px tiles at 2 um/px), saved as artifacts
    under ``root`` and loaded as the slide engines load them: ``(smt, tile)``."""
    import torch
    from omegaconf import OmegaConf

    from patholite import artifacts as art
    from patholite.config.options import load_model_option
    from patholite.models.factory import create_network
    from patholite.slides.inference import load_classifier
    from patholite.slides.smt_inference import load_smt_model

    torch.manual_seed(0)
    smt_model = {"name": "smt", "family": "smt", "timm_name": "vit_tiny_patch16_224", "checkpoint": None,
                 "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "smt": MICRO_SMT}  # fmt: skip
    meta = {"model": smt_model, "class_names": classes, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "slide_model": True, "negative_class": classes[0], "tissue": {}}  # fmt: skip
    art.save_float_artifact(create_network(smt_model, 2, 32).eval(), root / "smt", meta)
    tile_model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    tile_meta = {"model": {**tile_model, "checkpoint": None}, "class_names": classes, "image_size": 32,
                 "mean": [0.5] * 3, "std": [0.25] * 3, "mpp": 2.0, "tile_size": 32}  # fmt: skip
    art.save_float_artifact(create_network(tile_model, 2, 32).eval(), root / "tiles", tile_meta)
    return load_smt_model(root / "smt"), load_classifier(root / "tiles")
