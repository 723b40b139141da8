"""Pre-emption and time limits under SLURM: the signal, the checkpoint, ``scontrol requeue``, the requeued
attempt continuing from the saved step in the same folder and W&B run (without SLURM: a fake ``scontrol``)."""

from __future__ import annotations

import os
import signal
import subprocess
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from patholite import requeue
from patholite.errors import ConfigError
from patholite.jobs import sigterm_as_exit
from patholite.overrides import quote
from patholite.pipelines.lightning import (
    STOP,
    InterruptedCheckpoint,
    StopAtStepEnd,
    StopRequested,
    without_slurm_requeue,
)
from patholite.records import RunRecord, read_record
from tests.conftest import REPO, run_cli

FAST = ["debug=fast", "model=vit_micro"]


@pytest.fixture(autouse=True)
def _no_slurm_here(monkeypatch):
    """Whatever machine runs the tests, the job's SLURM facts are only what a test sets."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SUBMITIT_")) or name == requeue.SIGNAL_ENV:
            monkeypatch.delenv(name)
    STOP.clear()
    yield
    STOP.clear()
    requeue._pointer.clear()  # a pointer a test set must not reach a later job of this worker


# --- the job's SLURM facts ------------------------------------------------------------------------------


def test_slurm_job_reads_the_environment():
    assert requeue.slurm_job({}) is None  # not under SLURM: nothing changes
    job = requeue.slurm_job({"SLURM_JOB_ID": "81", "SLURM_RESTART_COUNT": "2"})
    assert (job.job_id, job.restart_count, job.signal, job.launcher) == ("81", 2, signal.SIGUSR1, "sbatch")
    # an array task is requeued by <array id>_<task id>
    array = requeue.slurm_job({"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"})
    assert array.job_id == "77_3" and array.restart_count == 0
    assert array.describe() == {
        "job_id": "77_3",
        "restart_count": 0,
        "requeue_signal": "SIGUSR1",
        "launcher": "sbatch",
    }


def test_the_signal_is_what_the_launcher_asks_slurm_to_send():
    submitit = {"SLURM_JOB_ID": "5", "SUBMITIT_EXECUTOR": "slurm"}
    assert requeue.slurm_job(submitit).signal == signal.SIGUSR2  # submitit's --signal=USR2@<delay>
    assert requeue.slurm_job({**submitit, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}).signal == signal.SIGUSR1
    assert requeue.slurm_job(submitit).launcher == "submitit"
    for value, expected in [("TERM", signal.SIGTERM), ("sigusr2", signal.SIGUSR2), ("none", None)]:
        assert requeue.slurm_job({**submitit, requeue.SIGNAL_ENV: value}).signal == expected


def test_a_bad_signal_or_restart_count_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"PATHOLITE_REQUEUE_SIGNAL='HUP'.*USR1, USR2 or TERM"):
        requeue.slurm_job({"SLURM_JOB_ID": "5", requeue.SIGNAL_ENV: "HUP"})
    with pytest.raises(ConfigError, match="PATHOLITE_REQUEUE_SIGNAL='USR3'"):  # checked outside SLURM too
        requeue.with_run_dir(["model=vit_micro"], {requeue.SIGNAL_ENV: "USR3"})
    with pytest.raises(ConfigError, match="SLURM_RESTART_COUNT='x'"):
        requeue.slurm_job({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "x"})


# --- one signal, one stop, one requeue ------------------------------------------------------------------


def test_the_signal_stops_at_the_end_of_the_step_and_only_once(tmp_path):
    job = requeue.SlurmJob("12")
    before = signal.getsignal(signal.SIGUSR1)
    one_process = SimpleNamespace(world_size=1, strategy=SimpleNamespace(launcher=None))
    with requeue.requeue_on_signal(job):
        STOP.trainers.append(one_process)  # inside a fit: the handler only notes the stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert STOP.signum == signal.SIGUSR1 and requeue.requested(job) == signal.SIGUSR1
        with pytest.raises(StopRequested) as stopped:  # ... which the step's end carries out
            StopAtStepEnd(tmp_path / "interrupted.ckpt").on_train_batch_end(one_process)
        assert stopped.value.code == 128 + signal.SIGUSR1
        STOP.trainers.clear()
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal while stopping: no second stop
    assert signal.getsignal(signal.SIGUSR1) is before and STOP.signum is None


def test_a_spawned_fit_passes_the_signal_to_its_ranks_and_its_driver_writes_no_checkpoint(tmp_path):
    killed = []
    launcher = SimpleNamespace(procs=["rank0", "rank1"], kill=killed.append)
    driver = SimpleNamespace(world_size=2, strategy=SimpleNamespace(launcher=launcher))
    STOP.trainers.append(driver)
    assert STOP.ask(signal.SIGUSR2) is False and killed == [signal.SIGUSR2]  # the ranks stop at a step's end
    # the driver's trainer never trained: its on_exception must not overwrite the ranks' checkpoint
    InterruptedCheckpoint(dirpath=tmp_path, filename="interrupted").on_exception(
        driver, None, StopRequested(signal.SIGUSR2)
    )
    assert not list(tmp_path.iterdir())
    # in a rank, rank 0's word decides (all stop at the same step) and the ranks save before they stop
    STOP.clear()
    saved = []
    rank = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(broadcast=lambda stop, src: True),  # rank 0 was signalled
        save_checkpoint=saved.append,
    )
    with pytest.raises(StopRequested):
        StopAtStepEnd(tmp_path / "interrupted.ckpt", signal.SIGUSR2).on_train_batch_end(rank)
    assert saved == [tmp_path / "interrupted.ckpt"]
    rank.strategy.broadcast = lambda stop, src: False
    StopAtStepEnd(tmp_path / "interrupted.ckpt", signal.SIGUSR2).on_train_batch_end(rank)  # trains on


def test_a_launchers_ranks_stop_on_rank_0s_word_and_checkpoint_only_that_stop(tmp_path):
    """srun's or torchrun's ranks each run a Trainer.fit (so ``STOP.trainers`` is not empty in them): rank
    0's word is broadcast every step; they raise together and write the checkpoint together in
    ``on_exception`` (a collective), which one rank's own error must not start."""
    saved = []
    environment = SimpleNamespace(creates_processes_externally=True)
    said = []
    rank = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(
            cluster_environment=environment,
            launcher=None,
            broadcast=lambda stop, src: said.append(stop) or True,
        ),
        save_checkpoint=saved.append,
    )
    STOP.trainers.append(rank)
    try:
        with pytest.raises(StopRequested):  # this rank was not signalled; rank 0 was
            StopAtStepEnd(tmp_path / "interrupted.ckpt", signal.SIGUSR1).on_train_batch_end(rank)
        assert said == [False] and saved == []  # written in on_exception, below, by every rank
        rank.strategy.broadcast = lambda stop, src: False
        StopAtStepEnd(tmp_path / "interrupted.ckpt", signal.SIGUSR1).on_train_batch_end(rank)  # trains on
    finally:
        STOP.trainers.remove(rank)
    checkpoint = InterruptedCheckpoint(dirpath=tmp_path, filename="interrupted")
    checkpoint.on_exception(rank, None, RuntimeError("this rank alone ran out of memory"))
    assert saved == []  # the other ranks would wait in the checkpoint's barrier for ever
    checkpoint.on_exception(rank, None, StopRequested(signal.SIGUSR1))
    assert saved == [checkpoint.ckpt_path]


