"""LSQ quantization-aware training: the learned-step quantizer's gradients, its layer shapes, the QDQ ONNX
export, the ``compression=qat compression.qat.method=lsq`` run, refusals, and the torch-free runtime."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from patholite.artifacts.load import load_artifact
from patholite.artifacts.lsq import save_lsq_artifact
from patholite.compress.lsq import (
    LsqLinear,
    LsqQuantizer,
    calibrate_lsq,
    lsq_layers,
    lsq_quantize,
    prepare_lsq,
)
from patholite.errors import ConfigError
from patholite.records import read_record
from patholite.train import run_job
from tests.conftest import REPO
from tests.helpers import colour_task, module_on_one_thread, tiny_vit, train_on_colour_task  # noqa: F401

# values below (-6 s), inside (-1.4 s ... 2.6 s) and above (10 s) the 3-bit signed range [-4, 3] of s = 0.5
V = [-3.0, -0.7, 0.2, 0.45, 1.3, 5.0]
UPSTREAM = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_the_step_gradient_equals_the_papers_formula_computed_by_hand():
    q = LsqQuantizer(bits=3, signed=True)
    assert (q.qn, q.qp) == (4, 3)
    with torch.no_grad():
        q.step.fill_(0.5)
    v = torch.tensor(V, requires_grad=True)
    out = q.quantize(v, (1,), per_step=6)
    (out * torch.tensor(UPSTREAM)).sum().backward()
    # forward: round(clamp(v / s, -4, 3)) * s
    assert out.tolist() == [-2.0, -0.5, 0.0, 0.5, 1.5, 1.5]
    # d v_hat / d s: -Qn below; round(v/s) - v/s inside; Qp above; v/s = -6, -1.4, 0.4, 0.9, 2.6, 10
    dvds = [-4.0, -1 + 1.4, 0 - 0.4, 1 - 0.9, 3 - 2.6, 3.0]
    g = 1 / math.sqrt(6 * 3)  # N = 6 elements share the step, Qp = 3
    expected = g * sum(u * d for u, d in zip(UPSTREAM, dvds, strict=True))
    assert q.step.grad.item() == pytest.approx(expected, rel=1e-5)
    # the straight-through estimator: the upstream gradient inside the range, nothing outside
    assert v.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_per_channel_steps_get_their_own_rows_gradient():
    v = torch.tensor([V, [x / 2 for x in V]], requires_grad=True)
    s = torch.tensor([[0.5], [0.25]], requires_grad=True)  # row 2 is row 1 halved: the same v / s
    lsq_quantize(v, s, 4, 3, 0.1).backward(torch.tensor([UPSTREAM, UPSTREAM]))
    dvds = [-4.0, 0.4, -0.4, 0.1, 0.4, 3.0]
    row = 0.1 * sum(u * d for u, d in zip(UPSTREAM, dvds, strict=True))
    assert s.grad.flatten().tolist() == pytest.approx([row, row], rel=1e-5)


def test_steps_are_per_block_at_4_bits_per_channel_at_8_and_the_head_stays_8_bit():
    net = tiny_vit(depth=2)
    lsq = prepare_lsq(net, weight_bits=4, act_bits=8, block_size=32)
    layers = lsq_layers(lsq)
    assert len(layers) == 2 * 4 + 1 and isinstance(lsq.patch_embed.proj, nn.Conv2d)  # patch embedding float
    assert not any(isinstance(m, LsqLinear) for m in net.modules())  # the source is untouched
    for name, layer in layers.items():
        out, inp = layer.linear.weight.shape
        assert layer.wq.step.ndim == 1  # flat: no weight decay on steps
        if name == "head":
            assert (layer.wq.bits, layer.wq.step.numel(), layer.wq.qn) == (8, out, 127)
        else:
            assert (layer.wq.bits, layer.wq.step.numel(), layer.wq.qn) == (4, out * inp // 32, 8)
        assert layer.aq.signed == (not name.endswith("mlp.fc2"))  # unsigned after GELU
    qkv = layers["blocks.0.attn.qkv"]
    w = qkv.linear.weight.detach()
    first_block = w[0, :32].abs().mean()
    assert qkv.wq.step[0].item() == pytest.approx(2 * first_block.item() / math.sqrt(7), rel=1e-6)
    assert prepare_lsq(net, 8, 8).get_submodule("blocks.0.attn.qkv").wq.step.numel() == w.shape[0]
    # a width that is not a multiple of the block: the last block is padded, the weight keeps its shape
    odd = LsqLinear(nn.Linear(40, 3), weight_bits=4, act_bits=32, block_size=32)
    assert odd.wq.step.numel() == 3 * 2 and odd.quantized_weight().shape == (3, 40)


def test_bad_widths_and_an_uncalibrated_layer_are_refused():
    with pytest.raises(ConfigError, match="weight_bits=3.*use 4 or 8"):
        prepare_lsq(tiny_vit(depth=1), weight_bits=3)
    with pytest.raises(ConfigError, match="act_bits=4"):
        prepare_lsq(tiny_vit(depth=1), act_bits=4)
    with pytest.raises(ConfigError, match="block_size=24"):
        prepare_lsq(tiny_vit(depth=1), weight_bits=4, block_size=24)
    with pytest.raises(ConfigError, match="calibrate_lsq"):
        prepare_lsq(tiny_vit(depth=1))(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="no images"):
        calibrate_lsq(prepare_lsq(tiny_vit(depth=1)), [])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compression.qat.weight_bits=2", r"weight_bits=2: LSQ exports 4-bit"),
        ("compression.qat.calibration_batches=0", r"calibration_batches=0: LSQ initialises"),
        ("compression.qat.method=diffq", r"compression.qat.method='diffq' must be one of"),
    ],
)
def test_a_bad_lsq_config_is_refused_before_work(make_cfg, override, message):
    from patholite.pipelines.preflight import check_run

    cfg = make_cfg("compression=qat", "compression.qat.method=lsq", override)
    with pytest.raises(ConfigError, match=message):
        check_run(cfg)  # the config checks preflight runs before any data, model or training


@pytest.fixture(scope="module")
def colour_vit() -> nn.Module:
    """A micro ViT that learned the colour task (real margins: agreement tests mean something)."""
    torch.manual_seed(0)
    return train_on_colour_task(tiny_vit(depth=2), batches=12)


def lsq_trained(net: nn.Module, weight_bits: int, act_bits: int = 8) -> nn.Module:
    """``net`` prepared for LSQ, calibrated, and a few LSQ steps on the colour task (real steps)."""
    torch.manual_seed(0)
    lsq = prepare_lsq(net, weight_bits, act_bits, 32)
    x, y = colour_task(96, seed=5)
    calibrate_lsq(lsq, list(x.split(32)))
    opt = torch.optim.AdamW(lsq.parameters(), 1e-3)
    for xb, yb in zip(x.split(32), y.split(32), strict=True):
        loss = nn.functional.cross_entropy(lsq(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lsq.eval()


META = {"model": {"name": "vit_micro"}, "class_names": ["a", "b", "c", "d"], "image_size": 32}
META |= {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_the_qdq_onnx_export_reproduces_the_torch_fake_quant_model(tmp_path, colour_vit, weight_bits):
    lsq = lsq_trained(colour_vit, weight_bits)
    x, _ = colour_task(64, seed=9)
    files = save_lsq_artifact(lsq, tmp_path, META, [x[:16]])
    ort_net, meta = load_artifact(tmp_path)
    assert files == ["model.onnx", "artifact.json"] and meta["kind"] == "onnx"
    with torch.no_grad():
        ref, got = lsq(x), ort_net(x)
    # Both sides compute round(clamp(v/s)) * s with the same steps and the same integers: what remains is
    # float summation order (~1e-6 of the logits) and, rarely, an activation landing on the other side of
    # a rounding boundary (one step of one element, ~1e-3 of a logit here): 1e-3 of the largest logit.
    tol = 1e-3 * float(ref.abs().max())
    assert float((ref - got).abs().max()) <= tol
    assert torch.equal(ref.argmax(1), got.argmax(1))
    how = meta["quantization"]
    assert (how["method"], how["weight_bits"], how["format"]) == ("lsq", weight_bits, "QDQ")
    assert how["export_check"]["images"] == 16 and how["export_check"]["top1_flips"] == 0
    qkv = how["layers"]["blocks.0.attn.qkv"]
    assert qkv["weight_scales"] == ("per_block" if weight_bits == 4 else "per_channel")
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_weight_dq")]
    assert len(dq) == 9  # every Linear: 8 in the blocks, the head
    types = {t.name: t.data_type for t in graph.initializer}
    want = onnx.TensorProto.INT4 if weight_bits == 4 else onnx.TensorProto.INT8
    assert sum(types[n.input[0]] == want for n in dq) == (8 if weight_bits == 4 else 9)  # head: INT8
    # integer weights are stored as bytes: the file is well under the float network's size (an INT8 tensor
    # written as int32_data, up to 10 bytes a value, made an 8-bit file larger than FP32's)
    float_bytes = 4 * sum(p.numel() for p in colour_vit.parameters())
    assert (tmp_path / "model.onnx").stat().st_size < 0.45 * float_bytes


def test_lsq_runs_end_to_end_through_the_qat_option(make_cfg, tmp_path):
    cfg = make_cfg(
        "compression=qat",
        "compression.qat.method=lsq",
        "compression.qat.weight_bits=4",
        "compression.qat.finetune.epochs=1",
        "compression.qat.calibration_batches=2",
    )
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    fp32, lsq = record["artifacts"]
    assert (fp32["name"], lsq["name"], lsq["source"]) == ("fp32", "lsq_int4", "fp32")
    assert lsq["parity"]["against"] == "fp32" and lsq["parity"]["n_samples"] > 0
    meta = json.loads((tmp_path / "run" / "artifacts" / "lsq_int4" / "artifact.json").read_text())
    check = meta["quantization"]["export_check"]
    assert check["top1_flips"] == 0 and check["max_abs_logit_diff"] < 1e-2
    assert meta["quantization"]["block_size"] == 32 and meta["opset"] == 21


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` on the way now raises ImportError
from patholite.deploy import main
code = main(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
sys.exit(code)
"""


