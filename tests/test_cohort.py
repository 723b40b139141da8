"""Cohort inference in shards (issue 17): shares balanced by file size, manifests, one cohort folder written
atomically, reruns that skip complete slides and refuse other settings, a merged summary that does not
depend on the shard count, and a submitit_local sweep of two shards.

Slides here are processed by a fake ``process`` (a deterministic report and one output file), so the cohort
logic is tested without a model; the sweep test runs the real engine with a tiny random vit_micro."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from patholite.config.slide_schema import SlideRunConfig
from patholite.errors import ConfigError, SlideError
from patholite.slides import cohort as cohort_module
from patholite.slides.cohort import (
    FAILED_FILE,
    REPORT_FILE,
    Cohort,
    cohort_settings,
    each_slide,
    slide_names,
)
from patholite.slides.manifest import SlideEntry, read_cohort
from patholite.slides.merge import finish_shard, merge_cohort
from patholite.slides.shards import assign_shards, shard_of, slide_bytes
from patholite.wsi.reader import find_slides

from .conftest import job_config, run_cli, shared_dir
from .helpers import csv_rows

DIGEST = "0" * 64


# ------------------------------------------------------------------------------------------- shards
def test_shards_are_balanced_by_size_and_cover_every_slide_once():
    # LPT by hand: 10->A, 7->B, 5->B (12), 4->A (14), 3->B (15), 1->A (15): 15 bytes each
    sizes, keys = [10, 7, 5, 4, 3, 1], list("abcdef")
    assert assign_shards(sizes, keys, 2) == [[0, 3, 5], [1, 2, 4]]
    # the order slides are listed in changes nothing: the same keys land in the same shares
    order = [4, 0, 5, 2, 1, 3]
    again = assign_shards([sizes[i] for i in order], [keys[i] for i in order], 2)
    assert [sorted(keys[order[i]] for i in share) for share in again] == [["a", "d", "f"], ["b", "c", "e"]]
    # one huge slide: alone in its share, the rest shared by the others
    assert assign_shards([100, 1, 1, 1, 1], list("vwxyz"), 2) == [[0], [1, 2, 3, 4]]
    # files that cannot be stat'ed weigh 0 and still spread over the shares (fewest slides first)
    assert assign_shards([0] * 5, list("abcde"), 3) == [[0, 3], [1, 4], [2]]
    rng = random.Random(0)
    for shards in (1, 2, 3, 5):
        sizes = [rng.randint(0, 1000) for _ in range(23)]
        shares = assign_shards(sizes, [f"s{i:02d}" for i in range(23)], shards)
        assert sorted(i for share in shares for i in share) == list(range(23))  # every slide exactly once
        loads = [sum(sizes[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes)  # LPT's bound: within one slide of each other
    with pytest.raises(ValueError, match="shards=0"):
        assign_shards([1], ["a"], 0)


def test_slide_size_counts_mirax_companions_and_missing_files(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x" * 100)
    (tmp_path / "m.mrxs").write_bytes(b"x" * 10)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"x" * 500)
    assert slide_bytes(tmp_path / "a.svs") == 100
    assert slide_bytes(tmp_path / "m.mrxs") == 510
    assert slide_bytes(tmp_path / "missing.svs") == 0
    entries = [SlideEntry(tmp_path / n) for n in ("missing.svs", "a.svs", "m.mrxs")]
    shares = [shard_of(entries, i, 2, path=lambda e: e.path) for i in range(2)]
    assert [[e.path.name for e in s] for s in shares] == [["m.mrxs"], ["a.svs", "missing.svs"]]


def test_output_names_come_from_the_whole_cohort_not_the_order_or_shard(tmp_path):
    paths = [tmp_path / "x" / "s.svs", tmp_path / "y" / "s.svs", tmp_path / "t.svs"]
    names = slide_names(paths)
    assert (
        names[2] == "t" and names[0].startswith("s-") and names[1].startswith("s-") and names[0] != names[1]
    )
    assert slide_names(paths[::-1]) == names[::-1]


# ----------------------------------------------------------------------------------------- manifest
def test_manifest_reads_mpp_label_group_and_refuses_bad_rows(tmp_path, caplog):
    (tmp_path / "slides").mkdir()
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "# an archive export\nslide,mpp,label,group,patient\n"
        "slides/a.svs,0.25,tumor,train,p1\n/abs/b.svs,,normal,,p2\n\nslides/c.svs,,,,p3\n"
    )
    entries = read_cohort(manifest)
    assert entries == [
        SlideEntry(tmp_path / "slides" / "a.svs", 0.25, "tumor", "train"),
        SlideEntry(Path("/abs/b.svs"), None, "normal", None),
        SlideEntry(tmp_path / "slides" / "c.svs"),
    ]
    assert "patient" in caplog.text  # a column patholite does not read is named, not silently dropped
    assert find_slides(manifest) == [e.path for e in entries]  # the paths alone, as any list file
    plain = tmp_path / "plain.csv"  # a .csv without a header is still a plain list
    plain.write_text("slides/a.svs\nslides/c.svs\n")
    assert read_cohort(plain) == [SlideEntry(tmp_path / "slides" / n) for n in ("a.svs", "c.svs")]
    manifest.write_text("path,mpp\na.svs,0.25\nb.svs,fast\n")
    with pytest.raises(ConfigError, match=r"line 3: mpp='fast' is not a positive number"):
        read_cohort(manifest)
    manifest.write_text("slide,label\na.svs,x\n,y\n")
    with pytest.raises(ConfigError, match="line 3: the slide column is empty"):
        read_cohort(manifest)
    manifest.write_text("slide\na.svs\nb.svs\n./a.svs\n")
    with pytest.raises(ConfigError, match=r"a\.svs twice \(entries 1 and 3\)"):
        read_cohort(manifest)


# ------------------------------------------------------------------------------ the cohort folder
def _cfg(**overrides):
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.slides = "cohort"
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _slides(tmp_path, sizes: dict[str, int]) -> list[SlideEntry]:
    folder = tmp_path / "slides"
    folder.mkdir(exist_ok=True)
    for name, size in sizes.items():
        (folder / f"{name}.svs").write_bytes(b"x" * size)
    return [SlideEntry(folder / f"{name}.svs") for name in sizes]


class Fake:
    """A slide's processing: report.json and tiles.csv, deterministic per slide; ``bad`` slides fail;
    ``stop_at`` interrupts the job there (Ctrl-C, a pre-emption's signal), after half of the outputs."""

    def __init__(self, cfg, bad=(), stop_at=None):
        self.cfg, self.bad, self.stop_at, self.calls, self.mpp = cfg, set(bad), stop_at, [], {}

    def __call__(self, path: Path, out: Path) -> dict:
        self.calls.append(path.stem)
        self.mpp[path.stem] = self.cfg.reader.mpp  # what the engine would open the slide with
        out.mkdir(parents=True)
        (out / "tiles.csv").write_text(f"x,y\n{len(path.stem)},0\n")
        if path.stem == self.stop_at:
            raise KeyboardInterrupt
        if path.stem in self.bad:
            raise SlideError(f"slide {path.name} cannot be read")
        n = path.stat().st_size
        call = {"label": "Tumor", "confidence": 0.5, "share": 0.25}
        fractions = {"Normal": 0.75, "Tumor": 0.25}
        report = {"slide": str(path), "status": "ok", "call": call, "fractions": fractions, "n_tiles": n,
                  "seconds": n / 10, "tiles_per_s": 10.0, "out_dir": str(out),
                  "files": {"tiles": "tiles.csv"},
                  "timings": {"tiles_per_s": 10.0, "load_busy_s": 0.0, "workers": 0, "process_s": 0.0,
                              "save_busy_s": 0.0}}  # fmt: skip
        (out / REPORT_FILE).write_text(json.dumps(report))
        return report


def _shard(cfg, entries, folder, shard=0, shards=1, process=None, overwrite=False):
    """One shard's job as the entry point runs it: check the folder, plan, process the rest, mark done."""
    cohort = Cohort(folder, entries, cohort_settings(cfg, "tiles", DIGEST), "art", overwrite)
    cohort.check_folder()
    todo, skipped = cohort.plan(shard_of(entries, shard, shards, path=lambda e: e.path))
    process = process or Fake(cfg)
    rows = each_slide([e.path for e in todo], cfg, folder, process, cohort=cohort) if todo else []
    done = finish_shard(folder, shard, shards, cohort.key(), skipped + rows)
    return types.SimpleNamespace(todo=[e.path.stem for e in todo], skipped=skipped, rows=rows, done=done,
                                 calls=process.calls, mpp=process.mpp)  # fmt: skip


def _tick(monkeypatch):
    """Every slide takes exactly 1 s by the cohort's clock, so summaries of two runs compare byte for byte."""
    clock = iter(range(10**6))
    monkeypatch.setattr(cohort_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))


