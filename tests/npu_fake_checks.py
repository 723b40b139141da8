"""The Ascend NPU path against a fake torch_npu: the device calls made, Lightning's wiring, clear errors.

Not collected by a plain ``pytest`` run: the fake renames torch's PrivateUse1 backend to ``npu`` (as
torch_npu does), which is permanent for the process and would make torch look for ``torch.npu`` in every
later test. ``test_accelerators_npu.py`` runs this file in its own pytest process."""

from __future__ import annotations

import subprocess
import sys
import types

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from patholite.accelerators import runtime
from patholite.accelerators.npu import NPUAccelerator, register
from patholite.accelerators.resolve import resolve_accelerator
from patholite.accelerators.runtime import sync_name, synchronize
from patholite.config.schema import AcceleratorConfig
from patholite.errors import AcceleratorError

from .conftest import REPO


def _cfg(**values):
    base = {"name": "npu", "accelerator": "npu", "devices": 1, "precision": "auto"}
    return OmegaConf.merge(OmegaConf.structured(AcceleratorConfig), {**base, **values})


@pytest.fixture
def fake_npu(monkeypatch):
    """What ``import torch_npu`` does, minus the hardware: a ``torch.npu`` device API that records its
    calls, and the ``npu`` device type (torch_npu renames torch's PrivateUse1 backend)."""
    calls: list[tuple] = []
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")  # once per process, as torch_npu does
    api = types.SimpleNamespace(
        count=2,
        set_device=lambda d: calls.append(("set_device", str(d))),
        synchronize=lambda d=None: calls.append(("synchronize", str(d))),
        memory_stats=lambda d=None: calls.append(("memory_stats", str(d))) or {"allocated_bytes.all.peak": 7},
        empty_cache=lambda: calls.append(("empty_cache",)),
    )
    api.device_count = lambda: api.count
    monkeypatch.setattr(torch, "npu", api, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    api.calls = calls
    return api


def test_resolves_to_the_npu_accelerator_with_fp16_mixed(fake_npu):
    resolved = resolve_accelerator(_cfg())
    assert resolved.kind == "npu" and resolved.device == torch.device("npu", 0)
    settings = resolved.trainer_kwargs()
    assert isinstance(settings["accelerator"], NPUAccelerator)
    (plugin,) = settings["plugins"]
    assert (plugin.precision, plugin.device) == ("16-mixed", "npu")
    assert resolved.precision == "16-mixed"  # resolved, as the trained-model cache keys it
    described = resolved.describe()
    assert described["accelerator"] == "NPUAccelerator" and described["plugins"] == [
        "MixedPrecision(16-mixed)"
    ]
    for _ in range(2):  # a teacher's Trainer, then its student's: each gets its own strategy
        trainer = L.Trainer(**resolved.trainer_kwargs(), logger=False, enable_checkpointing=False)
        assert isinstance(trainer.accelerator, NPUAccelerator)
        assert trainer.strategy.root_device == torch.device("npu", 0)  # not Lightning's CPU default
    full = resolve_accelerator(_cfg(precision="32-true"))
    assert full.lightning["precision"] == full.precision == "32-true"


def test_accelerator_makes_the_device_calls(fake_npu):
    accelerator = NPUAccelerator()
    accelerator.setup_device(torch.device("npu", 1))
    assert accelerator.get_device_stats(torch.device("npu", 1)) == {"allocated_bytes.all.peak": 7}
    accelerator.teardown()
    synchronize(torch.device("npu", 0))
    assert fake_npu.calls == [
        ("set_device", "npu:1"),
        ("memory_stats", "npu:1"),
        ("empty_cache",),
        ("synchronize", "npu:0"),
    ]
    assert sync_name(torch.device("npu", 0)) == "npu.synchronize"
    assert NPUAccelerator.auto_device_count() == 2 and NPUAccelerator.is_available()
    assert NPUAccelerator.parse_devices(2) == [0, 1]
    assert NPUAccelerator.parse_devices("auto") == [0, 1]
    assert NPUAccelerator.get_parallel_devices([0, 1]) == [torch.device("npu", 0), torch.device("npu", 1)]
    with pytest.raises(AcceleratorError, match="2 NPU"):
        NPUAccelerator.parse_devices([3])
    with pytest.raises(AcceleratorError, match="not an NPU"):
        accelerator.setup_device(torch.device("cpu"))


def test_registered_with_lightning_as_npu(fake_npu):
    from lightning.pytorch.accelerators import AcceleratorRegistry

    register()
    register()  # idempotent
    assert AcceleratorRegistry.get("npu").__class__ is NPUAccelerator


def test_no_device_and_too_many_devices(fake_npu):
    with pytest.raises(AcceleratorError, match="has 2 NPU"):
        resolve_accelerator(_cfg(devices=4))
    fake_npu.count = 0
    with pytest.raises(AcceleratorError, match="sees no NPU"):
        resolve_accelerator(_cfg())
    assert not NPUAccelerator.is_available()


def test_missing_torch_npu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # an import of it raises ImportError
    with pytest.raises(AcceleratorError) as err:
        resolve_accelerator(_cfg())
    assert "patholite[npu]" in str(err.value) and "CANN" in str(err.value)


def test_torch_npu_without_cann_says_so(monkeypatch):
    def broken(name):
        raise OSError("libhccl.so: cannot open shared object file")

    monkeypatch.setattr(runtime.importlib, "import_module", broken)
    with pytest.raises(AcceleratorError, match="cannot load.*libhccl.*CANN"):
        resolve_accelerator(_cfg())


def test_train_with_npu_on_this_machine_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "patholite.train", "accelerator=npu", "logger=none", "debug=fast"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PATHOLITE_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "AcceleratorError" in result.stderr and "patholite[npu]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