def test_sigterm_waits_for_a_requeue_stop_in_progress():
    with sigterm_as_exit():
        STOP.ask(signal.SIGUSR1)  # stopping: the checkpoint is being written
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's time limit: no exit in the middle of it
        STOP.clear()
        with pytest.raises(SystemExit) as killed:  # otherwise SIGTERM ends the job as ever
            os.kill(os.getpid(), signal.SIGTERM)
    assert killed.value.code == 143


def test_outside_a_fit_the_signal_stops_at_once():
    job = requeue.SlurmJob("12", signal=signal.SIGUSR2)
    with pytest.raises(StopRequested), requeue.requeue_on_signal(job):
        os.kill(os.getpid(), signal.SIGUSR2)
    assert requeue.requested(requeue.SlurmJob("12", signal=None)) is None  # "none": patholite never requeues


def test_lightning_installs_no_requeue_handler_of_its_own_under_srun(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "33")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    kwargs = without_slurm_requeue({"accelerator": "cpu", "devices": 1})
    [environment] = kwargs["plugins"]
    assert environment.auto_requeue is False
    ours = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is ours  # Lightning's hpc_ckpt + scontrol handler is off
    finally:
        trainer._signal_connector.teardown()
    # a strategy bringing its own environment (DDP's LightningEnvironment) and non-SLURM runs are left alone
    ddp = type("Strategy", (), {"cluster_environment": object()})()
    assert without_slurm_requeue({"strategy": ddp}) == {"strategy": ddp}
    assert without_slurm_requeue({"devices": 1}, env={}) == {"devices": 1}


