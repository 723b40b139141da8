"""A few minutes on a CUDA machine: do patholite's GPU paths run, and do their records say where they ran?

    .venv/bin/python scripts/gpu_check.py [--slide <file>] [--out <dir>] [--timeout 600] [--dry-run]

Each check runs one of patholite's own commands in a fresh process and reads the run record it writes:
- train_gpu: ``vit_micro`` for a few steps (``debug=fast``) with ``accelerator=gpu`` (bf16-mixed where the
  GPU supports it); its fp32 artifact evaluated and timed on cuda.
- train_gpu_ddp: the same with ``accelerator=gpu_ddp`` (DDP over every GPU), only with more than one GPU.
- slide_cuda: the slide engine with ``engine.device=cuda`` over a real slide (``--slide``: any slide
  OpenSlide reads, e.g. OpenSlide's public test slide CMU-1-Small-Region.svs; by default that slide from the
  test fixtures folder, ``$PATHOLITE_SHARED/data/slides`` or ``../shared/data/slides`` beside the
  checkout, when present) with train_gpu's fp32 artifact.
- bench_fp32: ``patholite.bench`` of ``vit_micro`` at 224 px with ``accelerator=gpu``, fp32 and dynamic
  INT8: fp32 timed on cuda, INT8 on the CPU (torch.ao has no CUDA kernels), each record saying so.
- bench_bf16: a bf16 bench variant, where ``patholite.bench`` has one (otherwise SKIP, saying so).

Prints one line per check, ``PASS|FAIL|SKIP <check> <seconds> <detail>``, and exits 1 if any check failed.
Without CUDA every check is skipped (exit 0). Each check's output is kept in ``<out>/<check>.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# the test fixtures' folder, found as the tests find it (tests/conftest.shared_dir)
CMU_SLIDE = (
    Path(os.environ.get("PATHOLITE_SHARED") or REPO.parent / "shared") / "data/slides/CMU-1-Small-Region.svs"
)
QUIET = ["logger=none"]


@dataclass
class Check:
    """One check: a patholite command (``python -m <args>``) and what its record must show (``verify``
    raises AssertionError naming what is wrong, or returns the line's detail); ``skip``: why it does not
    run here; ``needs``: a check that must pass first (whose output it uses)."""

    name: str
    command: list[str]
    run_dir: Path
    verify: Callable[[dict[str, Any]], str]
    skip: str | None = None
    needs: str | None = None


def _record(run_dir: Path) -> dict[str, Any]:
    from patholite.records import read_record

    record = read_record(run_dir)
    assert record["status"] == "ok", f"the run's status is {record['status']}: {record.get('error')}"
    return record


def _artifact(record: dict[str, Any], name: str) -> dict[str, Any]:
    found = [a for a in record["artifacts"] if a["name"] == name]
    assert found, f"no {name} artifact in the record ({[a['name'] for a in record['artifacts']]})"
    return found[0]


def verify_train(record: dict[str, Any]) -> str:
    device = record["device"]
    fp32 = _artifact(record, "fp32")
    assert str(fp32["cost"]["device"]).startswith("cuda"), f"fp32 timed on {fp32['cost']['device']}"
    accuracy = fp32["quality"].get("accuracy")
    where = f"{device.get('gpu', '?')}, {device.get('world_size')} process(es)"
    return f"{where}, {device.get('precision')}, fp32 on {fp32['cost']['device']}, accuracy {accuracy}"


def verify_slide(record: dict[str, Any]) -> str:
    (artifact,) = record["artifacts"]
    cost = artifact["cost"]
    assert cost["device"].startswith("cuda"), f"the engine ran on {cost['device']}"
    assert cost.get("tiles_per_slide"), "no tiles were classified"
    return (
        f"{cost['tiles_per_slide']:.0f} tiles at {cost.get('tiles_per_s', 0):.1f} tiles/s on {cost['device']}"
    )


def verify_bench(record: dict[str, Any]) -> str:
    fp32, int8 = _artifact(record, "fp32")["cost"], _artifact(record, "int8_dynamic")["cost"]
    assert fp32["device"].startswith("cuda"), f"fp32 timed on {fp32['device']}, not the GPU"
    assert int8["device"] == "cpu", f"INT8 recorded on {int8['device']}; torch.ao INT8 runs on the CPU"
    batch = max(fp32["latency_ms"], key=int)
    return (
        f"fp32 b{batch} {fp32['latency_ms'][batch]['p50']:.2f} ms on {fp32['device']}; "
        f"int8_dynamic {int8['latency_ms'][batch]['p50']:.2f} ms on cpu"
    )


def verify_bench_variants(record: dict[str, Any]) -> str:
    parts = [f"{a['name']} on {a['cost']['device']}" for a in record["artifacts"]]
    return ", ".join(parts)


def plan(gpus: int, slide: Path | None, out: Path) -> list[Check]:
    """The checks for a machine with ``gpus`` CUDA devices, and for each why it is skipped (None: it runs)."""
    from patholite.bench import VARIANTS

    def run(name: str) -> Path:
        return out / name

    train = ["patholite.train", "debug=fast", "model=vit_micro", *QUIET]
    bench = ["patholite.bench", "model=vit_micro", "model.num_classes=7", "image_size=224", *QUIET]
    bf16 = [v for v in VARIANTS if "bf16" in v]
    checks = [
        Check("train_gpu", [*train, "accelerator=gpu"], run("train_gpu"), verify_train),
        Check(
            "train_gpu_ddp",
            [*train, "accelerator=gpu_ddp"],
            run("train_gpu_ddp"),
            verify_train,
            skip=None if gpus > 1 else f"needs more than one GPU (found {gpus})",
        ),
        Check(
            "slide_cuda",
            [
                "patholite.slide",
                f"slide={slide}",
                f"artifact={run('train_gpu')}",
                "artifact_name=fp32",
                "engine.device=cuda",
                "tile.mpp=0.5",
                *QUIET,
            ],
            run("slide_cuda"),
            verify_slide,
            skip=None if slide is not None and slide.is_file() else f"no slide ({slide}): give --slide",
            needs="train_gpu",
        ),
        Check(
            "bench_fp32",
            [*bench, "accelerator=gpu", "variants=[fp32,int8_dynamic]"],
            run("bench_fp32"),
            verify_bench,
        ),
        Check(
            "bench_bf16",
            [*bench, "accelerator=gpu", f"variants=[fp32,{','.join(bf16)}]"],
            run("bench_bf16"),
            verify_bench_variants,
            skip=None
            if bf16
            else f"patholite.bench has no bf16 variant ({list(VARIANTS)}) and its timing runs fp32 whatever "
            "accelerator.precision says; train_gpu covers bf16-mixed training",
        ),
    ]
    for check in checks:
        check.command = [*check.command, f"hydra.run.dir={check.run_dir}"]
        if gpus == 0:
            check.skip = "no CUDA: torch sees no GPU on this machine"
    return checks


def run_check(check: Check, timeout: int) -> tuple[str, str]:
    """Run one check's command; ("PASS" | "FAIL", detail). Its stdout and stderr go to ``<check>.log``."""
    command = [sys.executable, "-m", *check.command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "FAIL", f"still running after {timeout} s (--timeout)"
    log = check.run_dir.parent / f"{check.name}.log"
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        last = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return "FAIL", f"exit {result.returncode}: {last[-1] if last else ''} (log: {log})"
    try:
        return "PASS", check.verify(_record(check.run_dir))
    except (AssertionError, KeyError, TypeError, ValueError, OSError) as err:
        return "FAIL", f"{type(err).__name__}: {err} (log: {log})"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = CMU_SLIDE if CMU_SLIDE.is_file() else None
    parser.add_argument("--slide", type=Path, default=default, help=f"a slide file (default {default})")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a new temp dir)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per check")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    out = (args.out or Path(tempfile.mkdtemp(prefix="patholite-gpu-check-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for check in plan(torch.cuda.device_count(), args.slide, out):
        start = time.perf_counter()
        if check.skip is None and check.needs and status.get(check.needs) != "PASS" and not args.dry_run:
            check.skip = f"needs {check.needs}, which did not pass"
        if check.skip is not None:
            outcome, detail = "SKIP", check.skip
        elif args.dry_run:
            outcome, detail = "SKIP", f"dry run: python -m {' '.join(check.command)}"
        else:
            outcome, detail = run_check(check, args.timeout)
        status[check.name] = outcome
        print(f"{outcome} {check.name} {time.perf_counter() - start:.1f} {detail}", flush=True)
    return 1 if "FAIL" in status.values() else 0


if __name__ == "__main__":
    raise SystemExit(main())
