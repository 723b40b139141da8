"""Per-slide limits (``slides.supervise``): a slide that hangs, swells, raises or crashes its worker is a
failed row and the next slide runs (in a fresh worker where the last was killed); the limits' checks; one
run of the real tile mode through the supervised worker, equal to the in-process run.

The unit tests' worker runs ``toy_factory`` below: this module is what the spawned worker imports, so it
imports nothing heavy at the top (no torch: each worker start would pay for it).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from patholite.errors import ConfigError
from patholite.slides.supervise import (
    SlideLimitError,
    Supervisor,
    WorkerDiedError,
    check_limits,
    limits_set,
    tree_memory,
)

MB = 2**20


class ToySlideError(ConfigError):
    """A user mistake raised inside the worker (it must come back as itself)."""


def toy_process(cfg, directory: Path, path: Path, out: Path) -> dict:
    """One 'slide': what it does is its file name's first word."""
    kind = path.name.split("-")[0]
    if kind == "sleep":
        time.sleep(60)
    elif kind == "swell":  # written bytes, so resident: a slide read whole into memory
        ballast = b"x" * (int(cfg.swell_mb) * MB)
        time.sleep(60)
        del ballast
    elif kind == "swellchild":  # a loader-like child of the worker swells: the tree is what counts
        pid = os.fork()
        if pid == 0:
            ballast = b"x" * (int(cfg.swell_mb) * MB)
            time.sleep(60)
            os._exit(len(ballast) and 0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "child.pid").write_text(str(pid))
        time.sleep(60)
    elif kind == "raise":
        raise ToySlideError(f"slide {path.name} has no tissue; set tissue.method=otsu_gray")
    elif kind == "bug":
        raise ValueError("a bug in one slide's processing")
    elif kind == "exit":
        os._exit(3)
    elif kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "log":
        logging.getLogger("patholite.toy").warning("slide %s: annotations left out", path.name)
    # the start method its own children get (the tile engine's loaders): the run's, not spawn's
    start = multiprocessing.get_start_method()
    mpp = cfg.reader.mpp if "reader" in cfg else None
    report = {"pid": os.getpid(), "value": cfg.value, "directory": str(directory), "start_method": start,
              "mpp": mpp}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))  # written last, as the engines do
    return report


def toy_factory(cfg, directory: Path):
    """A picklable factory, as ``slides.run.ModeSetup``: the set-up fails where the config says so."""
    if cfg.get("broken"):
        raise ToySlideError("artifact is inconsistent; export it again")
    return lambda path, out: toy_process(cfg, directory, path, out)


def _supervisor(tmp_path, seconds=None, memory_gb=None, **cfg) -> Supervisor:
    limits = {"slide_seconds": seconds, "slide_memory_gb": memory_gb}
    config = OmegaConf.create({"value": 7, "swell_mb": 200, **cfg})
    return Supervisor(toy_factory, config, tmp_path / "artifact", limits, poll_s=0.05)


def _run(sup: Supervisor, tmp_path, name: str):
    return sup(tmp_path / name, tmp_path / "out" / name)


def test_a_slide_past_the_time_limit_is_killed_and_the_next_runs_in_a_fresh_worker(tmp_path):
    with _supervisor(tmp_path, seconds=0.5) as sup:
        first = _run(sup, tmp_path, "ok-a.svs")
        assert first["value"] == 7 and first["directory"] == str(tmp_path / "artifact")
        assert first["start_method"] == multiprocessing.get_start_method()
        start = time.monotonic()
        with pytest.raises(
            SlideLimitError, match=r"sleep-b.svs exceeded limits.slide_seconds=0.5 \(ran \d+ s"
        ):
            _run(sup, tmp_path, "sleep-b.svs")
        assert time.monotonic() - start < 5
        assert not psutil.pid_exists(first["pid"]) or psutil.Process(first["pid"]).status() == "zombie"
        second = _run(sup, tmp_path, "ok-c.svs")
        assert second["pid"] != first["pid"] and sup.starts == 2


def test_the_worker_sees_each_slide_s_mpp_as_the_run_s_process_has_it(tmp_path):
    """A cohort manifest's per-slide mpp is set on the run's config around each slide's call
    (``slides.cohort.slide_overrides``); the worker, which got the config once, gets it with each slide."""
    config = OmegaConf.create({"value": 7, "reader": {"mpp": None}})
    with Supervisor(toy_factory, config, tmp_path / "artifact", {"slide_seconds": 30}, poll_s=0.05) as sup:
        seen = []
        for mpp in (0.25, None, 0.5):
            config.reader.mpp = mpp
            seen.append(_run(sup, tmp_path, f"ok-{mpp}.svs")["mpp"])
    assert seen == [0.25, None, 0.5]


