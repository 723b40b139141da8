"""SMT under DDP: the focusing memory is exchanged after every training step, so every rank holds the memory
one process would hold for the same slides.

The comparisons hold the weights still (no optimiser step, or learning rates 0): a key's update then depends
only on its slide, its patch path and the weights, not on which rank saw the slide or with which others in a
batch, so the memory after an epoch must equal the single process's, key for key, up to float summation order.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from patholite.errors import ConfigError
from patholite.models.smt_focus import FocusMemory, focus_key, process_group_gather
from patholite.modules.smt import DEPTH_KEY, MEMORY_KEY, SMTModule
from patholite.wsi.region import Box

from .conftest import compose_config, run_cli

S, GRID = 32, 4
ENCODER = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class BoxReader:
    """An image that depends only on the slide and the box read (not on the order of reads), so ranks that
    read the same region in another order see the same pixels."""

    def __init__(self, slide: int) -> None:
        self.slide = slide

    def read(self, box: Box, size: int) -> np.ndarray:
        seed = hashlib.sha256(repr((self.slide, box, size)).encode()).digest()[:8]
        rng = np.random.default_rng(int.from_bytes(seed, "little"))
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def module() -> SMTModule:
    torch.manual_seed(0)  # every rank starts from the same weights (DDP broadcasts them)
    cfg = {
        "name": "smt", "family": "smt", **ENCODER,
        "smt": {"image_size": S, "grid": GRID, "top_k": 2, "layers": 3, "start_epochs": [0, 0, 0]},
    }  # fmt: skip
    return SMTModule(cfg, ["Normal", "Tumor"], MEAN, STD, region_reader=BoxReader)


def batch(slides: list[int]) -> dict[str, torch.Tensor]:
    """Thumbnails that depend on the slide only, whichever batch holds it."""
    images = [torch.randint(0, 256, (3, S, S), generator=torch.Generator().manual_seed(s)) for s in slides]
    return {
        "image": torch.stack(images).to(torch.uint8),
        "label": torch.tensor([s % 2 for s in slides]),
        "slide": torch.tensor(slides),
        "box": torch.tensor([[0.0, 0.0, 2048.0 + 512 * s] for s in slides]),
    }


def assert_same_memory(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Same keys with the same epochs, scores equal up to float summation order."""
    order_a = {tuple(k): i for i, k in enumerate(a["keys"])}
    order_b = {tuple(k): i for i, k in enumerate(b["keys"])}
    assert set(order_a) == set(order_b)
    keys = sorted(order_a)
    ia, ib = [order_a[k] for k in keys], [order_b[k] for k in keys]
    assert torch.equal(a["epochs"][ia], b["epochs"][ib])
    sa, sb = a["scores"][ia], b["scores"][ib]
    assert sa.abs().sum() > 0
    torch.testing.assert_close(sa, sb, rtol=rtol, atol=rtol * float(sa.abs().max()))


def exchange(ranks: list[SMTModule]) -> None:
    """What ``synchronise`` does over a process group, for modules held in one process."""
    gathered = [r.memory.take_updates() for r in ranks]
    for r in ranks:
        r.memory.merge(gathered)


def test_exchanged_memories_equal_the_single_process_memory_over_epochs():
    single, ranks = module(), [module(), module()]
    # epoch 0: slides 0-2 split over two ranks, slide 0 again on rank 1 (the sampler pads a short share);
    # epoch 1: reshuffled, each rank continues slides the other saw; an exchange after every step
    plan = {0: [[[0], [1]], [[2], [0]]], 1: [[[1, 2], [0]]]}
    for epoch, steps in plan.items():
        single.step_losses(batch([0, 1, 2]), epoch)
        for step in steps:
            for rank, slides in zip(ranks, step, strict=True):
                rank.step_losses(batch(slides), epoch)
            exchange(ranks)
        reference = single.memory.state_dict()
        assert {k[0] for k in map(tuple, reference["keys"])} == {0, 1, 2}
        for rank in ranks:
            assert_same_memory(rank.memory.state_dict(), reference)
    assert single.memory.state_dict()["epochs"].tolist() == [1] * len(single.memory)

    # without the exchange a rank knows only its own slides: what the refusal of DDP guarded against
    alone = module()
    alone.step_losses(batch([1]), 0)
    assert focus_key(0, ()) not in alone.memory and focus_key(1, ()) in alone.memory


