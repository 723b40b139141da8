"""A technique is a plug-in: its yaml, its schema, its transform and its stage file are all it takes.

The test copies the package and the configs, adds the four files of a technique that only renames its input
(``tests/plugin/``) where ``docs/ARCHITECTURE.md`` says a technique's files go, and runs it as a user would.
Nothing else is edited: no registry, no list of stage or artifact names, no check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PLUGIN = Path(__file__).parent / "plugin"
# file of tests/plugin -> where ARCHITECTURE.md says a technique's file of that kind goes (<x>: rename)
FILES = {
    "rename.yaml": "conf/compression/rename.yaml",
    "schema_rename.py": "src/patholite/config/compression/rename.py",
    "compress_rename.py": "src/patholite/compress/rename.py",
    "stage_rename.py": "src/patholite/pipelines/stages/rename.py",
}


def test_architecture_lists_these_files_as_a_technique(tmp_path):
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("### Add a technique", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"`((?:conf|src|tests)/[^`]*<x>[^`]*)`", section))
    assert listed == {p.replace("rename", "<x>") for p in FILES.values()} | {"tests/test_<x>.py"}


def _copy_with_plugin(root: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", root / "src", ignore=ignore)
    shutil.copytree(REPO / "conf", root / "conf", ignore=ignore)
    for name, target in FILES.items():
        assert not (root / target).exists(), f"{target} exists already: the plug-in must add, not edit"
        shutil.copy(PLUGIN / name, root / target)
    return root


def _train(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PATHOLITE_ROOT": str(root)}
    args = ["compression=rename", "debug=fast", "model=vit_micro", "logger=csv", *overrides]
    return subprocess.run(
        [sys.executable, "-m", "patholite.train", *args, f"hydra.run.dir={root / 'run'}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # 22 s: make test stays under its 8 minutes
def test_a_technique_added_as_four_files_runs_and_records_its_artifact(tmp_path):
    root = _copy_with_plugin(tmp_path / "tree")
    bad = _train(root, "compression.rename.copies=0")  # its own check, before any work
    assert bad.returncode == 1 and "compression.rename.copies=0 must be >= 1" in bad.stderr
    assert not (root / "outputs" / "cache" / "trained").exists()
    done = _train(root)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((root / "run" / "metrics.json").read_text())
    assert [a["name"] for a in record["artifacts"]] == ["fp32", "renamed"]
    renamed = record["artifacts"][1]
    assert renamed["source"] == "fp32" and renamed["parity"]["flip_rate"] == 0.0
    assert renamed["parity"]["max_abs_logit_diff"] == 0.0
    assert renamed["quality"]["accuracy"] == record["artifacts"][0]["quality"]["accuracy"]
