"""Every option of every group composes and validates; invalid values and combinations fail early, by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from patholite.config import check_config
from patholite.errors import AcceleratorError, ConfigError
from patholite.models.fits import check_model_fits
from patholite.pipelines.preflight import check_run, preflight
from patholite.train import CONF_DIR
from tests.conftest import compose_config

GROUPS = [
    "dataset",
    "model",
    "compression",
    "accelerator",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "bench",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path, monkeypatch):
    slide_model = group == "model" and option.startswith("smt")  # diagnoses slides: needs slide data
    extra = ["dataset=smt_synthetic"] if slide_model else []
    cfg = compose_config([f"{group}={option}", *extra], tmp_path, tmp_path / "cache")
    if group == "model" and cfg.model.hub:  # foundation models: loaded from a built hub cache in test_hub.py
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
            check_run(cfg)
        return
    # every check short of the data; an accelerator option is checked against this machine elsewhere
    check_config(cfg) if group == "accelerator" else check_run(cfg)
    if group == "model":
        check_model_fits(cfg.model, num_classes=4, image_size=64)
        assert cfg.model.name == option and cfg.model.pretrained is False
    if group == "dataset":
        assert cfg.dataset.name == option


def test_smt_needs_slides_and_sane_geometry(tmp_path):
    def cfg(*overrides):
        return compose_config(["model=smt_micro", "dataset=smt_synthetic", *overrides], tmp_path, tmp_path)

    check_run(cfg())
    with pytest.raises(ConfigError, match="dataset=synthetic has no slides"):
        check_run(cfg("dataset=synthetic"))
    with pytest.raises(ConfigError, match=r"top_k=65: K must lie in 1..grid\^2 = 64"):
        check_run(cfg("model.smt.top_k=65"))
    with pytest.raises(ConfigError, match="image_size=64 must be a multiple of model.smt.grid=6"):
        check_run(cfg("model.smt.grid=6"))
    with pytest.raises(ConfigError, match=r"the prune stage does not run on model=smt_micro \(slides\)"):
        check_run(cfg("compression=prune"))
    with pytest.raises(ConfigError, match="mixed does not run on model=smt_micro"):
        check_run(cfg("compression=ptq", "compression.ptq.methods=[mixed]"))
    with pytest.raises(ConfigError, match="EMA of SMT's weights is not built"):
        check_run(cfg("compression=ema"))
    with pytest.raises(ConfigError, match="learns from a float SMT teacher"):
        check_run(cfg("compression=kd", "compression.teacher.model=deit_small"))
    with pytest.raises(ConfigError, match="must share model.smt.image_size, grid and layers"):
        check_run(cfg("compression=kd", "compression.teacher.model=smt"))  # 256/16 against 64/8
    check_run(cfg("compression=kd", "compression.teacher.model=smt_micro"))
    with pytest.raises(ConfigError, match="model.smt.reform"):
        check_run(cfg("model.smt.reform=[ret,cls]"))
    with pytest.raises(ConfigError, match=r"start_epochs=\[0, 20, 50\] but trainer.max_epochs=10"):
        check_run(cfg("model.smt.start_epochs=[0,20,50]", "trainer.max_epochs=10"))
    check_run(cfg("compression=ptq"))
    check_run(cfg("compression=qat"))
    with pytest.raises(ConfigError, match="set model.smt.finetune_lr_scale instead"):
        check_run(cfg("compression=qat", "compression.qat.finetune.lr=0.001"))
    with pytest.raises(ConfigError, match="finetune_lr_scale=0.0 must be > 0"):
        check_run(cfg("compression=qat", "model.smt.finetune_lr_scale=0"))


@pytest.mark.parametrize("key", ["compression.ptq.engine", "compression.qat.engine"])
def test_the_old_int8_engine_keys_name_the_new_one(key, tmp_path):
    overrides = ["debug=fast", "compression=pdq", "compression.stages=[start,qat,ptq]", f"{key}=x86"]
    cfg = compose_config(overrides, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=f"{key}=x86: .* use accelerator.int8_engine=x86"):
        check_run(cfg)


def test_an_int8_engine_this_torch_lacks_is_refused_before_work(tmp_path):
    cfg = compose_config(["debug=fast", "compression=qat", "accelerator.int8_engine=x68"], tmp_path, tmp_path)
    with pytest.raises(AcceleratorError, match="accelerator.int8_engine=x68 is not supported"):
        check_run(cfg)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize(
    "override,key",
    [
        ("dataset.imagesize=64", "dataset.imagesize"),  # a typo
        ("trainer.max_epoch=3", "trainer.max_epoch"),
        ("model.kwarg.depth=2", "model.kwarg"),
        ("sed=1", "sed"),
    ],
)
def test_unknown_key_fails_naming_it(override, key, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override], tmp_path, tmp_path)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["dataset.image_size=big", "trainer.max_epochs=1.5", "optim.lr=fast", "dataset.batch_size=[1]"],
)
def test_wrong_type_fails_naming_the_key(override, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override], tmp_path, tmp_path)
    assert override.split("=")[0] in str(err.value) + str(err.value.__cause__)


def test_key_added_with_plus_is_caught_by_the_schema(tmp_path):
    cfg = compose_config(["+dataset.tile_sise=3"], tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="dataset.tile_sise"):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.pretrained=true", "model.checkpoint=/w.safetensors"], "both name weights"),
        (["model.hub=MahmoodLab/uni"], "model.hub"),
        (["dataset.val_fraction=0.6", "dataset.test_fraction=0.5"], "val_fraction"),
        (["dataset.batch_size=0"], "dataset.batch_size"),
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["logger.wandb.mode=cloud"], "logger.wandb.mode"),
        (["callbacks.progress_bar=fancy"], "callbacks.progress_bar"),
        (["bench.batch_sizes=[]"], "bench.batch_sizes"),
        (["resume=/a", "rerun=/b"], "exclude"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch"),
        (["+bench.iter=3"], "bench.iter"),
        (["+seedx=1"], "seedx"),
        (["callbacks.monitor=val/f1"], "callbacks.monitor"),
        (["dataset.eval_batch_size=0"], "eval_batch_size"),
        (["dataset.max_samples_per_split=0"], "max_samples_per_split"),
        (["dataset.name=svs"], "dataset.name"),
    ],
)
def test_invalid_values_fail_with_config_error(overrides, match, tmp_path):
    cfg = compose_config(overrides, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=vit_micro", "dataset.image_size=30"], "not a multiple of vit_micro's patch size 4"),
        (["model=deit_tiny", "dataset.image_size=40"], "patch size 16"),
        (["model=resnet18", "dataset.image_size=16"], "must be >= 32"),
        (["model=vit_mini", "model.num_classes=7"], "model.num_classes=7 but the dataset has 4"),
        (["model=resnet18", "model.pyramid.enabled=true"], "needs a Vision Transformer"),
        (["+model.kwargs.img_size=64"], "dataset.image_size"),
        (["compression.stages=[magic]"], "compression.stages"),
    ],
)
def test_impossible_combinations_fail_before_training(overrides, match, tmp_path):
    cfg = compose_config(["debug=fast", *overrides], tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match=match):
        preflight(cfg)


def test_checkpoint_with_other_class_count_fails_unless_head_skipped(tmp_path):
    from patholite.models import build_model

    net = build_model(
        {
            "name": "vit_micro",
            "timm_name": "vit_tiny_patch16_224",
            "family": "vit",
            "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
        },
        7,
        32,
    )
    ckpt = tmp_path / "seven.pth"
    torch.save(net.state_dict(), ckpt)
    cfg = compose_config(
        ["debug=fast", "model=vit_micro", f"model.checkpoint={ckpt}"], tmp_path, tmp_path / "c"
    )
    with pytest.raises(ConfigError, match="7-class head but the dataset has 4 classes.*checkpoint_skip_head"):
        preflight(cfg)
    cfg = compose_config(
        ["debug=fast", "model=vit_micro", f"model.checkpoint={ckpt}", "model.checkpoint_skip_head=true"],
        tmp_path,
        tmp_path / "c",
    )
    preflight(cfg)


def test_more_cpu_processes_than_cores_fail_before_training(tmp_path):
    n = (os.cpu_count() or 1) + 1
    cfg = compose_config(["debug=fast", f"accelerator.devices={n}"], tmp_path, tmp_path / "cache")
    with pytest.raises(AcceleratorError, match=f"accelerator.devices={n} but this machine has .* CPU cores"):
        preflight(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_without_cuda_fails_before_training(tmp_path):
    cfg = compose_config(["debug=fast", "accelerator=gpu"], tmp_path, tmp_path / "cache")
    with pytest.raises(AcceleratorError, match="no CUDA device.*accelerator=cpu"):
        preflight(cfg)


def test_auto_accelerator_records_its_pick(tmp_path):
    cfg = compose_config(["debug=fast", "accelerator=auto"], tmp_path, tmp_path / "cache")
    accel = preflight(cfg).accelerator
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert accel.kind == expected
    assert f"auto picked {expected}" in accel.describe()["notes"]


def test_debug_fast_makes_any_run_tiny(tmp_path):
    cfg = compose_config(["debug=fast", "experiment=demo"], tmp_path, tmp_path)
    assert cfg.trainer.max_epochs == 1 and cfg.dataset.image_size == 32
    assert cfg.dataset.max_samples_per_split <= 64 and cfg.trainer.limit_train_batches <= 8


def test_gpu_resolution_picks_bf16_where_supported(monkeypatch):
    from omegaconf import OmegaConf

    from patholite.accelerators.resolve import resolve_accelerator
    from patholite.config.schema import AcceleratorConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = OmegaConf.structured(AcceleratorConfig(name="gpu", accelerator="gpu", precision="auto", devices=1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    for capability, expected in (((8, 0), "bf16-mixed"), ((7, 0), "16-mixed")):  # native bf16 from Ampere on
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0, c=capability: c)
        resolved = resolve_accelerator(cfg)
        assert resolved.lightning["precision"] == expected and resolved.device == torch.device("cuda", 0)
    cfg.devices = 3
    with pytest.raises(AcceleratorError, match="devices=3 but this machine has 2"):
        resolve_accelerator(cfg)
    cfg.devices = [0, 5]
    with pytest.raises(AcceleratorError, match=r"has 2 CUDA device\(s\) \(ids 0-1\)"):
        resolve_accelerator(cfg)
    for devices in (2, "auto", [0, 1]):  # several GPUs: DDP in spawned processes over NCCL
        cfg.devices = devices
        resolved = resolve_accelerator(cfg)
        strategy = resolved.trainer_kwargs()["strategy"]
        assert resolved.world_size == 2 and resolved.lightning["devices"] == [0, 1]
        assert strategy._start_method == "spawn" and strategy.process_group_backend == "nccl"


def test_bench_presets_carry_the_protocols(tmp_path):
    quick = compose_config([], tmp_path, tmp_path).bench
    assert (quick.warmup, quick.iters, quick.repeats, list(quick.batch_sizes)) == (10, 30, 3, [1, 8, 32])
    paper = compose_config(["bench=paper"], tmp_path, tmp_path).bench
    assert (paper.warmup, paper.iters, paper.repeats) == (50, 100, 5)  # R2's CPU protocol
    fast = compose_config(["debug=fast", "bench=paper"], tmp_path, tmp_path).bench
    assert fast.iters <= 5  # debug=fast keeps any run tiny
