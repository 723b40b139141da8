"""OpenVINO artifacts (FP32, bf16, NNCF INT8): saved, reloaded from their files without pickle, run with an
explicit precision hint; the ptq methods that make them, with their parity; bf16 refused on a CPU without
it; a clear error naming the extra when OpenVINO or NNCF is missing."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import patholite.accelerators.machine as machine
import patholite.artifacts.openvino as ov_art
from patholite import artifacts as art
from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import ONNX_FILE, save_onnx_artifact
from patholite.compress.nncf_ptq import import_nncf, import_openvino
from patholite.errors import AcceleratorError, ConfigError
from patholite.records import read_record
from tests.conftest import job_config
from tests.helpers import tiny_vit

pytest.importorskip("openvino")
pytest.importorskip("nncf")

SIZE = 32
NATIVE_BF16 = ov_art.bf16_unsupported_reason() is None
BF16_REST = ["compression.ptq.openvino_precision=bf16"]
META = {"image_size": SIZE, "class_names": ["a", "b", "c", "d"]}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread is faster and steadier
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    net = tiny_vit().eval()
    directory = tmp_path_factory.mktemp("onnx")
    save_onnx_artifact(net, directory, META)
    return net, directory / ONNX_FILE


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ artifacts
@pytest.mark.parametrize("precision", ["f32", pytest.param("bf16", marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="no native bf16 on this CPU"))])  # fmt: skip
def test_float_variants_save_reload_without_pickle_and_match_torch(
    float_onnx, tmp_path, precision, monkeypatch
):
    net, onnx_file = float_onnx
    files = ov_art.save_openvino_from_onnx(onnx_file, tmp_path, META, precision)
    assert sorted(files) == sorted(p.name for p in tmp_path.iterdir())  # no temporary left behind
    assert files == ["model.xml", "model.bin", "artifact.json"]
    # FP32 weights stay FP32 (OpenVINO's save_model compresses to FP16 unless told not to)
    assert (tmp_path / "model.bin").stat().st_size > 4 * 0.95 * sum(p.numel() for p in net.parameters())

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded, meta = load_artifact(tmp_path)
    assert (meta["kind"], meta["precision"]) == ("openvino", precision)
    assert loaded.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == precision
    x = _x()
    with torch.no_grad():
        ref = net(x)
    got = loaded(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    tol = 1e-4 if precision == "f32" else 0.1  # bf16 keeps 8 bits of mantissa
    assert (got - ref).abs().max() <= tol
    assert torch.equal(loaded(x[:1]), got[:1]) or (loaded(x[:1]) - got[:1]).abs().max() < 1e-5  # any batch


def test_nncf_int8_reloads_to_the_outputs_it_was_saved_with(float_onnx, tmp_path, no_pickle):
    import openvino as ov

    from patholite.compress.nncf_ptq import quantize_nncf

    net, onnx_file = float_onnx
    calibration = list(_x(16, seed=3).split(8))
    model = quantize_nncf(ov_art.onnx_to_openvino(onnx_file), calibration)
    files = ov_art.save_openvino_artifact(model, tmp_path, META, "f32", {"method": "nncf"})
    x = _x()
    before = ov.Core().compile_model(model, "CPU", ov_art.compile_config("f32", 1))(x.numpy())[0]
    loaded, meta = load_artifact(tmp_path)
    assert torch.equal(loaded(x), torch.from_numpy(before))  # the files are the model, bit for bit
    assert meta["quantization"] == {"method": "nncf"}
    xml = (tmp_path / "model.xml").read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml  # really quantized
    assert (tmp_path / "model.bin").stat().st_size < 0.5 * 4 * sum(p.numel() for p in net.parameters())
    assert files[-1] == "artifact.json"


# ------------------------------------------------------------------------------------- the ptq stage
def test_ptq_openvino_methods_record_parity_and_reproduce_their_accuracy(make_cfg, tmp_path):
    # one float method (the other's precision path is the unit tests'): bf16 where this CPU runs it natively
    floating = "ov_bf16" if NATIVE_BF16 else "ov_fp32"
    methods = ["nncf", "nncf_accuracy", floating]
    cfg = make_cfg(
        "compression=ptq",
        f"compression.ptq.methods=[{','.join(methods)}]",
        "compression.ptq.calibration_images=16",
        "compression.ptq.sensitivity_images=16",
        # 16 validation images: one flip is 6.25 pp; a budget that holds keeps NNCF's restoration loop (a
        # ranking of every quantized layer group, the slow part) out of the fast tests
        "compression.ptq.budget_pp=50",
    )
    from patholite.train import run_job

    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    arts = {a["name"]: a for a in record["artifacts"]}
    expected = ["fp32", "ov_int8_nncf", "ov_int8_nncf_accuracy", floating]
    assert list(arts) == expected
    from patholite.data import build_datamodule
    from patholite.measure.evaluate import evaluate_quality

    dm = build_datamodule(cfg.dataset)
    dm.setup()
    for name in expected[1:]:
        art = arts[name]
        assert art["files"] == ["model.xml", "model.bin", "artifact.json"]
        parity = art["parity"]  # against the float source, on the same test images
        assert parity["against"] == "fp32" and parity["n_samples"] == art["quality"]["n_samples"] > 0
        assert 0 <= parity["flip_rate"] <= 1 and parity["max_abs_logit_diff"] >= 0
        net, meta = load_artifact(art["path"])
        again = evaluate_quality(net, dm.test_dataloader(), meta["class_names"])
        assert again["confusion_matrix"] == art["quality"]["confusion_matrix"], name
        assert art["cost"]["params"] == arts["fp32"]["cost"]["params"]  # counted on the float twin
    # the float model in OpenVINO: the same calls; bf16 moves logits by its 8-bit mantissa, f32 by rounding
    assert arts[floating]["parity"]["max_abs_logit_diff"] <= (0.1 if NATIVE_BF16 else 1e-3)
    assert arts[floating]["parity"]["flip_rate"] <= (0.05 if NATIVE_BF16 else 0.0)
    for name in ("ov_int8_nncf", "ov_int8_nncf_accuracy"):
        assert arts[name]["cost"]["size_bytes"] < arts[floating]["cost"]["size_bytes"]
    how = json.loads((Path(arts["ov_int8_nncf"]["path"]) / "artifact.json").read_text())["quantization"]
    assert how == {"method": "nncf", "preset": "transformer", "calibration_images": 16}
    control = json.loads((Path(arts["ov_int8_nncf_accuracy"]["path"]) / "artifact.json").read_text())
    control = control["quantization"]
    assert control["method"] == "nncf_accuracy_control" and control["budget_pp"] == 50
    assert 0 < control["validation_images"] <= 16 and control["validations"] >= 2  # float, INT8, ...
    assert len(control["validated_accuracies"]) == control["validations"]


# ----------------------------------------------------------------------------------------- bf16
def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch, tmp_path, float_onnx, make_cfg):
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_vnni"})
    reason = ov_art.bf16_unsupported_reason()
    assert "no native bf16" in reason and "avx512_bf16" in reason
    # an artifact saved on a bf16 CPU, loaded here: one clear error, nothing compiled
    _, onnx_file = float_onnx
    ov_art.save_openvino_from_onnx(onnx_file, tmp_path, META, "bf16")
    with pytest.raises(AcceleratorError, match="runs in bf16, but this CPU has no native bf16"):
        load_artifact(tmp_path)
    from patholite.pipelines.preflight import preflight

    with pytest.raises(AcceleratorError, match=r"methods=\[ov_bf16\] runs in bf16"):
        preflight(make_cfg("compression=ptq", "compression.ptq.methods=[ov_bf16]"))
    with pytest.raises(AcceleratorError, match="openvino_precision=bf16"):
        preflight(make_cfg("compression=ptq", "compression.ptq.methods=[nncf]", *BF16_REST))
    # the benchmark skips it with its reason (the record's notes), and times the rest
    from patholite.bench import check_variants

    skipped = check_variants(["fp32", "ov_fp32", "ov_bf16", "ov_int8_nncf_bf16"])
    assert set(skipped) == {"ov_bf16", "ov_int8_nncf_bf16"} and skipped["ov_bf16"] == reason
    with pytest.raises(ConfigError, match="nothing left to time"):
        check_variants(["ov_bf16"])
    # with AVX512-BF16 or AMX it runs
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16", "amx_tile"}):
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        assert ov_art.bf16_unsupported_reason() is None


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="'fp16' is not one of"):
        ov_art.check_precision("fp16", "test")


# ------------------------------------------------------------------------------------ the extra
@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_a_missing_package_names_the_extra_before_work(monkeypatch, make_cfg, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    if missing == "openvino":
        install = r"needs openvino, which is not installed: pip install 'patholite\[openvino\]'"
        with pytest.raises(ConfigError, match=install):
            import_openvino()
    with pytest.raises(ConfigError, match=rf"needs {missing}, which is not installed.*patholite\[openvino\]"):
        import_nncf()
    from patholite.bench import check_variants
    from patholite.pipelines.preflight import preflight

    with pytest.raises(ConfigError, match=r"compression.ptq.methods=\['nncf'\] needs"):
        preflight(make_cfg("compression=ptq", "compression.ptq.methods=[nncf]"))
    with pytest.raises(ConfigError, match=r"variants=\['ov_int8_nncf'\] needs"):
        check_variants(["fp32", "ov_int8_nncf"])


# ------------------------------------------------------------------------------------ the benchmark
def test_bench_builds_the_openvino_variants(tmp_path):
    from patholite.bench import build_random_artifacts

    variants = "variants=[fp32,ov_fp32,ov_int8_nncf]"
    overrides = ["model=vit_micro", "image_size=32", "model.num_classes=4", variants]
    cfg = job_config(overrides, tmp_path, tmp_path / "cache", "bench")
    dirs = build_random_artifacts(cfg, tmp_path / "artifacts", "x86")
    assert [d.name for d in dirs] == ["fp32", "ov_fp32", "ov_int8_nncf"]
    x = _x(2)
    fp32, _ = load_artifact(dirs[0])
    ov_fp32, meta = load_artifact(dirs[1])
    int8, int8_meta = load_artifact(dirs[2])
    assert meta["precision"] == "f32"  # ov_fp32: f32 always; ov_int8_nncf: the ptq default, auto
    assert int8_meta["precision"] == ov_art.resolve_precision("auto")
    assert int8_meta["precision_requested"] == "auto"
    assert int8_meta["quantization"]["calibration_images"] == 16
    with torch.no_grad():
        assert (ov_fp32(x) - fp32(x)).abs().max() < 1e-4
    assert int8(x).shape == (2, 4)


# ------------------------------------------------------------------------------------- the slide engine
def test_the_slide_engine_runs_an_openvino_artifact(slides, tmp_path):
    import numpy as np

    from patholite.config.options import load_model_option
    from patholite.slides.engine import TileSpec, stream_tiles
    from patholite.slides.inference import load_classifier

    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    meta = {**META, "model": {**model, "checkpoint": None}, "mean": [0.5] * 3, "std": [0.25] * 3,
            "mpp": 2.0, "tile_size": 64}  # fmt: skip
    net = tiny_vit().eval()
    art.save_float_artifact(net, tmp_path / "fp32", meta)
    art.save_onnx_artifact(net, tmp_path / "onnx", meta)
    ov_art.save_openvino_from_onnx(tmp_path / "onnx" / ONNX_FILE, tmp_path / "ov", meta, "f32")
    grid = np.array([[x, y] for y in range(0, 1024, 256) for x in range(0, 1024, 256)])
    spec = TileSpec(str(slides / "CMU-1-Small-Region.svs"), grid, 256, 64, SIZE, (0.5,) * 3, (0.25,) * 3)
    probs = {}
    for kind in ("fp32", "ov"):
        loaded, _ = load_classifier(tmp_path / kind)
        result = stream_tiles(loaded, spec, meta["class_names"], tmp_path / f"{kind}.csv", 8, workers=1)
        assert result.timings["tiles"] == len(grid)
        probs[kind] = result.probs
    assert np.abs(probs["ov"] - probs["fp32"]).max() < 1e-4


def test_telemetry_is_off_once_patholite_imports_openvino_and_nncf():
    import importlib

    import_nncf()
    stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
    for name in ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils"):
        assert importlib.import_module(name).tm is stub  # ov.convert_model's events go nowhere
    wrapper = importlib.import_module("nncf.telemetry.wrapper")
    assert not isinstance(
        importlib.import_module("nncf.telemetry.decorator").telemetry, wrapper.NNCFTelemetry
    )


def test_bench_names_a_given_openvino_artifact_by_its_variant(tmp_path):
    from patholite.bench import artifact_name

    folder = tmp_path / "mine"
    for meta, name in (
        ({"kind": "openvino", "precision": "f32"}, "ov_fp32"),
        ({"kind": "openvino", "precision": "bf16"}, "ov_bf16"),
        ({"kind": "openvino", "precision": "f32", "quantization": {"method": "nncf"}}, "ov_int8_nncf"),
        ({"kind": "openvino", "precision": "bf16", "quantization": {"method": "nncf"}}, "ov_int8_nncf_bf16"),
    ):
        assert artifact_name(folder, meta) == name


def test_a_subprocess_still_starts_once_openvino_models_are_gone():
    """OpenVINO unloaded its CPU plugin with the last Core, leaving fork handlers into unmapped code: after
    this file's tests the next subprocess crashed the test process (SIGSEGV). ``ov_core`` keeps one Core."""
    import gc
    import subprocess

    from patholite.artifacts.openvino import ov_core

    assert ov_core() is ov_core()
    gc.collect()
    command = [sys.executable, "-c", "print('started')"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "started"
