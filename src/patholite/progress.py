"""Progress of long jobs: a Rich bar on a terminal, periodic plain lines in a log (CI, SLURM, a pipe).

Every long loop (slides of a folder, synthetic tiles and slides, benchmark timing) reports through
``Progress``: done out of total, a rate (of the main count or of a secondary one, e.g. tiles per second
while counting slides) and the time left. Where the console is a terminal it is a repainted Rich bar;
elsewhere it is one plain line (no carriage return, no ANSI code) at the start, whenever another tenth of
the total is done (at least ``min_gap_s`` after the last line) or ``interval_s`` seconds have passed, and at
the end. ``PATHOLITE_PROGRESS`` picks the
mode (``auto``: by the terminal, ``bar``, ``lines``, ``off``) and ``PATHOLITE_PROGRESS_INTERVAL`` the
seconds between plain lines (default 30).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from patholite.errors import ConfigError

MODE_ENV = "PATHOLITE_PROGRESS"
INTERVAL_ENV = "PATHOLITE_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 30.0
T = TypeVar("T")

# The Rich display of this process's bars: a bar started while another runs joins its display (Rich allows
# one live display per console), and the display stops with its last bar.
_shared: dict[str, Any] = {"rich": None, "users": 0, "console": None}
_shared_lock = threading.Lock()


def _stderr_console() -> Console:
    """One stderr console for every progress of the process, so a bar opened inside another (a slide's
    levels inside a folder of slides) joins its display instead of starting a second one."""
    with _shared_lock:
        if _shared["console"] is None:
            _shared["console"] = Console(stderr=True)
        return _shared["console"]


def progress_mode(console: Console) -> str:
    """``bar``, ``lines`` or ``off`` for ``console``: ``PATHOLITE_PROGRESS``, else by whether it is a
    terminal."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{MODE_ENV}={mode!r}: use one of {list(MODES)} (auto: a bar on a terminal)")
    if mode == "auto":
        return "bar" if console.is_terminal else "lines"
    return mode


