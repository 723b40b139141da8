"""Structured ViT pruning: heads and MLP channels go, shapes rebuild from JSON, mistakes fail early."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn

from patholite.compress.prune import (
    MovingAverageImportance,
    apply_structure,
    describe_structure,
    flops_and_params,
    prune_vit,
)
from patholite.errors import CheckpointError, ConfigError
from patholite.measure.cost import torch_threads
from patholite.models.pyramid import PyramidViT
from tests.helpers import tiny_vit

SIZE = 32
HEADS, HIDDEN, DIM = 4, 256, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from threads, and on a busy 2-core machine two OpenMP threads made each
    backward pass 100x slower (1.2 s instead of 7 ms)."""
    with torch_threads(1):
        yield


def batches(n: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)
    ]


def kept_heads(before: nn.Module, after: nn.Module) -> list[list[int]]:
    """For q, k and v: which original heads survive (matched by their weight rows)."""
    d = before.head_dim
    w0 = before.qkv.weight.detach().view(3, before.num_heads, d, -1)
    w1 = after.qkv.weight.detach().view(3, after.num_heads, d, -1)
    return [
        [
            h
            for h in range(before.num_heads)
            if any(torch.equal(w0[i, h], w1[i, j]) for j in range(after.num_heads))
        ]
        for i in range(3)
    ]


def test_ratio_half_removes_heads_and_channels():
    net = tiny_vit()
    original = copy.deepcopy(net)
    flops0, params0 = flops_and_params(net, SIZE)
    out = prune_vit(net, ratio=0.5, importance="magnitude", image_size=SIZE)
    assert out is net
    flops1, params1 = flops_and_params(net, SIZE)
    assert params1 < params0 and flops1 < flops0
    for block, ref in zip(net.blocks, original.blocks, strict=True):
        attn = block.attn
        assert attn.num_heads == HEADS // 2 and attn.head_dim == DIM // HEADS
        assert attn.attn_dim == attn.num_heads * attn.head_dim == attn.proj.in_features
        assert attn.qkv.out_features == 3 * attn.attn_dim
        assert block.mlp.fc1.out_features == HIDDEN // 2 == block.mlp.fc2.in_features
        assert block.mlp.fc1.out_features % 8 == 0
        # Whole heads: q, k and v keep the same heads; the residual width is untouched.
        q, k, v = kept_heads(ref.attn, attn)
        assert q == k == v and len(q) == attn.num_heads
        assert attn.qkv.in_features == attn.proj.out_features == block.mlp.fc2.out_features == DIM
    assert net.patch_embed.proj.weight.shape == original.patch_embed.proj.weight.shape
    assert net.head.weight.shape == original.head.weight.shape
    assert net.pos_embed.shape == original.pos_embed.shape
    assert net(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 4)


@pytest.mark.parametrize(
    "importance,saliency",
    [("magnitude", "taylor"), ("taylor", "taylor"), ("moving_average", "taylor"), ("moving_average", "grad")],
)
def test_each_importance_prunes_and_restores_the_network(importance, saliency):
    net = tiny_vit().train()
    net.head.weight.requires_grad_(False)  # a frozen layer stays frozen
    prune_vit(
        net, ratio=0.3, importance=importance, saliency=saliency, scoring_batches=batches(), image_size=SIZE
    )
    assert net.training
    assert not net.head.weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert all(getattr(m, "fused_attn", True) == timm.layers.use_fused_attn() for m in net.modules())
    shapes = describe_structure(net)["blocks"]
    # 0.3 of 4 heads rounds to 1 head; floor(0.7 * 256) = 179 rounds down to 176.
    assert all(s == {"num_heads": 3, "head_dim": 16, "mlp_hidden": 176} for s in shapes)
    assert net.eval()(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 4)


def _fc1_group(net: nn.Module):
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 3, SIZE, SIZE))
    fc1 = net.blocks[0].mlp.fc1
    return graph.get_pruning_group(fc1, tp.prune_linear_out_channels, list(range(fc1.out_features)))


def _moving_average_scores(net: nn.Module, beta: float, saliency: str, data) -> torch.Tensor:
    imp = MovingAverageImportance(beta=beta, saliency=saliency)
    for x, y in data:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        imp.update(net)
    return imp(_fc1_group(net))


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_moving_average_accumulates_per_batch():
    net = tiny_vit().eval()
    data = batches(2)
    fc1, fc2 = net.blocks[0].mlp.fc1, net.blocks[0].mlp.fc2
    per_batch = []
    for x, y in data:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        per_batch.append(
            [(fc1.weight * fc1.weight.grad).abs().sum(1), (fc2.weight * fc2.weight.grad).abs().sum(0)]
        )
    beta = 0.6
    # S_2 = beta * (1 - beta) * s_1 + (1 - beta) * s_2 per layer; mean over fc1/fc2; then / its mean.
    expected = sum(beta * (1 - beta) * a + (1 - beta) * b for a, b in zip(*per_batch, strict=True)) / 2
    expected = expected / expected.mean()
    scores = _moving_average_scores(net, beta, "taylor", data)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)

    # The decay matters, and the result is not Taylor's one-shot |w * (g_1 + g_2)|.
    assert not torch.allclose(scores, _moving_average_scores(net, 0.1, "taylor", data), rtol=1e-3)
    net.zero_grad(set_to_none=True)
    for x, y in data:
        nn.functional.cross_entropy(net(x), y).backward()
    taylor = tp.importance.GroupTaylorImportance()(_fc1_group(net))
    assert not torch.allclose(scores, taylor, rtol=1e-3)
    # With one batch the moving average is Taylor up to a constant, which the normalisation removes.
    one = _moving_average_scores(net, beta, "taylor", data[:1])
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(data[0][0]), data[0][1]).backward()
    torch.testing.assert_close(
        one, tp.importance.GroupTaylorImportance()(_fc1_group(net)), rtol=1e-4, atol=1e-6
    )
    grad_scores = _moving_average_scores(net, beta, "grad", data)
    assert not torch.allclose(scores, grad_scores, rtol=1e-3)


