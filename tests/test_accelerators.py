"""Accelerators: the Ascend NPU path (in its own process: see npu_fake_checks.py), the CPU INT8 engine
choice, and sweeps that ask for hardware the machine lacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from patholite.accelerators.resolve import resolve_accelerator
from patholite.config.schema import AcceleratorConfig

from .conftest import REPO, run_cli


def test_npu_path_against_a_fake_torch_npu_in_its_own_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/npu_fake_checks.py"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 7, result.stdout[-2000:]


def test_cpu_int8_engine_follows_the_cpu():
    from patholite.accelerators.resolve import default_int8_engine

    assert default_int8_engine("x86_64") == "x86"
    assert default_int8_engine("aarch64") == "qnnpack" and default_int8_engine("arm64") == "qnnpack"
    cfg = OmegaConf.merge(OmegaConf.structured(AcceleratorConfig), {"name": "cpu", "int8_engine": "auto"})
    assert resolve_accelerator(cfg).int8_engine == default_int8_engine()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_sweep_over_present_and_absent_accelerators_finishes_the_present_ones(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "accelerator=cpu,gpu", "debug=fast", "logger=none", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 1  # a sweep with a failed job says so
    records = {i: json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)}
    assert records[0]["status"] == "ok" and records[0]["artifacts"]
    assert records[1]["status"] == "failed"
    assert "AcceleratorError" in records[1]["error"] and "no CUDA device" in records[1]["error"]
    assert not (sweep / "1" / "checkpoints").exists()  # refused before any training
    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["failed"] == 1
    assert [(j["status"], j["overrides"][0]) for j in summary["jobs"]] == [
        ("ok", "accelerator=cpu"),
        ("failed", "accelerator=gpu"),
    ]


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "hydra/launcher=submitit_local", "model=vit_micro,vit_nano", "debug=fast", "logger=none",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [r["config"]["model"]["name"] for r in records] == ["vit_micro", "vit_nano"]
    assert list((sweep / ".submitit").iterdir())  # the jobs went through submitit
    assert (sweep / "compare" / "compare.csv").is_file()


def test_slurm_launcher_defaults_compose(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min == 240
    assert launcher.additional_parameters.requeue is True  # sbatch --requeue: the job may requeue itself


def test_submitit_launcher_without_the_extra_says_what_to_install(monkeypatch):
    import importlib.util

    from patholite.errors import ConfigError
    from patholite.overrides import check_launcher

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "submitit" in name else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"patholite\[slurm\]"):
        check_launcher(["-m", "hydra/launcher=slurm", "model=deit_tiny"])
    check_launcher(["-m", "model=deit_tiny"])  # the default launcher needs nothing


def _fake_gpus(monkeypatch, capabilities: dict[int, tuple[int, int]]) -> None:
    """CUDA devices with these compute capabilities; torch's own bf16 check says yes (it counts emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[int(i or 0)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU{int(i or 0)}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(
    "devices, expected, named",
    [([0], "bf16-mixed", "native bf16 on cuda:0"), ([1], "16-mixed", "cuda:1 (GPU1, compute capability 7.0)"),
     ([0, 1], "16-mixed", "cuda:1 (GPU1, compute capability 7.0) has no native bf16")],
)  # fmt: skip
def test_auto_precision_is_bf16_only_where_every_gpu_in_use_has_it_natively(
    monkeypatch, devices, expected, named
):
    """An A100 (8.0) beside a V100 (7.0): torch.cuda.is_bf16_supported() says yes for both (emulation)."""
    _fake_gpus(monkeypatch, {0: (8, 0), 1: (7, 0)})
    cfg = OmegaConf.merge(
        OmegaConf.structured(AcceleratorConfig),
        {"name": "gpu", "accelerator": "gpu", "devices": devices, "precision": "auto"},
    )
    resolved = resolve_accelerator(cfg)
    assert resolved.lightning["precision"] == expected
    assert resolved.precision == expected  # what the trained-model cache keys (pipelines/cache.py)
    assert any(note.startswith(f"precision auto -> {expected}") and named in note for note in resolved.notes)
    # asked for explicitly, bf16 stays, and the record says it is emulated
    emulated = resolve_accelerator(OmegaConf.merge(cfg, {"precision": "bf16-mixed", "devices": [1]}))
    assert emulated.precision == "bf16-mixed" and "emulated" in " ".join(emulated.notes)
