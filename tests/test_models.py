"""Model factory: timm networks offline, local weights with resized position embeddings, the pyramid head."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from patholite.errors import CheckpointError
from patholite.models import build_model, classifier_keys
from patholite.models.pyramid import PyramidViT

MICRO = {
    "name": "vit_micro",
    "timm_name": "vit_tiny_patch16_224",
    "family": "vit",
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
}


@pytest.mark.parametrize(
    "spec,size",
    [
        (MICRO, 32),
        ({"name": "deit_tiny", "timm_name": "deit_tiny_patch16_224", "family": "vit"}, 32),
        ({"name": "resnet18", "timm_name": "resnet18", "family": "cnn"}, 32),
        ({"name": "mobilenetv3_large", "timm_name": "mobilenetv3_large_100", "family": "cnn"}, 32),
    ],
)
def test_networks_classify_at_the_dataset_size(spec, size):
    net = build_model(spec, num_classes=5, image_size=size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)


def test_pyramid_head_pools_the_chosen_blocks():
    net = build_model({**MICRO, "pyramid": {"enabled": True, "blocks": None}}, 4, 32)
    assert isinstance(net, PyramidViT)
    assert net.blocks == [1, 2, 3]  # depth 4: depth//4, depth//2, depth-1
    assert net.head.in_features == 64 * 3
    feats = net.forward_features(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [torch.Size([2, 64])] * 3
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    custom = build_model({**MICRO, "pyramid": {"enabled": True, "blocks": [0, 3]}}, 4, 32)
    assert custom.head.in_features == 128


def test_checkpoint_loads_at_another_image_size_with_resized_pos_embed(tmp_path):
    src = build_model(MICRO, 4, 32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_model({**MICRO, "checkpoint": str(path)}, 4, 64)
    assert dst.pos_embed.shape[1] == 1 + (64 // 4) ** 2
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.head.weight, src.head.weight)


def test_lightning_checkpoint_and_skip_head(tmp_path):
    src = build_model(MICRO, 7, 32)
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model({**MICRO, "checkpoint": str(path)}, 4, 32)
    dst = build_model({**MICRO, "checkpoint": str(path), "checkpoint_skip_head": True}, 4, 32)
    assert torch.equal(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    assert dst.head.weight.shape == (4, 64)


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model({**MICRO, "checkpoint": str(tmp_path / "none.pth")}, 4, 32)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        build_model({**MICRO, "checkpoint": str(junk)}, 4, 32)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(4, 8)}, other)
    with pytest.raises(CheckpointError, match="does not match the model"):
        build_model({**MICRO, "checkpoint": str(other)}, 4, 32)


def test_classifier_keys_cover_the_head_and_distillation_head():
    assert classifier_keys(build_model(MICRO, 4, 32)) == ["head.weight", "head.bias"]
    distilled = build_model(
        {"name": "d", "timm_name": "deit_tiny_distilled_patch16_224", "family": "vit"}, 4, 32
    )
    assert set(classifier_keys(distilled)) == {
        "head.weight",
        "head.bias",
        "head_dist.weight",
        "head_dist.bias",
    }


def test_pyramid_head_takes_plain_vit_weights(tmp_path):
    """Foundation-model weights (a plain ViT, any head) feed the pyramid's backbone; its head starts fresh."""
    plain = build_model(MICRO, 1000, 32)
    path = tmp_path / "foundation.pth"
    torch.save(plain.state_dict(), path)
    net = build_model({**MICRO, "pyramid": {"enabled": True}, "checkpoint": str(path)}, 4, 64)
    assert torch.equal(net.vit.blocks[2].attn.proj.weight, plain.blocks[2].attn.proj.weight)
    assert net.head.weight.shape == (4, 64 * 3)


def test_preflight_checks_every_checkpoint_shape_on_the_meta_device(tmp_path):
    from patholite.models.factory import create_network, load_weights

    wide = build_model({**MICRO, "kwargs": {**MICRO["kwargs"], "embed_dim": 96, "num_heads": 4}}, 4, 32)
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    with torch.device("meta"):
        net = create_network(MICRO, 4, 32)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_weights(net, path)