def test_merge_equals_a_single_shard_run(tmp_path, monkeypatch):
    _tick(monkeypatch)
    entries = _slides(tmp_path, {"a": 900, "b": 700, "c": 500, "d": 400, "bad": 300, "e": 100})
    entries = [SlideEntry(e.path, label=e.path.stem.upper(), group="g1" if e.path.stem < "c" else None)
               for e in entries]  # fmt: skip
    cfg = _cfg()
    one = _shard(cfg, entries, tmp_path / "one", process=Fake(cfg, bad={"bad"}))
    assert one.done and sorted(one.calls) == ["a", "b", "bad", "c", "d", "e"]
    two = tmp_path / "two"
    second = _shard(cfg, entries, two, 1, 2, Fake(cfg, bad={"bad"}))  # the second share finishes first
    assert not second.done and not (two / "summary.csv").exists()
    first = _shard(cfg, entries, two, 0, 2, Fake(cfg, bad={"bad"}))
    assert first.done  # the last shard to finish merges
    assert sorted(first.calls + second.calls) == sorted(one.calls)
    assert not set(first.calls) & set(second.calls)
    rows, _ = merge_cohort(tmp_path / "one")
    merge_cohort(two)
    for name in ("summary.csv", "summary.md"):
        assert (tmp_path / "one" / name).read_bytes() == (two / name).read_bytes(), name
    summary = csv_rows(two / "summary.csv")
    assert [r["slide"].split("/")[-1] for r in summary] == [
        "a.svs",
        "b.svs",
        "bad.svs",
        "c.svs",
        "d.svs",
        "e.svs",
    ]
    assert [r["status"] for r in summary] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert list(summary[0])[:4] == ["slide", "label", "group", "status"]
    assert (summary[0]["label"], summary[0]["group"], summary[3]["group"]) == ("A", "g1", "")
    assert "cannot be read" in summary[2]["error"]
    # every slide folder is complete (report.json, its files) or a failed marker; nothing else is left
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == [
        "a", "b", "bad", "c", "cohort.json", "d", "e", "summary.csv", "summary.md"]  # fmt: skip
    report = json.loads((two / "a" / REPORT_FILE).read_text())
    assert report["out_dir"] == str(two / "a") and report["label"] == "A"
    assert report["cohort"]["fingerprint"] and report["cohort"]["settings"]["artifact_sha256"] == DIGEST
    assert json.loads((two / "bad" / FAILED_FILE).read_text())["status"] == "failed"