def test_target_flops_is_reached_closely():
    net = tiny_vit()
    flops0, _ = flops_and_params(net, SIZE)
    target = 0.6 * flops0
    prune_vit(net, target_flops=target, importance="magnitude", image_size=SIZE)
    flops1, _ = flops_and_params(net, SIZE)
    assert 0.9 * target < flops1 <= target
    assert all(s["mlp_hidden"] % 8 == 0 for s in describe_structure(net)["blocks"])


def test_target_flops_above_the_network_prunes_nothing():
    net = tiny_vit()
    flops0, params0 = flops_and_params(net, SIZE)
    with pytest.warns(UserWarning, match="nothing pruned"):
        prune_vit(net, target_flops=2 * flops0, importance="magnitude", image_size=SIZE)
    assert flops_and_params(net, SIZE) == (flops0, params0)


def test_structure_rebuilds_the_pruned_network_exactly(tmp_path):
    net = tiny_vit(seed=0)
    prune_vit(net, ratio=0.5, importance="taylor", scoring_batches=batches(1), image_size=SIZE)
    structure = json.loads(json.dumps(describe_structure(net)))
    save_file(net.state_dict(), str(tmp_path / "pruned.safetensors"))

    fresh = apply_structure(tiny_vit(seed=7), structure)
    fresh.load_state_dict(load_file(str(tmp_path / "pruned.safetensors")), strict=True)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net.eval()(x))
    assert describe_structure(fresh) == structure


def test_pyramid_vit_prunes_its_inner_blocks():
    net = PyramidViT(tiny_vit(), num_classes=4, blocks=[1, 2, 3])
    prune_vit(net, ratio=0.5, importance="magnitude", image_size=SIZE)
    structure = describe_structure(net)
    assert structure["blocks_path"] == "vit.blocks"
    fresh = apply_structure(PyramidViT(tiny_vit(seed=3), num_classes=4, blocks=[1, 2, 3]), structure)
    fresh.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net.eval()(x))


@pytest.mark.parametrize("heads,mlp", [(True, False), (False, True)])
def test_heads_or_mlp_alone(heads, mlp):
    net = tiny_vit()
    prune_vit(net, ratio=0.5, importance="magnitude", heads=heads, mlp=mlp, image_size=SIZE)
    shape = describe_structure(net)["blocks"][0]
    assert shape["num_heads"] == (HEADS // 2 if heads else HEADS)
    assert shape["mlp_hidden"] == (HIDDEN // 2 if mlp else HIDDEN)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "net_fn,kwargs,error,match",
    [
        # Arguments that the prune stage's config check validates first: a direct caller's bug.
        (tiny_vit, {"ratio": 0.0}, ValueError, "between 0 and 1"),
        (tiny_vit, {"ratio": 1.2}, ValueError, "between 0 and 1"),
        (tiny_vit, {}, ValueError, "exactly one of ratio"),
        (tiny_vit, {"ratio": 0.5, "target_flops": 1e6}, ValueError, "exactly one of ratio"),
        (tiny_vit, {"target_flops": -1.0}, ValueError, "positive"),
        (tiny_vit, {"ratio": 0.5, "importance": "taylor"}, ValueError, "scoring_batches"),
        (tiny_vit, {"ratio": 0.5, "importance": "moving_average"}, ValueError, "scoring_batches"),
        (tiny_vit, {"ratio": 0.5, "importance": "taylor", "scoring_batches": []}, ValueError, "no batch"),
        (tiny_vit, {"ratio": 0.5, "importance": "hessian"}, ValueError, "importance='hessian'"),
        (
            tiny_vit,
            {"ratio": 0.5, "importance": "magnitude", "saliency": "fisher"},
            ValueError,
            "saliency='fisher'",
        ),
        (tiny_vit, {"ratio": 0.5, "importance": "magnitude", "beta": 1.0}, ValueError, "beta"),
        (tiny_vit, {"ratio": 0.5, "importance": "magnitude", "round_to": 0}, ValueError, "round_to"),
        (
            tiny_vit,
            {"ratio": 0.5, "importance": "magnitude", "heads": False, "mlp": False},
            ValueError,
            "removes nothing",
        ),
        # What only the network reveals: the config (model or target) must change.
        (tiny_vit, {"target_flops": 1.0, "importance": "magnitude"}, ConfigError, "out of reach"),
        (ResNetLike, {"ratio": 0.5, "importance": "magnitude"}, ConfigError, "no Vision Transformer blocks"),
    ],
)
def test_mistakes_raise_and_leave_the_network(net_fn, kwargs, error, match):
    net = net_fn()
    before = {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        prune_vit(net, image_size=SIZE, **kwargs)
    assert {k: v.shape for k, v in net.state_dict().items()} == before


def test_structure_that_does_not_fit_is_refused():
    pruned = describe_structure(tiny_vit())
    wider = copy.deepcopy(pruned)
    wider["blocks"][0]["num_heads"] = HEADS + 1
    with pytest.raises(CheckpointError, match="do not fit"):
        apply_structure(tiny_vit(), wider)
    with pytest.raises(CheckpointError, match="blocks"):
        apply_structure(tiny_vit(depth=3), pruned)
    with pytest.raises(CheckpointError, match="describe_structure"):
        apply_structure(tiny_vit(), {"blocks": []})
    with pytest.raises(CheckpointError, match="no Vision Transformer blocks"):
        apply_structure(ResNetLike(), pruned)
