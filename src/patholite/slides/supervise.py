"""Per-slide limits: slides run one at a time in a supervised worker process, so a slide that hangs, swells
or crashes its process is a failed row and the run goes on (``limits.slide_seconds``,
``limits.slide_memory_gb``).

``Supervisor`` is a slide ``process(path, out) -> report``, what ``slides.cohort.each_slide`` calls, that
runs the real one in a long-lived worker process. The worker is a fresh interpreter (forking a process whose
torch and OpenMP thread pools already run is unsafe), started as multiprocessing's ``spawn`` would but
without importing the run's ``__main__`` again (a user's script without a main guard would run again in
it). It builds the mode's per-slide process once from picklable inputs (``factory(cfg, directory)``: the
model loaded and checked as in the run's own process), then processes the slides it is sent one at a time.
The supervisor waits for each result with the time limit and polls the memory of the worker and every
process below it (the tile engine's loader workers) against the cap; on an overrun it kills the whole tree
(SIGKILL), raises ``SlideLimitError`` naming the limit, and starts a fresh worker for the next slide. A
worker that dies by itself (a segfault in a reader library, the kernel's OOM killer) is a
``WorkerDiedError``. An exception inside the worker is raised again here as itself (its worker traceback
chained), so its failed row reads as it would in-process. The worker's log records go to the run's log.

Memory is the sum of the tree's proportional set sizes (PSS: a page shared by n processes counts 1/n), what
the tree costs the machine; a sum of resident sizes would count the model's pages once more for every
forked loader worker. PSS is read (about 10 ms a process) only when the cheap RSS sum is over the cap, as
PSS <= RSS. Memory is polled every ``POLL_S``, so a process that swells faster can overshoot the cap before
it is killed; the kernel's OOM killer stays the last line, and its kill is a failed row too. Loading the
model is not timed (a first load may compile or fetch), but is held to the memory cap.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from patholite.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the worker tree's liveness, time and memory are checked
STOP_S = 10.0  # a worker asked to stop that has not is killed after this
GB = 2**30
LIMIT_KEYS = {"slide_seconds": ("seconds", 600), "slide_memory_gb": ("GB", 16)}

SlideProcess = Callable[[Path, Path], dict[str, Any]]
# builds a mode's SlideProcess in the worker from the run's config (a DictConfig) and the artifact folder
Factory = Callable[[DictConfig, Path], SlideProcess]


class SlideLimitError(SlideError):
    """A slide that ran past ``limits.slide_seconds`` or ``limits.slide_memory_gb``."""


class WorkerDiedError(SlideError):
    """The worker process died by itself (a crash in native code, the kernel's OOM killer)."""


class WorkerTraceback(Exception):
    """Where an exception raised in the worker came from: chained to it as its cause, so a logged traceback
    shows the worker's frames."""


# ------------------------------------------------------------------------------------------- checks
def _limit(limits: Any, key: str) -> Any:
    if limits is None:
        return None
    return limits.get(key) if isinstance(limits, Mapping | DictConfig) else getattr(limits, key, None)


def check_limits(limits: Any) -> None:
    """``limits.slide_seconds`` and ``limits.slide_memory_gb``: each None (no limit) or a positive number."""
    for key, (unit, example) in LIMIT_KEYS.items():
        value = _limit(limits, key)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"limits.{key}={value!r}: give a positive number of {unit} (e.g. limits.{key}={example}), "
                "or null for no limit"
            )


def limits_set(limits: Any) -> bool:
    """Whether any per-slide limit is set (then slides run in a supervised worker)."""
    return any(_limit(limits, key) is not None for key in LIMIT_KEYS)


def plain_config(cfg: DictConfig) -> dict:
    """``cfg`` as plain containers for the worker, its interpolations resolved here: the worker has no
    Hydra to resolve ``${hydra:...}`` with. One that cannot be resolved here either (a config built
    outside Hydra) is kept as written, to fail in the worker only where it is used, as it would here."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return _resolved(cfg)


def _resolved(node: DictConfig | ListConfig) -> Any:
    raw = OmegaConf.to_container(node, resolve=False)
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    out = {} if isinstance(node, DictConfig) else [None] * len(keys)
    for key in keys:
        try:
            value = node[key]
        except OmegaConfBaseException:
            out[key] = raw[key]
            continue
        out[key] = _resolved(value) if isinstance(value, DictConfig | ListConfig) else value
    return out


# ------------------------------------------------------------------------------------------- memory
def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and every process below it that is still running."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:  # gone between listing and reading
        return 0


def _pss(proc: psutil.Process) -> int:
    try:
        info = proc.memory_full_info()
    except psutil.AccessDenied:
        return _rss(proc)
    except psutil.Error:
        return 0
    return int(getattr(info, "pss", info.rss))  # PSS on Linux; elsewhere resident bytes


def tree_memory(procs: list[psutil.Process], cap: float | None = None) -> int:
    """Bytes ``procs`` hold together: the sum of their PSS. With ``cap``, a sum of RSS at most ``cap`` is
    returned as it is (it bounds the PSS sum, and costs microseconds instead of milliseconds)."""
    rss = sum(_rss(p) for p in procs)
    if cap is not None and rss <= cap:
        return rss
    return sum(_pss(p) for p in procs)


# ------------------------------------------------------------------------------------------- worker
class _PipeHandler(logging.Handler):
    """Sends the worker's log records to the supervisor, which logs them as its own."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        super().__init__()
        self.send = send
        self.pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid:  # a loader forked from the worker: the pipe is not its own, stderr is
            if logging.lastResort is not None:
                logging.lastResort.handle(record)
            return
        try:
            plain = copy.copy(record)
            plain.msg, plain.args = record.getMessage(), None  # arguments may not pickle
            if record.exc_info:
                plain.exc_text = logging.Formatter().formatException(record.exc_info)
            plain.exc_info = None
            self.send(("log", plain))
        except Exception:  # noqa: BLE001 - logging never breaks the slide
            self.handleError(record)


