"""Several nodes: ranks that a launcher started (torchrun's workers, the tasks of an srun step).

On this one machine two "nodes" are two launcher processes on localhost, one CPU rank each (gloo). The
equivalence check is ``tests/test_ddp.py``'s: the same global batch and data order train the same weights as
one process, up to float summation order. Rank 0 runs the job (evaluation, artifacts, the record); the
other rank only trains what rank 0 hands it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from shlex import quote

import pytest
import torch
from omegaconf import OmegaConf

from patholite.accelerators.cluster import launched, multirun_refusal
from patholite.accelerators.resolve import resolve_accelerator
from patholite.config.schema import AcceleratorConfig
from patholite.errors import AcceleratorError, ConfigError

from .conftest import REPO, run_cli
from .test_ddp import FIXED_ORDER, LOGIT_TOLERANCE

TORCHRUN = {"TORCHELASTIC_RUN_ID": "t1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
            "RANK": "0", "LOCAL_RANK": "0"}  # fmt: skip
SRUN = {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "patholite",
        "SLURM_JOB_ID": "77"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerator(**values):
    return OmegaConf.merge(OmegaConf.structured(AcceleratorConfig), {"name": "cpu", **values})


def test_the_launchers_variables_say_which_rank_this_is():
    rank = launched({**TORCHRUN, "RANK": "1", "GROUP_RANK": "1"})
    assert (rank.launcher, rank.world_size, rank.rank, rank.num_nodes, rank.local_world_size) == (
        "torchrun", 2, 1, 2, 1,
    )  # fmt: skip
    assert not rank.leads and launched(TORCHRUN).leads
    task = launched(SRUN)
    assert (task.launcher, task.world_size, task.rank, task.local_rank, task.node_rank) == (
        "srun",
        4,
        3,
        1,
        1,
    )
    assert (task.num_nodes, task.local_world_size) == (2, 2)
    assert launched({**TORCHRUN, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}) is None  # one worker: lone
    assert launched({}) is None
    batch_script = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert launched(batch_script) is None  # sbatch's own process: srun has started no ranks
    assert launched({**SRUN, "SLURM_JOB_NAME": "interactive"}) is None  # Lightning's interactive shell
    with pytest.raises(AcceleratorError, match=r"srun started 2 task\(s\) but the SLURM job has 4"):
        launched({**SRUN, "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not a count"):
        launched({**TORCHRUN, "WORLD_SIZE": "two"})
    assert launched({**SRUN, "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "4(x1)"}).num_nodes == 1
    with pytest.raises(AcceleratorError, match="no --ntasks-per-node"):
        launched({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS_PER_NODE"})
    with pytest.raises(AcceleratorError, match="not --ntasks-per-node=3 on each"):
        launched({**SRUN, "SLURM_NTASKS_PER_NODE": "3"})


def test_a_launched_rank_trains_in_lightnings_cluster_environment(monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    acc = resolve_accelerator(_accelerator(num_nodes=2))
    assert acc.world_size == 2 and not acc.spawns and acc.launch.launcher == "torchrun"
    kwargs = acc.trainer_kwargs()
    assert kwargs["num_nodes"] == 2 and kwargs["devices"] == 1
    strategy = kwargs["strategy"]
    assert type(strategy).__name__ == "DDPStrategy" and strategy.process_group_backend == "gloo"
    assert type(strategy.cluster_environment).__name__ == "TorchElasticEnvironment"
    assert strategy.cluster_environment.creates_processes_externally  # nothing is spawned
    described = acc.describe()
    assert described["launch"]["num_nodes"] == 2 and "started by torchrun" in " ".join(described["notes"])

    for name, value in {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    slurm_like = resolve_accelerator(_accelerator(num_nodes=2, devices=2))
    assert slurm_like.world_size == 4  # the global batch divides over every rank of every node
    with pytest.raises(
        AcceleratorError, match=r"started 2 process\(es\) on each node .* accelerator.devices=2"
    ):
        resolve_accelerator(_accelerator(num_nodes=2, devices=1))
    with pytest.raises(
        AcceleratorError, match=r"started 2 node\(s\) \(--nnodes=2\): set accelerator.num_nodes=2"
    ):
        resolve_accelerator(_accelerator(num_nodes=1, devices=2))
    with pytest.raises(ConfigError, match="ddp_spawn under torchrun"):
        resolve_accelerator(_accelerator(num_nodes=2, devices=2, strategy="ddp_spawn"))


def test_srun_tasks_get_slurms_environment_without_its_requeue(monkeypatch):
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    acc = resolve_accelerator(_accelerator(num_nodes=2, devices=2))
    environment = acc.trainer_kwargs()["strategy"].cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and not environment.auto_requeue
    assert environment.global_rank() == 3 and acc.world_size == 4


def test_several_nodes_without_a_launcher_fail_before_work():
    with pytest.raises(AcceleratorError, match="num_nodes=2, but no cluster launcher started this process"):
        resolve_accelerator(_accelerator(num_nodes=2))
    with pytest.raises(ConfigError, match="num_nodes=0"):
        resolve_accelerator(_accelerator(num_nodes=0))


def test_the_global_batch_must_divide_over_every_rank_of_every_node(make_cfg, monkeypatch):
    from patholite.pipelines.preflight import preflight

    for name, value in {**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    cfg = make_cfg("dataset.batch_size=6", "accelerator.devices=2", "accelerator.num_nodes=2")
    with pytest.raises(ConfigError, match=r"batch_size=6 .* 4 DDP processes .*batch_size=4 or 8"):
        preflight(cfg)


def test_a_multirun_under_a_launcher_is_refused_on_every_rank(monkeypatch, capsys, tmp_path):
    assert multirun_refusal(["-m", "model=a,b"], TORCHRUN).startswith("a Hydra multirun (-m) cannot run")
    assert multirun_refusal(["model=a"], TORCHRUN) is None and multirun_refusal(["-m"], {}) is None
    from patholite import train

    monkeypatch.chdir(tmp_path)
    for rank in ("0", "1"):  # a follower refuses too, rather than waiting for a rank 0 that left
        for name, value in {**TORCHRUN, "RANK": rank, "GROUP_RANK": rank}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as refused:
            train.main(["-m", "debug=fast", "model=vit_micro,vit_micro"])
        assert refused.value.code == 2
        said = capsys.readouterr().err
        assert "cannot run under torchrun" in said and "hydra/launcher=slurm" in said
    assert not (tmp_path / "outputs").exists()


def _node(rank: int, port: int, args: list[str], cwd: Path) -> subprocess.Popen:
    """One "node" of two on localhost: torchrun with one CPU rank, as on each machine of a cluster."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "patholite.train", *args]  # fmt: skip
    env = {**os.environ, "PATHOLITE_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _logits(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    from patholite.artifacts.torch_float import load_float_artifact

    net, _ = load_float_artifact(run_dir / "artifacts" / "fp32")
    with torch.no_grad():
        return net(images)


@pytest.mark.timeout(600)
def test_two_torchrun_nodes_train_what_one_process_trains(tmp_path):
    single = tmp_path / "single"
    result = run_cli([*FIXED_ORDER, f"hydra.run.dir={single}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "two_nodes"
    args = [*FIXED_ORDER, "accelerator.num_nodes=2", f"hydra.run.dir={run_dir}"]
    port = _free_port()
    nodes = [_node(rank, port, args, tmp_path) for rank in (0, 1)]
    logs = [node.communicate(timeout=500)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["device"]["world_size"] == 2
    assert record["device"]["launch"]["launcher"] == "torchrun" and record["device"]["num_nodes"] == 2
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (_logits(single, images) - _logits(run_dir, images)).abs().max() < LOGIT_TOLERANCE
    ours = json.loads((single / "metrics.json").read_text())["artifacts"][0]["quality"]
    theirs = record["artifacts"][0]["quality"]
    assert theirs["n_samples"] == ours["n_samples"]  # rank 0 evaluated the whole test set, not its share
    assert theirs["accuracy"] == pytest.approx(ours["accuracy"], abs=1e-6)
    # rank 0 alone evaluated and wrote: one record, one log of 4 steps, no second run folder
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    step_col, loss_col = header.index("step"), header.index("train/loss_step")
    assert [int(r.split(",")[step_col]) for r in rows[1:] if r.split(",")[loss_col]] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["outputs", "single", "two_nodes"]
    assert not (tmp_path / "outputs" / "runs").exists()
    assert "[rank 1] INFO patholite.pipelines.fit: rank 1: stage train" in logs[1]


def _srun_task(rank: int, port: int, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """One task of a two-node srun step, as SLURM starts it (its variables, no SLURM here)."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(rank),
             "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_JOB_NAME": "patholite",
             "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}  # fmt: skip
    full = {**os.environ, "PATHOLITE_ROOT": str(cwd), "PYTHONUNBUFFERED": "1", **slurm, **env}
    command = [sys.executable, "-m", "patholite.train", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _step(tasks: list[subprocess.Popen]) -> tuple[list[int], str]:
    logs = [task.communicate(timeout=500)[0] for task in tasks]
    return [task.returncode for task in tasks], "\n".join(log[-3000:] for log in logs)


@pytest.mark.slow  # 2 x 2 processes, ~60 s
@pytest.mark.timeout(900)
def test_two_srun_nodes_requeue_together_and_continue_from_the_saved_step(tmp_path):
    """SLURM's warning reaches every task; rank 0's word stops both after the same step, they write one
    interrupted checkpoint, rank 0 requeues (a fake scontrol) and both exit as the signal would. The
    requeued attempt (same job id, SLURM_RESTART_COUNT=1) continues from that step in the same folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {quote(str(calls))}\n')
    (bin_dir / "scontrol").chmod(0o755)
    starts = tmp_path / "start.pt"
    args = [*FIXED_ORDER, "accelerator.num_nodes=2",
            "+callbacks.extra.stop._target_=tests.helpers.InterruptAt", "+callbacks.extra.stop.step=1",
            "+callbacks.extra.stop.kind=sigusr1", "+callbacks.extra.start._target_=tests.helpers.RecordStart",
            f"+callbacks.extra.start.path={quote(str(starts))}"]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "SLURM_JOB_ID": "5151",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip

    port = _free_port()
    codes, logs = _step([_srun_task(rank, port, args, tmp_path, env) for rank in (0, 1)])
    assert codes == [128 + signal.SIGUSR1] * 2, logs
    [run_dir] = (tmp_path / "outputs" / "runs").glob("*/*")
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "requeued" and record["job"]["requeues"] == 1
    assert calls.read_text().split() == ["requeue", "5151"]  # once, by rank 0
    saved = torch.load(
        run_dir / "checkpoints" / "train" / "interrupted.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["global_step"] >= 1

    port = _free_port()
    restarted = {**env, "SLURM_RESTART_COUNT": "1"}
    codes, logs = _step([_srun_task(rank, port, args, tmp_path, restarted) for rank in (0, 1)])
    assert codes == [0, 0], logs
    assert list((tmp_path / "outputs" / "runs").glob("*/*")) == [run_dir]
    assert torch.load(starts, weights_only=False)["global_step"] == saved["global_step"]  # not from zero
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["status"] == "ok" and again["device"]["launch"]["launcher"] == "srun"


@pytest.mark.parametrize(
    ("overrides", "nodes", "tasks"),
    [
        (["accelerator=gpu_ddp", "accelerator.num_nodes=2", "hydra.launcher.gpus_per_node=4"], 2, 4),
        (["accelerator=cpu", "accelerator.num_nodes=3", "accelerator.devices=2"], 3, 2),
        (["accelerator=gpu", "accelerator.num_nodes=2", "accelerator.devices=[0,1]"], 2, 2),
        (["accelerator=gpu_ddp", "hydra.launcher.gpus_per_node=4"], 1, 1),  # one node: its task spawns
    ],
)
def test_the_slurm_launcher_asks_for_the_nodes_and_one_task_per_device(overrides, nodes, tasks):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        slide = compose("slide", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (nodes, tasks)
    assert (slide.hydra.launcher.nodes, slide.hydra.launcher.tasks_per_node) == (1, 1)  # no accelerator


def test_a_submitit_task_other_than_rank_0_follows_and_writes_nothing(make_cfg, monkeypatch, tmp_path):
    """submitit runs the sweep job's function in every task of a multi-node job: all but rank 0 follow."""
    from patholite import train
    from patholite.accelerators.cluster import Launch

    follower = Launch(
        "srun", world_size=2, rank=1, local_rank=0, node_rank=1, num_nodes=2, local_world_size=1
    )
    monkeypatch.setattr(train, "launched", lambda: follower)
    followed = []
    monkeypatch.setattr(train, "follow_rank", lambda launch: followed.append(launch) or "ok")
    cfg = make_cfg(run_dir=tmp_path / "run")
    assert train.run_job(cfg) == "ok" and followed == [follower]
    assert not (tmp_path / "run" / "metrics.json").exists()