def test_a_slide_past_the_memory_cap_is_killed_and_the_next_runs(tmp_path):
    with _supervisor(tmp_path, memory_gb=0.15) as sup:
        with pytest.raises(SlideLimitError, match=r"swell-a.svs exceeded limits.slide_memory_gb=0.15 \(its"):
            _run(sup, tmp_path, "swell-a.svs")
        assert _run(sup, tmp_path, "ok-b.svs")["value"] == 7
        assert sup.starts == 2


def test_the_memory_cap_holds_the_worker_s_whole_tree_and_kills_it(tmp_path):
    sup = _supervisor(tmp_path, memory_gb=0.15)
    with sup, pytest.raises(SlideLimitError, match=r"limits.slide_memory_gb=0.15 .* in 2 processes"):
        _run(sup, tmp_path, "swellchild-a.svs")
    child = int((tmp_path / "out" / "swellchild-a.svs" / "child.pid").read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_an_exception_in_the_worker_comes_back_as_itself(tmp_path, caplog):
    with _supervisor(tmp_path, seconds=30) as sup:
        with pytest.raises(ToySlideError, match="raise-a.svs has no tissue; set tissue.method") as err:
            _run(sup, tmp_path, "raise-a.svs")
        assert "in the slide worker" in str(err.value.__cause__)  # the worker's traceback, for the log
        assert "toy_process" in str(err.value.__cause__)
        with pytest.raises(ValueError, match="a bug in one slide's processing"):
            _run(sup, tmp_path, "bug-b.svs")
        with caplog.at_level(logging.WARNING):
            _run(sup, tmp_path, "log-c.svs")
        assert "slide log-c.svs: annotations left out" in caplog.text  # the worker's log, in the run's
        assert sup.starts == 1  # an exception is a slide's failure, not the worker's


def test_a_worker_that_dies_by_itself_is_a_failed_slide(tmp_path):
    with _supervisor(tmp_path, seconds=30) as sup:
        with pytest.raises(WorkerDiedError, match=r"while processing slide exit-a.svs \(exit code 3\)"):
            _run(sup, tmp_path, "exit-a.svs")
        with pytest.raises(WorkerDiedError, match="killed by SIGSEGV: a crash in native code"):
            _run(sup, tmp_path, "segv-b.svs")
        idle = _run(sup, tmp_path, "ok-c.svs")["pid"]
        os.kill(idle, signal.SIGKILL)  # between slides (the OOM killer picks a big idle process too)
        psutil.Process(idle).wait(5)
        assert _run(sup, tmp_path, "ok-d.svs")["pid"] != idle
        assert sup.starts == 4


def test_a_failed_set_up_is_raised_before_any_slide(tmp_path):
    with pytest.raises(ToySlideError, match="export it again"), _supervisor(tmp_path, seconds=5, broken=True):
        pass


def test_a_factory_the_worker_cannot_have_is_refused_and_no_worker_is_left(tmp_path):
    sup = Supervisor(lambda cfg, d: None, OmegaConf.create({}), tmp_path, {"slide_seconds": 5})
    with pytest.raises(Exception, match="lambda"), sup:
        pass
    assert sup._proc is None and sup.starts == 1


def test_the_supervisor_is_each_slides_process_and_failures_are_rows(tmp_path):
    from patholite.slides.cohort import each_slide

    cfg = OmegaConf.create({"slide": None, "slides": str(tmp_path)})
    names = ["ok-a.svs", "sleep-b.svs", "bug-c.svs", "ok-d.svs"]
    with _supervisor(tmp_path, seconds=0.5) as sup:
        rows = each_slide([tmp_path / n for n in names], cfg, tmp_path / "out", sup)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert rows[1]["error"].startswith("SlideLimitError: slide sleep-b.svs exceeded limits.slide_seconds=0.5")
    assert rows[2]["error"] == "ValueError: a bug in one slide's processing"  # as in-process
    assert (tmp_path / "out" / "summary.csv").is_file()


@pytest.mark.parametrize(
    ("key", "value"),
    [("slide_seconds", 0), ("slide_seconds", -5), ("slide_memory_gb", float("nan")),
     ("slide_memory_gb", float("inf")), ("slide_seconds", "10"), ("slide_memory_gb", True)],
)  # fmt: skip
def test_bad_limits_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"limits.{key}=.*give a positive number .* or null for no limit"):
        check_limits({key: value})


