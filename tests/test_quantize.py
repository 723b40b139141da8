"""Quantization: static INT8 through ONNX Runtime, R1's quantizer, sensitivity, the mixed plan, QAT-lite."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patholite.artifacts.onnx import ONNX_FILE, OrtModule, save_onnx_artifact
from patholite.artifacts.qat import load_qat_artifact, save_qat_artifact
from patholite.compress.qat import check_qat_device, convert_qat, prepare_qat
from patholite.compress.quantize import (
    int8_layer_names,
    layer_sensitivity,
    mixed_precision_plan,
    quantize_dynamic_layers,
    quantize_static_ort,
    symmetric_quantize,
)
from patholite.errors import AcceleratorError, CheckpointError, ConfigError
from tests.helpers import colour_task, module_on_one_thread, tiny_vit, train_on_colour_task  # noqa: F401

SIZE = 32


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return colour_task(n, seed, SIZE)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    # A random-init ViT gives near-equal logits for every input, so any quantization noise flips its top-1;
    # agreement tests need a net with real margins.
    return train_on_colour_task(tiny_vit(), batches=30, size=SIZE)


@pytest.fixture(scope="module")
def val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = images(64, seed=7)
    return list(zip(x.split(32), y.split(32), strict=True))


def linear_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]


def saved_bytes(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


# ----------------------------------------------------------------------------------------- R1 quantizer
def test_symmetric_quantize_matches_hand_computation():
    x = torch.tensor([-1.0, -0.3, 0.0, 0.26, 0.55])
    # b=3: 3 positive levels, D = 1/3; x/D = -3, -0.9, 0, 0.78, 1.65 -> -3, -1, 0, 1, 2
    expected = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]) / 3
    assert torch.allclose(symmetric_quantize(x, 3), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_quantize_levels(bits):
    x = torch.randn(10_000)
    q = symmetric_quantize(x, bits)
    assert len(q[q > 0].unique()) <= 2 ** (bits - 1) - 1
    assert torch.isclose(q.abs().max(), x.abs().max())
    assert torch.equal(symmetric_quantize(torch.zeros(3), bits), torch.zeros(3))


@pytest.mark.parametrize("bits", [1, 0, 2.5, True])
def test_symmetric_quantize_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        symmetric_quantize(torch.randn(4), bits)


# ----------------------------------------------------------------------------------------- static ORT
def test_static_ort_agrees_with_float(trained, tmp_path):
    save_onnx_artifact(trained, tmp_path / "float", {"image_size": SIZE})
    out = tmp_path / "int8" / ONNX_FILE
    calibration = list(images(64, seed=3)[0].split(16))
    quantize_static_ort(tmp_path / "float" / ONNX_FILE, out, calibration)
    assert out.is_file()
    assert out.stat().st_size < (tmp_path / "float" / ONNX_FILE).stat().st_size
    assert not list(out.parent.glob("*.tmp"))  # written through a temp file, then renamed
    x, _ = images(128, seed=9)
    ref = OrtModule(tmp_path / "float" / ONNX_FILE)(x)
    got = OrtModule(out)(x)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.9


def test_static_ort_u8u8_and_reduce_range(trained, tmp_path):
    save_onnx_artifact(trained, tmp_path, {"image_size": SIZE})
    calibration = [images(16, seed=3)]  # (images, labels) pairs, as a DataLoader yields, are accepted
    x, _ = images(64, seed=9)
    ref = OrtModule(tmp_path / ONNX_FILE)(x)
    for kwargs in ({"weight_type": "uint8"}, {"reduce_range": True}):
        out = tmp_path / f"q_{next(iter(kwargs))}.onnx"
        quantize_static_ort(tmp_path / ONNX_FILE, out, calibration, **kwargs)
        assert (OrtModule(out)(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_static_ort_errors(tmp_path):
    missing = tmp_path / "none.onnx"
    save_onnx_artifact(tiny_vit(), tmp_path, {"image_size": SIZE})
    with pytest.raises(ValueError, match="zero calibration images"):
        quantize_static_ort(tmp_path / ONNX_FILE, tmp_path / "q.onnx", [])
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ValueError, match="zero calibration images"):
        quantize_static_ort(tmp_path / ONNX_FILE, tmp_path / "q.onnx", [torch.zeros(0, 3, SIZE, SIZE)])
    with pytest.raises(ValueError, match="weight_type"):
        quantize_static_ort(
            tmp_path / ONNX_FILE, tmp_path / "q.onnx", [torch.zeros(1, 3, SIZE, SIZE)], weight_type="int4"
        )
    with pytest.raises(ValueError, match="S8U8"):
        quantize_static_ort(
            tmp_path / ONNX_FILE, tmp_path / "q.onnx", [], activation_type="int8", weight_type="uint8"
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        quantize_static_ort(missing, tmp_path / "q.onnx", [torch.zeros(1, 3, SIZE, SIZE)])


# ----------------------------------------------------------------------------------------- sensitivity
def test_layer_sensitivity_rows(trained, val_batches):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    rows = layer_sensitivity(trained, val_batches, bits=(8, 4))
    names = linear_names(trained)
    assert len(rows) == 2 * len(names)
    assert {(r["layer"], r["bits"]) for r in rows} == {(n, b) for n in names for b in (8, 4)}
    assert all(set(r) == {"layer", "bits", "accuracy_drop_pp", "kl"} and r["kl"] >= 0 for r in rows)
    kl = {b: sum(r["kl"] for r in rows if r["bits"] == b) / len(names) for b in (8, 4)}
    assert kl[4] >= kl[8]
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # weights restored
    assert not trained.training

    only = layer_sensitivity(trained, val_batches, bits=(8,), layers=["head"])
    assert [r["layer"] for r in only] == ["head"]
    with pytest.raises(ConfigError, match="not nn.Linear"):
        layer_sensitivity(trained, val_batches, layers=["blocks.0.norm1"])
    with pytest.raises(ConfigError, match="no validation batches"):
        layer_sensitivity(trained, [])


# ----------------------------------------------------------------------------------------- dynamic / plan
def test_quantize_dynamic_layers_only_named(trained):
    chosen = ["blocks.0.mlp.fc1", "head"]
    qnet = quantize_dynamic_layers(trained, chosen)
    assert sorted(int8_layer_names(qnet)) == sorted(chosen)
    assert all(isinstance(m, nn.Linear) for n, m in trained.named_modules() if n in chosen)  # original kept
    x, _ = images(8, seed=2)
    with torch.no_grad():
        assert torch.allclose(qnet(x), trained(x), atol=0.1)
    assert len(int8_layer_names(quantize_dynamic_layers(trained, None))) == len(linear_names(trained))
    with pytest.raises(ConfigError, match="not nn.Linear"):
        quantize_dynamic_layers(trained, ["blocks.0.nope"])


def outlier_net(trained: nn.Module) -> nn.Module:
    """The trained net with one head weight 1e4 on a feature that is always 0: the float net does not see
    it, but per-tensor INT8 of the head rounds every other head weight to 0, so the head must stay float."""
    net = copy.deepcopy(trained)
    with torch.no_grad():
        net.norm.weight[0] = 0.0
        net.norm.bias[0] = 0.0
        net.head.weight[:, 0] = 1e4
    return net


def test_plan_keeps_sensitive_layer_float_within_budget(trained, val_batches):
    net = outlier_net(trained)
    plan = mixed_precision_plan(net, val_batches, budget_pp=0.0)
    names = linear_names(net)
    assert sorted(plan["int8_layers"] + plan["float_layers"]) == sorted(names)
    assert not set(plan["int8_layers"]) & set(plan["float_layers"])
    assert "head" in plan["float_layers"]
    assert plan["ranking"][-1] == "head"  # most sensitive by KL at 8 bits
    assert plan["accuracy_drop_pp"] <= plan["budget_pp"] == 0.0
    assert len(plan["int8_layers"]) >= len(names) // 2
    # The plan's own claim holds when the chosen set is quantized again.
    qnet = quantize_dynamic_layers(net, plan["int8_layers"])
    with torch.no_grad():
        ref = sum(int((net(x).argmax(1) == y).sum()) for x, y in val_batches)
        got = sum(int((qnet(x).argmax(1) == y).sum()) for x, y in val_batches)
    assert 100.0 * (ref - got) / 64 == pytest.approx(plan["accuracy_drop_pp"])
    json.dumps(plan)  # JSON-serialisable as it is

    # A budget larger than any possible drop takes every layer, sensitive or not.
    everything = mixed_precision_plan(net, val_batches, budget_pp=100.0, metric="accuracy")
    assert everything["float_layers"] == [] and everything["accuracy_drop_pp"] > 50


def test_plan_errors(trained, val_batches):
    with pytest.raises(ValueError, match="metric"):
        mixed_precision_plan(trained, val_batches, metric="mse")
    with pytest.raises(ValueError, match="include 8"):
        mixed_precision_plan(trained, val_batches, bits=(4,))
    with pytest.raises(ValueError, match="budget_pp"):
        mixed_precision_plan(trained, val_batches, budget_pp=-1)


# ----------------------------------------------------------------------------------------- QAT
def test_qat_train_convert_save_reload(trained, tmp_path):
    x, y = images(32, seed=11)
    qat = prepare_qat(trained, x[:1])
    assert qat.training and trained is not qat
    assert all(isinstance(m, nn.Linear) for n, m in trained.named_modules() if n == "head")  # untouched

    params = {n: p.detach().clone() for n, p in qat.named_parameters()}
    opt = torch.optim.AdamW(qat.parameters(), 1e-3)
    loss = F.cross_entropy(qat(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(params[n], p) for n, p in qat.named_parameters())

    int8 = convert_qat(qat)
    assert not int8.training
    names = int8_layer_names(int8)
    assert set(linear_names(trained)) <= set(names) and "patch_embed.proj" in names
    assert any(k.endswith("_packed_params._packed_params") for k in int8.state_dict())
    with torch.no_grad():
        out = int8(x)
        qat.eval()
        assert (out.argmax(1) == qat(x).argmax(1)).float().mean() >= 0.9  # fake-quant predicted INT8

    files = save_qat_artifact(int8, tmp_path, {"image_size": SIZE, "class_names": list("abcd")})
    assert (tmp_path / "artifact.json").is_file()
    weights = tmp_path / files[0]
    assert weights.stat().st_size < saved_bytes(trained.state_dict()) / 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(weights, weights_only=True)  # no pickled code needed
    again = load_qat_artifact(tmp_path, tiny_vit(seed=5))  # the twin's own weights do not matter
    with torch.no_grad():
        assert torch.equal(again(x), out)
        assert again(x[:5]).shape == (5, 4)  # batch size stays free

    with pytest.raises(CheckpointError, match="does not fit"):
        load_qat_artifact(tmp_path, tiny_vit(depth=2))


def test_qat_errors(trained):
    with pytest.raises(ConfigError, match="prepare_qat"):
        convert_qat(trained)
    with pytest.raises(ConfigError, match="image_size"):
        save_qat_artifact(trained, "unused", {})
    with pytest.raises(ConfigError, match="converted INT8"):
        save_qat_artifact(trained, "unused", {"image_size": SIZE})


def test_check_qat_device():
    assert check_qat_device("cpu") == torch.device("cpu")
    for bad in ("mps", "npu", "meta"):
        with pytest.raises(ConfigError, match=bad):
            check_qat_device(bad)
    with pytest.raises(ConfigError, match="not a torch device"):
        check_qat_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(AcceleratorError, match="no CUDA"):
            check_qat_device("cuda")
