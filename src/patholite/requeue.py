"""Pre-emption and time limits under SLURM: a job warned by a signal saves a checkpoint and requeues itself;
the requeued attempt (same SLURM job id) continues in the same run folder, from that checkpoint, in the same
W&B run.

One mechanism handles the signal: patholite's. Lightning's own SLURM auto-requeue is turned off
(``pipelines.lightning.without_slurm_requeue``), and submitit's USR2 handler is replaced while a job runs, so
a signal makes one checkpoint and one ``scontrol requeue``. Patholite's handler stops at the end of the
current step (``pipelines.lightning.STOP``), writes the stage's ``interrupted.ckpt`` (as Ctrl-C does), a
``requeued`` record, closes the loggers, and only then asks SLURM to requeue: ``scontrol requeue`` makes
SLURM end the job, so nothing may be left to write after it.

Which signal (``PATHOLITE_REQUEUE_SIGNAL``): what the job asks SLURM to send before its time limit. Under
submitit (``hydra/launcher=slurm``) its own, ``$SUBMITIT_PREEMPT_SIGNAL`` or USR2 (``--signal=USR2@<delay>``);
in a plain sbatch script USR1 (``#SBATCH --signal=USR1@120``). ``TERM`` for clusters that warn with SIGTERM;
``none`` leaves requeueing to SLURM. Without it, SIGTERM stays what it is everywhere: an ``interrupted``
record (exit 143); when SLURM itself requeues such a job (pre-emption with ``PreemptMode=REQUEUE``, a node
failure) the next attempt still continues the run.

How an attempt finds its run folder: a sweep job's is ``<sweep dir>/<job num>`` (submitit re-runs the same
pickled job, whose sweep dir Hydra resolved once); a single run's (``outputs/runs/<date>/<time>``) and a sweep
run by the basic launcher inside one SLURM job are pointed to by ``outputs/slurm_jobs/<job id>-<command
key>.json``, which the first attempt writes and a requeued one (``SLURM_RESTART_COUNT`` > 0) with the same
command line reads. An attempt continues the record in that folder when its ``job.slurm.job_id`` is this
job's (a finished one is left as it is).

Not under SLURM (no ``SLURM_JOB_ID``) nothing here changes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patholite.errors import ConfigError
from patholite.io import write_json
from patholite.overrides import quote, split_flags
from patholite.pipelines.lightning import STOP, StopRequested
from patholite.records import now

log = logging.getLogger(__name__)

SIGNAL_ENV = "PATHOLITE_REQUEUE_SIGNAL"
SIGNALS = {"USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "TERM": signal.SIGTERM}
_OFF = ("none", "off", "")
POINTER_FOLDER = "slurm_jobs"  # under <paths.root_dir>/outputs/


@dataclass(frozen=True)
class SlurmJob:
    """This process's SLURM job: its id (``<array id>_<task id>`` for an array task, as ``scontrol`` takes
    it), how many times SLURM restarted it, the signal that requeues it (None: patholite does not) and what
    launched it."""

    job_id: str
    restart_count: int = 0
    signal: signal.Signals | None = signal.SIGUSR1
    launcher: str = "sbatch"  # or "submitit"

    def describe(self) -> dict[str, Any]:
        """The record's ``job.slurm`` block."""
        return {
            "job_id": self.job_id,
            "restart_count": self.restart_count,
            "requeue_signal": self.signal.name if self.signal is not None else None,
            "launcher": self.launcher,
        }


def parse_signal(value: str) -> signal.Signals | None:
    """``USR1``, ``SIGUSR1``, ``usr1`` (and USR2, TERM) -> the signal; ``none`` -> None."""
    name = value.strip().upper().removeprefix("SIG")
    if name.lower() in _OFF:
        return None
    if name not in SIGNALS:
        raise ConfigError(
            f"{SIGNAL_ENV}={value!r}: use USR1, USR2 or TERM (the signal the job asks SLURM to send before "
            "its time limit, e.g. sbatch --signal=USR1@120), or none to leave requeueing to SLURM"
        )
    return SIGNALS[name]


