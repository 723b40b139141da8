"""What every entry point's job shares: its Hydra facts, SIGTERM handling, user-facing errors, sweep exit."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import OmegaConf

from patholite import sweep
from patholite.config.options import check_config_dir
from patholite.errors import (
    PatholiteError,
    user_message,  # noqa: F401  (entry points import it from here)
)
from patholite.pipelines.lightning import STOP


def job_info(hc) -> dict[str, Any]:
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "name": hc.job.name,
        "num": OmegaConf.select(hc, "job.num", default=None),
        "override_dirname": hc.job.override_dirname,
        "overrides": list(hc.overrides.task),
        "sweep_dir": str(Path(hc.sweep.dir).resolve()) if multirun else None,
        "multirun": multirun,
    }


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM anywhere in a job (not only inside Lightning's fit) ends it as interrupted, exit code 143;
    once a requeue signal is being carried out (``patholite.requeue``), SIGTERM (SLURM's time limit, or its
    own requeue) lets the checkpoint and the record finish, until SLURM's SIGKILL."""

    def handler(signum, frame):
        if STOP.signum is not None:  # stopping for SLURM's warning: SLURM's SIGTERM waits for its checkpoint
            return
        raise SystemExit(128 + signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_hydra(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; exit 1 if any job of a sweep did not end ok.

    A ``--config-dir`` that is missing, or holds an option file with a schema error, is one line naming the
    file and the key (exit 2), before Hydra composes anything."""
    try:
        check_config_dir(sys.argv[1:])
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    sweep.FAILED_JOBS.clear()
    hydra_main()
    if sweep.FAILED_JOBS:
        sys.exit(1)