def test_limits_checks_and_defaults(tmp_path):
    check_limits({"slide_seconds": None, "slide_memory_gb": 0.5})
    check_limits(None)
    assert not limits_set({"slide_seconds": None, "slide_memory_gb": None}) and not limits_set(None)
    assert limits_set({"slide_seconds": 600, "slide_memory_gb": None})
    me = psutil.Process()
    rss = me.memory_info().rss
    assert tree_memory([me], cap=100 * rss) >= rss * 0.9  # under the cap: the RSS sum, cheaply
    assert 0 < tree_memory([me]) <= me.memory_info().rss * 1.1  # PSS: shared pages split
    from patholite.config.slide_schema import SlideRunConfig
    from patholite.slide import check_slide_config

    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.slide, cfg.artifact = "x.svs", "a"
    assert cfg.limits.slide_seconds is None and cfg.limits.slide_memory_gb is None
    check_slide_config(cfg)
    cfg.limits.slide_memory_gb = -1.0
    with pytest.raises(ConfigError, match="limits.slide_memory_gb=-1.0"):
        check_slide_config(cfg)


def test_the_worker_s_mode_setup_pickles_and_sets_the_mode_s_threads(monkeypatch):
    import pickle

    import torch

    from patholite.slides import run

    monkeypatch.setitem(run.PREPARE, "smt", (lambda cfg: cfg.threads, lambda cfg, d: (cfg.threads, d)))
    assert set(run.PREPARE) == set(run.MODES) - {"auto"}  # every mode can run under limits
    setup = pickle.loads(pickle.dumps(run.ModeSetup("smt")))  # what the worker receives
    before = torch.get_num_threads()
    try:
        assert setup(OmegaConf.create({"threads": 3}), Path("a")) == (3, Path("a"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_tile_mode_under_limits_writes_what_the_run_s_own_process_writes(tmp_path):
    """The real tile mode in a supervised worker (a loader process below it, both limits polled): the same
    tiles and predictions as in-process, and a bad slide still a row."""
    import torch

    from patholite import artifacts as art
    from patholite.config.options import load_model_option
    from patholite.config.slide_schema import SlideRunConfig
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import LesionSpec, SlideSpec
    from patholite.models.factory import create_network
    from patholite.slides.run import run_slides

    from .helpers import csv_rows, one_thread

    classes = ["Normal", "InSitu"]
    torch.manual_seed(0)
    net = create_network(load_model_option("vit_micro"), len(classes), 32).eval()
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    meta = {"model": {**model, "checkpoint": None}, "class_names": classes, "image_size": 32,
            "mpp": 2.0, "tile_size": 32}  # fmt: skip
    art.save_float_artifact(net, tmp_path / "fp32", meta)
    slide = tmp_path / "s.svs"
    spec = SlideSpec(1024, 1024, seed=3, texture_px=128, lesions=[LesionSpec("InSitu", 1, (100.0, 150.0))])
    write_synthetic_slide(slide, spec)
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    paths = [slide, tmp_path / "broken.svs"]
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.artifact, cfg.slides = str(tmp_path / "fp32"), str(tmp_path)
    cfg.paths.cache_dir = str(tmp_path / "cache")
    cfg.engine.workers, cfg.engine.threads, cfg.engine.batch_size = 1, 1, 8
    cfg.report.thumbnail_px = 256
    with one_thread():
        own = run_slides(paths, cfg, tmp_path / "own")
    cfg.limits.slide_seconds, cfg.limits.slide_memory_gb = 120.0, 16.0
    supervised = run_slides(paths, cfg, tmp_path / "supervised")
    assert [r["status"] for r in supervised] == [r["status"] for r in own] == ["ok", "failed"]
    assert supervised[1]["error"] == own[1]["error"]
    for key in ("n_tiles", "call", "fractions"):
        assert supervised[0][key] == own[0][key], key
    tiles = csv_rows(tmp_path / "supervised" / "s" / "tiles.csv")
    assert len(tiles) > 10 and tiles == csv_rows(tmp_path / "own" / "s" / "tiles.csv")
    assert (tmp_path / "supervised" / "s" / "report.png").is_file()