def _portable(err: BaseException) -> tuple[BaseException, str]:
    """The exception as it can travel to the supervisor (itself if it pickles), and its traceback."""
    text = "".join(traceback.format_exception(err))
    try:
        return pickle.loads(pickle.dumps(err)), text
    except Exception:  # noqa: BLE001 - an exception type that does not pickle: its text
        return RuntimeError(f"{type(err).__name__}: {err}"), text


def _watch_parent(parent: int) -> None:
    """End the worker when its supervisor is gone (killed): nobody would read its results."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


# the worker's command line: the run's import path first (as spawn sets it), then the worker's loop
_WORKER_CODE = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[2]); "
    "from patholite.slides.supervise import worker_main; worker_main(int(sys.argv[1]))"
)


def worker_main(fd: int) -> None:
    """The worker process: its settings, then the factory and its inputs, from the pipe ``fd``; then
    ``_serve``. A factory that cannot be unpickled here is a set-up error the supervisor raises."""
    conn = Connection(fd)
    start_method, parent, level = conn.recv()
    # its children (the tile engine's loaders) start as in the run's own process: forked, not spawned,
    # which would import torch and the package again in each, for seconds
    multiprocessing.set_start_method(start_method, force=True)
    # Ctrl-C reaches the whole process group: stopping the worker is the supervisor's to do
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()  # the model's and the engine's threads may log while a result is sent

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    root = logging.getLogger()
    root.handlers = [_PipeHandler(send)]
    root.setLevel(level)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        factory, cfg, directory = conn.recv()
    except Exception as err:  # noqa: BLE001 - e.g. a factory defined in the run's __main__
        send(("setup_error", _portable(err)))
        return
    _serve(conn, send, factory, cfg, directory)


def _serve(
    conn: Connection, send: Callable[[tuple], None], factory: Factory, cfg: dict, directory: str
) -> None:
    """The worker's loop: build the process once, then process each (path, out) sent until None or EOF."""
    try:
        config = OmegaConf.create(cfg)
        process = factory(config, Path(directory))
    except Exception as err:  # noqa: BLE001 - raised again by the supervisor
        send(("setup_error", _portable(err)))
        return
    send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        path, out, mpp = job
        try:
            if "reader" in config:  # this slide's mpp, as the run's own process has it now
                config.reader.mpp = mpp
            report = process(path, out)
        except Exception as err:  # noqa: BLE001 - every slide's failure goes back as its row
            send(("error", _portable(err)))
        else:
            send(("ok", report))


def slide_mpp(cfg: Any) -> float | None:
    """``reader.mpp`` as the run's process has it while a slide is processed: a cohort manifest's per-slide
    override (``slides.cohort.slide_overrides``) sets it around each call, and the worker, which got the
    config once, must see it too."""
    reader = cfg.get("reader")  # none in a toy factory's config
    return None if reader is None else reader.get("mpp")


