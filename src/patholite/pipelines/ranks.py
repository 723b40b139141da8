"""Rank 0 and the other ranks of a launched job (``accelerators.cluster``): how they meet, what they say.

Under srun or torchrun every rank runs ``patholite.train``. Rank 0 runs the job as a lone process would:
config, stages, evaluation, artifacts, the record, W&B. The other ranks (followers) compose no config and
write nothing. Before each fit rank 0 sends them the fit: the module, its data, the loggers and the
trainer's settings, pickled as ``ddp_spawn`` pickles them for spawned ranks. They train it together with
rank 0 and wait for the next; when the job ends rank 0 says so and they exit. So every stage's evaluation
and record are written once, and a stage pipeline needs no rank guards.

They meet in two steps. First the launcher's store (torchrun's agent store, or the one rank 0 serves at
``MASTER_ADDR:MASTER_PORT`` under srun): rank 0 composes the config and posts the process group's backend
there, or why it stopped. Then the process group: the one Lightning trains in (nccl on GPUs, gloo on CPUs;
Lightning finds it initialised and uses it) and a gloo group for the orders, whose timeout is how long a
follower waits while rank 0 evaluates between fits (``accelerator.rank_wait_min``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from patholite.accelerators.cluster import Launch
from patholite.accelerators.resolve import process_group_backend
from patholite.errors import AcceleratorError

log = logging.getLogger(__name__)

START_KEY = "patholite/start"
# Followers wait this long for rank 0 to compose its config and post the start (seconds, normally)
START_WAIT = timedelta(minutes=10)


@dataclass
class FitOrder:
    """One fit, as rank 0 runs it: everything a follower needs to build the same trainer and train."""

    cfg: Any  # the run's config, as preflight completed it
    run_dir: Path
    stage: str
    module: Any
    datamodule: Any
    loggers: list[Any]
    ckpt_path: str | None
    settings: dict[str, Any] = field(default_factory=dict)  # fit()'s epochs, ema, monitor


@dataclass
class End:
    """The job is over (``status`` of its record); followers exit."""

    status: str
    message: str = ""


class Ranks:
    """This process's link to the others of a launched job (one per process: ``RANKS``)."""

    def __init__(self) -> None:
        self.launch: Launch | None = None
        self.store: Any = None
        self.control: Any = None  # the orders' gloo group, once joined

    @property
    def leading(self) -> bool:
        """Rank 0 of a launched job whose followers are in the process group."""
        return self.launch is not None and self.launch.leads and self.control is not None

    def meet(self, launch: Launch) -> None:
        """Connect to the launcher's store (every rank, before anything can fail on rank 0)."""
        if self.launch is not None:
            return
        environment = launch.environment()
        # Lightning's cluster environments say where rank 0 is (SLURM: the first node of the step)
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        self.store, _, _ = next(
            rendezvous("env://", rank=launch.rank, world_size=launch.world_size, timeout=START_WAIT)
        )
        self.launch = launch

    def start(self, accelerator_cfg: Any) -> None:
        """Rank 0: post the backend, then join the process group with the followers."""
        start = {
            "backend": process_group_backend(accelerator_cfg),
            "wait_min": int(accelerator_cfg.rank_wait_min),
        }
        self.store.set(START_KEY, json.dumps(start))
        self._join(start)

    def await_start(self) -> str | None:
        """A follower: wait for rank 0's start and join the process group; or why rank 0 stopped first."""
        try:
            self.store.wait([START_KEY], START_WAIT)
        except Exception as err:  # rank 0 died (its store closed) or never came
            raise AcceleratorError(f"rank 0 did not start the job within {START_WAIT}: {err}") from err
        start = json.loads(self.store.get(START_KEY))
        if "abort" in start:
            return start["abort"]
        self._join(start)
        return None

    def _join(self, start: dict[str, Any]) -> None:
        assert self.launch is not None
        dist.init_process_group(
            start["backend"],
            store=dist.PrefixStore("default_pg", self.store),
            rank=self.launch.rank,
            world_size=self.launch.world_size,
        )
        self.control = dist.new_group(backend="gloo", timeout=timedelta(minutes=start["wait_min"]))

    def send(self, order: FitOrder | End) -> None:
        dist.broadcast_object_list([order], src=0, group=self.control)

    def receive(self) -> FitOrder | End:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def finish(self, status: str, message: str = "") -> None:
        """Rank 0, when its job ends: the followers exit. Before the start, the store carries why."""
        if self.launch is None or not self.launch.leads:
            return
        try:
            if self.control is None:
                self.store.set(START_KEY, json.dumps({"abort": f"rank 0 stopped ({status}) {message}"}))
            else:
                self.send(End(status, message))
        except Exception as err:  # followers already gone (a failed fit, a requeue): nothing to tell
            log.warning("could not tell the other ranks that the job ended (%s)", err)


RANKS = Ranks()
