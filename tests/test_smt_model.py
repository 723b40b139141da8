"""SMT (R3): the focusing gradient, the focusing memory, the losses and their schedule, the inference walk's
reads, and training steps of the module on fake slides."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from patholite.errors import ConfigError
from patholite.models.factory import create_network
from patholite.models.smt import SMTNet, focusing_gradient, predict_slide
from patholite.models.smt_focus import (
    FocusMemory,
    cls_loss,
    emb_loss,
    focus_key,
    focus_loss,
    minmax,
    ret_loss,
    schedule_weights,
)
from patholite.modules.smt import DEPTH_KEY, MEMORY_KEY, SMTModule
from patholite.wsi.region import Box

S, GRID = 32, 4
ENCODER = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def tiny_net(top_k: int | None = None, seed: int = 0) -> SMTNet:
    torch.manual_seed(seed)
    return SMTNet(ENCODER, num_classes=2, image_size=S, grid=GRID, layers=3, top_k=top_k)


class FakeReader:
    """Counts reads and returns random images of the requested size."""

    def __init__(self, seed: int = 0) -> None:
        self.reads = 0
        self.boxes: list[Box] = []
        self.rng = np.random.default_rng(seed)

    def read(self, box: Box, size: int) -> np.ndarray:
        self.reads += 1
        self.boxes.append(box)
        return self.rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- network
def test_factory_builds_smt_with_one_token_per_focusing_patch():
    cfg = {"name": "smt", "family": "smt", **ENCODER, "smt": {"image_size": S, "grid": GRID, "layers": 3}}
    net = create_network(cfg, num_classes=2, image_size=999)  # smt.image_size wins
    assert isinstance(net, SMTNet) and len(net.encoders) == 3 and len(net.predictors) == 2
    logits, cls, patches = net.encode(1, torch.randn(2, 3, S, S))
    assert logits.shape == (2, 2) and cls.shape == (2, 32) and patches.shape == (2, GRID * GRID, 32)
    assert net(torch.randn(1, 3, S, S)).shape == (1, 2)
    scores = net.focus(0, patches)
    assert scores.shape == (2, GRID * GRID) and bool(((scores > 0) & (scores < 1)).all())


def test_top_k_beyond_the_grid_is_refused():
    with pytest.raises(ConfigError, match="top_k"):
        tiny_net(top_k=GRID * GRID + 1)
    with pytest.raises(ConfigError, match="top_k"):
        predict_slide(tiny_net(), FakeReader(), Box(0, 0, 512), GRID * GRID + 1, MEAN, STD)
    with pytest.raises(ConfigError, match="divide"):
        SMTNet(ENCODER, 2, image_size=30, grid=4)


def test_focusing_gradient_matches_autograd_through_a_hand_written_first_block():
    net = tiny_net().eval()
    enc = net.encoders[0]
    x = torch.randn(2, 3, S, S)

    tokens = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
    blk, attn_mod = enc.blocks[0], enc.blocks[0].attn
    h = blk.norm1(tokens)
    b, n, c = h.shape
    qkv = attn_mod.qkv(h).reshape(b, n, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(-1)  # B x H x N x N
    out = attn_mod.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    t = tokens + blk.ls1(out)
    t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    for later in enc.blocks[1:]:
        t = later(t)
    logits = enc.head(enc.norm(t)[:, 0])
    (grad,) = torch.autograd.grad(logits.softmax(-1)[:, 1].sum(), attn)
    expected = grad.sum(dim=(1, 2))[:, 1:]  # heads and queries summed, class-token column dropped

    fused_before = attn_mod.fused_attn
    got = focusing_gradient(net, 0, x, positive=[1])
    assert got.shape == (2, GRID * GRID)
    assert torch.allclose(got, expected, atol=1e-6) and expected.abs().sum() > 0
    assert attn_mod.fused_attn == fused_before  # the probe restores timm's setting


def test_focus_predictor_gives_the_encoder_no_gradient():
    net = tiny_net()
    _, _, patches = net.encode(0, torch.randn(1, 3, S, S))
    net.focus(0, patches).sum().backward()
    assert all(p.grad is None for p in net.encoders[0].parameters())
    assert all(p.grad is not None for p in net.predictors[0].parameters())


# ---------------------------------------------------------------------------------------------- memory
def test_focus_memory_ensembles_per_epoch_and_survives_a_resume(tmp_path):
    eps = 0.9
    grads = [torch.randn(2, GRID * GRID) for _ in range(3)]
    keys = [focus_key(3, ()), focus_key(3, (5,))]
    memory = FocusMemory(eps)
    expected = torch.zeros(2, GRID * GRID)
    for epoch in (0, 1):
        targets = memory.update(keys, grads[epoch], epoch)
        expected = eps * expected + (1 - eps) * grads[epoch]
        assert torch.allclose(memory.raw(keys[0]), expected[0]) and torch.allclose(
            memory.raw(keys[1]), expected[1]
        )
        assert torch.allclose(targets, minmax(expected))
        assert float(targets.min()) == 0.0 and float(targets.max()) == pytest.approx(1.0)
    memory.update(keys, torch.randn(2, GRID * GRID), 1)  # a second look in the same epoch changes nothing
    assert torch.allclose(memory.raw(keys[0]), expected[0])

    torch.save(memory.state_dict(), tmp_path / "memory.pt")  # the run stops; a new one resumes
    resumed = FocusMemory(0.5)
    resumed.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert resumed.eps == eps and len(resumed) == 2
    resumed.update(keys, grads[2], 2)
    expected = eps * expected + (1 - eps) * grads[2]
    assert torch.allclose(resumed.raw(keys[1]), expected[1])
    assert torch.equal(resumed.read([focus_key(9, ())], width=GRID * GRID), torch.zeros(1, GRID * GRID))
    # a new stage (QAT fine-tuning) counts from epoch 0 again: without restarting, epoch 0 would be ignored
    stale = resumed.raw(keys[0]).clone()
    resumed.update(keys, grads[0], 0)
    assert torch.equal(resumed.raw(keys[0]), stale)
    resumed.restart_epochs()
    resumed.update(keys, grads[1], 0)
    assert torch.allclose(resumed.raw(keys[0]), eps * stale + (1 - eps) * grads[1][0])


# ---------------------------------------------------------------------------------------------- losses
def test_reform_weights_are_zero_before_the_next_layer_starts_and_ramp_up():
    starts = [0, 2, 4]
    early = schedule_weights(1, starts, fwd_weight=1.0, bwd_weight=0.1, ramp_epochs=2)
    assert early["cls"] == [1.0, 0.0, 0.0] and early["focus"] == [1.0, 0.0]
    assert early["ret"] == [0.0, 0.0] and early["emb"] == [0.0, 0.0]
    assert schedule_weights(0, starts, ramp_epochs=2)["cls"][0] == pytest.approx(0.5)
    mid = schedule_weights(2, starts, fwd_weight=1.0, bwd_weight=0.1, ramp_epochs=2)
    assert mid["cls"][1] == pytest.approx(0.5) and mid["ret"] == pytest.approx([0.05, 0.0])
    assert mid["emb"] == mid["ret"]
    late = schedule_weights(9, starts, fwd_weight=1.0, bwd_weight=0.1, ramp_epochs=2, reform=["ret"])
    assert late["cls"] == [1.0, 1.0, 1.0] and late["ret"] == pytest.approx([0.1, 0.1])
    assert late["emb"] == [0.0, 0.0]
    with pytest.raises(ConfigError, match="reform"):
        schedule_weights(0, starts, reform=["ret", "bogus"])


def test_losses_vanish_exactly_when_prediction_meets_target():
    scores = torch.tensor([[0.1, 0.9], [0.4, 0.6]])
    assert float(focus_loss(scores, scores.clone())) == 0.0
    assert float(focus_loss(scores, scores.flip(1))) > 0.0
    assert float(ret_loss(scores, scores.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(ret_loss(scores, 1 - scores)) > 0.0
    cls, nxt = torch.randn(3, 8, requires_grad=True), torch.randn(3, 2, 8, requires_grad=True)
    assert float(emb_loss(nxt.mean(1).detach(), nxt)) == 0.0
    loss = emb_loss(cls, nxt)
    loss.backward()
    assert loss.item() > 0 and nxt.grad is None and cls.grad is not None  # the next layer is a target
    assert emb_loss(cls, nxt, "sum").item() == pytest.approx(loss.item() * 8, rel=1e-5)
    assert float(cls_loss(torch.tensor([[5.0, -5.0]]), torch.tensor([1]))) > 1.0


# ----------------------------------------------------------------------------------------------- walk
@pytest.mark.parametrize("k", [1, 2])
def test_predict_slide_reads_one_plus_k_plus_k_squared_regions(k):
    net, box = tiny_net(), Box(100.0, 50.0, 1024.0)
    reader = FakeReader()
    out = predict_slide(net, reader, box, k, MEAN, STD)
    assert reader.reads == out["reads"] == 1 + k + k * k
    assert [len(layer["boxes"]) for layer in out["layers"]] == [1, k, k * k]
    assert [layer["boxes"][0][2] for layer in out["layers"]] == [1024.0, 256.0, 64.0]
    assert out["layers"][0]["scores"] == [None] and len(out["layers"][2]["scores"]) == k * k
    for x, y, side in out["layers"][1]["boxes"]:  # focused patches lie inside the thumbnail's box
        assert box.x <= x and x + side <= box.x + box.side and box.y <= y and y + side <= box.y + box.side
    assert sum(out["probs"]) == pytest.approx(1.0) and out["label"] in (0, 1)
    assert out["read_seconds"] >= 0 and out["model_seconds"] > 0

    cached = FakeReader()
    thumb = np.zeros((S, S, 3), dtype=np.uint8)
    out = predict_slide(net, cached, box, k, MEAN, STD, thumbnail=thumb)
    assert cached.reads == out["reads"] == k + k * k
    assert predict_slide(net, FakeReader(), box, k, MEAN, STD, thumbnail=thumb, depth=2)["reads"] == k


# --------------------------------------------------------------------------------------------- module
def smt_model_cfg(start_epochs=(0, 0, 0)) -> dict:
    return {
        "name": "smt",
        "family": "smt",
        **ENCODER,
        "smt": {
            "image_size": S,
            "grid": GRID,
            "top_k": 2,
            "layers": 3,
            "start_epochs": list(start_epochs),
            "lrs": [0.01, 0.01, 0.02],
            "ramp_epochs": 1,
            "reform": ["ret", "emb"],
        },
    }


def fake_batch(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g),
        "label": torch.arange(n) % 2,
        "slide": torch.arange(n),
        "box": torch.tensor([[0.0, 0.0, 1024.0 * (i + 1)] for i in range(n)]),
    }


def make_module(readers: dict[int, FakeReader], start_epochs=(0, 0, 0), **kwargs) -> SMTModule:
    torch.manual_seed(0)
    cfg = smt_model_cfg(start_epochs)
    return SMTModule(cfg, ["Normal", "Tumor"], MEAN, STD, region_reader=readers.get, **kwargs)


def test_training_steps_update_encoders_and_predictors_and_the_memory():
    readers = {0: FakeReader(0), 1: FakeReader(1)}
    module = make_module(readers)
    optimizers = module.configure_optimizers()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    for epoch in (0, 1):
        terms = module.step_losses(fake_batch(), epoch)
        # per image: K focused + 1 negative at layer 2; per layer-2 focused image: K + 1 at layer 3
        assert terms["reads"] == 2 * (2 + 1) + 2 * 2 * (2 + 1)
        assert len(terms["cls"]) == 3 and len(terms["focus"]) == 2 and len(terms["ret"]) == 2
        for opt in optimizers:
            opt.zero_grad()
        terms["loss"].backward()
        for opt in optimizers:
            opt.step()
    assert sum(r.reads for r in readers.values()) == 2 * 18
    after = module.net.state_dict()
    for part in ("encoders.0.", "encoders.1.", "encoders.2.", "predictors.0.", "predictors.1."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    assert focus_key(0, ()) in module.memory and focus_key(1, ()) in module.memory
    layer_two = [k for k in module.memory._scores if k[1] == 1]
    assert len(layer_two) >= 2 * 2  # K focused images per slide, negatives are not focused

    # a fine-tuning module (QAT) continues this memory: epoch 0 of its own stage folds in, on the average
    tuned = make_module({0: FakeReader(0), 1: FakeReader(1)}, memory=module.memory.state_dict())
    thumb = focus_key(0, ())
    trained = module.memory.raw(thumb).clone()
    assert torch.equal(tuned.memory.raw(thumb), trained) and len(tuned.memory) == len(module.memory)
    tuned.step_losses(fake_batch(), 0)
    assert not torch.equal(tuned.memory.raw(thumb), trained)
    assert tuned.memory.raw(thumb).abs().sum() > 0.5 * trained.abs().sum()  # 0.9 of it carried over


def test_staged_start_reads_nothing_before_layer_two_starts():
    readers = {0: FakeReader(0), 1: FakeReader(1)}
    module = make_module(readers, start_epochs=(0, 3, 5))
    terms = module.step_losses(fake_batch(), 0)
    assert terms["reads"] == 0 and len(terms["cls"]) == 1 and terms["ret"] == []
    assert terms["loss"].item() > 0


def test_lightning_fit_checkpoints_the_memory_and_loads_weights_only(tmp_path):
    readers = {i: FakeReader(i) for i in range(4)}
    module = make_module(readers, start_epochs=(0, 1, 1), gradient_clip_val=1.0)
    batch = fake_batch(4)
    items = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    assert module.trained_depth == 3
    assert "val/macro_f1" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    path = tmp_path / "smt.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # hyperparameters and memory are plain containers
    assert (
        raw["hyper_parameters"]["model"]["smt"]["top_k"] == 2
        and raw[DEPTH_KEY] == 3
        and len(raw[MEMORY_KEY]["keys"]) == len(module.memory)
    )

    restored = SMTModule.load_from_checkpoint(path, region_reader=readers.get, weights_only=True)
    assert restored.trained_depth == 3 and len(restored.memory) == len(module.memory)
    for key in module.memory._scores:
        assert torch.equal(restored.memory.raw(key), module.memory.raw(key))
    probs = restored.slide_probs(fake_batch(2))
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(1), torch.ones(2))


def test_every_encoder_can_start_from_a_tile_classifier(tmp_path):
    from patholite.artifacts.torch_float import save_float_artifact
    from patholite.errors import CheckpointError
    from patholite.models.factory import build_model, create_network
    from patholite.pipelines.tasks.slides import encoder_weights

    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    tile_cfg = {
        "name": "t",
        "timm_name": "vit_tiny_patch16_224",
        "family": "vit",
        "kwargs": {**kwargs, "patch_size": 8},
    }
    tile = create_network(tile_cfg, 4, 64)  # 4 tile classes; the SMT has 2 slide classes: head dropped
    save_float_artifact(tile, tmp_path / "tile", {"model": tile_cfg, "class_names": list("abcd")})
    smt = {"image_size": 64, "grid": 8, "top_k": 2, "layers": 3, "encoder_checkpoint": str(tmp_path / "tile")}
    cfg = {"name": "s", "timm_name": "vit_tiny_patch16_224", "family": "smt", "kwargs": kwargs, "smt": smt}
    net = build_model(cfg, 2, 64)
    for encoder in net.encoders:
        assert torch.equal(encoder.blocks[1].mlp.fc2.weight, tile.blocks[1].mlp.fc2.weight)
        assert encoder.head.out_features == 2
    assert not torch.equal(net.encoders[0].head.weight[:2], tile.head.weight[:2])
    with pytest.raises(CheckpointError, match="encoder_checkpoint=.*no weights there"):
        build_model({**cfg, "smt": {**smt, "encoder_checkpoint": str(tmp_path / "none")}}, 2, 64)
    # the tile classifier's run folder: its fp32 artifact
    run = tmp_path / "run"
    run.mkdir()
    other = tmp_path / "other"
    meta = {"model": tile_cfg, "class_names": list("abcd")}
    save_float_artifact(create_network(tile_cfg, 4, 64), other, meta)
    artifacts = [{"name": "fp32", "path": str(tmp_path / "tile")}, {"name": "fp32_ema", "path": str(other)}]
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "artifacts": artifacts}))
    with pytest.raises(CheckpointError, match="no weights there"):  # models never resolve run folders
        build_model({**cfg, "smt": {**smt, "encoder_checkpoint": str(run)}}, 2, 64)
    resolved = encoder_weights(str(run))  # what preflight does (the slide task's check)
    assert resolved == str(tmp_path / "tile") and encoder_weights(str(other)) == str(other)
    net = build_model({**cfg, "smt": {**smt, "encoder_checkpoint": resolved}}, 2, 64)
    assert torch.equal(net.encoders[2].blocks[0].attn.qkv.weight, tile.blocks[0].attn.qkv.weight)


def test_dynamic_qat_keeps_the_focusing_score_and_converts_to_dynamic_int8():
    """SMT's QAT is eager mode: the attention hook still yields the focusing score, weights are
    fake-quantized (the score moves), and it converts to the dynamic INT8 network quantize_dynamic makes."""
    from torch.ao.nn.qat import dynamic as nnqatd
    from torch.ao.nn.quantized import dynamic as nnqd

    from patholite.compress.qat import convert_dynamic_qat, prepare_dynamic_qat
    from patholite.compress.quantize import quantize_dynamic_int8

    net = tiny_net().eval()
    images = torch.rand(2, 3, S, S)
    qat = prepare_dynamic_qat(net)
    assert qat.training and not any(isinstance(m, nnqatd.Linear) for m in net.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    assert sum(isinstance(m, nnqatd.Linear) for m in qat.modules()) == linears
    float_score = focusing_gradient(net, 0, images, [1])
    qat.eval()
    qat_score = focusing_gradient(qat, 0, images, [1])
    assert qat_score.shape == (2, GRID * GRID) and torch.isfinite(qat_score).all()
    assert not torch.equal(qat_score, float_score)  # INT8-rounded weights
    assert torch.allclose(qat_score, float_score, atol=0.2 * float_score.abs().max().item())
    logits, _, _ = qat.train().encode(2, images)
    logits.sum().backward()  # straight-through: the float weights under the fake quantizers learn
    assert qat.encoders[2].blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    int8 = convert_dynamic_qat(qat)
    assert sum(isinstance(m, nnqd.Linear) for m in int8.modules()) == linears
    reference = quantize_dynamic_int8(net)
    assert int8.state_dict().keys() == reference.state_dict().keys()  # reloads as a dynamic INT8 artifact
    with torch.no_grad():
        a, b = int8.encode(0, images)[0], qat.eval().encode(0, images)[0]
    assert torch.allclose(a, b, atol=0.1)  # only the activations' run-time quantization differs
    with pytest.raises(ConfigError, match="needs a network from prepare_dynamic_qat"):
        convert_dynamic_qat(net)
