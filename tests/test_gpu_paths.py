"""GPU and NPU paths checked on the CPU (issue 20): which device each benchmarked artifact is timed and
recorded on with a CUDA accelerator, the slide engine's pinned, non-blocking host-to-device copies, the SMT
walk's warm-up and its device synchronisation, and ``scripts/gpu_check.py``'s choice of checks. No GPU is
used: CUDA availability is mocked and every decision is asserted before anything would move to a device."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite import artifacts as art
from patholite.compress.quantize import quantize_dynamic_int8
from patholite.config.options import load_model_option
from patholite.config.slide_schema import SlideRunConfig
from patholite.models import smt as smt_module
from patholite.models.factory import create_network
from patholite.records import read_record
from patholite.slides import engine, smt_inference
from patholite.slides.comparison_runs import walk_artifacts

from .conftest import REPO, job_config

CLASSES = ["Normal", "Tumor"]


# ------------------------------------------------------------------------------------------------ bench
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """vit_micro at 32 px as fp32, torch.ao dynamic INT8 and ONNX (float) artifacts."""
    root = tmp_path_factory.mktemp("gpu-bench")
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    meta = {"model": {**model, "checkpoint": None}, "class_names": CLASSES, "image_size": 32}
    torch.manual_seed(0)
    net = create_network(model, len(CLASSES), 32).eval()
    art.save_float_artifact(net, root / "fp32", meta)
    art.save_int8_dynamic_artifact(quantize_dynamic_int8(net), root / "int8_dynamic", meta, "x86")
    art.save_onnx_artifact(net, root / "onnx_fp32", meta)
    return {name: root / name for name in ("fp32", "int8_dynamic", "onnx_fp32")}


@pytest.fixture
def fake_cuda(monkeypatch):
    """One CUDA GPU as torch reports it, without one: enough for ``accelerator=gpu`` to resolve."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    props = types.SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)


def _fake_timing(calls: list):
    """``time_artifacts`` as the bench calls it, recording (device, artifact names) instead of timing."""

    def time_artifacts(directories, image_size, bench, device="cpu", timeout=3600):
        names = [Path(d).name for d in directories]
        calls.append((device, names))
        ratio = {"median": 1.0, "min": 1.0, "max": 1.0, "per_repeat": [1.0]}
        entry = {"latency_ms": {"1": {"p50": 1.0, "p90": 1.0}}, "throughput_ips": {"1": 1000.0},
                 "ratio_to_baseline": {"1": ratio}}  # fmt: skip
        return {"threads": 1, "device": device, "sync": "test", "energy_source": None,
                "energy_absent_reason": "test", "artifacts": {n: entry for n in names},
                "baseline": names[0]}  # fmt: skip

    return time_artifacts


def test_bench_on_gpu_times_int8_and_onnx_artifacts_on_the_cpu(artifacts, fake_cuda, tmp_path, monkeypatch):
    """``accelerator=gpu artifacts=[...]``: the float artifact is timed on cuda:0; torch.ao INT8 (no CUDA
    kernel) and ONNX Runtime (CPU provider) on the CPU with the float one as their baseline there, and each
    record names the device its model ran on."""
    import patholite.bench as bench

    calls: list = []
    monkeypatch.setattr(bench, "time_artifacts", _fake_timing(calls))
    dirs = ",".join(str(artifacts[n]) for n in ("fp32", "int8_dynamic", "onnx_fp32"))
    overrides = ["accelerator=gpu", f"artifacts=[{dirs}]", "image_size=32", "bench.isolation=process",
                 "bench.batch_sizes=[1]", "logger=none"]  # fmt: skip
    run_dir = tmp_path / "run"
    assert bench.run_bench(job_config(overrides, run_dir, tmp_path / "cache", "bench")) == "ok"
    assert calls == [("cuda:0", ["fp32"]), ("cpu", ["fp32", "int8_dynamic", "onnx_fp32"])]
    arts = {a["name"]: a["cost"] for a in read_record(run_dir)["artifacts"]}
    assert list(arts) == ["fp32", "int8_dynamic", "onnx_fp32"]
    assert arts["fp32"]["device"] == "cuda:0" and "note" not in arts["fp32"]["timing"]
    for name in ("int8_dynamic", "onnx_fp32"):
        timing = arts[name]["timing"]
        assert arts[name]["device"] == "cpu" and timing["baseline"] == "fp32"
        assert timing["timed_with"] == ["fp32", "int8_dynamic", "onnx_fp32"]
        assert "run on the CPU only" in timing["note"] and "cuda:0" in timing["note"]


def test_timing_groups_without_a_float_artifact_or_on_the_cpu():
    from patholite.bench import timing_groups

    dirs = [Path("a/int8_dynamic"), Path("b/onnx_fp32")]
    names = ["int8_dynamic", "onnx_fp32"]
    kinds = ["torch_int8_dynamic", "onnx"]
    (group,) = timing_groups(dirs, names, kinds, "cuda:0")
    assert (group.device, group.directories, group.measured) == ("cpu", dirs, dirs)
    assert "baseline" not in group.note and "float artifacts ran" not in group.note
    (cpu,) = timing_groups([Path("f"), *dirs], ["fp32", *names], ["torch_float", *kinds], "cpu")
    assert cpu.device == "cpu" and cpu.measured == [Path("f"), *dirs] and cpu.note is None