# --------------------------------------------------------------------------------------- supervisor
class Supervisor:
    """A slide ``process(path, out) -> report`` that runs ``factory``'s process in a supervised worker,
    held to ``limits``. Use it as a context manager: the first worker starts (and the model loads, its
    errors raised) on entry, and the worker stops on exit (killed when leaving on an exception)."""

    def __init__(self, factory: Factory, cfg: Any, directory: str | Path, limits: Any = None,
                 poll_s: float = POLL_S) -> None:  # fmt: skip
        check_limits(limits)
        self.factory = factory
        self.cfg = plain_config(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
        self._live = cfg  # read per slide: a cohort manifest sets reader.mpp around each slide's call
        self.directory = str(directory)
        self.seconds = _limit(limits, "slide_seconds")
        gb = _limit(limits, "slide_memory_gb")
        self.cap = None if gb is None else float(gb) * GB
        self.poll_s = poll_s
        self.starts = 0  # workers started so far
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._tree: list[psutil.Process] = []

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted or failed: the slide in progress is not waited for
            self.kill()

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """A fresh worker with the mode's process built in it; its setup error is raised here."""
        self.kill()
        ours, theirs = multiprocessing.Pipe()
        fd = theirs.fileno()
        argv = [sys.executable, "-c", _WORKER_CODE, str(fd), json.dumps(sys.path)]
        proc = subprocess.Popen(argv, pass_fds=(fd,))
        theirs.close()
        self._proc, self._conn = proc, ours
        self._tree = [psutil.Process(proc.pid)]
        self.starts += 1
        level = logging.getLogger().getEffectiveLevel()
        try:
            try:
                ours.send((multiprocessing.get_start_method(), os.getpid(), level))
                ours.send((self.factory, self.cfg, self.directory))  # an unpicklable factory fails here
            except OSError:  # it could not start (its error is on stderr)
                raise self._died(None) from None
            kind, value = self._wait(None, None)
            if kind == "setup_error":
                raise value
        except BaseException:  # no worker is left waiting (Ctrl-C while the model loads included)
            self.kill()
            raise

    def close(self) -> None:
        """Ask the worker to stop; kill it if it has not within ``STOP_S``."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):  # a worker already gone
            self._conn.send(None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(STOP_S)
        self.kill()

    def kill(self) -> None:
        """Kill the worker and every process below it (SIGKILL), and reap them."""
        if self._proc is None:
            return
        procs = {p.pid: p for p in [*self._tree, *process_tree(self._tree[0])]}
        # the worker first, so it starts no new child while its children are killed
        for proc in procs.values():
            with contextlib.suppress(psutil.Error):  # gone already
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # in uninterruptible I/O: left to the OS
            self._proc.wait(5.0)  # reaped by its Popen, which then knows its exit code
        psutil.wait_procs([p for pid, p in procs.items() if pid != self._proc.pid], timeout=5.0)
        self._conn.close()
        self._proc = self._conn = None
        self._tree = []

    # ------------------------------------------------------------------------------------ one slide
    def __call__(self, path: Path, out: Path) -> dict[str, Any]:
        if self._proc is None or self._proc.poll() is not None:  # killed, or died between slides
            self.start()
        self._conn.send((Path(path), Path(out), slide_mpp(self._live)))
        kind, value = self._wait(self.seconds, Path(path))
        if kind == "ok":
            return value
        raise value

    def _wait(self, seconds: float | None, slide: Path | None) -> tuple[str, Any]:
        """The worker's next answer (its log records handled on the way), or the error that ended it:
        ``seconds`` passed, the tree over the memory cap, or the worker dead (each kills the tree)."""
        start = time.monotonic()
        while True:
            if self._conn.poll(self.poll_s):
                try:
                    kind, value = self._conn.recv()
                except (EOFError, OSError):
                    raise self._died(slide) from None
                if kind == "log":
                    logging.getLogger(value.name).handle(value)
                elif kind in ("error", "setup_error"):
                    err, text = value
                    err.__cause__ = WorkerTraceback(f"in the slide worker:\n{text}")
                    return kind, err
                else:
                    return kind, value
            elif self._proc.poll() is not None:
                raise self._died(slide)
            ran = time.monotonic() - start
            if seconds is not None and ran > seconds:
                self.kill()
                raise SlideLimitError(
                    f"slide {slide.name} exceeded limits.slide_seconds={seconds:g} (ran {ran:.0f} s; its "
                    "worker was killed); raise the limit if slides like it need longer, or check the slide "
                    "(a stalled read, a slide far larger than the others)"
                )
            if self.cap is not None:
                self._tree = process_tree(self._tree[0])
                used = tree_memory(self._tree, self.cap)
                if used > self.cap:
                    self._over_memory(used, len(self._tree), slide)

    def _over_memory(self, used: int, n: int, slide: Path | None) -> None:
        self.kill()
        cap = self.cap / GB
        held = f"{used / GB:.2f} GB in {n} process{'es' if n > 1 else ''}"
        if slide is None:
            raise ConfigError(
                f"limits.slide_memory_gb={cap:g} is less than loading the model takes (the slide worker "
                f"held {held} before reading any slide); raise the cap"
            )
        raise SlideLimitError(
            f"slide {slide.name} exceeded limits.slide_memory_gb={cap:g} (its worker held {held}; they "
            "were killed); raise the cap, or lower engine.workers, engine.batch_size or engine.prefetch"
        )

    def _died(self, slide: Path | None) -> WorkerDiedError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5.0)
        code = self._proc.returncode
        self.kill()  # its loader processes, if any outlived it
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
            if -code == signal.SIGKILL:
                how += ": the kernel's OOM killer, or another process"
            elif -code in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL):
                how += ": a crash in native code (a slide reader library, a model kernel)"
        else:
            how = f"exit code {code}"
        if slide is None:
            return WorkerDiedError(
                f"the slide worker died while starting or loading the model ({how}); its error, if it "
                "printed one, is above"
            )
        return WorkerDiedError(
            f"the slide worker died while processing slide {slide.name} ({how}); the next slide gets a "
            "fresh worker; if this repeats, look for the OOM killer in the system log (dmesg) and set "
            "limits.slide_memory_gb below the machine's memory"
        )
