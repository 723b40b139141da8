"""bf16 on CPUs that have it: torch's autocast artifact (``torch_autocast``: FP32 weights, run under
``torch.autocast("cpu", bfloat16)``) saved, reloaded without pickle, reproducing its recorded accuracy, with
its parity against the float source; refused (ptq preflight, loading) and skipped (bench) on a CPU without
native bf16; the one native-bf16 test; NNCF's float parts in bf16 where native (``auto``)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import patholite.accelerators.machine as machine
from patholite.artifacts.load import load_artifact
from patholite.artifacts.torch_autocast import KIND, AutocastModule, save_autocast_artifact
from patholite.artifacts.torch_float import save_float_artifact
from patholite.config.options import load_model_option
from patholite.errors import AcceleratorError, ConfigError
from patholite.models.factory import create_network
from patholite.records import read_record
from tests.conftest import job_config

SIZE = 32
ZEN3 = {"avx2", "fma", "avx512f", "avx512_vnni"}  # AVX-512 and VNNI, no bf16 (a Cascade Lake, say)
ZEN4 = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}


@pytest.fixture
def native(monkeypatch):
    """This CPU said to have AVX512-BF16 (torch runs bf16 autocast anywhere, only slower without it)."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN4)


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN3)
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")


@pytest.fixture(scope="module")
def micro():
    """A seeded vit_micro (4 classes, 32 px) and the sidecar of its artifacts."""
    spec = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    torch.manual_seed(0)
    net = create_network(spec, 4, SIZE).eval()
    return net, {"model": {**spec, "checkpoint": None}, "class_names": list("abcd"), "image_size": SIZE}


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- the native-bf16 test
@pytest.mark.parametrize(
    ("arch", "flags", "torch_ok", "openvino_ok"),
    [
        ("x86_64", ZEN4, True, True),
        ("x86_64", {"avx512f", "amx_tile", "amx_bf16"}, True, True),  # Sapphire Rapids
        ("x86_64", ZEN3, False, False),
        ("x86_64", {"avx2", "fma"}, False, False),
        ("aarch64", {"asimd", "asimddp", "bf16", "sve"}, True, False),  # Graviton3: torch yes, OpenVINO no
        ("aarch64", {"asimd", "asimddp"}, False, False),
    ],
)
def test_native_bf16_by_cpu_features(monkeypatch, arch, flags, torch_ok, openvino_ok):
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    monkeypatch.setattr(machine.platform, "machine", lambda: arch)
    assert machine.has_native_bf16("torch") is torch_ok
    assert machine.has_native_bf16("openvino") is openvino_ok
    reason = machine.bf16_unsupported_reason("torch")
    assert (reason is None) is torch_ok
    if reason:  # names what is missing
        assert "no native bf16" in reason and ("avx512_bf16" in reason or "bf16" in reason)
    monkeypatch.setattr(machine, "cpu_flags", set)  # no /proc/cpuinfo: not confirmed, so not native
    assert "cannot be read" in machine.bf16_unsupported_reason("torch")


