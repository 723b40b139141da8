"""Shared test fixtures: composing configs, running jobs in-process or as a CLI, finding ../shared."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import patholite.config  # noqa: F401  (registers the schemas)
from patholite.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # pytest-xdist workers share the cores: each worker's torch (and the jobs it starts) gets its share, or
    # tiny models spend their time contending for threads
    _share = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    torch.set_num_threads(int(_share))


def shared_dir() -> Path | None:
    """../shared: from PATHOLITE_SHARED, else the folder beside the checkout."""
    env = os.environ.get("PATHOLITE_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared is absent (set PATHOLITE_SHARED to its path)")
    return path


@pytest.fixture(scope="session")
def slides(shared) -> Path:
    """../shared/data/slides: the real slide fixtures (read in place, never copied into the project)."""
    path = shared / "data" / "slides"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


FAST = ["debug=fast", "model=vit_micro", "logger=csv"]
# Caches that hold data (synthetic tiles, slide masks and grids): content-addressed and written atomically,
# so sharing them across tests changes no result, only how often the data is generated.
_DATA_CACHES = ("synthetic", "slides")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the session, so tiles are generated once."""
    return tmp_path_factory.mktemp("cache")


def compose_config(
    overrides: list[str], run_dir: Path, cache: Path, config_name: str = "train"
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, Hydra's runtime pointed at ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[f"paths.cache_dir={cache}", f"paths.root_dir={run_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "test"
    return cfg


def job_config(overrides: list[str], run_dir: Path, cache: Path, config_name: str = "train") -> DictConfig:
    """``compose_config`` set up as ``@hydra.main`` hands a job its config (an entry point's run function,
    in this process): Hydra's runtime set, the task config only."""
    cfg = compose_config(overrides, run_dir, cache, config_name)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _manifest(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, cache_dir) -> Path:
    """The trained-model cache of the tests' default job (``FAST``: a plainly trained vit_micro), built once
    per test run and read-only from then on: the start of every ptq/prune/qat/kd test that needs it, so no
    result depends on which test happened to train it first. With pytest-xdist the workers share it."""
    from patholite.train import run_job

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "trained-models"
    with FileLock(str(root) + ".lock"):
        if not (root / "ready").is_file():
            shutil.rmtree(root, ignore_errors=True)
            cache = root / "cache"
            _link_data_caches(cache, cache_dir)
            cfg = job_config([*FAST, "compression=none"], root / "run", cache)
            try:
                assert run_job(cfg) == "ok", "training the shared vit_micro failed: see its record"
            finally:
                GlobalHydra.instance().clear()
            (root / "ready").write_text(_digest(cache / "trained"))
    trained = root / "cache" / "trained"
    yield trained
    assert _digest(trained) == (root / "ready").read_text(), f"a test wrote into the shared {trained}"


def _link_data_caches(cache: Path, shared: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for name in _DATA_CACHES:
        (shared / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(shared / name, target_is_directory=True)


@pytest.fixture
def job_cache(tmp_path, cache_dir, trained_models) -> Path:
    """This test's own ``paths.cache_dir``: the session's data caches and the shared trained models linked
    in (read, never written), anything it trains its own."""
    cache = tmp_path / "job-cache"
    _link_data_caches(cache, cache_dir)
    (cache / "trained").mkdir()
    for entry in trained_models.iterdir():
        if entry.is_dir():
            (cache / "trained" / entry.name).symlink_to(entry, target_is_directory=True)
    before = _manifest(trained_models)
    yield cache
    assert _manifest(trained_models) == before, f"a test wrote into the shared {trained_models}"


@pytest.fixture
def make_cfg(tmp_path, job_cache) -> Callable[..., DictConfig]:
    """Compose ``train`` with overrides (tiny by default) and point Hydra's runtime at a temp run dir."""

    def make(*overrides: str, fast: bool = True, run_dir: Path | None = None) -> DictConfig:
        return job_config([*(FAST if fast else []), *overrides], run_dir or tmp_path / "run", job_cache)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count (a job with accelerator.threads, a DDP rank run in-process)
    must not change the next test's."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, module: str = "patholite.train"
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (the training entry by default) in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PATHOLITE_ROOT": str(cwd), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def no_pickle(monkeypatch):
    """Loading must not unpickle anything: every unpickling entry point raises while it is active."""

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def micro_slide_models(tmp_path_factory):
    """An untrained micro SMT and micro ViT tile classifier (32-px tiles at 2 um/px, classes Normal and
    Tumor) as the slide engines load them: ``(smt, tile)``."""
    from tests.helpers import micro_smt_and_tiles

    return micro_smt_and_tiles(tmp_path_factory.mktemp("models"), ["Normal", "Tumor"])