def test_the_lowest_rank_wins_a_key_both_updated_in_one_step():
    memories = [FocusMemory(0.5), FocusMemory(0.5)]
    key = focus_key(3, ())
    for value, memory in zip((1.0, 3.0), memories, strict=True):
        memory.update([key], torch.full((1, 4), value), epoch=0)
    gathered = [m.take_updates() for m in memories]
    for memory in memories:
        memory.merge(gathered)
        assert torch.equal(memory.raw(key), torch.full((4,), 0.5))  # rank 0's 0.5 * 1.0
        assert memory.take_updates() == []  # merged updates are not sent again
    # a later look in the same epoch changes nothing, as in one process
    memories[1].update([key], torch.full((1, 4), 9.0), epoch=0)
    assert torch.equal(memories[1].raw(key), torch.full((4,), 0.5))
    memories[0].synchronise(None)  # one process: nothing to exchange
    assert process_group_gather() is None  # no process group in this test process


def _gloo_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    memory = FocusMemory(0.9)
    memory.update([focus_key(rank, ()), focus_key(rank, (rank + 1,))], torch.full((2, 4), rank + 1.0), 0)
    memory.synchronise(process_group_gather())
    torch.save(memory.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_exchange_their_updates(tmp_path):
    # forked, not spawned: a spawned child would import this test module, and with it Lightning and Hydra
    args = (str(tmp_path / "init"), str(tmp_path))
    torch.multiprocessing.start_processes(_gloo_rank, args=args, nprocs=2, start_method="fork")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_memory(states[0], states[1], rtol=0)
    assert sorted(map(tuple, states[0]["keys"])) == [(0, 0), (0, 1, 1), (1, 0), (1, 1, 2)]


def test_the_driver_takes_the_spawned_ranks_memory_from_the_last_checkpoint(tmp_path):
    from patholite.pipelines.tasks.slides import restore_spawned_memory

    trained = module()
    trained.step_losses(batch([0, 1]), 0)
    torch.save({MEMORY_KEY: trained.memory.state_dict(), DEPTH_KEY: 3}, tmp_path / "last.ckpt")
    driver = module()  # under ddp_spawn only the weights come back to it
    restore_spawned_memory(driver, tmp_path)
    assert_same_memory(driver.memory.state_dict(), trained.memory.state_dict(), rtol=0)
    assert driver.trained_depth == 3


def test_smt_passes_preflight_on_two_processes_and_looks_for_unused_parameters(make_cfg):
    from patholite.pipelines.preflight import check_run

    cfg = make_cfg("model=smt_micro", "dataset=smt_synthetic", "accelerator.devices=2")
    check_run(cfg)  # the task and machine checks (the data checks are the single process's)
    # layers join at model.smt.start_epochs: DDP must expect parameters without a gradient
    assert cfg.accelerator.find_unused_parameters is True


# ------------------------------------------------------------------ the patch classifier SMT starts from
def cache_entry(cache, name: str, cfg, age: int, image_size: int = 64, depth: int = 2, **dataset) -> object:
    """A complete trained-model cache entry: a patch classifier (random weights) with the encoder
    architecture of ``cfg.model`` at ``depth`` blocks, trained on ``cfg.dataset`` changed by ``dataset``;
    ``age``: seconds before now it was written."""
    import time

    from omegaconf import OmegaConf

    from patholite.artifacts.torch_float import save_float_artifact
    from patholite.io import write_json
    from patholite.models.factory import create_network
    from patholite.pipelines.cache import cache_inputs

    spec = OmegaConf.to_container(cfg.model, resolve=True)
    spec["kwargs"] = {**spec["kwargs"], "depth": depth}
    torch.manual_seed(age)
    encoder = create_network(spec, 2, int(cfg.model.smt.image_size)).encoders[0]
    entry = cache / "trained" / name
    save_float_artifact(encoder, entry, {"model": {"name": name}})
    # what publish() hashes for a tile classifier of this architecture trained on these slides' tiles
    tile = OmegaConf.merge(cfg.model, {"name": name, "family": "vit", "smt": None})
    inputs = cache_inputs(cfg, tile)
    inputs["dataset"].update({"image_size": image_size, **dataset})
    write_json(entry / "key.json", inputs)
    stamp = time.time() - age
    os.utime(entry / "key.json", (stamp, stamp))
    return entry


def test_auto_finds_the_newest_fitting_patch_classifier_of_the_same_slides(make_cfg, tmp_path):
    from patholite.models.factory import build_model
    from patholite.pipelines.tasks.slides import SlideTask

    cache = tmp_path / "own-cache"

    def cfg():
        return make_cfg(
            "model=smt_micro", "dataset=smt_synthetic", "model.smt.encoder_checkpoint=auto",
            f"paths.cache_dir={cache}",
        )  # fmt: skip

    with pytest.raises(
        ConfigError, match="encoder_checkpoint=auto: none of the 0 trained models .* compression=none"
    ):
        SlideTask().check(cfg())
    base = cfg()
    cache_entry(cache, "other-slides", base, age=1, lesion_count=5)  # newest, but other slides
    cache_entry(cache, "deeper", base, age=2, depth=3)  # other architecture: its weights do not fit
    older = cache_entry(cache, "at-smt-size", base, age=4)  # trained at model.smt.image_size (64)
    newer = cache_entry(cache, "at-tile-size", base, age=3, image_size=32)
    checked = cfg()
    SlideTask().check(checked)
    assert checked.model.smt.encoder_checkpoint == str(older)  # the run's config (and record) names it
    net = build_model(checked.model, 2, 64)
    from safetensors.torch import load_file

    weights = load_file(older / "model.safetensors")
    for encoder in net.encoders:  # every encoder starts from it, head and all else but the position grid
        assert torch.equal(encoder.blocks[1].mlp.fc1.weight, weights["blocks.1.mlp.fc1.weight"])
    (older / "key.json").unlink()  # incomplete now: the one at another image size is next
    checked = cfg()
    SlideTask().check(checked)
    assert checked.model.smt.encoder_checkpoint == str(newer)


TINY = [
    "model=smt_micro", "dataset=smt_synthetic", "dataset.width=1024", "dataset.height=1024",
    "dataset.lesion_diameter_um=[40.0,80.0]", "dataset.slides_per_split=[4,2,2]", "dataset.batch_size=2",
    "trainer.max_epochs=1", "model.smt.lrs=[0.0,0.0,0.0]",
]  # fmt: skip


@pytest.mark.slow  # 134 s at load 12 on 2 cores (490 s at load 21): two spawned ranks, slides written once
@pytest.mark.timeout(900)
def test_smt_trains_on_two_processes_with_the_memory_of_one(tmp_path):
    from patholite.pipelines.tasks.slides import SlideTask

    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose_config([*TINY, "debug=fast"], tmp_path / "single", cache)
    patch_classifier = cache_entry(cache, "patch-classifier", cfg, age=0)
    result = run_cli(
        [*TINY, "debug=fast", "logger=csv", "accelerator.devices=2", "model.smt.encoder_checkpoint=auto",
         f"paths.cache_dir={cache}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "ok" and record["device"]["world_size"] == 2
    assert record["artifacts"][0]["name"] == "smt_fp32"
    # the patch classifier found in the cache is named in the record, and the encoders started from it
    assert record["config"]["model"]["smt"]["encoder_checkpoint"] == str(patch_classifier)
    checkpoint = torch.load(run / "checkpoints" / "train" / "last.ckpt", weights_only=True)
    from safetensors.torch import load_file

    start = load_file(patch_classifier / "model.safetensors")
    for layer in range(3):  # learning rate 0: still the patch classifier's weights
        trained = checkpoint["state_dict"][f"net.encoders.{layer}.blocks.0.attn.qkv.weight"]
        assert torch.equal(trained, start["blocks.0.attn.qkv.weight"])

    # one process, the same 4 training slides in one batch, the same (unchanged: lr 0) weights
    dm = SlideTask().datamodule(cfg, pin_memory=False)
    dm.prepare_data()
    dm.setup("fit")
    train = dm.datasets["train"]
    hp = checkpoint["hyper_parameters"]
    single = SMTModule(**{**hp, "load_checkpoint": False}, region_reader=dm.region_reader)
    single.load_state_dict(checkpoint["state_dict"])
    items = [train[i] for i in range(len(train))]
    slides = {
        k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "label", "slide", "box")
    }
    single.step_losses(slides, 0)

    # rank 0 wrote the checkpoint: it holds the keys of rank 1's slides too, with the single process's values
    memory = checkpoint[MEMORY_KEY]
    assert {k[0] for k in memory["keys"]} == {int(s) for s in slides["slide"]}
    assert_same_memory(memory, single.memory.state_dict(), rtol=1e-4)
