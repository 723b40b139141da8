"""Shared test fixtures: composing configs, running jobs in-process or as a CLI, finding ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session, so tiles are generated once."""
    return tmp_path_factory.mktemp("cache")


def compose_config(overrides: list[str], run_dir: Path, cache: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.cache_dir={cache}", f"paths.root_dir={run_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "test"
    return cfg


@pytest.fixture
def make_cfg(tmp_path, cache_dir) -> Callable[..., DictConfig]:
    """Compose ``train`` with overrides (tiny by default) and point Hydra's runtime at a temp run dir."""

    def make(*overrides: str, fast: bool = True, run_dir: Path | None = None) -> DictConfig:
        base = ["debug=fast", "model=vit_micro", "logger=csv"] if fast else []
        cfg = compose_config([*base, *overrides], run_dir or tmp_path / "run", cache_dir)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # a job sees its task config only, as under @hydra.main
        return cfg

    yield make
    GlobalHydra.instance().clear()


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
