"""W&B a lab can compare in: every job's offline run read back from its ``.wandb`` log, its values equal to
the job's record, its job type and group set, its record file and plots saved, models only when asked."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from patholite import artifacts as art
from patholite.config.options import load_model_option
from patholite.errors import PatholiteError
from patholite.measure.compare import find_records
from patholite.measure.timing import PROGRESS_PREFIX, run_reporting_child
from patholite.models.factory import create_network
from patholite.pipelines.cache import EpochLog
from patholite.progress import Progress
from patholite.records import ArtifactRecord, read_record
from patholite.tracking import experiment_name, group_name, job_group, log_comparison
from patholite.train import run_job
from tests.conftest import FAST, job_config
from tests.test_bench import TINY
from tests.wandb_reader import OfflineRun, offline_runs

CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]


def only_run(run_dir: Path) -> OfflineRun:
    runs = offline_runs(run_dir)
    assert len(runs) == 1, [r.folder for r in runs]
    return runs[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_saved(run: OfflineRun, name: str, original: Path) -> None:
    """``name`` was saved into the run's files, holding what ``original`` holds."""
    assert name in run.files, run.files
    assert (run.folder / "files" / name).read_bytes() == Path(original).read_bytes()


def assert_image(run: OfflineRun, key: str, png: Path) -> None:
    """``key`` was logged as an image whose file is ``png``, byte for byte."""
    image = run.logged(key)
    assert image["_type"] == "image-file"
    assert image["sha256"] == sha256(png)
    assert run.media(image).read_bytes() == png.read_bytes()


def table_rows(run: OfflineRun, key: str) -> tuple[list[str], list[list]]:
    table = run.logged(key)
    assert table["_type"] == "table-file"
    data = json.loads(run.media(table).read_text())
    return data["columns"], data["data"]


def test_groups_carry_the_experiment():
    cfg = OmegaConf.create({"task_name": "train"})
    assert experiment_name(cfg, {"experiment": "demo", "model": "vit_mini"}) == "demo"
    assert experiment_name(cfg, {"experiment": None}) == "train"
    sweep = {"multirun": True, "sweep_dir": "/o/multiruns/2026-11-25/18-31-00"}
    assert job_group(cfg, sweep, Path("/o/multiruns/2026-11-25/18-31-00/3"), {"experiment": "demo"}) == (
        "demo_2026-11-25_18-31-00"
    )
    assert group_name("slide", Path("/o/slides/2026-11-25/09-00-01")) == "slide_2026-11-25_09-00-01"


def test_train_job_logs_its_record_and_models_when_asked(tmp_path, cache_dir, float_artifact, monkeypatch):
    """The training entry's wiring, its stages replaced by one that records a real artifact folder."""
    from patholite import train

    def stages(ctx, task):
        files = sorted(p.name for p in float_artifact.iterdir())
        quality = {"accuracy": 0.8125, "macro_f1": 0.79, "balanced_accuracy": 0.8, "auroc": 0.93}
        size = sum((float_artifact / f).stat().st_size for f in files)
        cost = {"params": 207_876, "size_bytes": size, "latency_ms": {"1": {"p50": 1.25, "p90": 1.5}}}
        return [ArtifactRecord("fp32", str(float_artifact), files, quality, cost, model="vit_micro")]

    monkeypatch.setattr(train, "run_stages", stages)
    overrides = [*FAST, "experiment=demo", "logger=wandb", "logger.log_model=true", "tags=[lab]"]
    cfg = job_config(overrides, tmp_path / "run", cache_dir)  # nothing is trained: no trained models needed
    assert run_job(cfg) == "ok"
    run_dir = Path(cfg.paths.output_dir)
    record = read_record(run_dir)
    run = only_run(run_dir)
    assert run.run.job_type == "train" and list(run.run.tags) == ["lab"]
    # the experiment names the group (a lone run: with its folder)
    assert run.run.run_group == f"demo_{run_dir.parent.name}_{run_dir.name}" == record["wandb"]["group"]
    (a,) = record["artifacts"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "auroc"):
        assert run.summary[f"fp32/{key}"] == a["quality"][key]
    assert (run.summary["fp32/params"], run.summary["fp32/size_bytes"]) == (207_876, a["cost"]["size_bytes"])
    assert run.summary["fp32/latency_p50_ms_b1"] == 1.25 and run.summary["status"] == "ok"
    assert_saved(run, "metrics.json", run_dir / "metrics.json")
    # the W&B copy of the record is not another run to compare
    assert [r["run_dir"] for r in find_records([run_dir])] == [str(run_dir)]
    (model,) = [m for m in run.artifacts if m.type == "model"]
    entries = {e.path: e for e in model.manifest.contents}
    assert sorted(entries) == a["files"] and sum(e.size for e in entries.values()) == a["cost"]["size_bytes"]


