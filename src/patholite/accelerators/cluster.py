"""The ranks an outside launcher started: SLURM's tasks (``srun``, submitit) or torchrun's workers.

On one machine a job spawns its own ranks (``ddp_spawn``, see ``resolve``). Across machines a launcher
starts one process per device on every node, and each process learns who it is from the launcher's
variables. Lightning reads them through its cluster environments: ``SLURMEnvironment`` (``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NNODES``) and ``TorchElasticEnvironment``
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``). ``launched`` reads the same
variables, so patholite and Lightning agree on the ranks, and checks them against the config before any
work: a mismatch is a hang in the first collective otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from patholite.errors import AcceleratorError, ConfigError

# SLURM job names Lightning treats as an interactive shell, not a task (srun --job-name=interactive)
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


@dataclass(frozen=True)
class Launch:
    """This process's place among the ranks a launcher started."""

    launcher: str  # "srun" (SLURM tasks, submitit's included) or "torchrun"
    world_size: int  # every rank of every node
    rank: int
    local_rank: int  # on this node
    node_rank: int
    num_nodes: int
    local_world_size: int  # ranks on each node

    @property
    def leads(self) -> bool:
        """Rank 0 runs the job; the others train what it hands them (``pipelines.ranks``)."""
        return self.rank == 0

    def environment(self) -> ClusterEnvironment:
        """Lightning's view of the same ranks. SLURM's without its auto-requeue: patholite's handler
        (``patholite.requeue``) owns the requeue signal."""
        if self.launcher == "torchrun":
            return TorchElasticEnvironment()
        return SLURMEnvironment(auto_requeue=False)

    def check(self, devices: int, num_nodes: int) -> None:
        """The config's ``num_nodes`` and ``devices`` (per node) against what the launcher started."""
        flag_nodes, flag_devices = (
            ("--nnodes", "--nproc-per-node")
            if self.launcher == "torchrun"
            else ("--nodes", "--ntasks-per-node (hydra/launcher=slurm sets it from accelerator.devices)")
        )
        if num_nodes != self.num_nodes:
            raise AcceleratorError(
                f"accelerator.num_nodes={num_nodes}, but {self.launcher} started {self.num_nodes} node(s) "
                f"({flag_nodes}={self.num_nodes}): set accelerator.num_nodes={self.num_nodes}, or launch "
                f"with {flag_nodes}={num_nodes}"
            )
        if devices != self.local_world_size:
            raise AcceleratorError(
                f"accelerator.devices gives {devices} device(s) per node, but {self.launcher} started "
                f"{self.local_world_size} process(es) on each node ({flag_devices}), one per device: set "
                f"accelerator.devices={self.local_world_size}"
            )

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _count(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    head = value.split("(")[0]  # SLURM writes uneven counts as "2(x3),1"; the first is this one's
    if not head.isdigit():
        raise ConfigError(f"{name}={value!r} is not a count: the launcher's variables are inconsistent")
    return int(head)


def _torchrun(env: Mapping[str, str]) -> Launch:
    world, local_world = _count(env, "WORLD_SIZE"), _count(env, "LOCAL_WORLD_SIZE")
    if local_world < 1 or world % local_world:
        raise ConfigError(
            f"torchrun's WORLD_SIZE={world} is not a multiple of its LOCAL_WORLD_SIZE={local_world}"
        )
    return Launch(
        launcher="torchrun",
        world_size=world,
        rank=_count(env, "RANK"),
        local_rank=_count(env, "LOCAL_RANK"),
        node_rank=_count(env, "GROUP_RANK"),
        num_nodes=world // local_world,
        local_world_size=local_world,
    )


def _srun(env: Mapping[str, str]) -> Launch:
    world, step = _count(env, "SLURM_NTASKS"), _count(env, "SLURM_STEP_NUM_TASKS")
    if step != world:
        # Lightning's SLURM environment counts the job's tasks (SLURM_NTASKS): a smaller step would wait
        # for ranks that never start
        raise AcceleratorError(
            f"srun started {step} task(s) but the SLURM job has {world} (SLURM_NTASKS): run the training "
            "step with all of the job's tasks (srun without -n), one per device on each node"
        )
    nodes = _count(env, "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES")
    if "SLURM_NTASKS_PER_NODE" not in env:
        # Lightning's SLURM environment refuses a bare --ntasks: it cannot tell which tasks share a node
        raise AcceleratorError(
            f"this SLURM job has {world} tasks but no --ntasks-per-node: ask for the tasks per node "
            "(one per device; hydra/launcher=slurm does), not a total --ntasks"
        )
    per_node = _count(env, "SLURM_NTASKS_PER_NODE")
    if per_node * nodes != world:
        raise AcceleratorError(
            f"SLURM started {world} tasks on {nodes} node(s), not --ntasks-per-node={per_node} on each: "
            "give every node the same number of tasks, one per device"
        )
    return Launch(
        launcher="srun",
        world_size=world,
        rank=_count(env, "SLURM_PROCID"),
        local_rank=_count(env, "SLURM_LOCALID"),
        node_rank=_count(env, "SLURM_NODEID"),
        num_nodes=nodes,
        local_world_size=per_node,
    )


def launched(env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's rank when a launcher started several (torchrun workers, or the tasks of an ``srun``
    step, submitit's included); None for a lone process, which spawns its own ranks if it needs several.

    A SLURM job's batch script (no ``srun``) is a lone process even with several tasks allocated: only an
    ``srun`` step (``SLURM_STEP_NUM_TASKS``) has started the other ranks."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID") is not None:  # what torch and Lightning test for torchrun
        launch = _torchrun(env)
    elif (
        "SLURM_NTASKS" in env
        and "SLURM_STEP_NUM_TASKS" in env
        and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES
    ):
        launch = _srun(env)
    else:
        return None
    return launch if launch.world_size > 1 else None


def multirun_refusal(argv: list[str], env: Mapping[str, str] | None = None) -> str | None:
    """Why ``-m`` cannot run here, or None: under a launcher every rank would run the whole sweep, each
    job's ranks spread over jobs. A sweep of multi-node jobs is ``hydra/launcher=slurm`` from a login node:
    one SLURM job per sweep job, each with its nodes."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return None
    launch = launched(env)
    if launch is None:
        return None
    return (
        f"a Hydra multirun (-m) cannot run under {launch.launcher}: each of its {launch.world_size} ranks "
        "would run the whole sweep. Launch one job per command under torchrun or srun, or submit the sweep "
        "from a login node with hydra/launcher=slurm accelerator.num_nodes=<N>, which gives each sweep job "
        "its own nodes"
    )
