"""R1's pyramid head: every parameter it trains gets a gradient, so DDP (find_unused_parameters=False, the
default) trains it; the parts it never runs stay in the state dict, so saved pyramid artifacts still load."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from patholite.models.factory import create_network
from patholite.models.pyramid import PyramidViT

VIT_MICRO = {
    "name": "vit_micro",
    "timm_name": "vit_tiny_patch16_224",
    "family": "vit",
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
}


def pyramid(blocks: list[int] | None = None, **kwargs) -> PyramidViT:
    cfg = {**VIT_MICRO, "kwargs": {**VIT_MICRO["kwargs"], **kwargs}, "pyramid": {"enabled": True}}
    cfg["pyramid"]["blocks"] = blocks
    return create_network(cfg, 4, 32)


@pytest.mark.parametrize(
    "blocks, kwargs",
    [(None, {}), ([0, 1], {}), ([1], {"global_pool": "avg", "reg_tokens": 2})],
    ids=["default", "shallow", "avg-pool-registers"],
)
def test_every_trained_parameter_gets_a_gradient(blocks, kwargs):
    torch.manual_seed(0)
    net = pyramid(blocks, **kwargs)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    # the ViT's final norm (fc_norm when it average-pools) never runs in the pyramid
    assert ("vit.fc_norm.weight" if kwargs else "vit.norm.weight") in frozen
    assert ("vit.blocks.2.attn.qkv.weight" in frozen) == (blocks is not None)  # deeper than the last block
    assert not any(n.startswith(("head.", "scale_norms.")) for n in frozen)
    assert "vit.cls_token" not in frozen and "vit.pos_embed" not in frozen  # they feed every block
    # the optimiser leaves the frozen ones alone (no weight decay either)
    from patholite.modules.classifier import adamw_warmup_cosine

    trainer = type("T", (), {"estimated_stepping_batches": 4, "max_epochs": 1})()
    optim = {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_epochs": 0, "min_lr_ratio": 0.1}
    groups = adamw_warmup_cosine(trainer, net, optim)["optimizer"].param_groups
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in net.parameters())


def test_the_state_dict_keeps_every_vit_key():
    """Frozen, not removed: a pyramid artifact saved before (with the final norm and deeper blocks) loads."""
    net = pyramid([0, 1])
    plain = create_network(VIT_MICRO, 0, 32)
    expected = {f"vit.{k}" for k in plain.state_dict()} | {
        k for k in net.state_dict() if k.startswith(("head.", "scale_norms."))
    }
    assert set(net.state_dict()) == expected
    again = pyramid([0, 1])
    again.load_state_dict(net.state_dict(), strict=True)


def _ddp_rank(rank: int, world: int, store: str, blocks: list[int] | None, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(pyramid(blocks), find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):  # the second step is where DDP finds the unreduced gradients of the first
            x = torch.randn(4, 3, 32, 32, generator=generator)
            y = torch.randint(0, 4, (4,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.module.head.weight.detach().clone(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_train_the_pyramid_with_ddp_defaults(tmp_path):
    """R1's teacher on gpu_ddp: "Expected to have finished reduction in the prior iteration" before."""
    torch.manual_seed(0)
    before = pyramid([0, 1]).head.weight.detach().clone()  # the same seed as the ranks
    out = tmp_path / "head.pt"
    fd, store = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    os.remove(store)
    mp.spawn(_ddp_rank, args=(2, store, [0, 1], str(out)), nprocs=2, join=True)
    assert not torch.equal(torch.load(out, weights_only=True), before)  # it trained