def test_rerun_skips_complete_slides_only_and_retries_failed_ones(tmp_path):
    entries = _slides(tmp_path, {"a": 300, "b": 200, "c": 100})
    cfg, folder = _cfg(), tmp_path / "out"
    assert _shard(cfg, entries, folder, process=Fake(cfg, bad={"c"})).calls == ["a", "b", "c"]
    (folder / "b" / "tiles.csv").unlink()  # a partial slide (a file its report lists is gone)
    again = _shard(cfg, entries, folder)
    assert again.todo == again.calls == ["b", "c"]  # a redone, c retried; a skipped
    assert [(r["slide"].split("/")[-1], r["skipped"]) for r in again.skipped] == [("a.svs", True)]
    assert again.done and all(r["status"] == "ok" for r in merge_cohort(folder)[0])
    assert _shard(cfg, entries, folder).calls == []  # all complete: nothing runs


def test_other_settings_are_refused_or_overwritten_never_mixed(tmp_path):
    entries = _slides(tmp_path, {"a": 300, "b": 200})
    folder = tmp_path / "out"
    _shard(_cfg(), entries, folder)
    with pytest.raises(ConfigError) as err:  # the whole folder: before any of this job's slides
        _shard(_cfg(**{"tile.theta": 0.7}), entries, folder)
    assert "tile.theta: 0.5 -> 0.7" in str(err.value) and "overwrite=true" in str(err.value)
    retrained = Cohort(folder, entries, cohort_settings(_cfg(), "tiles", "1" * 64), "new")
    with pytest.raises(ConfigError, match=r"artifact: art -> new \(other files\)"):
        retrained.check_folder()
    # one slide's manifest mpp changed: only that slide is stale, refused by name
    changed = [SlideEntry(entries[0].path, mpp=0.25), entries[1]]
    with pytest.raises(ConfigError, match=r"slide a was made .*reader\.mpp: None -> 0\.25.*overwrite=true"):
        _shard(_cfg(), changed, folder)
    redo = _shard(_cfg(), changed, folder, overwrite=True)
    assert redo.calls == ["a"] and redo.mpp == {"a": 0.25}  # the manifest's mpp, for that slide only
    cfg = _cfg(**{"tile.theta": 0.7})
    other = _shard(cfg, entries[:1], folder, overwrite=True)  # b is not listed now, but goes too
    assert other.calls == ["a"] and not (folder / "b").exists()
    assert cfg.reader.mpp is None  # the override was for the slide's processing only
    assert [r["slide"].split("/")[-1] for r in merge_cohort(folder)[0]] == ["a.svs"]


