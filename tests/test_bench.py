"""The benchmark: FP32 and dynamic INT8 of a model option timed side by side, memory from children."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from patholite.config.schema import BenchConfig
from patholite.models.count import count_flops
from patholite.records import read_record
from tests.conftest import job_config, run_cli

TINY = [
    "model=vit_micro",
    "image_size=32",
    "bench.iters=3",
    "bench.warmup=1",
    "bench.repeats=2",
    "bench.batch_sizes=[1,2]",
]


def run_bench(args: list[str], cwd):
    return run_cli(args, cwd, module="patholite.bench")


def test_bench_times_fp32_and_int8_side_by_side(tmp_path):
    variants = "variants=[fp32,int8_dynamic,onnx_fp32]"
    result = run_bench([*TINY, "model.num_classes=7", variants, "hydra.run.dir=outputs/b"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(tmp_path / "outputs" / "b")
    fp32, int8, onnx = record["artifacts"]
    assert onnx["name"] == "onnx_fp32" and onnx["cost"]["params"] == fp32["cost"]["params"]
    assert set(onnx["cost"]["latency_ms"]) == {"1", "2"}
    assert (fp32["name"], int8["name"], int8["source"]) == ("fp32", "int8_dynamic", "fp32")
    assert fp32["cost"]["params"] == int8["cost"]["params"] == 207_684 + 3 * 64 + 3  # 7-class head
    assert int8["cost"]["size_bytes"] < 0.5 * fp32["cost"]["size_bytes"]
    for art in (fp32, int8):
        cost = art["cost"]
        assert set(cost["latency_ms"]) == {"1", "2"} and cost["protocol"]["repeats"] == 2
        assert all(v["p90"] >= v["p50"] > 0 for v in cost["latency_ms"].values())
        assert all(len(r["per_repeat"]) == 2 for r in cost["timing"]["ratio_to_baseline"].values())
        assert (
            cost["memory"]["method"] == "child"
            and cost["peak_rss_mb"] > cost["memory"]["rss_after_imports_mb"]
        )
    assert all(r["median"] == 1.0 for r in fp32["cost"]["timing"]["ratio_to_baseline"].values())  # itself
    assert fp32["cost"]["timing"]["timed_with"] == ["fp32", "int8_dynamic", "onnx_fp32"]
    assert record["entry"] == "bench"
    assert "int8_dynamic: latency / fp32" in result.stdout
    # energy: a number where RAPL/NVML is readable, otherwise the reason it is absent
    timing = fp32["cost"]["timing"]
    assert timing.get("energy_j_per_image") or timing["energy_absent_reason"]


def bench_job(args: list[str], run_dir):
    """``python -m patholite.bench <args>`` run in this process (memory measured in-process: the CLI test
    above and ``test_isolated_cost_comes_from_fresh_children`` cover the children)."""
    from patholite.bench import run_bench as run

    return run(job_config([*TINY, "bench.isolation=process", *args], run_dir, run_dir / "cache", "bench"))


def test_bench_onnx_runtime_int8_variants(tmp_path):
    variants = "variants=[fp32,onnx_fp32,int8_dynamic_ort,int8_static_ort]"
    assert bench_job(["model.num_classes=7", variants], tmp_path / "o") == "ok"
    arts = {a["name"]: a for a in read_record(tmp_path / "o")["artifacts"]}
    assert list(arts) == ["fp32", "onnx_fp32", "int8_dynamic_ort", "int8_static_ort"]
    for name in ("int8_dynamic_ort", "int8_static_ort"):
        # INT8 weights inside the .onnx: well under half the float file, same architecture counted
        assert arts[name]["cost"]["size_bytes"] < 0.5 * arts["onnx_fp32"]["cost"]["size_bytes"]
        assert arts[name]["cost"]["params"] == arts["fp32"]["cost"]["params"]
        assert set(arts[name]["cost"]["timing"]["ratio_to_baseline"]) == {"1", "2"}


def test_bench_measures_given_artifacts_and_refuses_missing_ones(tmp_path, capsys):
    assert bench_job(["variants=[fp32]"], tmp_path / "a") == "ok"
    fp32_dir = tmp_path / "a" / "artifacts" / "fp32"
    assert bench_job([f"artifacts=[{fp32_dir}]"], tmp_path / "again") == "ok"
    assert read_record(tmp_path / "again")["artifacts"][0]["path"] == str(fp32_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as missing:
        bench_job([f"artifacts=[{tmp_path / 'gone'}]"], tmp_path / "m")
    err = capsys.readouterr().err
    assert missing.value.code == 1 and "CheckpointError" in err and "gone" in err
    assert read_record(tmp_path / "m")["status"] == "failed"
    with pytest.raises(SystemExit) as bad:
        bench_job(["variants=[fp16]"], tmp_path / "v")
    assert bad.value.code == 1 and "variants=['fp16']" in capsys.readouterr().err


def test_flop_count_equals_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 4, kernel_size=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    # conv: 8*8 positions x 4 outputs x 3 inputs multiply-adds; linear: 256 x 10; 2 FLOPs per multiply-add
    expected = 2 * (8 * 8 * 4 * 3 + 256 * 10)
    assert count_flops(net, 8) == {"flops": expected, "flops_fused_uncounted": expected}


def test_alternating_protocol_returns_the_requested_counts(tmp_path):
    from patholite.artifacts.torch_float import save_float_artifact
    from patholite.measure.timing import time_artifacts
    from patholite.models.factory import create_network

    spec = {
        "name": "vit_micro",
        "timm_name": "vit_tiny_patch16_224",
        "family": "vit",
        "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
    }
    meta = {"model": spec, "class_names": ["a", "b"], "image_size": 16}
    for name in ("one", "two"):
        save_float_artifact(create_network(spec, 2, 16), tmp_path / name, meta)
    bench = OmegaConf.structured(BenchConfig(warmup=1, iters=4, repeats=3, batch_sizes=[1, 3]))
    result = time_artifacts([tmp_path / "one", tmp_path / "two"], 16, bench)
    assert result["baseline"] == "one" and result["threads"] == torch.get_num_threads()
    two = result["artifacts"]["two"]
    assert set(two["latency_ms"]) == {"1", "3"}
    assert all(
        len(r["per_repeat"]) == 3 and r["min"] <= r["median"] <= r["max"]
        for r in two["ratio_to_baseline"].values()
    )


def test_rapl_energy_per_image_with_counter_wrap(tmp_path, monkeypatch):
    """A fake RAPL tree: the meter sums package zones and survives the counter wrapping around."""
    from patholite.measure.energy import open_meter

    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("900000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): not counted again
    monkeypatch.setenv("PATHOLITE_RAPL_ROOT", str(tmp_path))
    meter, source = open_meter("cpu")
    assert meter is not None and "whole package" in source
    (zone / "energy_uj").write_text("100000\n")  # wrapped: 900000 -> 1000000 -> 100000
    assert meter.joules() == pytest.approx(0.2)
    monkeypatch.setenv("PATHOLITE_RAPL_ROOT", str(tmp_path / "none"))
    meter, reason = open_meter("cpu")
    assert meter is None and "no RAPL zones" in reason


def test_unreadable_onnx_artifact_is_a_checkpoint_error(tmp_path):
    from patholite.artifacts.load import load_artifact
    from patholite.errors import CheckpointError
    from patholite.io import write_json

    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    write_json(tmp_path / "artifact.json", {"kind": "onnx", "weights": "model.onnx"})
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load"):
        load_artifact(tmp_path)
    write_json(tmp_path / "artifact.json", {"kind": "tflite", "weights": "x"})
    with pytest.raises(CheckpointError, match="unknown kind 'tflite'"):
        load_artifact(tmp_path)
