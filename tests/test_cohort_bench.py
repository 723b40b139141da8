"""The cohort benchmark's pure logic (``patholite.slides.cohort_bench``): the command and environment of a
shard, the rotation and ratios, the summary comparison, the folder census of a killed shard, and the
10,000-slide arithmetic. Nothing here spawns a process."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import pytest

from patholite.slides import cohort_bench as cb


def _summary(path: Path, rows: list[dict]) -> Path:
    columns = ["slide", "status", "error", "call", "confidence", "call_share", "frac_Normal", "frac_Invasive",
               "n_tiles", "tiles_per_s", "seconds"]  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


ROWS = [
    {"slide": "/s/a.svs", "status": "ok", "call": "Invasive", "confidence": "0.61", "call_share": "0.2",
     "frac_Normal": "0.8", "frac_Invasive": "0.2", "n_tiles": "100", "tiles_per_s": "50.0", "seconds": "2.0"},
    {"slide": "/s/b.svs", "status": "ok", "call": "Normal", "confidence": "0.9", "call_share": "1.0",
     "frac_Normal": "1.0", "frac_Invasive": "0.0", "n_tiles": "80", "tiles_per_s": "40.0", "seconds": "2.0"},
]  # fmt: skip


def test_pinned_env_pins_every_pool_and_puts_src_first(tmp_path):
    env = cb.pinned_env(1, base={"PYTHONPATH": "/other", "OMP_NUM_THREADS": "8"}, src=tmp_path)
    assert all(env[v] == "1" for v in cb.THREAD_VARS)
    assert "OPENCV_FOR_THREADS_NUM" in cb.THREAD_VARS  # OpenCV's pool, which the engine does not set
    assert env["PYTHONPATH"].split(":") == [str(tmp_path.resolve()), "/other"]


def test_cohort_command_sweeps_the_shards_or_runs_one_job(tmp_path):
    sweep = cb.cohort_command(
        tmp_path / "s", tmp_path / "a", tmp_path / "o", tmp_path / "r", tmp_path / "c", 4
    )
    assert sweep[1:4] == ["-m", "patholite.slide", "-m"]
    assert "shard=0,1,2,3" in sweep and "shards=4" in sweep and "hydra/launcher=submitit_local" in sweep
    assert {"engine.workers=0", "engine.threads=1", f"hydra.sweep.dir={tmp_path / 'r'}"} <= set(sweep)
    one = cb.cohort_command(tmp_path / "s", tmp_path / "a", tmp_path / "o", tmp_path / "r", tmp_path / "c", 1,
                            launcher=None)  # fmt: skip
    assert "-m" not in one[2:] and "shard=0" in one and f"hydra.run.dir={tmp_path / 'r'}" in one


def test_rotation_puts_each_config_first_once():
    orders = [cb.rotation([1, 2, 4], rep) for rep in range(3)]
    assert orders == [[1, 2, 4], [2, 4, 1], [4, 1, 2]]
    assert cb.rotation([1, 2, 4], 3) == [1, 2, 4]


def test_ratio_summary_pairs_repeats_with_the_base():
    ratios = cb.ratio_summary({1: [100.0, 200.0, 100.0], 2: [190.0, 360.0, 150.0]})
    assert ratios[1] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert ratios[2]["median"] == pytest.approx(1.8)
    assert ratios[2]["min"] == pytest.approx(1.5) and ratios[2]["max"] == pytest.approx(1.9)
    with pytest.raises(ValueError, match="base configuration 1"):
        cb.ratio_summary({2: [1.0]})
    with pytest.raises(ValueError, match="repeats"):
        cb.ratio_summary({1: [1.0, 2.0], 2: [1.0]})


def test_scaling_summary_separates_start_up_from_slides():
    def run(shards, wall, slide_s, starts, durations):
        jobs = [{"shard": i, "start_after_launch_s": s, "duration_s": d}
                for i, (s, d) in enumerate(zip(starts, durations, strict=True))]  # fmt: skip
        return cb.CohortRun(shards, wall, 12, "x", jobs, slide_s)

    runs = {
        1: [run(1, 110.0, [90.0], [10.0], [95.0])],
        2: [run(2, 62.0, [44.0, 46.0], [10.0, 11.0], [48.0, 50.0])],
    }
    s = cb.scaling_summary(runs, cores=2)
    assert s["ratios"][2]["median"] == pytest.approx(110 / 62)
    assert s["processing_ratios"][2]["median"] == pytest.approx(90 / 46)
    row = s["configs"][2]
    assert row["start_s_median"] == 10.0 and row["last_start_s_median"] == 11.0
    assert row["in_job_s_median"] == pytest.approx(50 - 46)  # the last job (shard 1) outside its slides
    assert row["tail_s_median"] == pytest.approx(62 - 61)
    assert runs[2][0].overhead_s == pytest.approx(62 - 46)
    assert s["note"] == ""
    assert "4 shards on 2 cores" in cb.scaling_summary({1: runs[1], 4: runs[1]}, cores=2)["note"]


def test_compare_summaries_ignores_timings_and_names_a_changed_call(tmp_path):
    a = _summary(tmp_path / "a.csv", ROWS)
    slower = [{**r, "tiles_per_s": "1.0", "seconds": "99"} for r in ROWS]
    b = _summary(tmp_path / "b.csv", slower)
    same = cb.compare_summaries({"1 shard": a, "2 shards": b})
    assert same["identical"] and same["slides"] == 2
    assert "seconds" not in same["columns"] and "frac_Invasive" in same["columns"]
    changed = [ROWS[0], {**ROWS[1], "call": "Invasive"}]
    c = _summary(tmp_path / "c.csv", changed)
    diff = cb.compare_summaries({"1 shard": a, "4 shards": c})
    assert not diff["identical"]
    assert diff["differences"] == [{"label": "4 shards", "slide": "/s/b.svs", "column": "call",
                                    "reference": "Normal", "value": "Invasive"}]  # fmt: skip
    missing = cb.compare_summaries({"1 shard": a, "rerun": _summary(tmp_path / "d.csv", ROWS[:1])})
    assert not missing["identical"] and "1 rows" in missing["differences"][0]["what"]


def test_folder_states_counts_complete_failed_incomplete_and_work_folders(tmp_path):
    layout = {"a": ["report.json"], "b": ["failed.json"], "c": ["tiles.csv"],
              ".d.partial-host-12": ["tiles.csv"], ".cohort": ["shard-0-of-1.json"]}  # fmt: skip
    for name, files in layout.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
    states = cb.folder_states(tmp_path)
    assert states == {"complete": ["a"], "failed": ["b"], "incomplete": ["c"],
                      "work_folders": [".d.partial-host-12"]}  # fmt: skip
    assert cb._killable(states, 1) and not cb._killable(states, 2)
    assert cb.folder_states(tmp_path / "absent")["complete"] == []


def test_slide_walls_from_the_cohort_loops_log_lines():
    log = (
        "[2026-12-07 20:33:28,900][patholite.slides.cohort][INFO] - slide /s/a.svs\n"
        "[2026-12-07 20:33:30,100][patholite.wsi.tissue][INFO] - tissue of slide /s/a.svs: 35.6%\n"
        "[2026-12-07 20:33:31,400][patholite.slides.cohort][INFO] - slide /s/b.svs\n"
        "[2026-12-07 20:33:37,326][submitit][INFO] - Job completed successfully\n"
    )
    end = dt.datetime(2026, 12, 7, 20, 33, 34, 400000).astimezone().isoformat()  # the record's, local
    assert cb.slide_walls(log, end) == {"/s/a.svs": pytest.approx(2.5), "/s/b.svs": pytest.approx(3.0)}
    assert cb.slide_walls("", end) == {}


def test_report_costs_splits_the_cli_timings_per_tile(tmp_path):
    walls = {}
    for row, tiles in zip(ROWS, (100, 80), strict=True):
        folder = tmp_path / Path(row["slide"]).stem
        folder.mkdir()
        timings = {"tiles": tiles, "load_busy_s": tiles * 0.002, "process_s": tiles * 0.001, "total": 1.5,
                   "tissue_s": 0.4, "tiling_s": 0.1}  # fmt: skip
        report = {"slide": row["slide"], "seconds": 1.5, "timings": timings}
        (folder / "report.json").write_text(json.dumps(report))
        walls[row["slide"]] = 2.0  # 0.5 s of outputs after the engine
    costs = cb.report_costs(tmp_path, walls)
    assert costs["read_s_per_tile"] == pytest.approx(0.002)
    assert costs["model_s_per_tile"] == pytest.approx(0.001)
    assert costs["outputs_s_per_tile"] == pytest.approx(1.0 / 180)
    assert costs["tissue_s_per_slide"] == pytest.approx(0.5) and costs["slide_s_median"] == 2.0
    with pytest.raises(ValueError, match="walls lack"):
        cb.report_costs(tmp_path, {"/s/a.svs": 2.0})


def test_read_level_is_the_coarsest_level_at_least_as_fine():
    assert cb.read_level(0.5, [0.25, 1.0, 4.0]) == 0.25
    assert cb.read_level(1.33, [0.25, 1.0, 4.0]) == 1.0
    assert cb.read_level(1.0, [0.25, 1.0, 4.0]) == 1.0
    assert cb.read_level(0.1, [0.25, 1.0]) == 0.25  # finer than the scan: the finest level, upsampled


def test_estimate_writes_out_its_arithmetic():
    costs = cb.ModelCosts(
        name="m", tile_um=100.0, mpp=0.5, read_s_per_tile=0.001, measured_decoded_side=200.0,
        model_s_per_tile={"float": 0.004, "int8": 0.002}, outputs_s_per_tile=0.0005,
        tissue_s_per_slide=1.0, startup_s=20.0,
    )  # fmt: skip
    a = cb.CohortAssumptions(slides=1000, width_px=40_000, height_px=20_000, mpp=0.25, tissue_share=0.5,
                             cores_per_node=8, nodes=(1, 100))  # fmt: skip
    est = cb.estimate_cohort(costs, a)
    # 10,000 x 5,000 um in 100-um tiles: 100 x 50 = 5,000, half tissue
    assert est["tiles_per_slide"] == 2500
    # 0.5 um/px from a 0.25 um/px level: 400 px per side against 200 measured, four times the pixels
    assert est["read_ms_per_tile"] == pytest.approx(4.0)
    fp = est["precisions"]["float"]
    slide_s = 1.0 + 2500 * (0.004 + 0.004 + 0.0005)
    assert fp["slide_s"] == pytest.approx(slide_s)
    assert fp["core_hours"] == pytest.approx(1000 * slide_s / 3600)
    one = fp["nodes"][1]
    assert one["shards"] == 8 and one["slides_per_shard"] == 125
    assert one["wall_h"] == pytest.approx((125 * slide_s + 20.0) / 3600)
    # 800 shards, each reading 2,500 tiles of 400^2 px at 0.3 bytes per slide-second
    many = fp["nodes"][100]
    assert many["slides_per_shard"] == 2
    assert many["read_gb_s"] == pytest.approx(800 * 2500 * 400**2 * 0.3 / slide_s / 1e9)
    assert many["filesystem_bound"] == (many["read_gb_s"] > a.filesystem_gb_s)
    assert est["precisions"]["int8"]["slide_s"] < slide_s
    text = "\n".join(est["arithmetic"])
    assert "100.0 x 50.0 = 5,000" in text and "2,500 tiles per slide" in text and "(400/200)^2" in text
    assert f"{fp['core_hours']:,.1f} core-hours" in text


def test_results_markdown_has_the_section_and_every_number():
    costs = cb.ModelCosts("m", 100.0, 0.5, 0.001, 200.0, {"float": 0.004, "int8": 0.002}, 0.0005, 1.0, 20.0)
    est = {**cb.estimate_cohort(costs, cb.CohortAssumptions()), "source": "test"}
    run = cb.CohortRun(
        1, 100.0, 12, "x", [{"shard": 0, "start_after_launch_s": 10.0, "duration_s": 85.0}], [80.0]
    )
    run2 = cb.CohortRun(2, 55.0, 12, "x", [{"shard": 0, "start_after_launch_s": 10.0, "duration_s": 44.0},
                                          {"shard": 1, "start_after_launch_s": 10.5, "duration_s": 43.0}],
                        [40.0, 39.0])  # fmt: skip
    kill = {"slides": 12, "killed_after_s": 30.0, "killed_with_complete": 4,
            "after_kill": {"complete": 4, "failed": 0, "incomplete": 0, "work_folders": 1},
            "rerun_skipped_line": "skipped 4 slides already complete", "rerun_processed": 8,
            "after_rerun": {"complete": 12, "failed": 0, "incomplete": 0, "work_folders": 0},
            "all_complete_after_rerun": True}  # fmt: skip
    report = {
        "date": "2026-12-07", "cpu": {"model": "CPU", "cores": 2, "features": ["avx2"]},
        "setup": {"command": "python scripts/bench_cohort.py", "slides": 12, "slide_px": 16384, "repeats": 1,
                  "artifact_desc": "vit_micro"},
        "scaling": cb.scaling_summary({1: [run], 2: [run2]}, cores=2),
        "summaries": {"identical": True, "compared": ["1 shard", "2 shards"], "slides": 12,
                      "columns": ["call"]},
        "kill_rerun": kill, "estimates": [est],
    }  # fmt: skip
    md = cb.results_markdown(report)
    assert md.startswith("## Cohorts in shards (issue 17, `scripts/bench_cohort.py`)")
    assert "**1.82x**" in md and "missed" not in md.split("Scaling.")[1].split("\n")[0]
    assert "skipped 4 slides already complete" in md and "every slide complete: yes" in md
    assert "| m | float |" in md and not math.isnan(est["precisions"]["float"]["slide_s"])