def slurm_job(env: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The SLURM job this process runs in (None outside SLURM), from its environment."""
    env = os.environ if env is None else env
    raw_id = env.get("SLURM_JOB_ID")
    if not raw_id:
        return None
    array_id, task_id = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{task_id}" if array_id and task_id else raw_id
    restarts = env.get("SLURM_RESTART_COUNT") or "0"
    if not restarts.isdigit():
        raise ConfigError(f"SLURM_RESTART_COUNT={restarts!r} is not a count; unset it or give a whole number")
    submitit = env.get("SUBMITIT_EXECUTOR") == "slurm"
    if SIGNAL_ENV in env:
        chosen = parse_signal(env[SIGNAL_ENV])
    elif submitit:  # submitit asked SLURM for this one (sbatch --signal=<it>@signal_delay_s)
        chosen = parse_signal(env.get("SUBMITIT_PREEMPT_SIGNAL") or "USR2")
    else:
        chosen = signal.SIGUSR1  # Lightning's and most clusters' convention: #SBATCH --signal=USR1@120
    return SlurmJob(job_id, int(restarts), chosen, "submitit" if submitit else "sbatch")


@contextlib.contextmanager
def requeue_on_signal(job: SlurmJob | None, follower: bool = False) -> Iterator[None]:
    """While a job runs: its requeue signal stops it at the end of the current step (``STOP``). Nested
    inside ``jobs.sigterm_as_exit``, so with ``TERM`` this handler is SIGTERM's. ``follower``: a rank other
    than 0 of a launched job, which notes the signal (SLURM sends it to every task) and stops when rank 0
    says so; it neither stops by itself nor requeues."""
    if job is None or job.signal is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if STOP.ask(signum) and not follower:
            raise StopRequested(signum)
        if not follower:
            log.warning("%s: the job stops at the end of this step and requeues", signal.Signals(signum).name)

    STOP.clear()
    STOP.watch = int(job.signal)  # a spawned DDP fit's ranks listen to it too
    previous = signal.signal(job.signal, handler)
    try:
        yield
    finally:
        signal.signal(job.signal, previous)
        STOP.clear()


def requested(job: SlurmJob | None) -> int | None:
    """The requeue signal this job received, if it did (another stop, such as Ctrl-C, is not a requeue)."""
    if job is None or job.signal is None or STOP.signum != int(job.signal):
        return None
    return STOP.signum


def history(job: SlurmJob, previous: Mapping[str, Any] | None) -> tuple[int, list[dict[str, Any]]]:
    """(requeues so far, their events) for an attempt of ``job`` that continues ``previous`` (the record it
    found in its folder; None for a first attempt). SLURM's restart count also counts requeues patholite did
    not ask for (pre-emption, node failure)."""
    before = (previous or {}).get("job") or {}
    events = list(before.get("requeue_events") or [])
    return max(int(before.get("requeues") or 0), job.restart_count), events


def continues(job: SlurmJob | None, previous: Mapping[str, Any] | None) -> bool:
    """Whether this attempt continues the run whose record ``previous`` is: the same SLURM job wrote it, and
    SLURM restarted the job since (or the record says it asked to be). Inside one ``salloc`` allocation (one
    job id, never restarted) a second command in an interrupted run's folder still needs ``resume=``."""
    if job is None or not previous:
        return False
    if ((previous.get("job") or {}).get("slurm") or {}).get("job_id") != job.job_id:
        return False
    return job.restart_count > 0 or previous.get("status") == "requeued"


def resubmit(job: SlurmJob, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """``scontrol requeue <job id>``; None when SLURM accepted it, else why not (the job then ends as
    interrupted: continue it with ``resume=<run dir>``)."""
    command = ["scontrol", "requeue", job.job_id]
    try:
        done = run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "scontrol is not on PATH"
    except subprocess.TimeoutExpired:
        return "scontrol requeue did not answer within 60 s"
    if done.returncode != 0:
        return f"{' '.join(command)} exited {done.returncode}: {(done.stderr or done.stdout or '').strip()}"
    return None


def event(job: SlurmJob, signum: int, error: str | None) -> dict[str, Any]:
    """One requeue in the record's ``job.requeue_events``."""
    out: dict[str, Any] = {
        "at": STOP.at or now(),
        "signal": signal.Signals(signum).name,
        "restart_count": job.restart_count,
        "requeued": error is None,
    }
    if error is not None:
        out["error"] = error
    return out


# --- where a requeued attempt runs: the first attempt's folder -------------------------------------------

_pointer: dict[str, Any] = {}  # this process's pointer file and the Hydra key it pins; set by with_run_dir


def command_key(argv: list[str]) -> str:
    """A short digest of a command line: two trainings in one batch script point to two folders."""
    return hashlib.sha1("\0".join(argv).encode()).hexdigest()[:12]


def _root_dir(argv: list[str], env: Mapping[str, str]) -> Path:
    """``paths.root_dir`` as the config computes it (``PATHOLITE_ROOT``, else the working directory), or as
    the command line sets it."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("paths.root_dir=")]
    return Path(given[-1] if given else env.get("PATHOLITE_ROOT") or ".").expanduser().resolve()


def with_run_dir(argv: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` for this attempt: a requeued run gets its first attempt's folder (``hydra.run.dir``, or
    ``hydra.sweep.dir`` for a sweep the basic launcher runs in this job). A first attempt only remembers
    where its pointer goes (``remember``). Nothing changes outside SLURM, when the command names its folder,
    or for ``resume=`` (whose folder is given)."""
    env = os.environ if env is None else env
    _pointer.clear()
    if SIGNAL_ENV in env:  # a typo shows on the laptop, not first on the cluster
        parse_signal(env[SIGNAL_ENV])
    job = slurm_job(env)
    flags, overrides = split_flags(argv)
    multirun = any(f in ("-m", "--multirun") for f in flags)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if job is None or any(o.startswith((f"{key}=", "resume=")) for o in overrides):
        return argv
    path = _root_dir(argv, env) / "outputs" / POINTER_FOLDER / f"{job.job_id}-{command_key(argv)}.json"
    _pointer.update(path=path, key=key, job_id=job.job_id)
    if job.restart_count == 0 or not path.is_file():
        return argv
    try:
        folder = json.loads(path.read_text())["dir"]
    except (OSError, ValueError, KeyError) as err:
        log.warning("requeued job %s: cannot read %s (%s); starting a new run", job.job_id, path, err)
        return argv
    if not Path(folder).is_dir():
        log.warning("requeued job %s: its folder %s is gone; starting a new run", job.job_id, folder)
        return argv
    log.info("requeued job %s (restart %d): continuing in %s", job.job_id, job.restart_count, folder)
    return [*argv, f"{key}={quote(folder)}"]


def remember(run_dir: Path, sweep_dir: str | None) -> None:
    """Write this attempt's folder where a requeued attempt of the same command looks (``with_run_dir``)."""
    if not _pointer:
        return
    folder = sweep_dir if _pointer["key"] == "hydra.sweep.dir" else str(run_dir)
    if folder is None:
        return
    path: Path = _pointer["path"]
    with contextlib.suppress(OSError, ValueError):  # only a requeue needs it; the job goes on without
        if path.is_file() and json.loads(path.read_text()).get("dir") == folder:
            return
    try:
        write_json(path, {"dir": folder, "key": _pointer["key"], "job_id": _pointer["job_id"], "at": now()})
    except OSError as err:
        log.warning("cannot write %s (%s): a requeue of this job would start a new run", path, err)
