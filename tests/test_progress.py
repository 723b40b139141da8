"""Progress: plain periodic lines in a log, a Rich bar on a terminal, the same counts in both."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from patholite.errors import ConfigError
from patholite.progress import Progress, format_duration, progress_interval, progress_mode, track

ANSI = re.compile(r"\x1b\[")


def log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False), buffer


def test_lines_in_a_log_are_plain_periodic_and_reach_the_total():
    console, buffer = log_console()
    with Progress(
        "slides", 20, "slides", rate_of="tiles", console=console, interval_s=3600, min_gap_s=0
    ) as p:
        for _ in range(20):
            p.advance(1, tiles=50)
    text = buffer.getvalue()
    assert "\r" not in text and not ANSI.search(text)
    lines = text.splitlines()
    # started, one line per further tenth (2, 4, ... 18 of 20), and the final one
    assert len(lines) == 1 + 9 + 1
    done = [int(re.search(r": (\d+)/20 slides", line).group(1)) for line in lines]
    assert done == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert lines[-1].startswith("slides: 20/20 slides (100%), 1000 tiles, ")
    assert "tiles/s" in lines[-1] and "done in 0:00:0" in lines[-1]
    assert "left " in lines[5]


def test_a_short_loop_prints_its_start_and_end_only():
    console, buffer = log_console()
    with Progress("synthetic tiles", 100, "tiles", console=console, interval_s=3600) as p:
        for _ in range(100):  # every tenth within a moment of the last line
            p.advance()
    lines = buffer.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "synthetic tiles: 0/100 tiles (0%)",
        "synthetic tiles: 100/100 tiles (100%)",
    ]


def test_lines_also_come_every_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("patholite.progress.time", SimpleNamespace(monotonic=lambda: clock[0]))
    console, buffer = log_console()
    with Progress("timing", 1000, "blocks", console=console, interval_s=30) as p:
        for _ in range(5):  # far below a tenth each, but 40 s apart
            clock[0] += 40
            p.advance()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1 + 5 + 1
    assert lines[3].startswith(
        "timing: 3/1000 blocks (0%), 0.025 blocks/s, elapsed 0:02:00, left 11:04:40"
    )  # 40 s a block


def test_bar_on_a_terminal_shows_counts_and_rate():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with Progress("slides", 4, "slides", rate_of="tiles", console=console) as p:
        assert p.mode == "bar"
        for _ in range(4):
            p.advance(1, tiles=10)
    text = buffer.getvalue()
    assert ANSI.search(text)  # a repainted bar, not lines
    final = text.split("\r")[-1]  # the last repaint
    assert "4/4" in final and "40 tiles, " in final and "tiles/s" in final
    assert "slides: " not in text  # no plain line


def test_a_second_bar_joins_the_first_display():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with Progress("outer", 2, console=console) as outer:
        with Progress("inner", 3, console=console) as inner:
            assert inner._rich is outer._rich
            inner.advance(3)
        outer.advance(2)
    assert "3/3" in buffer.getvalue() and "2/2" in buffer.getvalue()


def test_bars_on_the_default_console_nest_and_all_stop():
    # the synthetic slides' bar opens a bar per slide inside it, neither naming a console
    with Progress("slides", 2, mode="bar") as outer:
        with Progress("level 0", 3, mode="bar") as inner:
            assert inner._rich is outer._rich and inner.console is outer.console
            inner.advance(3)
        assert outer._rich.live.is_started  # the inner bar's end left the display running
        outer.advance(2)
    assert not outer._rich.live.is_started and not outer.console._live_stack


def test_a_loop_left_early_says_it_stopped():
    console, buffer = log_console()
    with pytest.raises(RuntimeError), Progress("slides", 3, "slides", console=console) as p:
        p.advance()
        raise RuntimeError("a slide failed")
    assert buffer.getvalue().splitlines()[-1].startswith("slides: 1/3 slides (33%)")
    assert "stopped after 0:00:0" in buffer.getvalue().splitlines()[-1]


def test_track_yields_everything_once():
    console, buffer = log_console()
    assert list(track(range(7), "things", console=console, interval_s=3600)) == list(range(7))
    assert buffer.getvalue().splitlines()[-1].startswith("things: 7/7 items (100%)")


def test_mode_and_interval_from_the_environment(monkeypatch):
    console, buffer = log_console()
    monkeypatch.setenv("PATHOLITE_PROGRESS", "off")
    with Progress("quiet", 3, console=console) as p:
        p.advance(3)
    assert buffer.getvalue() == ""
    monkeypatch.setenv("PATHOLITE_PROGRESS", "bar")
    assert progress_mode(console) == "bar"
    monkeypatch.setenv("PATHOLITE_PROGRESS", "sometimes")
    with pytest.raises(ConfigError, match="PATHOLITE_PROGRESS='sometimes'"):
        progress_mode(console)
    monkeypatch.setenv("PATHOLITE_PROGRESS_INTERVAL", "5")
    assert progress_interval() == 5.0
    monkeypatch.setenv("PATHOLITE_PROGRESS_INTERVAL", "0")
    with pytest.raises(ConfigError, match="PATHOLITE_PROGRESS_INTERVAL"):
        progress_interval()


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"