# ------------------------------------------------------------------------------------------ artifact
def test_autocast_artifact_saves_fp32_weights_and_reloads_without_pickle(micro, tmp_path, native, no_pickle):
    net, meta = micro
    files = save_autocast_artifact(net, tmp_path / "bf16", meta)
    save_float_artifact(net, tmp_path / "fp32", meta)
    assert files == ["model.safetensors", "artifact.json"]
    sidecar = json.loads((tmp_path / "bf16" / "artifact.json").read_text())
    assert sidecar["kind"] == KIND and sidecar["autocast"] == "bfloat16"
    # the weights are the float model's, byte for byte: only how it runs differs
    weights = (tmp_path / "bf16" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "fp32" / "model.safetensors").read_bytes()
    loaded, _ = load_artifact(tmp_path / "bf16")
    assert isinstance(loaded, AutocastModule) and not loaded.training
    x = _x()
    with torch.inference_mode():
        got = loaded(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = net(x).float()
        fp32 = net(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)  # autocast, exactly
    # matmul weights cast once on load (what autocast does per call); norms and tokens stay FP32
    blocks = loaded.net.blocks[0]
    assert blocks.attn.qkv.weight.dtype == torch.bfloat16 and blocks.norm1.weight.dtype == torch.float32
    assert loaded.net.cls_token.dtype == torch.float32
    diff = (got - fp32).abs().max().item()
    assert 0 < diff < 0.1  # really bf16 (an 8-bit mantissa), and close to FP32
    assert loaded.get_classifier() is loaded.net.get_classifier()  # pre-logits stay tappable
    with pytest.raises(AcceleratorError, match="on the CPU only"):
        loaded(x.to("meta"))
    with pytest.raises(ValueError, match="float16"):
        save_autocast_artifact(net, tmp_path / "half", meta, autocast="float16")


def test_the_slide_engine_runs_the_autocast_artifact_on_the_cpu_only(micro, tmp_path, native):
    from patholite.slides.inference import load_classifier

    net, meta = micro
    save_autocast_artifact(net, tmp_path / "bf16", {**meta, "mpp": 2.0, "tile_size": SIZE})
    model, _ = load_classifier(tmp_path / "bf16")  # the engine's loader: runs it once, checks its classes
    assert isinstance(model, AutocastModule)
    with pytest.raises(ConfigError, match="runs on the CPU: use engine.device=cpu"):
        load_classifier(tmp_path / "bf16", device="cuda")


def test_bf16_is_refused_without_native_bf16(micro, tmp_path, make_cfg, no_bf16):
    net, meta = micro
    save_autocast_artifact(net, tmp_path / "bf16", meta)  # saved on a bf16 CPU, loaded here
    with pytest.raises(AcceleratorError, match=r"bf16 autocast, but this CPU has no native bf16 \(avx512"):
        load_artifact(tmp_path / "bf16")
    from patholite.pipelines.preflight import preflight

    with pytest.raises(AcceleratorError, match=r"compression.ptq.methods=\[bf16\] runs torch under bf16"):
        preflight(make_cfg("compression=ptq", "compression.ptq.methods=[dynamic,bf16]"))
    # the benchmark skips it with its reason, and times the rest; OpenVINO's auto NNCF variant is not bf16
    from patholite.bench import check_variants

    skipped = check_variants(["fp32", "bf16", "int8_dynamic"])
    assert skipped == {"bf16": machine.bf16_unsupported_reason("torch")}
    with pytest.raises(ConfigError, match="nothing left to time"):
        check_variants(["bf16"])


# ------------------------------------------------------------------------------------- the ptq stage
def test_ptq_bf16_records_parity_and_reproduces_its_accuracy(make_cfg, tmp_path, native):
    cfg = make_cfg("compression=ptq", "compression.ptq.methods=[bf16]")
    from patholite.train import run_job

    assert run_job(cfg) == "ok"
    arts = {a["name"]: a for a in read_record(tmp_path / "run")["artifacts"]}
    assert list(arts) == ["fp32", "bf16"]
    bf16, fp32 = arts["bf16"], arts["fp32"]
    parity = bf16["parity"]  # against the float source, on the same test images
    assert parity["against"] == "fp32" and parity["n_samples"] == bf16["quality"]["n_samples"] > 0
    assert 0 < parity["max_abs_logit_diff"] < 0.5 and parity["flip_rate"] <= 0.1
    assert bf16["cost"]["params"] == fp32["cost"]["params"]  # counted on the float twin
    assert bf16["cost"]["device"] == "cpu"
    from patholite.data import build_datamodule
    from patholite.measure.evaluate import evaluate_quality

    dm = build_datamodule(cfg.dataset)
    dm.setup()
    net, meta = load_artifact(bf16["path"])
    again = evaluate_quality(net, dm.test_dataloader(), meta["class_names"])
    assert again["confusion_matrix"] == bf16["quality"]["confusion_matrix"]


# ------------------------------------------------------------------------------------------ the bench
def _bench(args: list[str], run_dir):
    from patholite.bench import run_bench

    tiny = ["model=vit_micro", "image_size=32", "bench.iters=2", "bench.warmup=1", "bench.repeats=1"]
    overrides = [*tiny, "bench.batch_sizes=[2]", "bench.isolation=process", "logger=none", *args]
    return run_bench(job_config(overrides, run_dir, run_dir / "cache", "bench"))


def test_bench_builds_the_bf16_variant_beside_fp32_and_times_it_on_the_cpu(tmp_path, native):
    from patholite.bench import artifact_name, build_random_artifacts, timing_groups

    cfg = job_config(["model=vit_micro", "image_size=32", "model.num_classes=4"], tmp_path, tmp_path, "bench")
    dirs = build_random_artifacts(cfg, tmp_path / "artifacts", "x86", ["fp32", "bf16"])
    assert [d.name for d in dirs] == ["fp32", "bf16"]
    (fp32, _), (bf16, meta) = load_artifact(dirs[0]), load_artifact(dirs[1])
    assert meta["kind"] == KIND and artifact_name(tmp_path / "elsewhere", meta) == "bf16"
    x = _x(2)
    with torch.inference_mode():
        assert 0 < (bf16(x) - fp32(x)).abs().max() < 0.1  # the same random weights, in bf16
    # on a GPU run the float artifact is timed there, the bf16 one on the CPU beside it (its autocast is
    # the CPU's)
    cpu = timing_groups(dirs, ["fp32", "bf16"], ["torch_float", KIND], "cuda:0")[-1]
    assert cpu.device == "cpu" and cpu.measured == [dirs[1]]


def test_bench_skips_bf16_without_native_bf16_with_its_reason_in_the_record(tmp_path, no_bf16):
    assert _bench(["variants=[fp32,bf16]"], tmp_path / "b") == "ok"  # fp32 timed alone, in a child
    record = read_record(tmp_path / "b")
    assert [a["name"] for a in record["artifacts"]] == ["fp32"]
    reason = machine.bf16_unsupported_reason("torch")
    assert reason.startswith("this CPU has no native bf16")
    assert f"variant bf16 skipped: {reason}" in record["device"]["notes"]


# --------------------------------------------------------------------------- OpenVINO's float parts
def test_openvino_auto_precision_is_bf16_where_native_and_says_so(micro, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import patholite.artifacts.openvino as ov_art
    from patholite.artifacts.onnx import ONNX_FILE, save_onnx_artifact
    from patholite.bench import OPENVINO_VARIANTS, check_variants

    net, meta = micro
    save_onnx_artifact(net, tmp_path / "onnx", meta)
    for flags, expected in ((ZEN4, "bf16"), (ZEN3, "f32")):
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        assert ov_art.resolve_precision("auto") == expected
        assert ov_art.resolve_precision("f32") == "f32"
        directory = tmp_path / expected
        ov_art.save_openvino_from_onnx(tmp_path / "onnx" / ONNX_FILE, directory, meta, "auto")
        sidecar = json.loads((directory / "artifact.json").read_text())
        assert sidecar["precision"] == expected and sidecar["precision_requested"] == "auto"
    # the bench's ov_int8_nncf takes the same default; only the explicit bf16 variants need native bf16
    assert OPENVINO_VARIANTS["ov_int8_nncf"] == "auto"
    pytest.importorskip("nncf")
    skipped = check_variants(["fp32", "ov_int8_nncf", "ov_int8_nncf_f32", "ov_int8_nncf_bf16"])
    assert set(skipped) == {"ov_int8_nncf_bf16"}