def test_resubmit_runs_scontrol_requeue_and_reports_a_refusal():
    calls = []

    def accept(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    job = requeue.SlurmJob("77_3")
    assert requeue.resubmit(job, run=accept) is None and calls == [["scontrol", "requeue", "77_3"]]

    def refuse(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Requested operation is presently disabled")

    assert "presently disabled" in requeue.resubmit(job, run=refuse)

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    assert requeue.resubmit(job, run=missing) == "scontrol is not on PATH"


def test_an_attempt_continues_only_its_own_jobs_record():
    first = {"status": "requeued", "job": {"slurm": {"job_id": "9"}, "requeues": 1, "requeue_events": [{}]}}
    again = requeue.SlurmJob("9", restart_count=1)
    assert requeue.continues(again, first)
    assert not requeue.continues(requeue.SlurmJob("10", restart_count=1), first)  # another job's folder
    assert not requeue.continues(None, first) and not requeue.continues(again, {})
    # one salloc allocation, never restarted: an interrupted run there still needs resume=
    assert not requeue.continues(requeue.SlurmJob("9"), {**first, "status": "interrupted"})
    assert requeue.continues(again, {**first, "status": "interrupted"})  # SLURM requeued it (pre-emption)
    assert requeue.history(again, first) == (1, [{}])
    assert requeue.history(requeue.SlurmJob("9", restart_count=3), first)[0] == 3  # SLURM's own requeues
    record = RunRecord(run_dir="/nowhere", config={}, status="requeued")
    assert record.status in ("requeued",)  # a status the schema accepts


def test_a_requeued_command_finds_its_first_attempts_folder(tmp_path):
    env = {"SLURM_JOB_ID": "21", "PATHOLITE_ROOT": str(tmp_path)}
    argv = [*FAST, "seed=3"]
    assert requeue.with_run_dir(argv, env) == argv  # a first attempt: Hydra's own folder ...
    run_dir = tmp_path / "outputs" / "runs" / "d" / "t"
    run_dir.mkdir(parents=True)
    requeue.remember(run_dir, None)  # ... which it remembers
    restarted = {**env, "SLURM_RESTART_COUNT": "1"}
    assert requeue.with_run_dir(argv, restarted) == [*argv, f"hydra.run.dir={quote(str(run_dir))}"]
    assert requeue.with_run_dir([*FAST, "seed=4"], restarted) == [*FAST, "seed=4"]  # another command
    pinned = [*argv, "hydra.run.dir=x"]
    assert requeue.with_run_dir(pinned, restarted) == pinned  # a named folder is stable anyway
    # a sweep the basic launcher runs inside one SLURM job keeps its sweep folder
    sweep = ["-m", *FAST, "seed=1,2"]
    requeue.with_run_dir(sweep, env)
    requeue.remember(run_dir / "0", str(run_dir))
    assert requeue.with_run_dir(sweep, restarted)[-1] == f"hydra.sweep.dir={quote(str(run_dir))}"
    assert requeue.with_run_dir(argv, {}) == argv  # not under SLURM


def test_a_requeued_submitit_job_composes_the_same_sweep_folder():
    """submitit re-runs the pickled launcher, whose config carries Hydra's resolved ``now``; the sweep
    config of each job copies that cache, so ``<sweep dir>/<job num>`` is the first attempt's."""
    import pickle
    import time

    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()  # Hydra's ``now`` resolver, cached per config
    config = OmegaConf.create({"sweep": {"dir": "multiruns/${now:%H-%M-%S.%f}"}})
    first = str(config.sweep.dir)
    time.sleep(0.01)
    again = pickle.loads(pickle.dumps(config))
    copy = OmegaConf.create({"sweep": {"dir": "multiruns/${now:%H-%M-%S.%f}"}})
    OmegaConf.copy_cache(from_config=again, to_config=copy)  # as Hydra's load_sweep_config does
    assert str(again.sweep.dir) == str(copy.sweep.dir) == first


# --- the whole story, as SLURM would play it --------------------------------------------------------------


def test_a_requeued_job_continues_from_its_saved_step_in_the_same_folder_and_wandb_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"  # records its arguments, as SLURM would accept them
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {quote(str(calls))}\n')
    scontrol.chmod(0o755)
    starts = tmp_path / "start.pt"
    command = [
        *FAST,
        "logger=wandb",
        "trainer.max_epochs=2",  # 8 steps; the signal comes at step 2
        "+callbacks.extra.stop._target_=tests.helpers.InterruptAt",
        "+callbacks.extra.stop.step=2",
        "+callbacks.extra.stop.kind=sigusr1",
        "+callbacks.extra.start._target_=tests.helpers.RecordStart",
        f"+callbacks.extra.start.path={quote(str(starts))}",
    ]
    env = {
        # this checkout's package (not an installed one) and tests.helpers
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
    }

    first = run_cli(command, tmp_path, env=env)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    [run_dir] = (tmp_path / "outputs" / "runs").glob("*/*")
    record = read_record(run_dir)
    assert record["status"] == "requeued", record["error"]
    assert record["job"]["slurm"]["job_id"] == "4242" and record["job"]["requeues"] == 1
    [event] = record["job"]["requeue_events"]
    assert event["signal"] == "SIGUSR1" and event["requeued"] is True
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = torch.load(
        run_dir / "checkpoints" / "train" / "interrupted.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["global_step"] >= 2  # a whole step: the stop waits for the step's end

    # SLURM starts the same batch script again, with the same job id
    second = run_cli(command, tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert list((tmp_path / "outputs" / "runs").glob("*/*")) == [run_dir]  # the same folder
    assert torch.load(starts, weights_only=False)["global_step"] == saved["global_step"]  # not from zero
    again = read_record(run_dir)
    assert again["status"] == "ok" and again["job"]["requeues"] == 1
    assert again["job"]["requeue_events"] == record["job"]["requeue_events"]
    assert again["wandb"]["run_id"] == record["wandb"]["run_id"]  # the same W&B run
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue
