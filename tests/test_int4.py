"""Real 4-bit weights: ONNX Runtime's block-wise INT4 (MatMulNBits) mixed with ORT dynamic INT8 and FP32 per
Linear layer, the plan that chooses among them, and the artifact that is that plan."""

from __future__ import annotations

import copy
import json
import types

import onnx
import pytest
import torch
from torch import nn

from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import ONNX_FILE, OrtModule, save_onnx_artifact
from patholite.artifacts.sidecar import read_sidecar
from patholite.compress.int4 import check_bits, fake_int4_layers, int4_dequantize, linear_onnx_nodes
from patholite.compress.quantize import mixed_precision_plan, quantize_dynamic_layers
from patholite.errors import ConfigError
from patholite.pipelines.stages.ptq import save_mixed_int4
from tests.helpers import colour_task, module_on_one_thread, tiny_vit, train_on_colour_task  # noqa: F401

SIZE = 32
META = {"image_size": SIZE, "class_names": ["a", "b", "c", "d"]}


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return colour_task(n, seed, SIZE)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return train_on_colour_task(tiny_vit(depth=2), batches=20, size=SIZE)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp32")
    save_onnx_artifact(trained, directory, META)
    return directory / ONNX_FILE


def graph_ops(path) -> dict[str, str]:
    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


# ----------------------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_int4_weights_are_the_runtimes(trained, exported, tmp_path, symmetric):
    """The planner's 4-bit layers in torch compute what MatMulNBits computes: same weights, so the logits
    differ by float summation order only (1e-4 on logits of size ~5)."""
    save_mixed_int4(trained, exported, tmp_path, META, symmetric=symmetric)
    ops = graph_ops(tmp_path / ONNX_FILE)
    assert sum(op == "MatMulNBits" for op in ops.values()) == 8  # 4 Linear layers per block x 2, not the head
    meta = read_sidecar(tmp_path)
    assert meta["quantization"]["layer_bits"]["head"] == 32  # a Gemm: neither ORT quantizer rewrites it
    four = [n for n, b in meta["quantization"]["layer_bits"].items() if b == 4]
    emulated = fake_int4_layers(copy.deepcopy(trained), four, 32, symmetric)
    loaded, _ = load_artifact(tmp_path)
    x, _ = images(16, seed=3)
    with torch.no_grad():
        got, want, fp32 = loaded(x), emulated(x), trained(x)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - fp32).abs().max() > 1e-3  # really quantized
    # 16 levels per block of 32: each weight within half a step of its original
    w = trained.blocks[0].mlp.fc1.weight
    step = (
        w.detach().reshape(w.shape[0], -1, 32).amax(-1) - w.detach().reshape(w.shape[0], -1, 32).amin(-1)
    ) / 15
    err = (int4_dequantize(w, 32, symmetric=False) - w).abs().reshape(w.shape[0], -1, 32)
    assert bool((err <= step[..., None] / 2 + 1e-6).all())