def test_the_deployed_artifact_classifies_images_with_no_torch(tmp_path, colour_vit, capsys):
    from PIL import Image

    lsq = lsq_trained(colour_vit, 8)
    art = tmp_path / "art"
    save_lsq_artifact(lsq, art, META, [])
    x, _ = colour_task(6, seed=11)
    # images as a user has them: 8-bit RGB files at the artifact's size
    pixels = ((x * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, p in enumerate(pixels):
        paths.append(str(tmp_path / f"tile{i}.png"))
        Image.fromarray(p).save(paths[-1])
    out = tmp_path / "pred.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(art), *paths, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["image", "label", "p_a", "p_b", "p_c", "p_d"] and len(rows) == 7
    # the same images through torch: the fake-quant model on the pixels, normalised as the sidecar says
    inputs = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        probs = torch.softmax(lsq(inputs), 1).numpy()
    got = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert [r[1] for r in rows[1:]] == [META["class_names"][k] for k in probs.argmax(1)]
    assert np.abs(got - probs).max() < 1e-3
    # a folder that is not an ONNX artifact: one clear line, exit code 2 (in this process: same code path)
    from patholite.deploy import main

    assert main([str(tmp_path), paths[0]]) == 2
    assert "artifact.json is missing" in capsys.readouterr().err
