"""Measuring on a GPU or NPU without one: the timing and memory children on an NPU (a fake torch_npu, autoload
off), NVML's GPU behind CUDA_VISIBLE_DEVICES, FLOPs that do not depend on the device, the device's peak memory
beside the RSS, and parity references taken on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from patholite.config.schema import BenchConfig

from .conftest import REPO

MICRO_VIT = {
    "name": "vit_micro",
    "timm_name": "vit_tiny_patch16_224",
    "family": "vit",
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4},
}

# What ``import torch_npu`` does, minus the hardware (as tests/npu_fake_checks.py's fixture): the ``npu``
# device type and a ``torch.npu`` API that logs its calls. Tensors asked for on the NPU are made on the CPU,
# so an artifact really runs. Loaded only by child processes: the rename is permanent for a process.
FAKE_TORCH_NPU = """
import json, os, types
import torch
from torch.overrides import TorchFunctionMode

torch.utils.rename_privateuse1_backend("npu")
LOG = os.environ["FAKE_NPU_LOG"]


def _log(*call):
    with open(LOG, "a") as f:
        f.write(json.dumps([str(c) for c in call]) + "\\n")


def _cpu(value):
    if isinstance(value, torch.device) and value.type == "npu":
        return torch.device("cpu")
    if isinstance(value, str) and value.split(":")[0] == "npu":
        return "cpu"
    return value