# ----------------------------------------------------------------------------------------- plan -> artifact
def test_the_artifact_is_its_plan(trained, exported, tmp_path):
    x, y = images(64, seed=7)
    batches = list(zip(x.split(32), y.split(32), strict=True))
    quantizable = [n for n, w in linear_onnx_nodes(trained, exported).items() if w.quantizable]
    plan = mixed_precision_plan(trained, batches, budget_pp=0.0, layers=quantizable, int4=True)
    bits = plan["layer_bits"]
    assert set(bits) == {n for n, m in trained.named_modules() if isinstance(m, nn.Linear)}
    assert bits["head"] == 32  # not quantizable in ONNX Runtime
    assert plan["int4_layers"] and set(bits.values()) <= {4, 8, 32}
    assert sorted(plan["int4_layers"] + plan["int8_layers"] + plan["float_layers"]) == sorted(bits)
    assert plan["accuracy_drop_pp"] <= plan["budget_pp"]
    json.dumps(plan)
    # its claim holds: the chosen mix (runtime INT4 weights, dynamic INT8) loses nothing on these images
    mixed = quantize_dynamic_layers(
        fake_int4_layers(copy.deepcopy(trained), plan["int4_layers"]), plan["int8_layers"]
    )
    with torch.no_grad():
        ref = sum(int((trained(a).argmax(1) == b).sum()) for a, b in batches)
        got = sum(int((mixed(a).argmax(1) == b).sum()) for a, b in batches)
    assert 100.0 * (ref - got) / 64 == pytest.approx(plan["accuracy_drop_pp"])

    # the plan, forced to hold every kind, becomes an artifact: its graph has exactly those layers
    forced = {**bits, quantizable[0]: 32, quantizable[1]: 8, quantizable[2]: 4}
    save_mixed_int4(trained, exported, tmp_path, META, forced)
    nodes = linear_onnx_nodes(trained, exported)
    ops = graph_ops(tmp_path / ONNX_FILE)
    graph = onnx.load(str(tmp_path / ONNX_FILE)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    inputs = {n.name: n.input[0] for n in graph.node if n.input}
    for layer, b in forced.items():
        node = nodes[layer].node
        if b == 4:
            assert ops.get(f"{node}_Q4") == "MatMulNBits" and node not in ops, layer
        elif b == 8:
            assert ops.get(f"{node}_quant") == "MatMulInteger", layer
            assert producers[inputs[f"{node}_quant"]] == "DynamicQuantizeLinear", layer
        else:
            assert ops.get(node) in ("MatMul", "Gemm") or ops.get(f"{node}_MatMul") == "MatMul", layer
    assert sum(op == "MatMulNBits" for op in ops.values()) == sum(b == 4 for b in forced.values())
    assert sum(op == "MatMulInteger" for op in ops.values()) == sum(b == 8 for b in forced.values())

    meta = read_sidecar(tmp_path)
    how = meta["quantization"]
    assert how["layer_bits"] == forced and how["block_size"] == 32 and how["symmetric"] is False
    assert how["onnx_bytes"] == (tmp_path / ONNX_FILE).stat().st_size
    assert how["onnx_bytes"] < 0.5 * exported.stat().st_size

    # it reloads through patholite's loader and agrees with the float net. Tolerance: a 4-bit weight is off
    # by at most half a step (1/30 of its block's range); on these logits (|max| ~3.5) the mix moves them by
    # ~0.02 (measured), so 0.1 leaves room for kernel differences across ORT builds while a mis-packed or
    # mis-mapped layer moves them by O(1); top-1 must hold on the easy task's images
    loaded, meta = load_artifact(tmp_path)
    assert isinstance(loaded, OrtModule) and meta["kind"] == "onnx"
    xt, _ = images(64, seed=11)
    with torch.no_grad():
        got, want = loaded(xt), trained(xt)
    assert (got - want).abs().max() < 0.1
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


# ----------------------------------------------------------------------------------------- bad input
def test_bit_widths_other_than_4_or_8_fail_before_work(trained, exported, tmp_path):
    with pytest.raises(ConfigError, match="bit width 6 has no ONNX Runtime kernel; use 4"):
        check_bits([8, 6], "compression.ptq.bits")
    x, y = images(32, seed=7)
    with pytest.raises(ConfigError, match="bit width 2"):
        mixed_precision_plan(trained, [(x, y)], bits=(8, 2), int4=True)
    layer = "blocks.0.mlp.fc1"
    with pytest.raises(ConfigError, match=f"bit width 6 for layer '{layer}'.*or 32 to keep"):
        save_mixed_int4(trained, exported, tmp_path / "a", META, {layer: 6})
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(ConfigError, match="Gemm"):
        save_mixed_int4(trained, exported, tmp_path / "b", META, {"head": 4})
    with pytest.raises(ConfigError, match="power of two"):
        save_mixed_int4(trained, exported, tmp_path / "c", META, None, block_size=24)


def test_ptq_check_refuses_other_widths(tmp_path):
    from patholite.pipelines.stages import ptq
    from tests.conftest import FAST, compose_config

    def cfg(*overrides: str):
        return compose_config(
            [*FAST, "compression=ptq", "compression.ptq.methods=[mixed_int4]", *overrides],
            tmp_path / "run",
            tmp_path / "cache",
        )

    task = types.SimpleNamespace(name="tiles")
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    ptq.check(cfg(), task, cpu)  # the defaults are fine
    with pytest.raises(ConfigError, match=r"compression.ptq.bits: bit width 6"):
        ptq.check(cfg("compression.ptq.bits=[8,6]"), task, cpu)
    with pytest.raises(ConfigError, match="block_size=20"):
        ptq.check(cfg("compression.ptq.block_size=20"), task, cpu)


def test_a_layer_4_bits_cannot_hold_stays_at_8(trained, monkeypatch):
    """The second pass keeps a layer at INT8 when its 4-bit weights break the budget: here the 4-bit
    weights of one layer are made harmful (negated, amplified) to stand in for a layer that needs 8 bits."""
    from patholite.compress import quantize

    fragile = "blocks.1.mlp.fc2"
    real = quantize.fake_int4_layers

    def breaking(net, layers, *args):
        net = real(net, layers, *args)
        if fragile in layers:
            with torch.no_grad():
                dict(net.named_modules())[fragile].weight.mul_(-100.0)
        return net

    monkeypatch.setattr(quantize, "fake_int4_layers", breaking)
    x, y = images(32, seed=7)
    layers = [n for n, m in trained.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    plan = mixed_precision_plan(trained, [(x, y)], budget_pp=0.0, layers=layers, int4=True)
    assert plan["layer_bits"][fragile] == 8 and fragile in plan["int8_layers"]
    assert [t["accepted"] for t in plan["trials_int4"] if t["layer"] == fragile] == [False]
    assert sum(b == 4 for b in plan["layer_bits"].values()) == len(layers) - 1