@pytest.mark.slow
def test_train_run_logs_its_record_and_models_when_asked(make_cfg):
    cfg = make_cfg("compression=ptq", "logger=wandb", "logger.log_model=true")
    assert run_job(cfg) == "ok"
    run_dir = Path(cfg.paths.output_dir)
    record = read_record(run_dir)
    run = only_run(run_dir)
    assert run.run.job_type == "train"
    assert run.run.run_group == f"train_{run_dir.parent.name}_{run_dir.name}"
    assert record["wandb"]["group"] == run.run.run_group and record["wandb"]["job_type"] == "train"
    assert run.exit_code == 0
    names = [a["name"] for a in record["artifacts"]]
    assert names == ["fp32", "int8_dynamic"]
    for a in record["artifacts"]:
        for key in ("accuracy", "macro_f1", "balanced_accuracy"):
            assert run.summary[f"{a['name']}/{key}"] == a["quality"][key]
        for key in ("params", "size_bytes", "flops"):
            assert run.summary[f"{a['name']}/{key}"] == a["cost"][key]
        assert run.summary[f"{a['name']}/latency_p50_ms_b1"] == a["cost"]["latency_ms"]["1"]["p50"]
    columns, rows = table_rows(run, "artifacts")
    assert [r[columns.index("artifact")] for r in rows] == names
    assert [r[columns.index("accuracy")] for r in rows] == [
        a["quality"]["accuracy"] for a in record["artifacts"]
    ]
    assert_saved(run, "metrics.json", run_dir / "metrics.json")
    # log_model: each artifact's files, every byte, as a model artifact
    models = {m.name: m for m in run.artifacts if m.type == "model"}
    assert sorted(models) == sorted(f"{run.run.run_id}-{n}" for n in names)
    for a in record["artifacts"]:
        entries = {e.path: e for e in models[f"{run.run.run_id}-{a['name']}"].manifest.contents}
        assert sorted(entries) == sorted(a["files"])
        assert sum(e.size for e in entries.values()) == a["cost"]["size_bytes"]
        for name, entry in entries.items():
            md5 = hashlib.md5((Path(a["path"]) / name).read_bytes()).digest()
            assert entry.digest == base64.b64encode(md5).decode()


def test_bench_job_is_tracked_and_uploads_no_model_unless_asked(tmp_path, monkeypatch):
    """The bench entry's wiring, its timing child run in this process (the protocol is the same)."""
    from patholite import bench
    from patholite.measure import timing

    def in_process(directories, image_size, spec, device="cpu", timeout=3600):
        keys = ("batch_sizes", "warmup", "iters", "repeats", "threads")
        return timing._child({"directories": [str(d) for d in directories], "image_size": image_size,
                              "device": device, **{k: spec[k] for k in keys}})  # fmt: skip

    monkeypatch.setattr(bench, "time_artifacts", in_process)
    cfg = job_config([*TINY, "bench.isolation=process", "variants=[fp32,int8_dynamic]", "bench.repeats=1",
                      "bench.batch_sizes=[1]"], tmp_path / "b", tmp_path / "cache", "bench")  # fmt: skip
    assert bench.run_bench(cfg) == "ok"
    record = read_record(tmp_path / "b")
    run = only_run(tmp_path / "b")
    assert run.run.job_type == "bench" and run.run.run_group == f"bench_{tmp_path.name}_b"
    assert run.run.display_name == "bench-vit_micro"
    assert not [m for m in run.artifacts if m.type == "model"]
    assert [a["name"] for a in record["artifacts"]] == ["fp32", "int8_dynamic"]
    for a in record["artifacts"]:
        for key in ("params", "size_bytes", "peak_rss_mb", "flops"):
            assert run.summary[f"{a['name']}/{key}"] == a["cost"][key]
        assert run.summary[f"{a['name']}/latency_p50_ms_b1"] == a["cost"]["latency_ms"]["1"]["p50"]
    columns, rows = table_rows(run, "artifacts")
    sizes = [a["cost"]["size_bytes"] for a in record["artifacts"]]
    assert [r[columns.index("size_bytes")] for r in rows] == sizes
    assert_saved(run, "metrics.json", tmp_path / "b" / "metrics.json")