class _OnTheCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:  # naming the device stays; only what is placed on it moves
            return func(*args, **(kwargs or {}))
        args = tuple(_cpu(a) for a in args)
        kwargs = {k: _cpu(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


_OnTheCpu().__enter__()
torch.npu = types.SimpleNamespace(
    device_count=lambda: 1,
    is_available=lambda: True,
    synchronize=lambda d=None: _log("synchronize", d),
    reset_peak_memory_stats=lambda d=None: _log("reset_peak_memory_stats", d),
    max_memory_allocated=lambda d=None: _log("max_memory_allocated", d) or 3 * 2**20,
)
_log("imported")
"""


def _fake_rapl(root: Path) -> Path:
    """A readable RAPL package zone: what an NPU's energy must never be read from."""
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("5\n")
    return root


def _micro_artifact(directory: Path) -> Path:
    from patholite.artifacts.torch_float import save_float_artifact
    from patholite.models.factory import create_network

    meta = {"model": MICRO_VIT, "class_names": ["a", "b"], "image_size": 16}
    save_float_artifact(create_network(MICRO_VIT, 2, 16), directory, meta)
    return directory


def test_the_timing_child_on_an_npu_with_autoload_off(tmp_path, monkeypatch):
    """The child imports torch_npu itself (the parent never did) and reads no RAPL for the NPU's energy."""
    from patholite.measure.timing import time_artifacts

    fake = tmp_path / "fake"
    (fake / "torch_npu").mkdir(parents=True)
    (fake / "torch_npu" / "__init__.py").write_text(FAKE_TORCH_NPU)
    log = tmp_path / "npu.log"
    path = os.pathsep.join([str(fake), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    monkeypatch.setenv("FAKE_NPU_LOG", str(log))
    monkeypatch.setenv("PATHOLITE_RAPL_ROOT", str(_fake_rapl(tmp_path / "rapl")))
    directory = _micro_artifact(tmp_path / "fp32")
    bench = OmegaConf.structured(BenchConfig(warmup=0, iters=2, repeats=1, batch_sizes=[2]))

    timing = time_artifacts([directory], 16, bench, "npu:0", timeout=120)
    assert timing["device"] == "npu:0" and timing["sync"] == "npu.synchronize"
    assert timing["energy_source"] is None and "RAPL" in timing["energy_absent_reason"]
    assert "energy_j_per_image" not in timing["artifacts"]["fp32"]
    assert set(timing["artifacts"]["fp32"]["latency_ms"]) == {"2"}
    assert json.loads(log.read_text().splitlines()[0]) == ["imported"]


# ---------------------------------------------------------------------------------------------- energy
def _fake_pynvml(monkeypatch, uuids: list[str], energy: bool = True) -> types.ModuleType:
    """pynvml over ``uuids`` (NVML's order, every GPU of the machine); handles are NVML indices."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(uuids)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    nvml.nvmlDeviceGetUUID = lambda h: uuids[h[1]].encode()  # older pynvml answers bytes

    def by_uuid(uuid: str):
        if uuid not in uuids:
            raise RuntimeError(f"NVML_ERROR_NOT_FOUND {uuid}")
        return ("handle", uuids.index(uuid))

    def energy_mj(handle):
        if not energy:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1000 * (1 + handle[1])

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy_mj
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


GPUS = ["GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2", "GPU-dddd-3"]


def test_nvml_reads_the_gpu_cuda_visible_devices_names(monkeypatch):
    from patholite.measure.energy import NvmlMeter, open_meter

    _fake_pynvml(monkeypatch, GPUS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # torch reports no UUID
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # as SLURM sets it: torch's cuda:1 is NVML's GPU 3
    assert NvmlMeter(1).handle == ("handle", 3) and NvmlMeter(1).joules() == 4.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,GPU-aaaa")  # UUIDs, or unique prefixes of them
    assert NvmlMeter(1).handle == ("handle", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-")
    meter, reason = open_meter("cuda", 0)
    assert meter is None and "matches 4" in reason
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert NvmlMeter(1).handle == ("handle", 1)


def test_nvml_finds_the_gpu_by_the_uuid_torch_reports(monkeypatch):
    from patholite.measure.energy import NvmlMeter

    _fake_pynvml(monkeypatch, GPUS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=["dddd-3", "bbbb-1"][i])
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # ignored: the UUID is exact
    assert NvmlMeter(0).handle == ("handle", 3) and NvmlMeter(1).handle == ("handle", 1)


def test_a_gpu_without_energy_counter_gets_no_meter_and_a_reason(monkeypatch):
    from patholite.measure.energy import open_meter

    _fake_pynvml(monkeypatch, GPUS, energy=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    meter, reason = open_meter("cuda", 0)  # refused here, not at the first read in the timing loop
    assert meter is None and "NOT_SUPPORTED" in reason
    monkeypatch.setitem(sys.modules, "pynvml", None)
    meter, reason = open_meter("cuda", 0)
    assert meter is None and "nvidia-ml-py" in reason


def test_an_npu_never_reads_rapl(tmp_path, monkeypatch):
    from patholite.measure.energy import open_meter

    monkeypatch.setenv("PATHOLITE_RAPL_ROOT", str(_fake_rapl(tmp_path)))
    assert open_meter("cpu")[0] is not None
    meter, reason = open_meter("npu", 0)
    assert meter is None and "npu" in reason and "RAPL" in reason


# ----------------------------------------------------------------------------------------------- FLOPs
def _micro_vit() -> nn.Module:
    from patholite.models.factory import create_network

    return create_network(MICRO_VIT, 2, 16).eval()


def test_flops_do_not_depend_on_the_device_the_model_lives_on():
    """A model off the CPU (meta here, CUDA on a GPU run: devices where torch's counter sees fused
    attention) counts as on the CPU, so a GPU run's float rows agree with its INT8 rows' float twins."""
    from patholite.compress.prune.search import _meta_copy
    from patholite.measure.evaluate import count_architecture
    from patholite.models.count import count_flops

    net = _micro_vit()
    on_cpu = count_flops(net, 16)
    assert on_cpu["flops_fused_uncounted"] < on_cpu["flops"]  # the CPU's counter misses fused attention
    elsewhere = _meta_copy(net)
    assert count_flops(elsewhere, 16) == on_cpu
    assert count_architecture(elsewhere, 16) == {"params": sum(p.numel() for p in net.parameters()), **on_cpu}
    assert all(t.is_meta for t in elsewhere.parameters())  # counted on a copy
    from patholite.models.count import count_unfused_flops  # what the pruning search counts with

    assert count_unfused_flops(elsewhere, 16) == count_unfused_flops(net, 16) == on_cpu["flops"]


# ---------------------------------------------------------------------------------------------- memory
def test_device_peak_memory_is_reset_and_read_on_a_gpu_and_absent_on_the_cpu(monkeypatch):
    from patholite.measure.devices import device_peak, reset_device_peak

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", str(d))))
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda d=None: calls.append(("peak", str(d))) or 2**21
    )
    gpu = torch.device("cuda", 1)
    reset_device_peak(gpu)
    assert device_peak(gpu) == {
        "device_peak_mb": 2.0,
        "device_peak_source": "torch.cuda.max_memory_allocated",
    }
    assert calls == [("reset", "cuda:1"), ("peak", "cuda:1")]
    reset_device_peak(torch.device("cpu"))
    cpu = device_peak(torch.device("cpu"))
    assert cpu["device_peak_mb"] is None and "peak_rss_mb" in cpu["device_peak_absent_reason"]
    assert len(calls) == 2


def test_memory_is_measured_in_a_child_on_the_runs_gpu(monkeypatch, tmp_path):
    """On a GPU run the memory child runs the artifact there (it used to report the job's host RSS)."""
    from patholite.measure import evaluate

    asked = {}

    def child(directory, batch, iters, image_size, device="cpu"):
        asked.update(device=device, batch=batch)
        return {"peak_rss_mb": 900.0, "device": device, "device_peak_mb": 120.0}

    monkeypatch.setattr(evaluate, "measure_in_child", child)
    bench = OmegaConf.structured(BenchConfig(batch_sizes=[1, 8], isolation="child"))
    measured = evaluate.measure_memory(tmp_path, 16, bench, torch.device("cuda", 0))
    assert asked == {"device": "cuda:0", "batch": 8}
    assert measured["peak_rss_mb"] == 900.0 and measured["memory"]["device_peak_mb"] == 120.0
    bench.isolation = "process"
    process = evaluate.measure_memory(tmp_path, 16, bench, "cpu")["memory"]
    assert process["method"] == "process" and process["device_peak_mb"] is None


class CudaOnTheCpu(TorchFunctionMode):
    """While active, what is placed on ``cuda`` is made on the CPU (naming the device still works)."""

    @staticmethod
    def _cpu(value):
        if isinstance(value, torch.device) and value.type == "cuda":
            return torch.device("cpu")
        return "cpu" if isinstance(value, str) and value.split(":")[0] == "cuda" else value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:
            return func(*args, **(kwargs or {}))
        args = tuple(self._cpu(a) for a in args)
        return func(*args, **{k: self._cpu(v) for k, v in (kwargs or {}).items()})


def test_the_memory_child_resets_and_reports_the_gpus_peak_beside_the_rss(tmp_path, monkeypatch):
    import argparse

    from patholite.measure import memory

    directory = _micro_artifact(tmp_path / "fp32")
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", str(d))))
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda d=None: calls.append(("peak", str(d))) or 2**21
    )
    loaded = memory.load_artifact
    monkeypatch.setattr(memory, "load_artifact", lambda d: calls.append(("load",)) or loaded(d))
    args = argparse.Namespace(directory=str(directory), batch=2, iters=1, image_size=16, device="cuda:0")
    with CudaOnTheCpu():
        measured = memory._child(args)
    assert calls == [("reset", "cuda:0"), ("load",), ("peak", "cuda:0")]  # reset before the weights load
    assert measured["device"] == "cuda:0" and measured["peak_rss_mb"] > 0
    assert measured["device_peak_mb"] == 2.0
    assert measured["device_peak_source"] == "torch.cuda.max_memory_allocated"

    calls.clear()
    measured = memory._child(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    assert calls == [("load",)] and measured["device"] == "cpu"
    assert measured["device_peak_mb"] is None and "CPU" in measured["device_peak_absent_reason"]


# ---------------------------------------------------------------------------------------------- parity
class RecordingNet(nn.Module):
    """Two logits per image; remembers the device of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device.type)
        return self.linear(x.mean(dim=(2, 3)))


def test_an_int8_rows_parity_reference_is_taken_on_the_cpu_on_a_gpu_run(tmp_path, monkeypatch):
    from patholite.pipelines.stages.base import Current, StageRun
    from patholite.pipelines.tasks import tiles

    images = torch.randn(6, 3, 4, 4)
    dm = types.SimpleNamespace(
        class_names=["a", "b"], test_dataloader=lambda: [(images, torch.zeros(6).long())]
    )
    ctx = types.SimpleNamespace(
        cfg=OmegaConf.create({"bench": {"isolation": "child"}, "dataset": {"image_size": 4}}),
        accelerator=types.SimpleNamespace(device=torch.device("cuda", 0)),
        datamodule=dm,
    )
    given = []

    def record(name, net, directory, files, loader, class_names, size, bench, device, source, reference, **_):
        given.append((name, str(device), reference))
        return types.SimpleNamespace(name=name, cost={"device": str(device)}), torch.zeros(6, 2)

    monkeypatch.setattr(tiles, "artifact_record", record)
    run = StageRun(ctx, tiles.TileTask())
    source_net = RecordingNet().eval()
    on_gpu = torch.full((6, 2), 99.0)  # what the float row's evaluation on the GPU returned
    source = Current("fp32", source_net, tmp_path, on_gpu, device="cuda:0")

    for name in ("int8_dynamic", "onnx_fp32"):
        run.record(name, nn.Identity(), tmp_path, [], source, cpu=True)
    run.record("pruned", nn.Identity(), tmp_path, [], source)  # a float row on the GPU: against the GPU's

    assert source_net.seen == ["cpu"]  # one pass on the CPU, kept for every CPU row
    with torch.inference_mode():
        expected = source_net(images)
    (_, int8_device, int8_ref), (_, _, onnx_ref), (_, pruned_device, pruned_ref) = given
    assert int8_device == "cpu" and torch.allclose(int8_ref, expected) and onnx_ref is int8_ref
    assert pruned_device == "cuda:0" and pruned_ref is on_gpu


def test_a_ddp_run_moves_what_the_driver_evaluated_back_to_the_cpu(tmp_path, monkeypatch):
    """Issue 20, 10a: the driver evaluates on the first device; before a later spawned fit (rank 0 on that
    device) the evaluated network goes back to the CPU, so the driver holds no GPU memory while it trains."""
    from patholite.pipelines.stages.base import StageRun
    from patholite.pipelines.tasks import tiles

    dm = types.SimpleNamespace(class_names=["a", "b"], test_dataloader=lambda: [])
    moved = []

    class Net(nn.Linear):
        def cpu(self):
            moved.append("cpu")
            return super().cpu()

    def record(name, *_, **__):
        return types.SimpleNamespace(name=name, cost={"device": "cuda:0"}), torch.zeros(1, 2)

    monkeypatch.setattr(tiles, "artifact_record", record)
    for world_size, expected in ((1, []), (2, ["cpu"])):
        moved.clear()
        ctx = types.SimpleNamespace(
            cfg=OmegaConf.create({"bench": {"isolation": "child"}, "dataset": {"image_size": 4}}),
            accelerator=types.SimpleNamespace(device=torch.device("cuda", 0), world_size=world_size),
            datamodule=dm,
        )
        StageRun(ctx, tiles.TileTask()).record("fp32", Net(2, 2), tmp_path, [])
        assert moved == expected


def test_the_memory_child_imports_no_lightning():
    """The memory child's RSS is the measurement: what it imports to load an artifact (any kind, SMT's
    included) is counted, so Lightning (about 80 MB) must stay out of it."""
    code = (
        "import sys, patholite.measure.memory, patholite.artifacts.load, patholite.measure.devices; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
