"""The learnable stain front-end (models/stain.py), classical stain normalisation (data/stain_norm.py) and
the synthetic tiles' stain shift (data/synthetic/tiles.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from skimage.color import hed_from_rgb, rgb2hed

from patholite.artifacts.onnx import OrtModule, save_onnx_artifact
from patholite.artifacts.torch_float import load_float_artifact, save_float_artifact
from patholite.config.schema import SyntheticConfig
from patholite.data.base import ImageSet
from patholite.data.stain_norm import Macenko, Reinhard, _lab, fit_stain_norm, macenko_vectors
from patholite.data.synthetic.tiles import StainShift, SyntheticDataModule, generate_tile
from patholite.errors import ConfigError
from patholite.models.factory import create_network, load_weights
from patholite.models.stain import (
    ADAPT_FLOOR,
    ADAPT_TARGET,
    RUIFROK_HED,
    StainFrontEnd,
    prepare_stain,
    stain_matrix,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MICRO = {
    "name": "vit_micro",
    "timm_name": "vit_tiny_patch16_224",
    "family": "vit",
    "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
STAINED = {**MICRO, "stain": "learnable"}


def normalised(rgb01: torch.Tensor) -> torch.Tensor:
    return (rgb01 - MEAN) / STD


def shifted_gains(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        net.stain.gains.copy_(torch.tensor([1.4, 0.6, 1.1]))
    return net


# ------------------------------------------------------------------------------------ the front-end
def test_initial_matrix_reproduces_skimage_hed_deconvolution() -> None:
    """At initialisation the unmixing is Ruifrok & Johnston's (skimage's hed_from_rgb), and the densities of
    fixture pixels match skimage.color.rgb2hed: ours use log10, skimage divides ln(I) by ln(1e-6), so ours
    are 6 times skimage's, which also clips negatives to 0."""
    pixels = np.array(
        [[[0.35, 0.20, 0.55], [0.85, 0.45, 0.70], [0.95, 0.92, 0.96], [0.40, 0.25, 0.30]]], np.float64
    )  # haematoxylin-blue, eosin-pink, near background, dark mixed
    front = StainFrontEnd()
    np.testing.assert_allclose(front.unmix.detach().numpy(), hed_from_rgb, rtol=1e-6)
    x = normalised(torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None])
    ours = front.concentrations(x)[0].permute(1, 2, 0).detach().numpy() / 6.0
    np.testing.assert_allclose(np.maximum(ours, 0), rgb2hed(pixels), atol=2e-5)
    # hand check of one value: the eosin density of the pink pixel
    od = -np.log10(pixels[0, 1])
    assert ours[0, 1, 1] * 6 == pytest.approx(od @ hed_from_rgb[:, 1], abs=1e-4)


def test_identity_at_initialisation() -> None:
    torch.manual_seed(0)
    x = normalised(torch.rand(2, 3, 16, 16) * 0.98 + 0.01)
    front = StainFrontEnd()
    torch.testing.assert_close(front(x), x, atol=2e-5, rtol=0)
    plain, stained = create_network(MICRO, 4, 32).eval(), create_network(STAINED, 4, 32).eval()
    stained.load_state_dict({**stained.state_dict(), **plain.state_dict()})
    x = normalised(torch.rand(2, 3, 32, 32) * 0.98 + 0.01)
    torch.testing.assert_close(stained(x), plain(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("vectors", "says"),
    [
        ([[0.65, 0.70, 0.29], [0.65, 0.70, 0.29]], "parallel"),
        ([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.72, 1.69, 0.40]], "condition number"),  # third = sum
        ([[0.65, 0.70, 0.29], [0.0, 0.0, 0.0]], "non-zero"),
        ([[0.65, 0.70], [0.07, 0.99]], "2 or 3 rows of 3"),
    ],
)
def test_singular_or_malformed_vectors_refused(vectors, says) -> None:
    with pytest.raises(ConfigError, match=says):
        stain_matrix(vectors)
    with pytest.raises(ConfigError, match="model.stain_vectors"):
        create_network({**STAINED, "stain_vectors": vectors}, 4, 32)
    cfg = OmegaConf.create({"model": {**STAINED, "stain_vectors": vectors}, "dataset": {"mean": [0.5] * 3}})
    with pytest.raises(ConfigError, match="model.stain_vectors"):
        prepare_stain(cfg)  # preflight: before any work