def test_an_interrupted_shard_resumes_at_the_first_unfinished_slide(tmp_path):
    """Pre-emption: Ctrl-C or SIGTERM mid-slide removes its half-written folder; a SIGKILL leaves one
    hidden (``.<name>.partial-<host>-<pid>``), which the rerun removes. Either way each slide is complete
    or absent, and the rerun does only the rest."""
    entries = _slides(tmp_path, {"a": 400, "b": 300, "c": 200, "d": 100})
    cfg, folder = _cfg(), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _shard(cfg, entries, folder, process=Fake(cfg, stop_at="c"))
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b", "cohort.json"]
    killed = folder / ".d.partial-node7-4242"  # what a SIGKILL during slide d would have left
    killed.mkdir()
    (killed / "tiles.csv").write_text("x,y\n")
    rerun = _shard(cfg, entries, folder)
    assert rerun.todo == rerun.calls == ["c", "d"] and len(rerun.skipped) == 2
    assert not list(folder.glob(".*.partial-*"))
    assert [r["status"] for r in merge_cohort(folder)[0]] == ["ok"] * 4


def test_without_a_cohort_each_slide_writes_its_own_summary(tmp_path):
    """A library call (no entry point): names from the paths given, atomic folders, a summary of its rows."""
    entries = _slides(tmp_path, {"a": 2, "b": 1})
    cfg = _cfg()
    rows = each_slide([e.path for e in entries], cfg, tmp_path / "out", Fake(cfg, bad={"b"}))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert [r["status"] for r in csv_rows(tmp_path / "out" / "summary.csv")] == ["ok", "failed"]
    cfg.slides, cfg.slide = None, str(entries[1].path)  # one slide: raised, nothing left behind
    with pytest.raises(SlideError):
        each_slide([entries[1].path], cfg, tmp_path / "one", Fake(cfg, bad={"b"}))
    assert list((tmp_path / "one").iterdir()) == []


# ---------------------------------------------------------------------------------- the entry point
@pytest.fixture
def fake_artifact(tmp_path):
    directory = tmp_path / "artifact"
    directory.mkdir()
    (directory / "artifact.json").write_text(json.dumps({"kind": "torch_float", "weights": "w.bin",
                                                         "model": {"name": "vit_micro"}}))  # fmt: skip
    (directory / "w.bin").write_bytes(b"weights")
    return directory


def test_entry_point_shards_skip_and_merge(tmp_path, fake_artifact, monkeypatch, capsys):
    from patholite import slide

    def fake_run_slides(paths, cfg, out_dir, directory, *, cohort=None):
        return each_slide(paths, cfg, out_dir, Fake(cfg), cohort=cohort)

    monkeypatch.setattr(slide, "run_slides", fake_run_slides)
    entries = _slides(tmp_path, {"a": 300, "b": 200, "c": 100})
    listing = tmp_path / "cohort.csv"
    listing.write_text("slide,label\n" + "".join(f"{e.path},L{e.path.stem}\n" for e in entries))
    cohort = tmp_path / "cohort"
    base = [f"slides={listing}", f"artifact={fake_artifact}", f"out={cohort}", "logger=none", "shards=2"]

    def run(i, *more):
        return slide.run_slide(job_config([*base, *more], tmp_path / f"run{i}", tmp_path / "cache", "slide"))

    assert run(0, "shard=0") == 0
    assert "written by the last shard" in capsys.readouterr().out
    assert run(1, "shard=1") == 0
    assert f"summary: {cohort / 'summary.csv'} (3 slides)" in capsys.readouterr().out
    assert [r["label"] for r in csv_rows(cohort / "summary.csv")] == ["La", "Lb", "Lc"]
    assert run(2, "shard=0") == 0  # a rerun: its share is complete
    assert "skipped 1 slides already complete" in capsys.readouterr().out
    record = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert record["slides"]["skipped"] == 1 and record["slides"]["merged"]
    # merge= on demand: the same summary, from a job of its own
    before = (cohort / "summary.csv").read_bytes()
    merge = job_config([f"merge={cohort}", "logger=none"], tmp_path / "merge", tmp_path / "cache", "slide")
    assert slide.run_slide(merge) == 0
    assert (cohort / "summary.csv").read_bytes() == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["shard=2", "shards=2", "out=x"], "shard=2 with shards=2: shards count from 0, give 0 to 1"),
        (["shards=0"], "shards=0: give the number of shares"),
        (["shard=1"], "shard=1 needs shards=<n>"),
        (["shards=3", "out=x"], "shards=3 needs shard=<i>"),
        (["shard=0", "shards=2"], "shards=2 needs out=<cohort folder>"),
        (["merge=x", "shards=2"], "give it alone, without shards="),
    ],
)  # fmt: skip
def test_bad_shard_settings_fail_before_work(tmp_path, fake_artifact, capsys, args, needle):
    from patholite.slide import run_slide

    (tmp_path / "a.svs").write_bytes(b"x")
    overrides = [f"slides={tmp_path / 'a.svs'}", f"artifact={fake_artifact}", "logger=none", *args]
    if any(a.startswith("merge=") for a in args):
        overrides = overrides[1:]
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as failed:
        run_slide(job_config(overrides, run, tmp_path / "cache", "slide"))
    assert failed.value.code == 1 and needle in capsys.readouterr().err
    assert not (run / "a").exists()


