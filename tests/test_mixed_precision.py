"""Mixed precision: tiny trainings in bf16-mixed on the CPU (the classifier, the distiller with EMA, SMT),
SMT's gradient clipping under a gradient scaler (16-mixed, as on NPUs and CUDA), and the trained-model cache
keyed by the precision that ran."""

from __future__ import annotations

import types

import pytest
from hydra.core.global_hydra import GlobalHydra

from .conftest import FAST, job_config


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