def test_custom_vectors_and_preflight_pin_the_normalisation() -> None:
    rows = stain_matrix([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])  # Macenko's H and E
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-9)
    third = np.cross(rows[0], rows[1])
    np.testing.assert_allclose(rows[2], third / np.linalg.norm(third))
    assert np.array_equal(stain_matrix(None), RUIFROK_HED)
    cfg = OmegaConf.create(
        {"model": {**STAINED, "mean": None, "std": None}, "dataset": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    )
    prepare_stain(cfg)
    assert list(cfg.model.mean) == [0.5] * 3 and list(cfg.model.std) == [0.25] * 3
    with pytest.raises(ConfigError, match="model.stain='lernable'"):
        create_network({**MICRO, "stain": "lernable"}, 4, 32)


def test_gains_and_matrix_receive_gradients() -> None:
    torch.manual_seed(0)
    net = create_network(STAINED, 4, 32)
    x, y = normalised(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for p in (net.stain.gains, net.stain.unmix):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert net.stain.mix.requires_grad is False  # the reference stains are fixed


def test_every_artifact_carries_the_front_end(tmp_path) -> None:
    """The float artifact keeps the trained gains, dynamic INT8 keeps the front-end float, and a checkpoint
    without a front-end loads (the front-end stays the identity)."""
    torch.manual_seed(0)
    net = shifted_gains(create_network(STAINED, 4, 32).eval())
    x = normalised(torch.rand(3, 3, 32, 32) * 0.98 + 0.01)
    meta = {"model": STAINED, "class_names": list("abcd"), "image_size": 32}
    save_float_artifact(net, tmp_path / "fp32", meta)
    loaded, _ = load_float_artifact(tmp_path / "fp32")
    torch.testing.assert_close(loaded.stain.gains, net.stain.gains)
    torch.testing.assert_close(loaded(x), net(x))

    int8 = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    assert type(int8.stain) is StainFrontEnd and int8.stain.gains.dtype == torch.float32

    plain = create_network(MICRO, 4, 32)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    fresh = create_network(STAINED, 4, 32).eval()
    load_weights(fresh, tmp_path / "plain.pth")
    torch.testing.assert_close(fresh(x), plain.eval()(x), atol=1e-4, rtol=0)


def test_onnx_export_contains_the_front_end_and_matches(tmp_path) -> None:
    torch.manual_seed(0)
    net = shifted_gains(create_network(STAINED, 4, 32).eval())
    x = normalised(torch.rand(3, 3, 32, 32) * 0.98 + 0.01)
    save_onnx_artifact(net, tmp_path, {"model": STAINED, "class_names": list("abcd"), "image_size": 32})
    graph = onnx.load(tmp_path / "model.onnx").graph
    ops = [n.op_type for n in graph.node]
    # OD = -log10(I) then 10^-OD (a plain ViT's graph has no Log), through the learned unmixing with the
    # trained gains folded in and the reference stains
    assert "Log" in ops and "Pow" in ops and ops.index("Log") < ops.index("Pow")
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer]
    for tensor in (net.stain.unmix * net.stain.gains, net.stain.mix):
        expect = tensor.detach().numpy()
        assert any(w.shape == expect.shape and np.allclose(w, expect, atol=1e-6) for w in weights)
    torch.testing.assert_close(OrtModule(tmp_path / "model.onnx")(x), net(x), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- classical normalisation
@pytest.fixture(scope="module")
def tiles() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three tiles in the normal staining, and the same tissue in a shifted one."""
    shift = StainShift(rotate_deg=30.0, scale_h=1.4, scale_e=0.6)
    normal = [generate_tile(np.random.default_rng(i), i % 4, 64, 0.3) for i in range(3)]
    moved = [generate_tile(np.random.default_rng(i), i % 4, 64, 0.3, shift) for i in range(3)]
    return normal, moved


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_classical_normalisation_maps_a_shifted_image_toward_the_reference(tiles, method) -> None:
    normal, moved = tiles
    norm = fit_stain_norm(method, None, normal)
    assert isinstance(norm, Macenko if method == "macenko" else Reinhard)
    for ref, image in zip(normal, moved, strict=True):
        out = norm(image)
        assert out.shape == image.shape and out.dtype == np.uint8
        # the same tissue: the normalised shifted tile is closer to the unshifted one, pixel by pixel
        before = np.abs(image.astype(float) - ref).mean()
        after = np.abs(out.astype(float) - ref).mean()
        assert after < 0.85 * before, (before, after)
        if method == "reinhard":  # its CIELAB statistics become the reference's
            lab = _lab(out)
            np.testing.assert_allclose(lab.mean(0), norm.mean, atol=1.0)
            np.testing.assert_allclose(lab.std(0), norm.std, rtol=0.05)
        else:  # its stain vectors turn toward the reference's

            def angle(v):
                return np.degrees(np.arccos(np.clip((v * norm.vectors).sum(1), -1, 1))).sum()

            assert angle(macenko_vectors(out)) < 0.5 * angle(macenko_vectors(image))


def test_classical_normalisation_refuses_bad_settings(tmp_path) -> None:
    with pytest.raises(ConfigError, match="dataset.stain_norm='vahadane'"):
        fit_stain_norm("vahadane", None, [])
    with pytest.raises(ConfigError, match="not a readable image"):
        fit_stain_norm("macenko", str(tmp_path / "missing.png"), [])
    with pytest.raises(ConfigError, match="stain_norm is null"):
        fit_stain_norm(None, str(tmp_path / "ref.png"), [])
    blank = np.full((32, 32, 3), 250, np.uint8)
    with pytest.raises(ConfigError, match="almost no stained tissue"):
        fit_stain_norm("macenko", None, [blank])
    assert Macenko(np.eye(3)[:2], np.ones(2))(blank) is blank  # a blank tile is left as it is


# ------------------------------------------------------------------------------------ stain shift
def synthetic(tmp_path, **shift) -> SyntheticDataModule:
    cfg = OmegaConf.structured(
        SyntheticConfig(
            train_per_class=2, val_per_class=1, test_per_class=2, tile_size=24, image_size=24, batch_size=4
        )
    )
    cfg.cache_dir = str(tmp_path)
    for key, value in shift.items():
        cfg.stain_shift[key] = value
    return SyntheticDataModule(cfg)


def test_stain_shift_changes_only_the_test_split(tmp_path) -> None:
    plain, moved = synthetic(tmp_path), synthetic(tmp_path, rotate_deg=25.0, scale_e=0.7)
    a, b = plain.read_splits(), moved.read_splits()
    for split in ("train", "val"):
        assert np.array_equal(a[split].images, b[split].images)
    assert np.array_equal(a["test"].labels, b["test"].labels)  # the same tiles, restained
    assert not np.array_equal(a["test"].images, b["test"].images)
    assert len(list(tmp_path.glob("synthetic-test-*.npz"))) == 2  # the shifted split has its own cache
    assert len(list(tmp_path.glob("synthetic-train-*.npz"))) == 1


@pytest.mark.parametrize(
    ("shift", "says"),
    [
        ({"rotate_deg": 90.0}, "rotate_deg=90.0"),
        ({"scale_h": 0.0}, "scale_h=0.0"),
        ({"scale_e": 9.0}, "scale_e=9.0"),
    ],
)
def test_stain_shift_is_validated(tmp_path, shift, says) -> None:
    with pytest.raises(ConfigError, match=says):
        synthetic(tmp_path, **shift).read_splits()


def test_datamodule_normalises_every_split(tmp_path) -> None:
    dm = synthetic(tmp_path, scale_h=1.5)
    dm.cfg.stain_norm = "reinhard"
    dm.setup("fit")
    assert isinstance(dm.stain_norm, Reinhard)
    raw = dm.read_splits()
    for split in ("train", "val", "test"):  # tiles in memory are normalised once, in setup
        expect = np.stack([dm.stain_norm(image) for image in raw[split].images])
        assert np.array_equal(dm.splits[split].images, expect)
        assert "StainNormalise" not in repr(dm.datasets[split].transform)
    lazy = ImageSet(labels=[0], paths=["tile.png"])  # images read from files: normalised in the transform
    assert "StainNormalise(Reinhard)" in repr(dm._transform(lazy, train=False))


def test_front_end_is_not_weight_decayed() -> None:
    """AdamW decays weights toward 0; the unmixing matrix must stay near the deconvolution instead."""
    from types import SimpleNamespace

    from patholite.modules.classifier import adamw_warmup_cosine

    net = create_network(STAINED, 4, 32)
    optim = {
        "lr": 1e-3,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_epochs": 1,
        "min_lr_ratio": 0.01,
    }
    trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2)
    decay, no_decay = adamw_warmup_cosine(trainer, net, optim)["optimizer"].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is net.stain.unmix for p in no_decay["params"])
    assert not any(p is net.stain.unmix or p is net.stain.gains for p in decay["params"])
    assert any(p is net.head.weight for p in decay["params"])


# ------------------------------------------------------------------- the adaptive front-end (per image)
ADAPTIVE = {**MICRO, "stain": "adaptive"}


def rendered(conc: torch.Tensor) -> torch.Tensor:
    """Normalised images rendered from stain densities (B,3,H,W) with Ruifrok's stains (Beer-Lambert)."""
    od = torch.einsum("bshw,sc->bchw", conc, torch.tensor(RUIFROK_HED, dtype=torch.float32))
    return normalised(torch.pow(10.0, -od))


def tissue(seed: int, batch: int = 3) -> torch.Tensor:
    """Stain densities of fake tissue: H and E blobs over glass (density 0), a faint third stain."""
    gen = torch.Generator().manual_seed(seed)
    conc = torch.rand(batch, 3, 32, 32, generator=gen) * torch.tensor([0.6, 0.4, 0.02]).view(1, 3, 1, 1)
    conc[:, :, :8] = 0.0  # a band of glass
    return conc


def test_adaptive_cancels_a_density_scaling_of_each_stain() -> None:
    """The same tissue with haematoxylin 1.4x denser and eosin 0.6x as faint maps to the same output;
    the learnable (fixed) front-end cannot tell them apart from different tissue."""
    conc = tissue(0)
    x = rendered(conc)
    scaled = rendered(conc * torch.tensor([1.4, 0.6, 1.0]).view(1, 3, 1, 1))
    assert (x - scaled).abs().max() > 0.3
    adaptive = StainFrontEnd(adaptive=True)
    torch.testing.assert_close(adaptive(scaled), adaptive(x), atol=2e-5, rtol=0)
    fixed = StainFrontEnd()
    assert (fixed(scaled) - fixed(x)).abs().max() > 0.3
    # different tissue fractions (more glass) do not change the statistic: glass has density 0
    more_glass = conc.clone()
    more_glass[:, :, 8:16] = 0.0
    stat = adaptive.density_scale(adaptive.concentrations(rendered(conc)))
    stat_glass = adaptive.density_scale(adaptive.concentrations(rendered(more_glass)))
    torch.testing.assert_close(stat_glass[:, :2], stat[:, :2], rtol=0.15, atol=0)


def test_adaptive_leaves_the_third_stain_and_blank_images_alone() -> None:
    adaptive = StainFrontEnd(adaptive=True)
    conc = tissue(1)
    doubled = conc.clone()
    doubled[:, 2] *= 2.0  # only the third (residual) stain: not normalised, so the output changes
    assert (adaptive(rendered(doubled)) - adaptive(rendered(conc))).abs().max() > 0.01
    # glass: its statistic is floored, so its faint densities grow by target / floor, not to the target
    blank = rendered(torch.full((1, 3, 32, 32), 1e-3))
    out = adaptive.concentrations(adaptive(blank)).mean(dim=(2, 3))[0]
    expect = torch.tensor([1e-3 * ADAPT_TARGET[0] / ADAPT_FLOOR, 1e-3 * ADAPT_TARGET[1] / ADAPT_FLOOR, 1e-3])
    torch.testing.assert_close(out, expect, rtol=0.02, atol=0)
    # a typical image passes nearly unchanged at initialisation: the gains start at the typical statistic
    front = StainFrontEnd(adaptive=True)
    # (uniform densities on [0, m] have the statistic 2m/3: H up to 0.375, E up to 0.15 are typical)
    x = rendered(tissue(2) * torch.tensor([0.625, 0.375, 1.0]).view(1, 3, 1, 1))
    assert (front(x) - x).abs().mean() < 0.01 * x.std()


def test_adaptive_network_trains_exports_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_network(ADAPTIVE, 4, 32)
    assert net.stain.adaptive and "stain.adapt" not in net.state_dict()  # a constant, not a weight
    x = rendered(tissue(3, batch=4))
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
    for p in (net.stain.gains, net.stain.unmix):
        assert p.grad is not None and p.grad.abs().sum() > 0
    net = shifted_gains(net.eval())
    meta = {"model": ADAPTIVE, "class_names": list("abcd"), "image_size": 32}
    save_float_artifact(net, tmp_path / "fp32", meta)
    loaded, _ = load_float_artifact(tmp_path / "fp32")
    assert loaded.stain.adaptive
    torch.testing.assert_close(loaded(x), net(x))
    save_onnx_artifact(net, tmp_path / "onnx", meta)
    ops = {n.op_type for n in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node}
    assert "ReduceMean" in ops  # the per-image statistic is in the graph
    torch.testing.assert_close(OrtModule(tmp_path / "onnx" / "model.onnx")(x), net(x), atol=1e-4, rtol=0)


def test_stain_modes_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="not one of learnable, adaptive"):
        create_network({**MICRO, "stain": "adaptiv"}, 4, 32)
    cfg = OmegaConf.create({"model": {**ADAPTIVE, "family": "smt"}, "dataset": {"mean": [0.5] * 3}})
    with pytest.raises(ConfigError, match="SMT"):
        prepare_stain(cfg)