# ----------------------------------------------------------------------------------------- slide engine
def _spec() -> engine.TileSpec:
    coords = np.zeros((3, 2), np.int64)
    return engine.TileSpec("none.svs", coords, 32, 32, 32, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_tile_loader_pins_host_batches_for_cuda_only(device, pinned):
    assert engine._loader(engine.SlideTiles(_spec()), 2, 0, 2, device).pin_memory is pinned
    assert engine._loader(engine.SlideTiles(_spec()), 2, 1, 2, device).pin_memory is pinned


def test_normalise_copies_to_cuda_without_blocking():
    """The copy to the GPU is non-blocking (from the loader's pinned batch); on the CPU it is as before."""
    copies = []

    class HostBatch:
        def to(self, device, non_blocking=False):
            copies.append((device, non_blocking))
            return torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)  # stands for the batch on the device

    out = engine.Normalise((0.5,) * 3, (0.25,) * 3, "cuda:0")(HostBatch())  # touches no CUDA
    assert copies == [("cuda:0", True)]
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25
    engine.Normalise((0.5,) * 3, (0.25,) * 3, "cpu")(HostBatch())
    assert copies[-1] == ("cpu", False)


def test_stream_tiles_builds_its_loader_for_the_device(monkeypatch):
    asked = []
    monkeypatch.setattr(engine, "_loader", lambda *args: asked.append(args[-1]) or [])
    engine.stream_tiles(torch.nn.Identity(), _spec(), CLASSES, None, workers=1, device="cuda")
    assert asked == ["cuda"]


# ------------------------------------------------------------------------------------------------- SMT
SMT = {"image_size": 32, "grid": 4, "top_k": 2, "layers": 3, "aggregate": "mean", "too_small": "upsample"}
SMT_MODEL = {"name": "smt", "family": "smt", "timm_name": "vit_tiny_patch16_224", "checkpoint": None,
             "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "smt": SMT}  # fmt: skip
SMT_META = {"model": SMT_MODEL, "class_names": CLASSES, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "slide_model": True, "negative_class": "Normal"}  # fmt: skip


@pytest.fixture
def smt_net():
    """A tiny SMT network whose ``encode`` calls are logged in ``net.events``."""
    torch.manual_seed(0)
    net = create_network(SMT_MODEL, len(CLASSES), 32).eval()
    net.events = []
    encode = net.encode

    def logged(layer, images):
        net.events.append(("encode", layer, images.shape[0]))
        return encode(layer, images)

    net.encode = logged
    return net


def test_smt_slides_warm_up_before_the_first_slide_is_timed(smt_net, tmp_path, monkeypatch):
    """A full blank walk (1 + K + K^2 images, the real batch shapes) runs before the first slide's
    ``process_smt_slide``, which starts that slide's timer."""

    class Stop(Exception):
        pass

    def first_slide(*args, **kwargs):
        smt_net.events.append(("slide",))
        raise Stop

    monkeypatch.setattr(smt_inference, "process_smt_slide", first_slide)
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.slide, cfg.engine.threads = "one.svs", 1
    with pytest.raises(Stop):
        smt_inference.run_smt_slides([tmp_path / "one.svs"], cfg, tmp_path, smt_net, dict(SMT_META))
    assert smt_net.events == [("encode", 0, 1), ("encode", 1, 2), ("encode", 2, 4), ("slide",)]


def test_smt_benchmark_walks_warm_up_every_model_first(smt_net):
    walk_artifacts([], {"float": (smt_net, SMT_META)}, None)
    assert [e[1] for e in smt_net.events] == [0, 1, 2]


def test_smt_walk_synchronises_through_the_accelerator_helper(smt_net, monkeypatch):
    """One device sync per layer through ``accelerators.resolve.synchronize`` (CUDA and NPU alike: its NPU
    branch is checked against the fake torch_npu in ``npu_fake_checks.py``), not torch.cuda's alone."""
    synced = []
    monkeypatch.setattr(smt_module, "synchronize", lambda device: synced.append(device.type))
    smt_module.warm_up(smt_net, 2, SMT_META["mean"], SMT_META["std"])
    assert synced == ["cpu"] * 3


# -------------------------------------------------------------------------------------------- the script
def test_gpu_check_plans_its_checks_by_the_gpus_there(tmp_path):
    script = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"))
    slide = tmp_path / "s.svs"
    slide.touch()
    skipped = {c.name: c.skip for c in script["plan"](0, slide, tmp_path)}
    assert skipped and all(reason and "no CUDA" in reason for reason in skipped.values())
    one = {c.name: c for c in script["plan"](1, None, tmp_path)}
    assert one["train_gpu"].skip is None and "accelerator=gpu" in one["train_gpu"].command
    assert "more than one GPU" in one["train_gpu_ddp"].skip and "no slide" in one["slide_cuda"].skip
    two = {c.name: c for c in script["plan"](2, slide, tmp_path)}
    assert two["train_gpu_ddp"].skip is None and "accelerator=gpu_ddp" in two["train_gpu_ddp"].command
    assert "engine.device=cuda" in two["slide_cuda"].command and f"slide={slide}" in two["slide_cuda"].command


def test_gpu_check_skips_everything_without_cuda_and_exits_0(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "scripts" / "gpu_check.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert done.value.code == 0 and lines
    assert all(line.startswith("SKIP ") and "no CUDA" in line for line in lines)
