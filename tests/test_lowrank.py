"""Nystrom low-rank attention: exactness when m >= N, convergence in m, shared weights, FLOPs, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from patholite.compress.lowrank import NystromAttention, apply_nystrom, iterative_pinv, segment_means
from patholite.errors import ConfigError
from patholite.models.pyramid import PyramidViT
from tests import helpers


def tiny_vit(img: int = 32, depth: int = 4, seed: int = 0) -> nn.Module:
    """The shared micro ViT in eval mode: 65 tokens at 32 px, 1025 at 128 px."""
    return helpers.tiny_vit(img, depth, seed).eval()


def smooth_tokens(n: int = 65, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Tokens that vary smoothly along the sequence, as neighbouring patches of an image do."""
    t = torch.linspace(0, 1, n).unsqueeze(1)
    freqs = torch.arange(1, 9, dtype=torch.float32)
    basis = torch.cat([torch.sin(torch.pi * freqs * t), torch.cos(torch.pi * freqs * t)], dim=1)
    mix = torch.randn(basis.shape[1], dim, generator=torch.Generator().manual_seed(seed))
    return (basis @ mix / 4).unsqueeze(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def counted_flops(net: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("landmarks", [65, 100])
def test_landmarks_at_least_tokens_is_exact_attention(fused, landmarks):
    attn = tiny_vit().blocks[1].attn
    attn.fused_attn = fused
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        assert torch.allclose(NystromAttention.from_attention(attn, landmarks)(x), attn(x), atol=1e-5)


def test_error_is_small_and_shrinks_as_landmarks_grow():
    # A random init attends almost uniformly, which any m reproduces up to the pinv's floor; sharpening q and
    # k gives the attention structure that landmarks must resolve.
    attn = tiny_vit().blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight[:128] *= 10
    for seed in (0, 1):
        x = smooth_tokens(seed=seed)
        with torch.no_grad():
            ref = attn(x)
            e8, e16, e32 = (rel_err(NystromAttention.from_attention(attn, m)(x), ref) for m in (8, 16, 32))
        assert e8 > e16 > e32
        assert 1e-4 < e32 < 0.1  # close, yet an approximation (6 pinv iterations do not converge fully)


def test_whole_random_network_stays_close():
    net = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        out = apply_nystrom(copy.deepcopy(net), 16)(x)
    assert 0 < rel_err(out, ref) < 0.1


@pytest.mark.parametrize("n,m", [(65, 8), (65, 7), (10, 3), (64, 8), (5, 5)])
def test_segments_partition_the_tokens_into_true_means(n, m):
    means = segment_means(n, m, torch.empty(0))
    member = means > 0
    assert means.shape == (m, n)
    assert torch.equal(member.sum(dim=0), torch.ones(n, dtype=torch.long))  # one segment per token
    sizes = member.sum(dim=1)
    assert sizes.max() - sizes.min() <= 1
    x = torch.randn(n, 3)
    for i in range(m):
        assert torch.allclose((means @ x)[i], x[member[i]].mean(dim=0), atol=1e-6)
        assert member[i].nonzero().diff(dim=0).eq(1).all()  # contiguous


def test_uneven_landmarks_run():
    attn = tiny_vit().blocks[0].attn
    x = smooth_tokens()
    out = NystromAttention.from_attention(attn, 7)(x)  # 65 = 7 * 9 + 2
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_iterative_pinv_inverts_a_well_conditioned_kernel():
    a = (torch.randn(2, 8, 8) * 0.3 + 3 * torch.eye(8)).softmax(dim=-1)
    z = iterative_pinv(a, 6)
    assert torch.allclose(z, torch.linalg.inv(a), atol=1e-4)


def test_state_dict_keys_stay_and_exact_weights_load_strictly():
    net = tiny_vit()
    before = {k: v.shape for k, v in net.state_dict().items()}
    apply_nystrom(net, 8, blocks=[1, 3])
    assert [type(b.attn) is NystromAttention for b in net.blocks] == [False, True, False, True]
    assert list(net.state_dict()) == list(before)
    assert {k: v.shape for k, v in net.state_dict().items()} == before

    other = tiny_vit(seed=1).state_dict()  # the unmodified architecture, other weights
    net.load_state_dict(other, strict=True)
    assert torch.equal(net.blocks[1].attn.qkv.weight, other["blocks.1.attn.qkv.weight"])
    tiny_vit().load_state_dict(net.state_dict(), strict=True)  # and back


def test_parameters_are_shared_not_copied_and_rewrapping_changes_landmarks():
    net = tiny_vit()
    qkv = net.blocks[0].attn.qkv
    apply_nystrom(net, 8)
    apply_nystrom(net, 16, blocks=[0])
    assert net.blocks[0].attn.qkv is qkv
    assert net.blocks[0].attn.landmarks == 16 and net.blocks[1].attn.landmarks == 8


def test_pyramid_wrapped_vit_is_found():
    net = PyramidViT(tiny_vit(), num_classes=3, blocks=[1, 3])
    apply_nystrom(net, 8)
    assert all(isinstance(b.attn, NystromAttention) for b in net.vit.blocks)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_counted_flops_drop_at_long_sequences_only():
    # At 1025 tokens exact attention dominates; Nystrom makes it linear in N. Exact is counted unfused
    # (the counter does not see CPU scaled_dot_product_attention).
    net = tiny_vit(img=128, depth=1)
    net.blocks[0].attn.fused_attn = False
    x = torch.randn(1, 3, 128, 128)
    exact = counted_flops(net, x)
    assert counted_flops(apply_nystrom(copy.deepcopy(net), 32), x) < 0.5 * exact

    # At 65 tokens attention is a small share and the O(m^3) pinv per head offsets the saving.
    net = tiny_vit(depth=1)
    net.blocks[0].attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    exact = counted_flops(net, x)
    for m in (8, 16):
        assert abs(counted_flops(apply_nystrom(copy.deepcopy(net), m), x) / exact - 1) < 0.15


def test_gradients_reach_the_shared_weights():
    net = apply_nystrom(tiny_vit(depth=2), 8).train()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name in ("qkv.weight", "qkv.bias", "proj.weight"):
        grad = net.blocks[0].attn.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_half_precision_runs():
    attn = NystromAttention.from_attention(tiny_vit().blocks[0].attn, 8).to(torch.bfloat16)
    out = attn(smooth_tokens().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: apply_nystrom(tiny_vit(), 0),
        lambda: apply_nystrom(tiny_vit(), -3),
        lambda: apply_nystrom(tiny_vit(), 2.5),
        lambda: apply_nystrom(tiny_vit(), True),
        lambda: apply_nystrom(tiny_vit(), 8, blocks=[4]),
        lambda: apply_nystrom(tiny_vit(), 8, blocks=[-1]),
        lambda: apply_nystrom(tiny_vit(), 8, blocks=[]),
        lambda: apply_nystrom(tiny_vit(), 8, pinv_iters=0),
    ],
)
def test_bad_arguments_raise_value_error(call):
    # compression.lowrank.* is checked in preflight (the lowrank stage); the library guards its arguments
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: apply_nystrom(_NoBlocks(), 8),
        lambda: NystromAttention.from_attention(nn.Linear(4, 4), 8),
        lambda: apply_nystrom(tiny_vit(), 8).blocks[0].attn(torch.randn(1, 65, 64), is_causal=True),
    ],
)
def test_networks_it_cannot_change_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()