def test_timing_childs_progress_reaches_the_parent(tmp_path):
    """A child that reports as the timing child does: its lines become the parent's progress, its other
    stderr stays the error text, its stdout the result."""
    console = Console(file=io.StringIO(), force_terminal=False)
    script = (
        "import json, sys\n"
        "for i in range(4):\n"
        f"    print({PROGRESS_PREFIX!r} + json.dumps({{'images': 10}}), file=sys.stderr, flush=True)\n"
        "print('a warning', file=sys.stderr)\n"
        "print(json.dumps({'ok': True}))\n"
    )
    with Progress("timing 2 artifacts", 4, "blocks", rate_of="images", console=console, min_gap_s=0) as p:
        code, stdout, stderr = run_reporting_child([sys.executable, "-c", script], p, timeout=60)
    assert (code, json.loads(stdout), stderr) == (0, {"ok": True}, "a warning\n")
    lines = console.file.getvalue().splitlines()
    assert [int(line.split(": ")[1].split("/")[0]) for line in lines] == [0, 1, 2, 3, 4]
    assert lines[-1].startswith("timing 2 artifacts: 4/4 blocks (100%), 40 images, ")
    assert "images/s" in lines[-1] and "done in" in lines[-1]
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    with pytest.raises(PatholiteError, match="ran past 1 s"), Progress("t", 1, console=console) as p:
        run_reporting_child(slow, p, timeout=1)
    # a garbled progress line is error text, and the lines after it still drain (a dead reader would block
    # the child on a full pipe until the timeout)
    garbled = (
        "import sys\n"
        f"print({PROGRESS_PREFIX!r} + '{{not json', file=sys.stderr)\n"
        "sys.stderr.write('x' * 200000)\n"
        "print('{}')\n"
    )
    with Progress("t", 1, console=console) as p:
        code, stdout, stderr = run_reporting_child([sys.executable, "-c", garbled], p, timeout=30)
    assert code == 0 and stdout.strip() == "{}" and "{not json" in stderr and stderr.count("x") >= 200000


@pytest.mark.slow
def test_no_model_is_uploaded_unless_asked(tmp_path, capsys):
    from patholite.bench import run_bench

    cfg = job_config([*TINY, "bench.isolation=process", "variants=[fp32,int8_dynamic]"], tmp_path / "b",
                     tmp_path / "cache", "bench")  # fmt: skip
    assert run_bench(cfg) == "ok"
    record = read_record(tmp_path / "b")
    run = only_run(tmp_path / "b")
    assert run.run.job_type == "bench" and run.run.run_group == f"bench_{tmp_path.name}_b"
    assert not [m for m in run.artifacts if m.type == "model"]
    for a in record["artifacts"]:
        for key in ("params", "size_bytes", "peak_rss_mb"):
            assert run.summary[f"{a['name']}/{key}"] == a["cost"][key]
        for batch, latency in a["cost"]["latency_ms"].items():
            assert run.summary[f"{a['name']}/latency_p50_ms_b{batch}"] == latency["p50"]
    assert_saved(run, "metrics.json", tmp_path / "b" / "metrics.json")
    # the timing child's progress, shown by the parent as plain lines in a log
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("timing 2 artifacts: ")]
    assert lines[0].startswith("timing 2 artifacts: 0/8 blocks (0%)")
    assert lines[-1].startswith("timing 2 artifacts: 8/8 blocks (100%), 48 images, ")  # (1+3)x(1+2)x2x2
    assert "\r" not in err and "\x1b[" not in err


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = create_network(load_model_option("vit_micro"), len(CLASSES), 32).eval()
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    meta = {"model": {**model, "checkpoint": None}, "class_names": CLASSES, "image_size": 32, **norm,
            "mpp": 2.0, "tile_size": 64}  # fmt: skip
    directory = tmp_path_factory.mktemp("artifact") / "fp32"
    art.save_float_artifact(net, directory, meta)
    return directory


