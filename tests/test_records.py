"""The run record's schema is versioned: records written by older patholite still read, in today's shape."""

from __future__ import annotations

import json

import pytest

from patholite.measure.compare import compare, find_records
from patholite.records import SCHEMA_VERSION, ArtifactRecord, RunRecord, read_record

RATIO = {"1": {"median": 0.8, "min": 0.7, "max": 0.9, "per_repeat": [0.8, 0.7, 0.9]}}


def v1_bench_record(run_dir) -> dict:
    """A benchmark record as patholite wrote it at schema version 1: timing ratios beside the costs."""
    cost = {"params": 10, "flops": 20, "size_bytes": 30, "latency_ms": {"1": {"p50": 2.0, "p90": 2.5}},
            "throughput_ips": {"1": 500.0}, "peak_rss_mb": 100.0, "device": "cpu", "threads": 2,
            "sync": "none (CPU is synchronous)", "baseline": "fp32", "energy_j_per_image": None,
            "energy_source": None, "energy_absent_reason": "no RAPL", "protocol": {"warmup": 1}}  # fmt: skip
    return {
        "schema_version": 1,
        "status": "ok",
        "run_dir": str(run_dir),
        "config": {"compression": {"name": "bench"}, "model": {"name": "deit_tiny"}, "task_name": "bench"},
        "job": {},
        "artifacts": [
            {"name": "fp32", "path": "/x/fp32", "files": [], "quality": {}, "source": None,
             "cost": {**cost, "ratio_to_baseline": {"1": {"median": 1.0, "min": 1.0, "max": 1.0,
                                                          "per_repeat": [1.0]}}}},
            {"name": "int8_dynamic", "path": "/x/int8_dynamic", "files": [], "quality": {}, "source": "fp32",
             "cost": {**cost, "ratio_to_baseline": RATIO}},
        ],
    }  # fmt: skip


def test_a_version_1_benchmark_record_reads_with_its_ratios_in_the_timing_block(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(v1_bench_record(tmp_path)))
    record = read_record(tmp_path)
    assert record["schema_version"] == SCHEMA_VERSION == 2 and record["entry"] == "bench"
    int8 = record["artifacts"][1]["cost"]
    assert "ratio_to_baseline" not in int8 and "sync" not in int8
    assert int8["timing"]["ratio_to_baseline"] == RATIO
    assert int8["timing"]["baseline"] == "fp32" and int8["timing"]["method"] == "child_alternating"
    assert int8["timing"]["energy_absent_reason"] == "no RAPL"
    assert int8["timing"]["timed_with"] == ["fp32", "int8_dynamic"]
    assert int8["latency_ms"] == {"1": {"p50": 2.0, "p90": 2.5}}  # the rest untouched


def test_a_version_1_training_record_reads_unchanged_but_for_its_entry(tmp_path):
    timing = {"method": "child_alternating", "baseline": "fp32", "ratio_to_baseline": RATIO}
    old = {"schema_version": 1, "status": "ok", "run_dir": str(tmp_path), "config": {"task_name": "train"},
           "artifacts": [{"name": "fp32", "path": "/x", "files": [], "quality": {"accuracy": 0.5},
                          "cost": {"timing": timing}}]}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    record = read_record(tmp_path)
    assert record["entry"] == "train" and record["artifacts"][0]["cost"]["timing"] == timing


def test_old_and_new_records_compare_in_one_table(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps(v1_bench_record(old)))
    new = RunRecord(run_dir=str(tmp_path / "new"), config={"compression": {"name": "bench"}}, entry="bench")
    new.artifacts = [ArtifactRecord("fp32", "/y", [], {}, {"size_bytes": 30, "latency_ms": {}})]
    new.finish("ok")
    rows = compare(find_records([old, tmp_path / "new"])).rows
    assert len(rows) == 3


def test_a_record_from_a_newer_patholite_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="newer than this patholite reads"):
        read_record(tmp_path)


def test_an_unknown_entry_is_refused_when_written(tmp_path):
    with pytest.raises(ValueError, match="entry 'serve'"):
        RunRecord(run_dir=str(tmp_path), config={}, entry="serve").write()
