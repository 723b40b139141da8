"""Mixed precision: tiny trainings in bf16-mixed on the CPU (the classifier, the distiller with EMA, SMT),
SMT's gradient clipping under a gradient scaler (16-mixed, as on NPUs and CUDA), and the trained-model cache
keyed by the precision that ran."""

from __future__ import annotations

import copy
import math
import types

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import DataLoader

from .conftest import FAST, job_config

MICRO = {
    "name": "vit_micro",
    "timm_name": "vit_tiny_patch16_224",
    "family": "vit",
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
}


@pytest.fixture
def cfg_of(tmp_path):
    def make(*overrides: str):
        return job_config([*FAST, *overrides], tmp_path / "run", tmp_path / "cache")

    yield make
    GlobalHydra.instance().clear()


def test_the_cache_key_holds_the_precision_that_ran(cfg_of, monkeypatch):
    from patholite.pipelines import cache

    gpu = cfg_of("accelerator=gpu")
    assert gpu.accelerator.precision == "auto"
    bf16, fp16 = (cache.cache_inputs(gpu, gpu.model, precision=p) for p in ("bf16-mixed", "16-mixed"))
    assert (bf16["precision"], fp16["precision"]) == ("bf16-mixed", "16-mixed")
    assert cache.cache_key(bf16) != cache.cache_key(fp16)  # a bf16 GPU teacher is not an fp16 NPU teacher
    # entries made before keep their keys: auto in full precision (the CPU's), and any explicit precision
    cpu_auto = cfg_of("accelerator=auto")
    assert cache.cache_inputs(cpu_auto, cpu_auto.model, precision="32-true")["precision"] == "auto"
    explicit = cfg_of("accelerator=cpu")
    assert cache.cache_inputs(explicit, explicit.model, precision="32-true") == cache.cache_inputs(
        explicit, explicit.model
    )

    # trained_plain keys the entry with the run's resolved accelerator
    entries = []
    monkeypatch.setattr(cache, "_train_into", lambda ctx, model_cfg, entry, *a: entries.append(entry.name))
    for precision in ("bf16-mixed", "16-mixed"):
        accelerator = types.SimpleNamespace(world_size=1, precision=precision)
        ctx = types.SimpleNamespace(cfg=gpu, accelerator=accelerator)
        cache.trained_plain(ctx, gpu.model, "teacher", train=lambda c: None)
    assert len(set(entries)) == 2


# ------------------------------------------------------------------------------------ tiny trainings
def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def _tiles(n_batches: int, seed: int = 0) -> DataLoader:
    """The same batch of 8 random 16-px tiles, ``n_batches`` times: the loss must fall on it."""
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 4
    return DataLoader([(images, labels)] * n_batches, batch_size=None)


OPTIM = {"lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_epochs": 0.0, "min_lr_ratio": 1.0}
CLASSES = ["a", "b", "c", "d"]


def _output_dtypes(layer: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes ``layer`` computes in from now on (autocast runs a Linear in bf16)."""
    seen: set[torch.dtype] = set()
    layer.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    return seen


def _loss(net: torch.nn.Module, loader: DataLoader) -> float:
    images, labels = next(iter(loader))
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(images), labels))


def test_the_classifier_learns_in_bf16_mixed():
    from patholite.modules.classifier import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule(MICRO, CLASSES, 16, OPTIM)
    loader = _tiles(6)
    before = _loss(module.net, loader)
    trainer = _trainer(6, precision="bf16-mixed")
    losses, computed = [], _output_dtypes(module.net.head)
    module.on_train_batch_end = lambda out, *a: losses.append(out["loss"].item())
    trainer.fit(module, loader)
    assert trainer.precision == "bf16-mixed" and torch.bfloat16 in computed  # autocast ran the head
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    assert next(module.net.parameters()).dtype == torch.float32  # the weights stay float32
    assert _loss(module.net, loader) < 0.8 * before  # it learnt the batch


def test_the_distiller_with_ema_learns_in_bf16_mixed():
    from patholite.compress.distill import Distiller
    from patholite.compress.ema import EmaCallback
    from patholite.models.factory import build_model
    from patholite.modules.classifier import ClassifierModule

    torch.manual_seed(0)
    teacher, student = build_model(MICRO, 4, 16), build_model(MICRO, 4, 16)
    distiller = Distiller(student, teacher, alpha=0.5, levels=("logits", "features"),
                          student_blocks=[3], teacher_blocks=[3])  # fmt: skip
    module = ClassifierModule(MICRO, CLASSES, 16, OPTIM, distiller=distiller)
    ema = EmaCallback(decay=0.5, warmup=False)
    loader = _tiles(6)
    start = copy.deepcopy(student.state_dict())
    before = _loss(student, loader)
    trainer = _trainer(6, precision="bf16-mixed", callbacks=[ema])
    computed = _output_dtypes(student.head)
    trainer.fit(module, loader)
    assert torch.bfloat16 in computed
    assert _loss(student, loader) < before
    averaged = ema.ema_net.state_dict()
    assert all(v.dtype == start[k].dtype and torch.isfinite(v).all() for k, v in averaged.items())
    moved = [k for k, v in averaged.items() if not torch.equal(v, start[k])]
    assert moved and any(not torch.equal(averaged[k], student.state_dict()[k]) for k in moved)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


# ------------------------------------------------------------------------------------------------- SMT
def _smt(**kwargs):
    from patholite.modules.smt import SMTModule

    from .test_smt_model import MEAN, STD, FakeReader, smt_model_cfg

    torch.manual_seed(0)
    readers = {0: FakeReader(0), 1: FakeReader(1)}
    return SMTModule(smt_model_cfg(), ["Normal", "Tumor"], MEAN, STD, region_reader=readers.get, **kwargs)


def _slides(n_batches: int) -> DataLoader:
    from .test_smt_model import fake_batch

    return DataLoader([fake_batch(seed=0)] * n_batches, batch_size=None)


def test_smt_trains_in_bf16_mixed():
    module = _smt(gradient_clip_val=1.0)
    before = copy.deepcopy(module.net.state_dict())
    losses, computed = [], _output_dtypes(module.net.encoders[0].head)
    module.on_train_batch_end = lambda out, *a: losses.append(out["loss"].item())
    trainer = _trainer(2 * 3, precision="bf16-mixed")  # two optimiser steps per batch
    trainer.fit(module, _slides(3))
    assert torch.bfloat16 in computed and len(losses) == 3 and all(map(math.isfinite, losses))
    after = module.net.state_dict()
    for part in ("encoders.0.", "encoders.2.", "predictors.0.", "predictors.1."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    assert module.trained_depth == 3


def test_smt_clips_unscaled_gradients_and_updates_the_scaler_once_per_step(monkeypatch):
    """16-mixed (the NPU default, CUDA's 16-mixed) with a gradient scaler, here on the CPU: each optimiser's
    gradients are clipped after unscaling, and the scale moves once per backward, not once per optimiser."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    init, batches = 2.0**10, 3
    scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1)  # grows on every clean update
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        clipped.append((float(norm), scaler.get_scale()))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    module = _smt(gradient_clip_val=1.0)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    trainer = _trainer(2 * batches, plugins=[plugin])
    trainer.fit(module, _slides(batches))
    assert len(clipped) == 2 * batches  # each optimiser, each step
    # the norms clipped are the true ones: far below the scale they were multiplied by in backward
    assert all(norm < scale / 16 for norm, scale in clipped), clipped
    assert scaler.get_scale() == init * 2**batches  # one update per step: grown once per batch