def test_slide_run_logs_calls_plots_and_progress(slides, float_artifact, tmp_path, capsys):
    from patholite.slide import run_slide

    listing = tmp_path / "slides.txt"
    listing.write_text(f"{slides / 'CMU-1-Small-Region.svs'}\n{slides / 'small.svs'}\n")
    overrides = [f"slides={listing}", f"artifact={float_artifact}", "engine.workers=0", "engine.threads=1",
                 "report.thumbnail_px=256"]  # fmt: skip
    out = tmp_path / "run"
    assert run_slide(job_config(overrides, out, tmp_path / "cache", "slide")) == 1  # small.svs fails
    record = read_record(out)
    run = only_run(out)
    assert run.run.job_type == "slide" and run.run.run_group == f"slide_{tmp_path.name}_run"
    assert run.exit_code == 1  # a run with a failed slide is not a success
    (artifact,) = record["artifacts"]
    for key in ("size_bytes", "tiles_per_slide", "seconds_per_slide", "tiles_per_s"):
        assert run.summary[f"fp32/{key}"] == artifact["cost"][key]
    assert (run.summary["slides/ok"], run.summary["slides/failed"]) == (1, 1)
    # the per-slide calls: the summary's rows, as the summary file has them
    columns, rows = table_rows(run, "slides")
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert columns == list(summary[0])
    assert [r[columns.index("status")] for r in rows] == [s["status"] for s in summary] == ["ok", "failed"]
    assert rows[0][columns.index("call")] == summary[0]["call"] in CLASSES
    n_tiles = int(summary[0]["n_tiles"])
    assert rows[0][columns.index("n_tiles")] == n_tiles == artifact["cost"]["tiles_per_slide"]
    assert np.isclose(rows[0][columns.index("confidence")], float(summary[0]["confidence"]))
    assert "tile.size" in rows[1][columns.index("error")]
    # the record and the slide's pictures, as files and as images
    assert_saved(run, "metrics.json", out / "metrics.json")
    for name in ("report", "heatmap"):
        png = out / "CMU-1-Small-Region" / f"{name}.png"
        assert_saved(run, f"CMU-1-Small-Region/{name}.png", png)
        assert_image(run, f"plots/CMU-1-Small-Region/{name}", png)
    # progress over the folder: plain lines in a log, reaching the total
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("slides: ")]
    assert lines[0].startswith("slides: 0/2 slides (0%)")
    assert lines[-1].startswith(f"slides: 2/2 slides (100%), {n_tiles} tiles, 1 failed, ")
    assert "tiles/s" in lines[-1] and "\r" not in err and "\x1b[" not in err