def progress_interval() -> float:
    """Seconds between plain progress lines: ``PATHOLITE_PROGRESS_INTERVAL``, default 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines (> 0), e.g. 30")
    return value


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``total`` units of work named ``unit`` (``description`` says what); ``rate_of`` names the count whose
    rate is shown (``unit`` itself, or a secondary count given to ``advance``, e.g. ``tiles``).

    Use as a context manager; ``advance(n, tiles=312)`` after each piece of work. ``console`` defaults to
    stderr (stdout stays the job's own output)."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "items",
        *,
        rate_of: str | None = None,
        console: Console | None = None,
        interval_s: float | None = None,
        mode: str | None = None,
        min_gap_s: float = 2.0,
    ) -> None:
        if total < 0:
            raise ValueError(f"progress total={total} must be 0 or more")
        self.description = description
        self.total = int(total)
        self.unit = unit
        self.rate_of = rate_of or unit
        self.console = console or _stderr_console()
        self.mode = mode or progress_mode(self.console)
        if self.mode not in MODES[1:]:
            raise ValueError(f"progress mode={self.mode!r}: use bar, lines or off")
        self.interval_s = progress_interval() if interval_s is None else float(interval_s)
        self.min_gap_s = float(min_gap_s)  # a tenth's line waits this long after the last line: short loops
        # print their start and end, not ten lines in a second
        self.done = 0
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_line = self._start
        self._last_tenth = 0
        self._closed = False
        self._rich: RichProgress | None = None
        self._task: Any = None
        if self.mode == "bar" and self._foreign_display():
            self.mode = "lines"  # another live display (Lightning's bar) owns the terminal: do not fight it
        if self.mode == "bar":
            self._open_bar()
        elif self.mode == "lines":
            self._line("started")

    # ------------------------------------------------------------------------------------------ public
    def advance(self, n: int = 1, **counts: int) -> None:
        """``n`` more units done; ``counts`` add to the secondary counts (e.g. ``tiles=312``)."""
        with self._lock:
            self.done += n
            for key, value in counts.items():
                self.counts[key] = self.counts.get(key, 0) + int(value)
            if self.mode == "bar":
                self._rich.update(self._task, completed=self.done, rate=self._bar_fields(), refresh=True)
            elif self.mode == "lines":
                now = time.monotonic()
                tenth = int(10 * self.done / self.total) if self.total else 10
                since = now - self._last_line
                if (tenth > self._last_tenth and since >= self.min_gap_s) or since >= self.interval_s:
                    self._last_tenth = max(self._last_tenth, tenth)
                    if self.done < self.total:  # the last line comes from close()
                        self._line()

    def close(self) -> None:
        """The final line (lines mode), or the bar left at its last state."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.mode == "bar":
                self._rich.update(self._task, completed=self.done, rate=self._bar_fields(), refresh=True)
                self._close_bar()
            elif self.mode == "lines":
                # a loop left early (an error, Ctrl-C) says so rather than "done"
                verb = "done in" if self.done >= self.total else "stopped after"
                self._line(f"{verb} {format_duration(self.elapsed)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def rate(self) -> float | None:
        """``rate_of`` units per second so far (None before any time has passed)."""
        elapsed = self.elapsed
        count = self.done if self.rate_of == self.unit else self.counts.get(self.rate_of, 0)
        return count / elapsed if elapsed > 0 else None

    def seconds_left(self) -> float | None:
        if not self.done or not self.total:
            return None
        return self.elapsed / self.done * (self.total - self.done)

    def status_line(self, note: str | None = None) -> str:
        """One plain line: ``<description>: 3/10 slides (30%), 1234 tiles, 85.2 tiles/s, elapsed 0:01:20,
        left 0:03:07``."""
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.done}/{self.total} {self.unit} ({percent:.0f}%)"]
        parts += [f"{value} {key}" for key, value in self.counts.items()]
        parts.append(self._rate_text())
        parts.append(f"elapsed {format_duration(self.elapsed)}")
        if note:
            parts.append(note)
        elif self.done < self.total:
            parts.append(f"left {format_duration(self.seconds_left())}")
        return f"{self.description}: " + ", ".join(parts)

    # ----------------------------------------------------------------------------------------- private
    def _rate_text(self) -> str:
        rate = self.rate()
        if rate is None:
            text = "?"
        elif rate >= 100:
            text = f"{rate:.0f}"
        else:
            text = f"{rate:.3g}"
        return f"{text} {self.rate_of}/s"

    def _bar_fields(self) -> str:
        """The bar's text after its count: the secondary counts and the rate."""
        return ", ".join([*(f"{value} {key}" for key, value in self.counts.items()), self._rate_text()])

    def _line(self, note: str | None = None) -> None:
        self._last_line = time.monotonic()
        # the console's file, written plainly: no markup, highlighting or wrapping in a log
        self.console.file.write(self.status_line(note) + "\n")
        self.console.file.flush()

    def _foreign_display(self) -> bool:
        """Whether a live display that is not ours runs: on this console or on Rich's global one (which
        Lightning's progress bar uses)."""
        ours = _shared["rich"]
        for console in (self.console, get_console()):
            if getattr(console, "_live_stack", []) and (ours is None or ours.console is not console):
                return True
        return False

    def _open_bar(self) -> None:
        with _shared_lock:
            rich = _shared["rich"]
            if rich is not None and rich.console is self.console:
                _shared["users"] += 1  # nested: a task in the running display
            else:
                rich = RichProgress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(),
                    TextColumn("left"),
                    TimeRemainingColumn(),
                    console=self.console,
                    # no refresh thread: the slide engine forks loader workers while a bar is shown, and a
                    # fork while another thread holds a stream's lock can hang the child; repainted on advance
                    auto_refresh=False,
                )
                rich.start()
                if _shared["rich"] is None:  # a display on another console stays this bar's own
                    _shared.update(rich=rich, users=1)
            self._rich = rich
            self._task = rich.add_task(self.description, total=self.total, unit=self.unit, rate="")

    def _close_bar(self) -> None:
        with _shared_lock:
            if self._rich is _shared["rich"]:
                _shared["users"] -= 1
                if _shared["users"] > 0:  # the display goes on for the bars around this one
                    self._rich.remove_task(self._task)
                    return
                _shared.update(rich=None, users=0)
            self._rich.stop()


def track(
    items: Iterable[T], description: str, total: int | None = None, unit: str = "items", **kwargs: Any
) -> Iterator[T]:
    """``items`` one by one, with progress (``total``: default ``len(items)``)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.advance()