# ---------------------------------------------------------------------------------------- the sweep
@pytest.mark.slow  # three interpreters (the launcher, two shards) start torch: ~50 s on 2 busy cores
def test_a_two_shard_submitit_sweep_writes_one_summary(tmp_path):
    """``-m shard=0,1 shards=2 hydra/launcher=submitit_local``: the shared slides (one too small to tile: a
    failed row) and two synthetic ones, a tiny random vit_micro; both shards write into one cohort folder,
    and the one that finishes last writes its summary."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    shared = shared_dir()
    if shared is None or not (shared / "data" / "slides" / "CMU-1-Small-Region.svs").is_file():
        pytest.skip("the shared slides (../shared/data/slides) are absent")
    from patholite import artifacts as art
    from patholite.config.options import load_model_option
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import SlideSpec
    from patholite.models.factory import create_network

    torch.manual_seed(0)
    net = create_network(load_model_option("vit_micro"), 2, 32).eval()
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    art.save_float_artifact(net, tmp_path / "fp32", {
        "model": {**model, "checkpoint": None}, "class_names": ["Normal", "Tumor"], "image_size": 32,
        "mean": [0.5] * 3, "std": [0.25] * 3, "mpp": 2.0, "tile_size": 64})  # fmt: skip
    slides = [shared / "data" / "slides" / n for n in ("CMU-1-Small-Region.svs", "small.svs")]
    for i in range(2):
        slides.append(tmp_path / f"synthetic_{i}.svs")
        write_synthetic_slide(slides[-1], SlideSpec(width=1024, height=1024, seed=i))
    listing = tmp_path / "cohort.txt"
    listing.write_text("\n".join(map(str, slides)))
    cohort, sweep = tmp_path / "cohort", tmp_path / "sweep"
    result = run_cli(
        ["-m", "hydra/launcher=submitit_local", "shard=0,1", "shards=2", f"slides={listing}",
         f"artifact={tmp_path / 'fp32'}", f"out={cohort}", "logger=none", "engine.workers=0",
         "engine.threads=1", "report.thumbnail_px=128", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, module="patholite.slide", timeout=300,
    )  # fmt: skip
    # the shard with small.svs failed a slide: its record says so, the sweep went on and exits 1
    assert result.returncode == 1 and "1 of 2 jobs ok" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert list((sweep / ".submitit").iterdir())  # the jobs went through submitit
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert sum(r["slides"]["n"] for r in records) == 4 and all(r["slides"]["n"] for r in records)
    assert sum(r["slides"]["merged"] for r in records) >= 1
    summary = csv_rows(cohort / "summary.csv")
    assert [Path(r["slide"]).name for r in summary] == [
        "CMU-1-Small-Region.svs", "small.svs", "synthetic_0.svs", "synthetic_1.svs"]  # fmt: skip
    assert [r["status"] for r in summary] == ["ok", "failed", "ok", "ok"]
    for name in ("CMU-1-Small-Region", "synthetic_0", "synthetic_1"):
        assert (cohort / name / "report.png").is_file()
    assert not list(cohort.glob(".*.partial-*"))