def test_a_sweeps_comparison_is_a_run_in_its_group(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-11-25" / "18-31-00"
    out = sweep / "compare"
    out.mkdir(parents=True)
    columns = ["technique", "artifact", "accuracy", "size_mb"]
    rows = [["none", "fp32", 0.9, 1.1], ["ptq", "int8_dynamic", 0.88, 0.36]]
    files = [out / "compare.csv", out / "compare.md"]
    files[0].write_text(
        "technique,artifact,accuracy,size_mb\nnone,fp32,0.9,1.1\nptq,int8_dynamic,0.88,0.36\n"
    )
    files[1].write_text("# patholite comparison\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot = out / "pareto_accuracy_size.png"
    plt.figure(figsize=(2, 2)).savefig(plot)
    plt.close("all")
    cfg = OmegaConf.create({"task_name": "train", "tags": ["lab"], "logger": {"wandb": {
        "project": "patholite", "entity": None, "mode": "offline", "group": None, "tags": []}}})  # fmt: skip
    folder = log_comparison(cfg, sweep, {"experiment": "demo"}, (columns, rows), files, [plot])
    run = only_run(out)
    assert folder == str(run.folder)
    assert run.run.job_type == "compare" and run.run.run_group == "demo_2026-11-25_18-31-00"
    assert list(run.run.tags) == ["lab"]
    columns, data = table_rows(run, "comparison")
    assert [r[columns.index("artifact")] for r in data] == ["fp32", "int8_dynamic"]
    assert [r[columns.index("accuracy")] for r in data] == [0.9, 0.88]
    assert_image(run, "plots/pareto_accuracy_size", plot)
    assert_saved(run, "compare.csv", files[0])
    assert_saved(run, "pareto_accuracy_size.png", plot)
    cfg.logger.wandb.mode = "disabled"
    assert log_comparison(cfg, sweep, None, (columns, rows), files, [plot]) is None


def test_cache_training_logs_its_epochs(caplog):
    epochs = EpochLog("cache training of vit_micro", total=3)
    with caplog.at_level(logging.INFO, logger="patholite.pipelines.cache"):
        for epoch in range(3):
            epochs.log_metrics({"train/loss": 1.0, "epoch": epoch}, step=epoch * 10)
            val = {"val/macro_f1": 0.5 + 0.1 * epoch, "val/f1/Normal": 0.2, "epoch": epoch}
            epochs.log_metrics(val, step=epoch * 10 + 9)
        epochs.finalize("success")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith(
        "cache training of vit_micro: epoch 1/3 done (val/macro_f1=0.5), elapsed 0:00:"
    )
    assert ", left " in lines[1] and lines[2].startswith(
        "cache training of vit_micro: epoch 3/3 done (val/macro_f1=0.7)"
    )
    assert ", left " not in lines[2]


def test_synthetic_tiles_report_progress(capsys):
    from patholite.data.synthetic.tiles import generate_split

    images, _ = generate_split(3, 16, 0.5, seed=0)
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("synthetic 16-px tiles")
    ]
    assert lines[0].startswith("synthetic 16-px tiles: 0/12 tiles (0%)")
    assert lines[-1].startswith("synthetic 16-px tiles: 12/12 tiles (100%)") and len(images) == 12


def test_bad_wandb_mode_fails_a_bench_job_before_work(tmp_path, capsys):
    from patholite.bench import run_bench

    cfg = job_config([*TINY, "logger.wandb.mode=cloud"], tmp_path / "b", tmp_path / "cache", "bench")
    with pytest.raises(SystemExit) as exit_info:
        run_bench(cfg)
    assert exit_info.value.code == 1
    assert (
        "logger.wandb.mode='cloud': use offline (the default), online or disabled" in capsys.readouterr().err
    )
    assert read_record(tmp_path / "b")["status"] == "failed"
    assert not (tmp_path / "b" / "artifacts").exists()  # nothing was built


def test_synthetic_slides_report_progress(tmp_path, capsys):
    from patholite.data.synthetic.slides import generate_slides
    from patholite.data.synthetic.spec import SlideSpec

    spec = SlideSpec(width=1024, height=768)
    generate_slides(tmp_path, 2, spec, seed=0)
    err = capsys.readouterr().err
    tiles = -(-1024 // spec.tile) * -(-768 // spec.tile)
    for i in range(2):
        rendering = [line for line in err.splitlines() if line.startswith(f"rendering synthetic_000{i}.svs")]
        assert rendering[-1].startswith(
            f"rendering synthetic_000{i}.svs level 0: {tiles}/{tiles} tiles (100%)"
        )
    slides = [line for line in err.splitlines() if line.startswith(f"synthetic slides in {tmp_path}")]
    assert slides[0].startswith(f"synthetic slides in {tmp_path}: 0/2 slides (0%)")
    assert slides[-1].startswith(f"synthetic slides in {tmp_path}: 2/2 slides (100%)")


def test_a_wandb_failure_after_the_work_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    from patholite import tracking
    from patholite.records import RunRecord

    class BrokenRun:
        class summary:  # noqa: N801
            @staticmethod
            def update(values):
                raise OSError("disk full in the W&B run folder")

    monkeypatch.setattr(tracking, "wandb_run", lambda loggers: BrokenRun())
    record = RunRecord(run_dir=str(tmp_path / "run"), config={})
    record.finish("ok")
    with caplog.at_level("WARNING", logger="patholite.tracking"):
        tracking.log_record([], record)  # the job's work is done: no exception
    assert "disk full" in caplog.text and str(record.path) in caplog.text
