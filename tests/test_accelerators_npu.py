"""The Ascend NPU path (in its own process: see npu_fake_checks.py) and the CPU INT8 engine choice."""

from __future__ import annotations

import re
import subprocess
import sys

from omegaconf import OmegaConf

from patholite.accelerators import resolve_accelerator
from patholite.config.schema import AcceleratorConfig

from .conftest import REPO


def test_npu_path_against_a_fake_torch_npu_in_its_own_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/npu_fake_checks.py"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 7, result.stdout[-2000:]


def test_cpu_int8_engine_follows_the_cpu():
    from patholite.accelerators.resolve import default_int8_engine

    assert default_int8_engine("x86_64") == "x86"
    assert default_int8_engine("aarch64") == "qnnpack" and default_int8_engine("arm64") == "qnnpack"
    cfg = OmegaConf.merge(OmegaConf.structured(AcceleratorConfig), {"name": "cpu", "int8_engine": "auto"})
    assert resolve_accelerator(cfg).int8_engine == default_int8_engine()
